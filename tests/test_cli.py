"""CLI: every --help works; bad input gives one clear line on stderr and exit status 2."""

import dataclasses
import subprocess
import sys

import pytest

from loopnn.cli import build_parser, main
from loopnn.config import ModelConfig, TrainConfig
from loopnn.errors import LoopnnError

SUBCOMMANDS = sorted(build_parser()._subparsers._group_actions[0].choices)


def test_module_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "loopnn", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "prepare" in out.stdout


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "usage" in capsys.readouterr().out


def one_error_line(capsys, argv, match):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert match in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "argv,match",
    [
        (["train", "--data-dir", "/nonexistent/data"], "/nonexistent/data"),
        (["train", "--preset", "debug", "--n-embd", "31", "--data-dir", "x"], "multiple of n_head"),
        (["train", "--preset", "debug", "--n-loops", "0", "--data-dir", "x"], "n_loops"),
        (["train", "--preset", "debug", "--loop-end", "7", "--data-dir", "x"], "loop range"),
        (["train", "--config", "/nonexistent.toml"], "not found"),
        (["eval", "/nonexistent/run"], "not found"),
        (["generate", "/nonexistent/run"], "not found"),
        (["prepare", "/nonexistent/corpus.txt", "--out", "/tmp/loopnn-never"], "corpus.txt"),
    ],
)
def test_bad_input_is_one_line_exit_2(argv, match, capsys):
    one_error_line(capsys, argv, match)


