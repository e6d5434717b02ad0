"""Property tests (hypothesis): bad input anywhere gives a LoopnnError or one line + exit 2, never a traceback.

Configs over any values, CLI argument lists for train/eval/generate/prepare, and corrupted token files (which
TokenData must catch before any training starts). Small example counts keep the file well under 30 s.
"""

import contextlib
import dataclasses
import itertools
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loopnn import LoopGPT, ModelConfig, TrainConfig, preset
from loopnn import checkpoint as ckpt
from loopnn.cli import main
from loopnn.config import to_dict
from loopnn.data import TokenData, prepare
from loopnn.errors import LoopnnError
from loopnn.recipes import model_config_from_dict, train_config_from_dict

# LOOPNN_EXAMPLES=500 for a longer hunt; 40 keeps the default run short.
SETTINGS = settings(
    max_examples=int(os.environ.get("LOOPNN_EXAMPLES", "40")), deadline=None, suppress_health_check=list(HealthCheck)
)
TEXT = "".join(f"line {i}: the loop runs the same blocks again, {i * i} times over.\n" for i in range(120))

# ----------------------------------------------------------------------------- configs

any_json = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.integers(min_value=10**300, max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def typed_values(f: dataclasses.Field):
    """Values of the field's annotated type: small and huge, negative, NaN and infinities."""
    kind = str(f.type)
    options = []
    if "int" in kind:
        options += [st.integers(-3, 70), st.integers(-(10**20), 10**20)]
    if "float" in kind:
        options += [st.floats(allow_nan=True, allow_infinity=True), st.floats(-2, 2)]
    if "str" in kind:
        options += [st.sampled_from(["stack", "layer", "repeat", "gated", "auto", "cpu", "cuda:0", "x"]), st.text()]
    if "bool" in kind:
        options += [st.booleans()]
    if "None" in kind:
        options += [st.none()]
    return st.one_of(options)


def fields_strategy(cls, values):
    fields = dataclasses.fields(cls)
    return st.fixed_dictionaries({}, optional={f.name: values(f) for f in fields})


@SETTINGS
@given(st.data())
def test_configs_from_any_json_are_valid_or_loopnn_error(data):
    for cls, load in ((ModelConfig, model_config_from_dict), (TrainConfig, train_config_from_dict)):
        values = data.draw(fields_strategy(cls, lambda f: st.one_of(typed_values(f), any_json)))
        if data.draw(st.booleans()):
            values = values | data.draw(st.dictionaries(st.text(max_size=6), any_json, max_size=2))
        try:
            cfg = load(values)
        except LoopnnError as e:
            assert str(e) and "\n" not in str(e)
            continue
        assert load(to_dict(cfg)) == cfg  # a valid config survives its own JSON round trip


@SETTINGS
@given(st.data())
def test_configs_from_typed_values_are_valid_or_loopnn_error(data):
    for cls in (ModelConfig, TrainConfig):
        values = data.draw(fields_strategy(cls, typed_values))
        with contextlib.suppress(LoopnnError):
            cls(**values)


@SETTINGS
@given(st.dictionaries(st.sampled_from(["preset", "model", "train", "other"]), any_json, max_size=3))
def test_any_toml_shape_is_valid_or_loopnn_error(tmp_path_factory, doc):
    from loopnn.recipes import resolve

    path = tmp_path_factory.mktemp("toml") / "recipe.toml"
    lines = [f"{k} = {json.dumps(v)}" for k, v in doc.items() if v is not None and not isinstance(v, dict)]
    lines += [
        f"[{k}]\n" + "\n".join(f"{json.dumps(a)} = {b}" for a, b in v.items())
        for k, v in doc.items()
        if isinstance(v, dict)
    ]
    path.write_text("\n".join(lines) + "\n")
    with contextlib.suppress(LoopnnError):
        resolve(toml_path=path)


# ----------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny prepared dataset, a tiny valid checkpoint, a damaged one, a pickle, an empty file."""
    root = tmp_path_factory.mktemp("world")
    (root / "corpus.txt").write_text(TEXT)
    (root / "empty.txt").write_text("")
    prepare(str(root / "corpus.txt"), root / "data", tokenizer="bytes", progress=False)
    cfg = ModelConfig(**(preset("debug") | dict(block_size=32)))
    good = ckpt.save_checkpoint(root / "run", 1, LoopGPT(cfg), cfg, {"data_dir": str(root / "data"), "seq_len": 16})
    ckpt.save_checkpoint(root / "damaged", 1, LoopGPT(cfg), cfg)
    weights = root / "damaged" / "checkpoints" / "step-0000001" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    torch.save({"w": torch.zeros(1)}, root / "model.pt")
    return root, good


values = st.one_of(
    st.sampled_from(
        [
            "0",
            "1",
            "2",
            "3",
            "-1",
            "0.5",
            "1e400",
            "nan",
            "inf",
            "-inf",
            "",
            "abc",
            "1,2",
            "1,x",
            "99999999999999999999999",
            "/proc/x",
        ]
    ),
    st.integers(-5, 40).map(str),
    st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=6),
)

