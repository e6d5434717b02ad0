"""`loopnn export`: model card, tokenizer files for every loopnn tokenizer, AutoTokenizer + pipeline in a process
that never imports loopnn's training code, and `loopnn eval --tasks` through lm-eval's HF model class."""

import json
import subprocess
import sys
import types

import pytest
import torch

pytest.importorskip("transformers")

import loopnn.hf as lh  # noqa: E402
from loopnn import LoopGPT, ModelConfig, preset  # noqa: E402
from loopnn.checkpoint import save_checkpoint  # noqa: E402
from loopnn.cli import main  # noqa: E402
from loopnn.hf.tokenizer import CHECK_TEXT  # noqa: E402
from loopnn.runs import open_run  # noqa: E402
from loopnn.tokenizer import EOT, get_tokenizer, train_bpe  # noqa: E402

TEXT = CHECK_TEXT + EOT + " and after the end"


def make_run(tmp_path, tokenizer: str, step: int = 7, val_loss: float | None = 3.21, **model):
    """A run directory as train.py leaves it (checkpoint, config.json, metrics.jsonl, tokenizer.json for bpe),
    with a random tiny model: the export reads only these files."""
    run, data = tmp_path / "run", tmp_path / "data"
    run.mkdir(parents=True)
    data.mkdir(parents=True)
    if tokenizer == "bpe":
        bpe = train_bpe([CHECK_TEXT * 20, "def f(x):\n    return x + 1\n" * 50], 300, data / "tokenizer.json")
        (run / "tokenizer.json").write_bytes((data / "tokenizer.json").read_bytes())
        vocab = bpe.vocab_size
    else:
        vocab = get_tokenizer(tokenizer).vocab_size
    torch.manual_seed(0)
    cfg = ModelConfig(**(preset("debug") | dict(vocab_size=vocab) | model))
    data_meta = {"source": "unit-corpus", "tokenizer": tokenizer, "vocab_size": vocab, "train_tokens": 1234}
    (run / "config.json").write_text(json.dumps({"data": data_meta | {"val_tokens": 99}}))
    if val_loss is not None:
        record = {"step": step, "kind": "eval", "val_loss": val_loss, "val_bits_per_byte": 1.5, "val_tokens": 512}
        (run / "metrics.jsonl").write_text(json.dumps({"step": step, "kind": "train", "loss": 9.0}) + "\n")
        (run / "metrics.jsonl").open("a").write(json.dumps(record) + "\n")
    info = {"data": {"dir": str(data), "tokenizer": tokenizer, "vocab_size": vocab}, "tokens": 4096}
    save_checkpoint(run, step, LoopGPT(cfg), cfg, {"lr": 1e-3, "batch_size": 4, "grad_accum": 1}, info=info)
    return run


@pytest.mark.parametrize("name", ["bytes", "bpe", "gpt2"])
def test_export_writes_a_tokenizer_autotokenizer_reads_with_loopnns_ids(tmp_path, name):
    from transformers import AutoTokenizer

    run = make_run(tmp_path, name)
    assert main(["export", str(run), "--out-dir", str(tmp_path / "hf")]) == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    own = get_tokenizer(name, run)
    text = TEXT if name != "bytes" else CHECK_TEXT  # bytes has no end-of-text token: EOT is just text there
    assert tok.encode(text, add_special_tokens=False) == own.encode(text)
    assert tok.decode(own.encode(text)) == own.decode(own.encode(text))
    assert tok.eos_token_id == own.eot_id
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["eos_token_id"] == own.eot_id


def test_model_card_says_what_the_run_measured(tmp_path):
    run = make_run(tmp_path, "bytes", step=7, val_loss=3.21, n_loops=3, residual_scale="inverse")
    lh.export_hf(run, tmp_path / "hf")
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "Validation loss 3.2100" in card and "step 7" in card and "512 tokens" in card
    assert "| `n_loops` | `3` |" in card and "| `residual_scale` | `inverse` |" in card
    assert "unit-corpus" in card and "`bytes`" in card and "1,234 training" in card
    assert f'AutoTokenizer.from_pretrained("{tmp_path / "hf"}")' in card and "import loopnn.hf" in card
    # no evaluation at the exported step: the card says so instead of quoting another step's loss
    run2 = make_run(tmp_path / "b", "bytes", step=5, val_loss=None)
    lh.export_hf(run2, tmp_path / "hf2")
    assert "No validation loss was recorded at step 5" in (tmp_path / "hf2" / "README.md").read_text()


