"""lm-evaluation-harness tasks on a loopnn model, through lm-eval's own HF model class (`loopnn eval --tasks`).

    results = run_tasks("runs/x", ["lambada_openai"], n_loops=4)   # a run, a checkpoint or an export directory

A run or checkpoint is first exported (`export_hf`, into a temporary directory) and read back the way any user
of the export reads it: AutoModelForCausalLM + AutoTokenizer. lm-eval's `HFLM` then scores it exactly as it
scores any HF causal LM; the loop count is the config's `inference_n_loops`. lm-eval is optional
(`pip install loopnn[eval]`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from loopnn.errors import LoopnnError


def require_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise LoopnnError(f"--tasks needs lm-eval ({e}); pip install 'loopnn[eval]'") from None
    return lm_eval, HFLM


def load_export(path: str | Path, n_loops: int | None, device: str):
    """(model, tokenizer) of an HF export directory, as a user of the export loads them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import loopnn.hf  # noqa: F401  (model_type "loopnn" for the Auto classes)

    path = Path(path)
    if not (path / "tokenizer_config.json").is_file():
        raise LoopnnError(f"{path} holds no tokenizer; re-export it with this loopnn (`loopnn export RUN`)")
    model = AutoModelForCausalLM.from_pretrained(path)
    if n_loops is not None:
        if getattr(model.config, "model_type", None) != "loopnn":
            raise LoopnnError(f"{path} is a plain GPT-2 (an unrolled export): its loop count is fixed; drop --n-loops")
        model.config.inference_n_loops = n_loops
    return model.to(device).eval(), AutoTokenizer.from_pretrained(path)


def run_tasks(
    source: str | Path,
    tasks: list[str],
    *,
    n_loops: int | None = None,
    batch_size: int = 1,
    num_fewshot: int | None = None,
    limit: float | None = None,
    include_path: str | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """lm_eval.simple_evaluate's results for `tasks` on a run, checkpoint or export directory."""
    lm_eval, HFLM = require_lm_eval()
    from lm_eval.tasks import TaskManager

    source = Path(source)
    if include_path is not None and not Path(include_path).is_dir():
        raise LoopnnError(f"--include-path {include_path} is not a directory of task YAML files")
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    known = getattr(manager, "all_tasks", None)  # lm-eval's names: tasks, groups and tags
    unknown = [t for t in tasks if known is not None and t not in known]
    if unknown:
        raise LoopnnError(f"unknown lm-eval task(s) {', '.join(unknown)}; `lm-eval --tasks list` lists them")
    with tempfile.TemporaryDirectory(prefix="loopnn-eval-") as tmp:
        from loopnn.runs import is_hf_directory

        if not is_hf_directory(source):  # a run or a checkpoint
            from loopnn.hf.convert import export_hf

            source = export_hf(source, Path(tmp) / "export")
        model, tokenizer = load_export(source, n_loops, device)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, backend="causal")
        return lm_eval.simple_evaluate(
            model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager
        )