@pytest.mark.parametrize(
    "argv,match", [(["train", "--n-loops", "many"], "--n-loops"), (["train", "--loop-rule", "twice"], "--loop-rule")]
)
def test_usage_error_is_one_line(argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err


def test_bad_toml_field_is_named(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nn_loopz = 3\n")
    one_error_line(capsys, ["train", "--config", str(bad)], "n_loopz")
    bad.write_text('[model]\nn_loops = "three"\n')
    one_error_line(capsys, ["train", "--config", str(bad)], "n_loops")
    bad.write_text("this is not toml [")
    one_error_line(capsys, ["train", "--config", str(bad)], "not valid TOML")


def parse(argv):
    return vars(build_parser().parse_args(argv))


def test_directory_flags_have_one_name_and_keep_the_old_spelling():
    """--out-dir and --data-dir everywhere (the config fields' names); --out and --data still work."""
    for old, new in (("--out", "--out-dir"), ("--data", "--data-dir")):
        a = parse(["train", old, "somewhere"])
        assert a == parse(["train", new, "somewhere"])
        assert a[f"TrainConfig.{new[2:].replace('-', '_')}"] == "somewhere"
    for argv in (["prepare", "src"], ["compare", "runs/a"], ["export", "runs/a"], ["import", "hf/a"]):
        assert parse([*argv, "--out", "d"])["out"] == parse([*argv, "--out-dir", "d"])["out"] == "d"
    assert parse(["demo", "--out", "d"])["out_dir"] == parse(["demo", "--out-dir", "d"])["out_dir"] == "d"
    for cmd in (["eval", "runs/a"], ["demo"]):
        assert parse([*cmd, "--data", "d"])["data"] == parse([*cmd, "--data-dir", "d"])["data"] == "d"


def test_demo_ablation_refuses_the_options_it_would_ignore(capsys):
    for extra in (["--full"], ["--roles", "base,loop"], ["--jobs", "2"]):
        assert main(["demo", "--ablation", *extra]) == 2
        assert "drop --full, --roles and --jobs" in capsys.readouterr().err
    assert main(["demo", "--jobs", "0"]) == 2
    assert "--jobs must be >= 1" in capsys.readouterr().err


def test_prepare_help_names_every_built_in_corpus(capsys):
    from loopnn.data.sources import BUILTIN_SOURCES

    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert all(name in shown for name in BUILTIN_SOURCES)


def test_choices_and_adaptive_defaults_come_from_the_library():
    from loopnn import config
    from loopnn.adaptive import CRITERIA, AdaptiveConfig
    from loopnn.cli import commands
    from loopnn.data import sharded
    from loopnn.tokenizer import TOKENIZER_NAMES

    def actions(command):
        sub = build_parser()._subparsers._group_actions[0].choices[command]
        return {a.dest: a for a in sub._actions}

    train = actions("train")
    for field, values in [
        ("loop_strategy", config.LOOP_STRATEGIES),
        ("loop_rule", config.LOOP_RULES),
        ("init_depth", config.INIT_DEPTHS),
        ("injection", config.INJECTIONS),
        ("parallel", config.PARALLEL),
        ("loop_sampling", config.LOOP_SAMPLING),
        ("dtype", config.DTYPES),
    ]:
        cls = "ModelConfig" if field in {f.name for f in dataclasses.fields(config.ModelConfig)} else "TrainConfig"
        assert tuple(train[f"{cls}.{field}"].choices) == values, field
    prepare = actions("prepare")
    assert tuple(prepare["tokenizer"].choices) == TOKENIZER_NAMES
    assert tuple(prepare["format"].choices) == sharded.LOCAL_FORMATS
    for command in ("eval", "generate"):
        a = actions(command)
        assert tuple(a["AdaptiveConfig.criterion"].choices) == CRITERIA
        # Unset flags leave AdaptiveConfig's defaults: one default everywhere (its value is test_adaptive's).
        args = build_parser().parse_args([command, "runs/a", "--adaptive"])
        assert commands._adaptive(args) == AdaptiveConfig()
        args = build_parser().parse_args([command, "runs/a", "--adaptive", "--threshold", "0.2", "--max-loops", "3"])
        assert commands._adaptive(args) == AdaptiveConfig(threshold=0.2, max_loops=3)
    bench = actions("bench")
    assert tuple(bench["BenchConfig.loop_rule"].choices) == config.LOOP_RULES
    assert tuple(bench["BenchConfig.preset"].choices) == tuple(sorted(config.PRESETS))


@pytest.mark.parametrize("command", ["prepare", "train", "eval", "generate", "bench", "demo", "export", "import"])
def test_every_flag_has_a_sentence(command):
    """Every flag (serve's aside) says what it does in words, not only its default."""
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            words = (action.help or "").split()
            assert len(words) >= 3 and not words[0].startswith("(default"), (action.option_strings, action.help)


def test_bench_flags_are_benchconfig_fields(capsys, monkeypatch):
    """bench's flags come from BenchConfig (help from the field docstrings); the old --no-X spellings still work."""
    from loopnn import bench
    from loopnn.fields import field_help, undocumented
    from loopnn.options import AdaptiveConfig, BenchConfig

    assert undocumented(BenchConfig) == [] and undocumented(AdaptiveConfig) == []
    seen = []
    monkeypatch.setattr(bench, "run_bench", lambda bc, log: seen.append(bc) or [])
    monkeypatch.setattr(bench, "table", lambda records: "")
    monkeypatch.setattr(bench, "write_jsonl", lambda records, path: "")
    assert main(["bench", "--preset", "debug", "--steps", "2", "--no-hf", "--no-memory", "--gen-repeats", "1"]) == 0
    assert seen == [BenchConfig(preset="debug", steps=2, hf=False, memory=False, gen_repeats=1)]
    one_error_line(capsys, ["bench", "--steps", "0"], "steps must be >= 1")
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for name, doc in field_help(BenchConfig).items():
        assert doc[:30] in help_text, (name, doc)


def test_version(capsys):
    import loopnn

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"loopnn {loopnn.__version__}"


def test_print_config_shows_the_resolved_configs_and_trains_nothing(tmp_path, capsys):
    """defaults < preset < TOML < flags, printed as the JSON a run saves; nothing is written."""
    import json

    from loopnn import preset

    recipe = tmp_path / "r.toml"
    recipe.write_text('preset = "debug"\n[model]\nn_loops = 3\n[train]\nlr = 1e-3\nmax_steps = 7\n')
    out = tmp_path / "run"
    argv = ["train", "--config", str(recipe), "--lr", "2e-3", "--data-dir", str(tmp_path / "none"), "--out-dir"]
    assert main([*argv, str(out), "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["model_config"]["n_loops"] == 3
    assert printed["model_config"]["n_embd"] == preset("debug")["n_embd"] != ModelConfig.n_embd
    assert printed["train_config"]["lr"] == 2e-3 and printed["train_config"]["max_steps"] == 7
    assert printed["train_config"]["warmup_steps"] == TrainConfig.warmup_steps
    assert not out.exists()


def test_every_train_flag_explains_itself(capsys):
    """Each config field has a docstring (loopnn.fields), and `train --help` shows it beside its flag."""
    from loopnn.config import ModelConfig, TrainConfig
    from loopnn.fields import field_help, undocumented

    assert undocumented(ModelConfig) == [] and undocumented(TrainConfig) == []
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for cls in (ModelConfig, TrainConfig):
        for name, doc in field_help(cls).items():
            assert doc[:30] in help_text, (name, doc)


def test_field_help_reads_attribute_docstrings():
    from loopnn.fields import field_help, undocumented

    @dataclasses.dataclass
    class Knobs:
        width: int = 3
        """How wide,
        folded."""
        depth: int = 1

    assert field_help(Knobs) == {"width": "How wide, folded."}
    assert undocumented(Knobs) == ["depth"]


def test_shipped_recipes_are_found_by_name_from_any_directory(tmp_path, monkeypatch):
    """The recipes ship inside the package; `--config cpu/loop-81m` and the checkout path `configs/cpu/...` both
    find them outside a checkout, and an unknown name lists the shipped ones."""
    from loopnn.recipes import RECIPES, load_toml, recipe_names, recipe_path

    monkeypatch.chdir(tmp_path)
    assert {"cpu/loop-81m", "paper/gpt2-124m"} <= set(recipe_names())
    for name in ("cpu/loop-81m", "cpu/loop-81m.toml", "configs/cpu/loop-81m.toml"):
        assert recipe_path(name) == RECIPES / "cpu" / "loop-81m.toml"
    assert load_toml("paper/loop-81m")["preset"] == "loop-81m"
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "loop-81m.toml").write_text("[model]\nn_loops = 5\n")  # a local file wins over the name
    assert load_toml("cpu/loop-81m.toml")["model"] == {"n_loops": 5}
    with pytest.raises(LoopnnError, match="shipped recipe: .*cpu/loop-81m"):
        load_toml("cpu/nope")


def test_packaging_files_exist():
    """LICENSE (pyproject's license-files) and py.typed (package data) are real files."""
    from pathlib import Path

    import loopnn

    root = Path(__file__).resolve().parents[1]
    assert "MIT License" in (root / "LICENSE").read_text()
    assert (Path(loopnn.__file__).parent / "py.typed").is_file()


def _float_fields(cls):
    return [f.name for f in dataclasses.fields(cls) if str(f.type).startswith("float")]


@pytest.mark.parametrize(
    "cls,name", [(c, n) for c in (ModelConfig, TrainConfig) for n in _float_fields(c)], ids=lambda x: str(x)
)
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), 1e39, -1e39])
def test_every_float_field_is_refused_outside_float32(cls, name, value):
    """Every float field of the configs, present and future: infinities, NaN and magnitudes float32 cannot hold
    are refused with a LoopnnError naming the field (the CLI prints it as one line, exit 2)."""
    with pytest.raises(LoopnnError, match=name):
        cls(**{name: value})