PIPELINE = """
import json, sys
import loopnn.hf  # the documented one line: registers model_type "loopnn"
from transformers import AutoTokenizer, pipeline

path, prompt = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(path)
pipe = pipeline("text-generation", model=path, device="cpu")
out = pipe(prompt, max_new_tokens=6, do_sample=False, return_tensors=True)
print(json.dumps({"ids": out[0]["generated_token_ids"], "prompt": tok.encode(prompt),
                  "training_code": sorted(m for m in sys.modules if m in ("loopnn.train", "loopnn.data"))}))
"""


@pytest.mark.parametrize("name", ["bpe", "bytes"])
def test_pipeline_generates_from_the_export_without_loopnns_training_code(tmp_path, name):
    run = make_run(tmp_path, name, n_loops=2)
    lh.export_hf(run, tmp_path / "hf")
    prompt = "def f(x):"
    done = subprocess.run([sys.executable, "-c", PIPELINE, str(tmp_path / "hf"), prompt],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["training_code"] == []
    model = open_run(run).model
    tok = get_tokenizer(name, run)
    idx = torch.tensor([tok.encode(prompt)])
    assert got["prompt"] == idx[0].tolist()
    for _ in range(6):  # loopnn's own greedy decode, full recompute
        with torch.no_grad():
            nxt = model(idx)[0][0, -1].argmax()
        idx = torch.cat([idx, nxt.view(1, 1)], dim=1)
        if tok.eot_id is not None and nxt.item() == tok.eot_id:
            break
    assert got["ids"] == idx[0].tolist()


def fake_lm_eval(monkeypatch, seen: dict):
    """Just enough of lm-eval's API for `loopnn eval --tasks` to run without it: HFLM records what it was given,
    simple_evaluate scores one continuation with the model it got."""
    lm_eval = types.ModuleType("lm_eval")
    models, hf_mod = types.ModuleType("lm_eval.models"), types.ModuleType("lm_eval.models.huggingface")
    tasks, utils = types.ModuleType("lm_eval.tasks"), types.ModuleType("lm_eval.utils")

    class HFLM:
        def __init__(self, pretrained, tokenizer, batch_size, backend):
            seen.update(model=pretrained, tokenizer=tokenizer, batch_size=batch_size, backend=backend)

    def simple_evaluate(model, tasks, num_fewshot, limit, task_manager):
        ids = torch.tensor([seen["tokenizer"].encode("def f(x):")])
        with torch.no_grad():
            logits = seen["model"](ids).logits
        seen.update(tasks=tasks, limit=limit, include=task_manager.include_path)
        return {"results": {tasks[0]: {"score": float(logits.float().mean())}}}

    hf_mod.HFLM = HFLM
    lm_eval.simple_evaluate = simple_evaluate
    tasks.TaskManager = lambda include_path=None: types.SimpleNamespace(
        include_path=include_path, all_tasks=["local_task"]
    )
    utils.make_table = lambda results: f"table of {sorted(results['results'])}"
    for name, module in [("lm_eval", lm_eval), ("lm_eval.models", models), ("lm_eval.models.huggingface", hf_mod),
                         ("lm_eval.tasks", tasks), ("lm_eval.utils", utils)]:  # fmt: skip
        monkeypatch.setitem(sys.modules, name, module)


def test_eval_tasks_scores_the_export_with_lm_evals_hf_class(tmp_path, monkeypatch, capsys):
    """The wiring, with lm-eval stubbed: the run is exported, loaded through the Auto classes at the asked loop
    count, and handed to HFLM with the export's tokenizer."""
    seen: dict = {}
    fake_lm_eval(monkeypatch, seen)
    run = make_run(tmp_path, "bpe", n_loops=2)
    (tmp_path / "tasks").mkdir()
    argv = ["eval", str(run), "--tasks", "local_task", "--n-loops", "3", "--limit", "5"]
    argv += ["--include-path", str(tmp_path / "tasks")]
    assert main([*argv, "--batch-size", "2", "--device", "cpu", "--json", str(tmp_path / "out.json")]) == 0
    model = seen["model"]
    assert type(model).__name__ == "LoopnnForCausalLM" and model.config.inference_n_loops == 3
    assert seen["tokenizer"].encode(CHECK_TEXT) == get_tokenizer("bpe", run).encode(CHECK_TEXT)
    assert (seen["batch_size"], seen["backend"], seen["tasks"], seen["limit"]) == (2, "causal", ["local_task"], 5)
    loopgpt = open_run(run).model
    ids = torch.tensor([seen["tokenizer"].encode("def f(x):")])
    with torch.no_grad():
        expected = float(loopgpt(ids, n_loops=3)[0].mean())
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["results"]["local_task"]["score"] == pytest.approx(expected, rel=1e-5)
    assert "table of ['local_task']" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags,named",
    [(["--tasks", "nope"], "unknown lm-eval task(s) nope"), (["--tasks", ","], "names no task"),
     (["--tasks", "local_task", "--limit", "-1"], "--limit"),
     (["--tasks", "local_task", "--n-loops", "0"], "--n-loops"),
     (["--tasks", "local_task", "--include-path", "/nonexistent"], "--include-path")],
)  # fmt: skip
def test_eval_tasks_bad_input_is_one_line(tmp_path, monkeypatch, capsys, flags, named):
    fake_lm_eval(monkeypatch, {})
    run = make_run(tmp_path, "bytes")
    assert main(["eval", str(run), *flags, "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err


def test_eval_tasks_without_lm_eval_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    run = make_run(tmp_path, "bytes")
    assert main(["eval", str(run), "--tasks", "lambada_openai"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "loopnn[eval]" in err


def test_lm_eval_local_task_on_the_export(tmp_path):
    """The real harness (when installed) on a local JSON task: lm-eval's perplexity equals exp(-mean log-likelihood)
    of the continuations under loopnn's own forward pass."""
    pytest.importorskip("lm_eval", reason="lm-eval is optional; pip install 'loopnn[eval]' to run this")
    pytest.importorskip("accelerate", reason="lm-eval's HF model needs accelerate")
    import math

    rows = [{"context": "def f(x):", "continuation": " return x"}, {"context": "Hello", "continuation": " world"}]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "local.yaml").write_text(
        "task: loopnn_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'data.jsonl'}\ntest_split: test\noutput_type: loglikelihood\n"
        'doc_to_text: "{{context}}"\ndoc_to_target: "{{continuation}}"\nmetric_list:\n'
        "  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
    )
    run = make_run(tmp_path, "bpe", n_loops=2)
    out = tmp_path / "out.json"
    argv = ["eval", str(run), "--tasks", "loopnn_local", "--include-path", str(tmp_path / "tasks"), "--n-loops", "3"]
    assert main([*argv, "--device", "cpu", "--json", str(out)]) == 0
    got = json.loads(out.read_text())["results"]["loopnn_local"]["perplexity,none"]
    model = open_run(run).model
    tok = get_tokenizer("bpe", run)
    total = 0.0
    for row in rows:
        ctx, whole = tok.encode(row["context"]), tok.encode(row["context"] + row["continuation"])
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([whole[:-1]]), n_loops=3)[0][0].float(), -1)
        total += sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))
    assert got == pytest.approx(math.exp(-total / len(rows)), rel=1e-4)


