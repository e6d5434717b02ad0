"""The run directory (metrics truncation, refusing to train over a run) and the one model loader."""

import json

import pytest
import torch

from loopnn.checkpoint import save_checkpoint
from loopnn.errors import LoopnnError
from loopnn.model import LoopGPT
from loopnn.runs import RunDir, open_run


def test_truncate_metrics_keeps_the_steps_up_to_the_checkpoint(tmp_path):
    run = RunDir(tmp_path / "run")
    run.prepare(resume=False, overwrite=False)
    for step in (1, 2, 3):
        run.log({"step": step, "kind": "train"})
    with open(run.metrics, "a") as f:
        f.write("[" * 5000 + "\n")  # nested past jsonio's depth limit: skipped like any unreadable line
        f.write('{"step": 4, "kin')  # a line cut short by a killed writer
    run.truncate_metrics(2)
    assert [json.loads(line)["step"] for line in run.metrics.read_text().splitlines()] == [1, 2]


def test_prepare_refuses_a_run_with_checkpoints_unless_resumed_or_overwritten(tmp_path, debug_cfg):
    torch.manual_seed(0)
    model = LoopGPT(debug_cfg)
    save_checkpoint(tmp_path / "run", 1, model, debug_cfg)
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(LoopnnError, match="already holds checkpoints"):
        RunDir(tmp_path / "run").prepare(resume=False, overwrite=False)
    RunDir(tmp_path / "run").prepare(resume=True, overwrite=False)  # resuming keeps everything
    assert (tmp_path / "run" / "metrics.jsonl").exists()
    RunDir(tmp_path / "run").prepare(resume=False, overwrite=True)
    assert not (tmp_path / "run" / "checkpoints" / "step-0000001").exists()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_one_loader_for_a_run_directory_and_a_checkpoint(tmp_path, debug_cfg):
    torch.manual_seed(0)
    model = LoopGPT(debug_cfg)
    ckpt = save_checkpoint(tmp_path / "run", 3, model, debug_cfg)
    RunDir(tmp_path / "run").write_config({"model_config": {}}, tmp_path / "no-data")  # a run's own config.json
    idx = torch.randint(0, debug_cfg.vocab_size, (1, 8))
    expected = model.eval()(idx)[0]
    for path in (tmp_path / "run", ckpt):
        run = open_run(path)
        loaded, meta = run.model, run.meta
        assert not loaded.training and meta["path"] == ckpt and meta["step"] == 3 and run.path == ckpt
        assert torch.equal(loaded(idx)[0], expected)


def test_the_hf_loader_takes_a_run_directory_for_what_it_is(tmp_path, debug_cfg):
    """A run directory holds a config.json too; it is not read as a GPT-2 directory."""
    convert = pytest.importorskip("loopnn.hf.convert", reason="the HF loader needs safetensors")
    torch.manual_seed(0)
    model = LoopGPT(debug_cfg)
    save_checkpoint(tmp_path / "run", 1, model, debug_cfg)
    RunDir(tmp_path / "run").write_config({"model_config": {}}, tmp_path / "no-data")
    loaded, n_loops = convert.load_pretrained(tmp_path / "run")
    assert n_loops is None
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert convert.load_pretrained(model) == (model, None)