@pytest.mark.parametrize(
    "flags,match",
    [
        (["--lr", "1e38", "--warmup-steps", "0"], "overflows float32 in AdamW's first step"),  # lr / (1 - beta1)
        (["--lr", "1e37", "--beta1", "0.99", "--weight-decay", "0"], "overflows float32"),
        (["--lr", "10", "--weight-decay", "0.5"], "lr x weight_decay"),
        (["--grad-clip", "inf"], "grad_clip"),
        (["--dropout", "nan"], "dropout"),
        (["--gate-init", "2000", "--loop-rule", "gated"], "gate_init"),
        (["--injection-scale", "1e39"], "injection_scale"),
        (["--loop-grow-at", "nan"], "loop_grow_at"),
    ],
)
def test_float_flags_beyond_what_training_holds_are_one_line(flags, match, capsys):
    one_error_line(capsys, ["train", "--preset", "debug", "--data-dir", "x", *flags], match)


def test_loop_counts_beyond_the_cap_are_one_line_not_a_hang(tmp_path, capsys):
    """A test-time loop count of 1e23 would run for ever: refused before any model work, one line, exit 2."""
    from loopnn.config import MAX_LOOPS

    huge = "99999999999999999999999"
    for argv in (["eval", str(tmp_path / "none"), "--loops", f"1,{huge}"], ["eval", str(tmp_path), "--n-loops", huge]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"between 1 and {MAX_LOOPS}" in err