# -- export --unroll: a plain GPT-2 of the effective depth ----------------------------------------------------

UNROLLED = """
import json, sys
import torch
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained(sys.argv[1])  # no loopnn import, no trust_remote_code
ids = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    logits = model(ids).logits
print(json.dumps({"class": type(model).__name__, "layers": model.config.n_layer, "logits": logits.tolist(),
                  "loopnn": sorted(m for m in sys.modules if m.startswith("loopnn"))}))
"""

FOLDABLE = {
    # prelude + looped core + coda, 1/N residual scale; gate_init/init_depth/injection_scale do nothing here
    "prelude-core-coda": dict(n_layer=4, loop_start=1, loop_end=3, n_loops=3, residual_scale="inverse",
                              gate_init=0.3, init_depth="effective", injection_scale=0.5),
    "layer-strategy": dict(n_layer=2, n_loops=2, loop_strategy="layer", residual_scale="constant",
                           residual_multiplier=0.4, bias=False),
    "whole-stack": dict(n_layer=2, n_loops=4, residual_scale="inverse_sqrt", dropout=0.1),
    # one loop (a demo's base model): injection and the boundary norm never act
    "one-loop": dict(n_layer=2, n_loops=1, injection="concat", loop_norm="input", residual_scale="inverse"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(FOLDABLE))
def test_unrolled_export_matches_loopnn_logits_in_plain_transformers(tmp_path, name):
    run = make_run(tmp_path, "bytes", **FOLDABLE[name])
    from loopnn.checkpoint import load_model, save_checkpoint

    model, meta = load_model(run)
    with torch.no_grad():  # random biases, norms and scales: a wrong fold or order cannot hide behind init values
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    save_checkpoint(run, meta["step"] + 1, model, model.config, meta["train_config"], info=meta["info"])
    assert main(["export", str(run), "--out-dir", str(tmp_path / "gpt2"), "--unroll"]) == 0
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    done = subprocess.run([sys.executable, "-c", UNROLLED, str(tmp_path / "gpt2"), json.dumps(ids.tolist())],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["loopnn"] == [] and got["class"] == "GPT2LMHeadModel"
    assert got["layers"] == model.config.effective_depth()
    with torch.no_grad():
        expected = model.eval()(ids)[0]
    torch.testing.assert_close(torch.tensor(got["logits"]), expected, atol=1e-5, rtol=1e-5)
    assert json.loads((tmp_path / "gpt2" / "config.json").read_text())["model_type"] == "gpt2"
    card = (tmp_path / "gpt2" / "README.md").read_text()
    assert f"unrolled into a plain {model.config.effective_depth()}-layer GPT-2" in card and "import loopnn" not in card


REFUSED = [
    (dict(loop_rule="residual"), "loop_rule 'residual'"),
    (dict(loop_rule="gated"), "loop_rule 'gated'"),
    (dict(loop_rule="gated_residual"), "loop_rule 'gated_residual'"),
    (dict(injection="add"), "injection 'add'"),
    (dict(injection="concat"), "injection 'concat'"),
    (dict(loop_norm="unit"), "loop_norm 'unit'"),
    (dict(loop_norm="input"), "loop_norm 'input'"),
    (dict(loop_embedding=True), "loop_embedding"),
    (dict(n_loops=1, injection="add", coda_injection=True), "coda_injection"),
    (dict(n_loops=1, loop_embedding=True), "loop_embedding"),
    (dict(n_loops=1, loop_rule="gated"), "loop_rule 'gated'"),
]


@pytest.mark.parametrize("overrides,named", REFUSED, ids=[f"{r[1]}-{i}" for i, r in enumerate(REFUSED)])
def test_unroll_refuses_loops_that_do_not_fold_in_one_line(overrides, named):
    from loopnn.errors import LoopnnError

    model = LoopGPT(ModelConfig(**(preset("debug") | overrides)))
    assert named in lh.why_not_unrollable(model)
    with pytest.raises(LoopnnError, match="cannot unroll"):
        lh.unrolled_gpt2(model)


def test_unroll_refusal_through_the_cli_writes_nothing(tmp_path, capsys):
    run = make_run(tmp_path, "bytes", injection="add")
    assert main(["export", str(run), "--out-dir", str(tmp_path / "gpt2"), "--unroll"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "injection 'add'" in err and "without --unroll" in err
    assert not (tmp_path / "gpt2").exists()
