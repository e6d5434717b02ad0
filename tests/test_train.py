"""Trainer and checkpoints: exact resume, weight sharing after a step and after save/load, clear errors."""

import json

import pytest
import torch

from loopnn import LoopGPT, ModelConfig, TrainConfig, preset
from loopnn import checkpoint as ckpt
from loopnn.errors import LoopnnError
from loopnn.train import train


def tiny(data_dir, out_dir, **kw):
    mc = ModelConfig(**(preset("debug") | dict(n_loops=2, loop_rule="gated")))
    base = dict(
        data_dir=str(data_dir),
        out_dir=str(out_dir),
        batch_size=4,
        seq_len=32,
        max_steps=8,
        warmup_steps=2,
        eval_interval=4,
        eval_tokens=512,
        log_interval=2,
        lr=3e-3,
        progress=False,
    )
    return mc, TrainConfig(**(base | kw))


def test_training_lowers_loss_and_writes_run_dir(pydoc_data, tmp_path):
    mc, tc = tiny(pydoc_data, tmp_path / "run", max_steps=30, eval_interval=0)
    first = LoopGPT(mc)
    summary = train(mc, tc)
    assert summary["step"] == 30 and summary["tokens"] == 30 * 4 * 32
    assert summary["val"]["loss"] < 5.0  # random init is ~ln(256) = 5.55
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["kind"] == "eval" and records[-1]["val_loss"] == summary["val"]["loss"]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["params"] == first.num_params()
    assert (tmp_path / "run" / "summary.json").exists()


