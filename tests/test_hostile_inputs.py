"""Every file and flag loopnn reads, treated as hostile: one error line and exit 2, never a traceback.

The named cases of issue 12 (sizes that cannot fit, numbers torch cannot take, commands without an error
boundary), then hypothesis strategies per file kind (checkpoint.json, meta.json, config.json, summary.json,
metrics.jsonl, loopnn.json, HF config.json, the safetensors index, progress.json, tokenizer.json): valid documents
mutated (deep nesting, huge numbers, wrong types, missing and extra fields) and fed to the real CLI commands
that read them. `LOOPNN_EXAMPLES=2000` hunts longer; the default keeps this file to seconds.
"""

import itertools
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loopnn import checkpoint as ckpt
from loopnn.cli import main
from loopnn.data import prepare

EXAMPLES = int(os.environ.get("LOOPNN_EXAMPLES", "8"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
TEXT = "".join(f"line {i}: the loop runs the same blocks again, {i * i} times over.\n" for i in range(150))
TRACEBACKS: list = []  # filled by run_cli: the figure docs/reliability.md reports (it must stay empty)
CASES: dict[str, int] = {}  # file kind -> mutated documents run through the CLI


def run_cli(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    except BaseException as e:  # noqa: BLE001 - exactly what this file hunts for
        TRACEBACKS.append((argv, repr(e)))
        raise
    out, err = capsys.readouterr()
    assert code in (0, 2), (argv, code, err)
    assert "Traceback" not in err, (argv, err)
    if code == 2:
        lines = [line for line in err.strip().splitlines() if "error" in line]
        assert len(lines) == 1 and lines[0] == err.strip().splitlines()[-1], (argv, err)
    return code, err


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Prepared bytes data, a finished tiny run, an HF export of it."""
    root = tmp_path_factory.mktemp("hostile")
    (root / "corpus.txt").write_text(TEXT)
    prepare(str(root / "corpus.txt"), root / "data", tokenizer="bytes", progress=False)
    run = root / "run"
    argv = ["train", "--preset", "debug", "--block-size", "16", "--data-dir", root / "data", "--out-dir", run]
    argv += ["--max-steps", "2", "--batch-size", "2", "--eval-tokens", "32", "--warmup-steps", "1"]
    argv += ["--no-progress", "--device", "cpu", "--ckpt-interval", "1"]
    assert main([str(a) for a in argv]) == 0
    return root


def fresh_copy(src: Path, dst: Path) -> Path:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------- sizes before allocation


@pytest.mark.parametrize(
    "flags,match",
    [
        (["--n-embd", "1048576", "--n-head", "1"], "needs at least"),
        (["--block-size", str(10**12)], "needs at least"),
        (["--batch-size", str(10**12)], "needs at least"),
        (["--n-layer", str(10**9)], "needs at least"),
        (["--seed", str(2**64)], "seed must fit in 64 bits"),
        (["--seed", str(-(2**63) - 1)], "seed must fit in 64 bits"),
        (["--lr", "1e39"], "finite in float32"),
        (["--weight-decay", "inf"], "weight_decay"),
        (["--threads", "100000"], "threads"),
        (["--gate-init", "1e300", "--loop-rule", "gated"], "gate_init"),
        (["--loop-sampling", "uniform", "--loop-max", str(2**40)], "max_loops"),
    ],
)
def test_sizes_and_numbers_are_refused_before_anything_is_allocated(world, tmp_path, capsys, flags, match):
    run = tmp_path / "run"
    argv = ["train", "--preset", "debug", "--data-dir", world / "data", "--out-dir", run, "--no-progress"]
    code, err = run_cli(argv + ["--device", "cpu", "--max-steps", "1", *flags], capsys)
    assert code == 2 and match in err, err
    assert not run.exists()


@pytest.mark.parametrize("change", [dict(vocab_size=10**12), dict(n_layer=10**9), dict(n_embd=2**20, n_head=1)])
def test_a_checkpoint_json_asking_for_a_huge_model_is_refused_before_building_it(world, tmp_path, capsys, change):
    run = fresh_copy(world / "run", tmp_path / "run")
    last = ckpt.latest_checkpoint(run)
    meta = json.loads((last / "checkpoint.json").read_text())
    meta["model_config"].update(change, loop_end=None)
    (last / "checkpoint.json").write_text(json.dumps(meta))
    for cmd in (["eval", last, "--device", "cpu"], ["generate", last, "--device", "cpu", "--max-new-tokens", "1"]):
        code, err = run_cli(cmd, capsys)
        assert code == 2 and "needs at least" in err, err


def test_a_config_larger_than_its_weights_is_refused_before_any_model_is_built(world, tmp_path, capsys, monkeypatch):
    """Found by LOOPNN_EXAMPLES=2000: a checkpoint.json whose model_config fits in RAM but not its weights (a
    vocab of 2e7, 10 GB) was built and initialised before the mismatch was noticed, for minutes; the same for a
    run's config.json on --resume. Now the config is compared with what the weights hold first."""
    import loopnn.model
    import loopnn.train

    def no_model(*_a, **_k):
        raise AssertionError("a model was built")

    monkeypatch.setattr(loopnn.model, "LoopGPT", no_model)
    monkeypatch.setattr(loopnn.train, "LoopGPT", no_model)
    run = fresh_copy(world / "run", tmp_path / "run")
    last = ckpt.latest_checkpoint(run)
    meta = json.loads((last / "checkpoint.json").read_text())
    meta["model_config"]["vocab_size"] = 20_000_000
    (last / "checkpoint.json").write_text(json.dumps(meta))
    code, err = run_cli(["eval", last, "--device", "cpu"], capsys)
    assert code == 2 and "parameters but the weights hold" in err, err

    run = fresh_copy(world / "run", tmp_path / "run2")
    config = json.loads((run / "config.json").read_text())
    config["model_config"]["n_embd"] *= 64
    (run / "config.json").write_text(json.dumps(config))
    code, err = run_cli(["train", "--out-dir", run, "--resume", "--no-progress", "--device", "cpu", *BOUNDS], capsys)
    assert code == 2 and "another model config" in err, err


def test_param_count_is_exactly_what_the_model_allocates():
    from loopnn import ModelConfig
    from loopnn.memory import param_count
    from loopnn.model import LoopGPT

    for bias, injection, embedding, rule in itertools.product(
        (True, False), ("none", "add", "concat"), (False, True), ("repeat", "gated", "gated_residual")
    ):
        cfg = ModelConfig(n_layer=2, n_loops=3, vocab_size=300, n_embd=32, n_head=2, block_size=64, bias=bias,
                          injection=injection, loop_embedding=embedding, loop_rule=rule)  # fmt: skip
        held = sum(t.numel() for k, t in LoopGPT(cfg).state_dict().items() if k != ckpt.TIED_KEY)
        assert param_count(cfg) == held, cfg


# ----------------------------------------------------------------------------- numbers where they enter


def test_eval_obeys_n_loops_refuses_bad_ones_and_refuses_nan_weights(world, tmp_path, capsys):
    run = world / "run"
    code, _ = run_cli(["eval", run, "--device", "cpu", "--n-loops", "0"], capsys)
    assert code == 2
    out = {}
    for n in (1, 3):
        code, _ = run_cli(["eval", run, "--device", "cpu", "--n-loops", n, "--json", tmp_path / f"{n}.json"], capsys)
        out[n] = json.loads((tmp_path / f"{n}.json").read_text())
    assert out[1]["n_loops"] == 1 and out[3]["n_loops"] == 3 and out[1]["loss"] != out[3]["loss"]
    nan_run = fresh_copy(run, tmp_path / "nan")
    last = ckpt.latest_checkpoint(nan_run)
    model, _ = ckpt.load_model(last)
    with torch.no_grad():
        model.transformer.wte.weight.fill_(float("nan"))
    meta = ckpt.read_meta(last)
    ckpt.save_checkpoint(nan_run, meta["step"] + 1, model, model.config, meta["train_config"], info=meta["info"])
    code, err = run_cli(["eval", nan_run, "--device", "cpu"], capsys)
    assert code == 2 and "not finite" in err


@pytest.mark.parametrize("temperature", ["1e-300", "1e300", "nan", "-1"])
def test_generate_refuses_temperatures_that_overflow(world, capsys, temperature):
    code, err = run_cli(["generate", world / "run", "--device", "cpu", "--temperature", temperature], capsys)
    assert code == 2 and "temperature" in err


# ----------------------------------------------------------------------------- the error boundary


def test_commands_report_environment_failures_in_one_line(world, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, err = run_cli(["compare", world / "run", "--out", tmp_path / "file" / "cmp"], capsys)
    assert code == 2 and str(tmp_path / "file") in err
    code, err = run_cli(["compare", tmp_path / "file"], capsys)  # a file where a run directory is expected
    assert code == 2 and "not a run directory" in err
    os.environ["LOOPNN_CACHE"] = str(tmp_path / "file" / "cache")
    try:
        code, err = run_cli(["prepare", "shakespeare", "--out", tmp_path / "s"], capsys)
    finally:
        del os.environ["LOOPNN_CACHE"]
    assert code == 2 and "LOOPNN_CACHE" in err
    argv = ["train", "--preset", "debug", "--data-dir", world / "data", "--out-dir", tmp_path / "file"]
    code, err = run_cli(argv, capsys)
    assert code == 2 and str(tmp_path / "file") in err


def test_truncated_hf_weights_are_one_line(world, tmp_path, capsys):
    pytest.importorskip("loopnn.hf")
    hf = tmp_path / "hf"
    assert run_cli(["export", world / "run", "--out", hf], capsys)[0] == 0
    weights = hf / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    code, err = run_cli(["import", hf, "--out", tmp_path / "back"], capsys)
    assert code == 2 and "model.safetensors" in err
    code, err = run_cli(["import", hf, "--gpt2", "--out", tmp_path / "back"], capsys)
    assert code == 2


def test_a_tokenizer_json_that_cannot_encode_every_byte_is_refused(tmp_path):
    from loopnn.errors import LoopnnError
    from loopnn.tokenizer import BPETokenizer, train_bpe

    tok = train_bpe([TEXT], 300)
    tok.save(tmp_path / "tokenizer.json")
    doc = json.loads((tmp_path / "tokenizer.json").read_text())
    vocab = doc["model"]["vocab"]
    for ch in [c for c, i in vocab.items() if len(c) == 1 and not c.isalnum()][:20]:  # drop some byte symbols
        del vocab[ch]
    doc["model"]["merges"] = [m for m in doc["model"]["merges"] if all(p in vocab for p in _pair(m))]
    (tmp_path / "tokenizer.json").write_text(json.dumps(doc))
    with pytest.raises(LoopnnError, match="cannot"):
        BPETokenizer.load(tmp_path / "tokenizer.json")


def _pair(merge) -> list[str]:
    return merge.split(" ") if isinstance(merge, str) else list(merge)


# ----------------------------------------------------------------------------- hypothesis: every file kind

DEEP, HUGE = "__loopnn_deep__", "__loopnn_huge__"
hostile_value = st.one_of(
    st.sampled_from([DEEP, HUGE, None, True, -1, 0, 10**30, 1e308, "", "../../etc/passwd", [], {}, [1], {"a": 1}]),
    st.integers(-(10**20), 10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.integers(), max_size=3),
)


def paths(doc, prefix=()):
    """Every key path inside a JSON document (dicts and lists)."""
    out = [prefix]
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for k, v in items:
        out += paths(v, (*prefix, k))
    return out


def render(doc, depth: int) -> str:
    text = json.dumps(doc)
    text = text.replace(json.dumps(DEEP), "[" * depth + "]" * depth)
    return text.replace(json.dumps(HUGE), "9" * 5000)


@st.composite
def mutated(draw, text: str) -> str:
    """A valid document's text, mutated: one field replaced, deleted or added, the text cut, or a hostile whole."""
    doc = json.loads(text)
    mode = draw(st.sampled_from(["replace", "replace", "delete", "extra", "cut", "whole"]))
    depth = draw(st.sampled_from([40, 100_000]))
    if mode == "cut":
        return text[: draw(st.integers(0, max(len(text) - 1, 0)))]
    if mode == "whole":
        return render(draw(hostile_value), depth)
    where = draw(st.sampled_from(paths(doc)[1:] or [()]))
    if not where:
        return render(draw(hostile_value), depth)
    parent = doc
    for k in where[:-1]:
        parent = parent[k]
    if mode == "replace":
        parent[where[-1]] = draw(hostile_value)
    elif mode == "delete":
        del parent[where[-1]]
    elif isinstance(parent, dict):
        parent[draw(st.text(min_size=1, max_size=6))] = draw(hostile_value)
    return render(doc, depth)


@pytest.fixture(scope="module")
def kinds(world, tmp_path_factory):
    """file kind -> (directory to copy, file inside it, CLI argv given the copy)."""
    root = tmp_path_factory.mktemp("kinds")
    run = world / "run"
    step = ckpt.latest_checkpoint(run).name
    out: dict = {
        "checkpoint.json": (run, f"checkpoints/{step}/checkpoint.json", lambda d: ["eval", d, "--device", "cpu"]),
        "meta.json": (world / "data", "meta.json", lambda d: ["eval", run, "--data", d, "--device", "cpu"]),
        "config.json (run)": (
            run,
            "config.json",
            # flags bound the work a valid mutation may ask for (more steps, compile, many threads)
            lambda d: ["train", "--out-dir", d, "--resume", "--no-progress", "--device", "cpu", *BOUNDS],
        ),
        "summary.json": (run, "summary.json", lambda d: ["compare", d, "--out", d / "cmp"]),
        "config.json (compare)": (run, "config.json", lambda d: ["compare", d, "--out", d / "cmp"]),
        "metrics.jsonl": (run, "metrics.jsonl", lambda d: ["compare", d, "--out", d / "cmp"]),
    }
    # progress.json: a sharded prepare that looks interrupted (meta.json gone); rerunning it reads progress.json
    corpus = root / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": line}) + "\n" for line in TEXT.splitlines()[:60]))
    sharded = root / "sharded"
    prepare_argv = ["prepare", corpus, "--shard-tokens", "1000", "--max-documents", "100000"]
    assert main([str(a) for a in [*prepare_argv, "--out", sharded]]) == 0
    (sharded / "meta.json").unlink()
    out["progress.json"] = (sharded, "progress.json", lambda d: [*prepare_argv, "--out", d])
    # tokenizer.json: a trained BPE in a run directory, read by generate --tokenizer bpe
    from loopnn.tokenizer import train_bpe

    bpe_run = fresh_copy(run, root / "bpe-run")
    train_bpe([TEXT], 300).save(bpe_run / "tokenizer.json")
    out["tokenizer.json"] = (
        bpe_run,
        "tokenizer.json",
        lambda d: ["generate", d, "--tokenizer", "bpe", "--device", "cpu", "--max-new-tokens", "1"],
    )
    try:
        import loopnn.hf  # noqa: F401
    except ImportError:
        return out
    hf = root / "hf"
    assert main(["export", str(run), "--out", str(hf)]) == 0
    imp = lambda d: ["import", d, "--out", d / "imported"]  # noqa: E731
    out["loopnn.json"] = (hf, "loopnn.json", imp)
    out["HF config.json"] = (hf, "config.json", imp)
    sharded_hf = fresh_copy(hf, root / "hf-index")
    (sharded_hf / "model.safetensors").rename(sharded_hf / "part-1.safetensors")
    from safetensors.torch import load_file

    index = {"weight_map": {k: "part-1.safetensors" for k in load_file(sharded_hf / "part-1.safetensors")}}
    (sharded_hf / "model.safetensors.index.json").write_text(json.dumps(index))
    assert main(["import", str(sharded_hf), "--out", str(root / "check")]) == 0  # the unmutated index imports
    out["safetensors index"] = (sharded_hf, "model.safetensors.index.json", imp)
    return out


BOUNDS = ["--max-steps", "2", "--threads", "1", "--no-compile", "--eval-tokens", "32", "--keep-checkpoints", "2"]
KINDS = [
    "checkpoint.json",
    "meta.json",
    "config.json (run)",
    "config.json (compare)",
    "summary.json",
    "metrics.jsonl",
    "progress.json",
    "tokenizer.json",
    "loopnn.json",
    "HF config.json",
    "safetensors index",
]


@pytest.mark.parametrize("kind", KINDS)
def test_mutated_files_through_the_real_commands_exit_0_or_2_with_one_line(kind, kinds, tmp_path, capsys):
    if kind not in kinds:
        pytest.skip("needs loopnn[hf]")
    src, name, argv_for = kinds[kind]
    valid = (src / name).read_text()

    @SETTINGS
    @given(text=mutated(valid) if kind != "metrics.jsonl" else metrics_lines(valid))
    def check(text):
        d = fresh_copy(src, tmp_path / "case")
        (d / name).write_text(text)
        CASES[kind] = CASES.get(kind, 0) + 1
        run_cli(argv_for(d), capsys)

    check()


@st.composite
def metrics_lines(draw, text: str) -> str:
    lines = text.splitlines()
    i = draw(st.integers(0, len(lines) - 1))
    lines[i] = draw(mutated(lines[i]))
    return "\n".join(lines) + draw(st.sampled_from(["\n", "", "\n{", "\n" + "[" * 100_000]))


def test_zz_figures(capsys):
    """The figures docs/reliability.md records; LOOPNN_FIGURES=path writes them as JSON."""
    assert not TRACEBACKS
    figures = {"examples_per_kind": EXAMPLES, "cases": CASES, "total": sum(CASES.values()), "tracebacks": 0}
    if os.environ.get("LOOPNN_FIGURES"):
        Path(os.environ["LOOPNN_FIGURES"]).write_text(json.dumps(figures, indent=2) + "\n")


def test_messages_quoting_control_characters_stay_one_line(tmp_path, capsys):
    """Found by LOOPNN_EXAMPLES=300: a tokenizer version "\\x1e" and an index naming the shard "\\r" were quoted
    raw, and str.splitlines broke the one error line at them."""
    from loopnn.errors import one_line

    assert one_line("a\rb\x1ec\u2028d\ne") == "a\\rb\\x1ec\\u2028d e"
    assert one_line("plain text, é ok") == "plain text, é ok"
    code, err = run_cli(["eval", tmp_path / "no\rsuch\x1erun", "--device", "cpu"], capsys)
    assert code == 2 and "\\r" in err and "\\x1e" in err