FLAGS = {
    "train": [
        "--preset",
        "--config",
        "--n-loops",
        "--n-layer",
        "--n-embd",
        "--n-head",
        "--loop-start",
        "--loop-end",
        "--loop-rule",
        "--loop-strategy",
        "--dropout",
        "--gate-init",
        "--vocab-size",
        "--block-size",
        "--lr",
        "--batch-size",
        "--seq-len",
        "--max-steps",
        "--warmup-steps",
        "--grad-clip",
        "--device",
        "--dtype",
        "--keep-checkpoints",
        "--ckpt-interval",
        "--min-lr-ratio",
        "--beta1",
        "--seed",
    ],
    "eval": [
        "--max-tokens",
        "--batch-size",
        "--seq-len",
        "--loops",
        "--device",
        "--n-loops",
        "--criterion",
        "--threshold",
        "--min-loops",
        "--max-loops",
        "--data",
    ],
    "generate": [
        "--prompt",
        "--temperature",
        "--top-k",
        "--top-p",
        "--seed",
        "--n-loops",
        "--tokenizer",
        "--device",
        "--prompts-file",
        "--threshold",
        "--min-loops",
        "--max-loops",
        "--criterion",
    ],
    "prepare": ["--tokenizer", "--vocab-size", "--val-fraction"],
}
SWITCHES = {
    "train": ["--resume", "--overwrite", "--bias", "--no-bias"],
    "eval": ["--per-loop", "--adaptive"],
    "generate": ["--stream", "--no-cache", "--stop-at-eot", "--adaptive"],
    "prepare": ["--overwrite"],
}
_counter = itertools.count()


@st.composite
def argv_for(draw, command, world):
    root, good = world
    argv = [command]
    if command in ("eval", "generate"):
        argv.append(
            draw(
                st.sampled_from([str(good), str(root / "run"), str(root / "damaged"), str(root / "model.pt"), "/nope"])
            )
        )
    if command == "prepare":
        argv.append(draw(st.sampled_from([str(root / "corpus.txt"), str(root / "empty.txt"), "/nope.txt"])))
    for flag in draw(st.lists(st.sampled_from(FLAGS[command]), max_size=5)):
        argv += [flag, draw(values)]
    argv += draw(st.lists(st.sampled_from(SWITCHES[command]), max_size=2))
    if command == "train":  # never a real run: the data is missing or damaged
        argv += ["--data-dir", draw(st.sampled_from(["/nope", str(root)]))]
    if command == "generate":
        argv += ["--max-new-tokens", draw(st.sampled_from(["-1", "0", "2"]))]
    if command == "eval":
        argv += ["--max-tokens", draw(st.sampled_from(["-3", "0", "16", "64"]))]
    if command == "prepare":
        argv += ["--out", str(root / f"prepared-{next(_counter)}")]
    return argv


def run_cli(argv, capsys):
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse usage errors and --help
        code = e.code
    out, err = capsys.readouterr()
    assert code in (0, 2), (argv, code, err)
    assert "Traceback" not in err
    if code == 2:
        assert len(err.strip().splitlines()) == 1, (argv, err)


@pytest.mark.parametrize("command", ["train", "eval", "generate", "prepare"])
def test_cli_exits_0_or_2_with_one_line(command, world, capsys):
    @SETTINGS
    @given(argv_for(command, world))
    def check(argv):
        run_cli(argv, capsys)

    check()


# ----------------------------------------------------------------------------- token files


CORRUPTIONS = ["truncate", "append", "dtype", "big_id", "small_vocab", "bad_vocab", "drop_key", "cut_meta", "count"]


@SETTINGS
@given(kind=st.sampled_from(CORRUPTIONS), split=st.sampled_from(["train", "val"]), data=st.data())
def test_corrupted_token_files_are_caught_before_training(world, kind, split, data):
    root, _ = world
    work = Path(tempfile.mkdtemp())
    try:
        shutil.copytree(root / "data", work / "data")
        d = work / "data"
        meta = json.loads((d / "meta.json").read_text())
        path = d / f"{split}.bin"
        raw = bytearray(path.read_bytes())
        if kind == "truncate":
            path.write_bytes(raw[: data.draw(st.integers(0, len(raw) - 1))])
        elif kind == "append":
            path.write_bytes(raw + bytes(data.draw(st.integers(1, 5))))
        elif kind == "big_id":
            tokens = np.frombuffer(bytes(raw), dtype=np.uint16).copy()
            tokens[data.draw(st.integers(0, len(tokens) - 1))] = data.draw(st.integers(meta["vocab_size"], 65535))
            path.write_bytes(tokens.tobytes())
        else:
            if kind == "dtype":
                meta["dtype"] = data.draw(st.sampled_from(["uint32", "int64", "float32", "", "uint8"]))
            elif kind == "small_vocab":
                meta["vocab_size"] = data.draw(st.integers(2, int(np.fromfile(path, dtype=np.uint16).max())))
            elif kind == "bad_vocab":
                meta["vocab_size"] = data.draw(st.sampled_from([-1, 0, 1, "256", None, 2.5, 10**20]))
            elif kind == "drop_key":
                del meta[data.draw(st.sampled_from(["vocab_size", "dtype", "train_tokens", "format_version"]))]
            elif kind == "count":
                meta[f"{split}_tokens"] += data.draw(st.sampled_from([-1, 1, 1000]))
            text = json.dumps(meta)
            if kind == "cut_meta":
                text = text[: data.draw(st.integers(0, len(text) - 1))]
            (d / "meta.json").write_text(text)
        with pytest.raises(LoopnnError, match="prepare"):
            TokenData(d)
        from loopnn.train import train

        mc = ModelConfig(**(preset("debug") | dict(block_size=16)))
        with pytest.raises(LoopnnError):
            train(mc, TrainConfig(data_dir=str(d), out_dir=str(work / "run"), max_steps=1, progress=False))
        assert not (work / "run").exists()  # refused before the run directory was touched
    finally:
        shutil.rmtree(work)