def test_resume_matches_uninterrupted_run_bit_for_bit(pydoc_data, tmp_path):
    mc, tc = tiny(pydoc_data, tmp_path / "full")
    train(mc, tc)
    # The same 8-step run, killed right after its step-4 checkpoint, then resumed.
    mc2, tc2 = tiny(pydoc_data, tmp_path / "split", ckpt_interval=4)

    class Stop(Exception):
        pass

    real_save = ckpt.save_checkpoint

    def save_then_die(*a, **k):
        path = real_save(*a, **k)
        if a[1] == 4:
            raise Stop
        return path

    import loopnn.train as tr

    tr.ckpt.save_checkpoint = save_then_die
    try:
        with pytest.raises(Stop):
            train(mc2, tc2)
    finally:
        tr.ckpt.save_checkpoint = real_save
    train(mc2, tc2, resume=True)
    a = ckpt.load_checkpoint(tmp_path / "full")["model_state"]
    b = ckpt.load_checkpoint(tmp_path / "split")["model_state"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    full_log = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    split_log = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    strip = lambda lines: [
        {k: v for k, v in json.loads(x).items() if k not in ("elapsed", "tokens_per_s")} for x in lines
    ]
    assert strip(full_log) == strip(split_log)


def test_shared_weights_stay_shared_after_step_and_reload(pydoc_data, tmp_path):
    mc, tc = tiny(pydoc_data, tmp_path / "run", max_steps=2, eval_interval=0)
    train(mc, tc)
    model, meta = ckpt.load_model(tmp_path / "run")
    assert model.lm_head.weight is model.transformer.wte.weight
    assert len(model.transformer.h) == mc.n_layer
    ptrs = [p.data_ptr() for p in model.parameters()]
    assert len(ptrs) == len(set(ptrs))
    # the stored file holds each block once, whatever n_loops is
    keys = ckpt.load_checkpoint(tmp_path / "run")["model_state"].keys()
    assert sum(k.startswith("transformer.h.") and k.endswith("c_attn.weight") for k in keys) == mc.n_layer


def test_existing_run_is_not_overwritten(pydoc_data, tmp_path):
    mc, tc = tiny(pydoc_data, tmp_path / "run", max_steps=2, eval_interval=0)
    train(mc, tc)
    before = (tmp_path / "run" / "checkpoints" / "step-0000002" / "model.safetensors").read_bytes()
    with pytest.raises(LoopnnError, match="--resume"):
        train(mc, tc)
    after = (tmp_path / "run" / "checkpoints" / "step-0000002" / "model.safetensors").read_bytes()
    assert before == after


def test_resume_with_another_architecture_is_refused(pydoc_data, tmp_path):
    mc, tc = tiny(pydoc_data, tmp_path / "run", max_steps=2, eval_interval=0)
    train(mc, tc)
    other = ModelConfig(**(mc.__dict__ | dict(n_embd=64)))
    with pytest.raises(LoopnnError, match="another model config"):
        train(other, TrainConfig(**(tc.__dict__ | dict(max_steps=4))), resume=True)


def test_truncated_and_foreign_checkpoints_are_refused(pydoc_data, tmp_path):
    mc, tc = tiny(pydoc_data, tmp_path / "run", max_steps=2, eval_interval=0)
    train(mc, tc)
    step_dir = tmp_path / "run" / "checkpoints" / "step-0000002"
    weights = step_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(LoopnnError, match="checksum"):
        ckpt.load_checkpoint(step_dir)
    with pytest.raises(LoopnnError, match="no valid checkpoint"):
        ckpt.load_model(tmp_path / "run")
    pickle_file = tmp_path / "model.pt"
    torch.save({"x": torch.zeros(1)}, pickle_file)
    with pytest.raises(LoopnnError, match="pickle"):
        ckpt.load_model(pickle_file)


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    cfg = ModelConfig(**preset("debug"))
    ckpt.save_checkpoint(tmp_path, 1, LoopGPT(cfg), cfg)
    bigger = LoopGPT(ModelConfig(**(preset("debug") | dict(n_embd=64))))
    tensors = ckpt.load_checkpoint(tmp_path)["model_state"]
    with pytest.raises(LoopnnError, match="another architecture"):
        ckpt.load_state_into(bigger, tensors, "checkpoint")


def test_vocab_mismatch_and_long_sequence_are_clear_errors(pydoc_data, tmp_path):
    mc, tc = tiny(pydoc_data, tmp_path / "run")
    with pytest.raises(LoopnnError, match="vocab_size"):
        train(ModelConfig(**(mc.__dict__ | dict(vocab_size=300))), tc)
    with pytest.raises(LoopnnError, match="block_size"):
        train(mc, TrainConfig(**(tc.__dict__ | dict(seq_len=mc.block_size + 1))))


def test_resume_of_a_finished_run_keeps_its_results(pydoc_data, tmp_path):
    mc, tc = tiny(pydoc_data, tmp_path / "run", max_steps=2, eval_interval=0)
    first = train(mc, tc)
    again = train(mc, tc, resume=True)  # nothing left to train: must still report the run's loss
    assert again["step"] == 2 and again["val"]["loss"] == first["val"]["loss"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["val"]["loss"] == first["val"]["loss"]


def test_cli_resume_reads_the_runs_own_config(pydoc_data, tmp_path):
    from loopnn.cli import main

    run = tmp_path / "run"
    flags = ["--preset", "debug", "--n-loops", "3", "--loop-rule", "residual", "--batch-size", "2", "--seq-len", "16"]
    common = ["--data-dir", str(pydoc_data), "--out-dir", str(run), "--eval-tokens", "128", "--no-progress"]
    assert main(["train", *flags, *common, "--max-steps", "2"]) == 0
    # only the new step count: model shape, rule and batch come from runs/config.json
    assert main(["train", "--out-dir", str(run), "--resume", "--max-steps", "4"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    config = json.loads((run / "config.json").read_text())
    assert summary["step"] == 4
    assert config["model_config"]["n_loops"] == 3 and config["model_config"]["loop_rule"] == "residual"
    assert config["train_config"]["batch_size"] == 2


def test_trained_bpe_tokenizer_travels_with_the_run(tmp_path):
    from loopnn.cli import main
    from loopnn.data import prepare

    prepare("pydoc", tmp_path / "bpe", tokenizer="bpe", vocab_size=300, progress=False)
    mc = ModelConfig(**(preset("debug") | dict(vocab_size=300)))
    _, tc = tiny(tmp_path / "bpe", tmp_path / "run", max_steps=2, eval_interval=0, seq_len=16, eval_tokens=64)
    train(mc, tc)
    (tmp_path / "bpe").rename(tmp_path / "moved")  # the data is gone; the run still generates text
    assert main(["generate", str(tmp_path / "run"), "--prompt", "The ", "--max-new-tokens", "3", "--seed", "0"]) == 0


def test_batch_seeds_come_from_a_documented_hash():
    """Pinned: batch seeds are sha256 of the key, so a resumed run draws the same batches on any Python."""
    import hashlib

    from loopnn.train import batch_generator

    expected = int.from_bytes(hashlib.sha256(b"loopnn-batch:1337:0:0:0").digest()[:8], "little") >> 1
    assert batch_generator(1337, 0, 0, 0).initial_seed() == expected
    assert torch.randint(0, 1000, (5,), generator=batch_generator(1337, 0, 0, 0)).tolist() == [143, 572, 613, 258, 931]
    assert batch_generator(1337, 0, 0, 0).initial_seed() != batch_generator(1337, 0, 1, 0).initial_seed()


def test_rng_states_saved_and_restored_with_cuda_only_where_it_is_used(monkeypatch, tmp_path):
    """The CUDA generator's state goes with the checkpoint on CUDA (tested on CPU with torch.cuda's two
    functions stood in); on CPU, and from checkpoints that predate it, there is none and resume works as before."""
    from loopnn.runs import restore_rng_state, rng_state

    cuda_state, restored = torch.arange(16, dtype=torch.uint8), []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: cuda_state.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state, device)))
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert rng_state(cpu).keys() == {"rng_cpu"}
    saved = rng_state(gpu)
    assert saved.keys() == {"rng_cpu", "rng_cuda"} and torch.equal(saved["rng_cuda"], cuda_state)

    expected = torch.rand(3)
    restore_rng_state(saved, gpu, tmp_path)  # CPU and CUDA generators both set
    assert torch.equal(torch.rand(3), expected)
    assert len(restored) == 1 and torch.equal(restored[0][0], cuda_state) and restored[0][1] == gpu
    restore_rng_state(saved, cpu, tmp_path)  # a CUDA run resumed on CPU: the CUDA state is not needed
    restore_rng_state({"rng_cpu": saved["rng_cpu"]}, gpu, tmp_path)  # an older checkpoint: no CUDA state
    restore_rng_state({}, gpu, tmp_path)  # no state.safetensors at all
    assert len(restored) == 1
    with pytest.raises(LoopnnError, match="malformed rng_cuda"):
        restore_rng_state({"rng_cuda": torch.zeros(3)}, gpu, tmp_path)


def test_cpu_checkpoints_hold_only_the_cpu_rng_and_resume(pydoc_data, tmp_path):
    mc, tc = tiny(pydoc_data, tmp_path / "run", max_steps=2, eval_interval=0, eval_tokens=128)
    train(mc, tc)
    assert ckpt.load_checkpoint(tmp_path / "run")["state_tensors"].keys() == {"rng_cpu"}
    mc, tc = tiny(pydoc_data, tmp_path / "run", max_steps=3, eval_interval=0, eval_tokens=128)
    assert train(mc, tc, resume=True)["step"] == 3


def test_bfloat16_on_cpu_really_autocasts(pydoc_data, tmp_path, monkeypatch):
    """dtype='bfloat16' on CPU trains and evaluates under CPU autocast (it once entered CUDA's, a silent no-op
    for CPU tensors, so the run was fp32); 'auto' stays fp32 on CPU."""
    entered = []
    real = torch.autocast

    def recording(device_type, *args, **kwargs):
        entered.append((device_type, kwargs.get("dtype")))
        return real(device_type, *args, **kwargs)

    monkeypatch.setattr(torch, "autocast", recording)
    summaries = {}
    for dtype in ("auto", "bfloat16"):
        entered.clear()
        summaries[dtype] = train(*tiny(pydoc_data, tmp_path / dtype, dtype=dtype, device="cpu", max_steps=4))
        assert entered == [] if dtype == "auto" else set(entered) == {("cpu", torch.bfloat16)}
    assert summaries["auto"]["val"]["loss"] != summaries["bfloat16"]["val"]["loss"]
