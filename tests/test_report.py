"""compare, the demo pipeline and the loop analysis on tiny runs: files exist, parse, and match the runs."""

import hashlib
import json
import re

import pytest

from loopnn import ModelConfig, TrainConfig, preset
from loopnn.recipes import resolve
from loopnn.report import compare, load_run
from loopnn.train import train


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from loopnn.data import prepare

    root = tmp_path_factory.mktemp("runs")
    prepare("pydoc", root / "data", tokenizer="bytes", progress=False)
    dirs = []
    for name, loops in (("plain", 1), ("looped", 3)):
        mc = ModelConfig(**(preset("debug") | dict(n_loops=loops)))
        tc = TrainConfig(
            data_dir=str(root / "data"),
            out_dir=str(root / name),
            batch_size=2,
            seq_len=32,
            max_steps=4,
            eval_interval=2,
            eval_tokens=256,
            progress=False,
        )
        train(mc, tc)
        dirs.append(root / name)
    return root, dirs


def test_compare_writes_tables_and_plots_that_match_the_runs(runs):
    root, dirs = runs
    out = root / "cmp"
    result = compare(dirs, out)
    for f in ("compare.md", "compare.json", "val_vs_tokens.png", "val_vs_flops.png"):
        assert (out / f).stat().st_size > 0
    assert (out / "val_vs_tokens.png").read_bytes()[:4] == b"\x89PNG"
    rows = {r["run"]: r for r in json.loads((out / "compare.json").read_text())["rows"]}
    for d in dirs:
        run = load_run(d)
        last_eval = [m for m in run["metrics"] if m["kind"] == "eval"][-1]
        assert rows[d.name]["val_loss"] == last_eval["val_loss"]
        assert rows[d.name]["tokens"] == run["summary"]["tokens"]
    # same parameters, 3x the FLOPs: one iso-parameter group, no iso-FLOP group
    assert rows["looped"]["params"] == rows["plain"]["params"]
    assert rows["looped"]["train_flops_per_token"] > 2.5 * rows["plain"]["train_flops_per_token"]
    assert "params" in result["markdown"] and "looped" in result["markdown"].split("Iso-parameter")[1]


def test_compare_refuses_unfinished_run(tmp_path):
    from loopnn.errors import LoopnnError

    with pytest.raises(LoopnnError, match="not a finished run"):
        compare([tmp_path], tmp_path / "out")


def test_eval_cli_per_loop_and_loop_counts(runs, capsys):
    from loopnn.cli import main

    root, dirs = runs
    out = root / "eval.json"
    assert (
        main(
            [
                "eval",
                str(dirs[1]),
                "--per-loop",
                "--loops",
                "1,2,3,5",
                "--max-tokens",
                "256",
                "--seq-len",
                "32",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert len(result["per_loop_loss"]) == 3
    assert result["per_loop_loss"][-1] == pytest.approx(result["loss"], abs=1e-5)
    assert result["loss_vs_loops"]["3"] == pytest.approx(result["loss"], abs=1e-5)
    assert result["loss_vs_loops"]["1"] == pytest.approx(result["per_loop_loss"][0], abs=1e-5)


def test_demo_pipeline_end_to_end(runs, tmp_path, monkeypatch):
    from loopnn import demo

    root, _ = runs
    monkeypatch.setattr(demo, "TRAIN", demo.TRAIN | dict(eval_tokens=1024))  # the pipeline, not the numbers
    monkeypatch.setattr(demo, "SHAPE", demo.SHAPE | dict(n_embd=32, n_head=2))
    result = demo.demo(str(tmp_path / "demo"), str(root / "data"), steps=2, seeds=(1, 2), progress=False, jobs=1)
    names = [r["model"] for r in result["rows"]]
    assert names == ["base", "loop", "deeper"] * 2
    for f in ("demo.md", "demo.json", "val_vs_tokens.png", "loss_vs_depth.png", "loop_analysis_loop-s1.png"):
        assert (tmp_path / "demo" / f).exists()
    analysis = json.loads((tmp_path / "demo" / "loop_analysis_loop-s1.json").read_text())
    assert len(analysis["per_loop_loss"]) == 2 and len(analysis["loss_vs_loops"]) == 4
    saved = json.loads((tmp_path / "demo" / "demo.json").read_text())
    loss = {(r["model"], r["seed"]): r["val_loss"] for r in saved["rows"]}
    depth_gains = [loss["base", s] - loss["deeper", s] for s in (1, 2)]
    loop_gains = [loss["base", s] - loss["loop", s] for s in (1, 2)]
    assert saved["depth_gain"] == pytest.approx(sum(depth_gains) / 2)
    assert saved["loop_gain"] == pytest.approx(sum(loop_gains) / 2)
    shares = [lg / dg for lg, dg in zip(loop_gains, depth_gains) if dg > 0]  # undefined where depth does not pay
    assert saved["share"] == (pytest.approx(sum(shares) / len(shares)) if shares else None)
    assert "phi" in saved and "A sample from loop-s1" in (tmp_path / "demo" / "demo.md").read_text()
    first = (tmp_path / "demo" / "demo.md").read_text().split("\n\n")[1]  # the paragraph after the title
    assert first.startswith("**Verdict") and first == saved["verdict"]
    digest = hashlib.sha256((root / "data" / "train.bin").read_bytes()).hexdigest()
    assert saved["corpus"]["train_sha256"] == digest and f"train.bin sha256 {digest}" in result["markdown"]
    # A rerun after the recipe changed (an upgraded loopnn) is refused before anything trains, with the way out.
    from loopnn.errors import LoopnnError

    before = {d.name: (d / "summary.json").read_bytes() for d in (tmp_path / "demo").glob("*-s[0-9]")}
    monkeypatch.setattr(demo, "RECIPE", demo.RECIPE | dict(loop_embedding=not demo.RECIPE.get("loop_embedding")))
    with pytest.raises(LoopnnError, match="pass --out-dir NEW, or delete .*loop-s1 to train loop again"):
        demo.demo(str(tmp_path / "demo"), str(root / "data"), steps=2, seeds=(1, 2), progress=False, jobs=1)
    assert before == {d.name: (d / "summary.json").read_bytes() for d in (tmp_path / "demo").glob("*-s[0-9]")}


def test_demo_full_trains_on_the_pinned_corpus(monkeypatch, tmp_path):
    from loopnn import demo

    class Prepared(Exception):
        pass

    seen = []

    def fake_data(data_dir, progress, corpus=demo.CORPUS):
        seen.append((data_dir, corpus["source"]))
        raise Prepared

    monkeypatch.setattr(demo, "_data", fake_data)
    for mode in (None, "lm", "full"):
        with pytest.raises(Prepared):
            demo.demo(str(tmp_path / "d"), mode=mode, progress=False)
    # the default: the copy task; --lm: Shakespeare; --full: the pinned corpus
    assert seen == [(None, "copies"), (None, demo.CORPUS["source"]), (None, "pycode")]
    assert demo.FULL_CORPUS["source"] in demo.CORPUS_NAMES and demo.FULL_CORPUS["source"] in demo.PROMPTS


def test_demo_default_is_the_copy_task_with_the_loss_on_the_repeats(tmp_path, monkeypatch):
    """`loopnn demo` with no arguments: the copies corpus prepared in data/copies-bytes, base and loop at the copy
    mode's context, and a report whose verdict names the task and whose table splits off the repeats."""
    from loopnn import demo
    from loopnn.data import synthetic

    monkeypatch.chdir(tmp_path)
    few = synthetic.copies_documents(200)
    monkeypatch.setattr(synthetic, "copies_documents", lambda: few)  # the pipeline, not the numbers
    monkeypatch.setattr(demo, "SHAPE", demo.SHAPE | dict(n_embd=32, n_head=2))
    monkeypatch.setattr(demo, "TRAIN", demo.TRAIN | dict(eval_tokens=1024))
    result = demo.demo(str(tmp_path / "d"), steps=2, progress=False)  # two lanes on a 2-core machine
    assert [r["model"] for r in result["rows"]] == ["base", "loop"] * 2
    assert result["corpus"]["source"] == "copies" and (tmp_path / "data" / "copies-bytes" / "train.bin").exists()
    runs = {(r["model"], r["seed"]): r for r in result["rows"]}
    assert set(result["copy_loss"]) == {"base", "loop"} and all(0 < v < 10 for v in result["copy_loss"].values())
    assert result["copy_loss"]["base"] == pytest.approx(
        (runs["base", 1]["copy_loss"] + runs["base", 2]["copy_loss"]) / 2
    )
    assert (
        "The task: random strings written three times" in result["verdict"] and "loopnn demo --lm" in result["verdict"]
    )
    assert "## Loss on the repeats of each line" in result["markdown"]
    saved = json.loads((tmp_path / "d" / "loop-s1" / "config.json").read_text())
    assert saved["model_config"]["block_size"] == 64 and saved["train_config"]["seq_len"] == 64


def test_demo_refuses_a_data_dir_that_holds_another_corpus(runs, tmp_path, monkeypatch):
    """data/shakespeare-bpe2048 prepared from other text (a name clash) is not silently trained on."""
    import shutil

    from loopnn import demo
    from loopnn.errors import LoopnnError

    root, _ = runs
    monkeypatch.chdir(tmp_path)
    shutil.copytree(root / "data", tmp_path / "data" / "shakespeare-bpe2048")
    with pytest.raises(LoopnnError, match="holds another corpus .*pass --data data/shakespeare-bpe2048"):
        demo.demo(str(tmp_path / "d"), mode="lm", progress=False)
    assert not (tmp_path / "d").exists()


def test_all_shipped_recipes_resolve():
    from pathlib import Path

    recipes = sorted(Path(__file__).parent.parent.glob("src/loopnn/configs/*/*.toml"))
    assert len(recipes) >= 8
    for path in recipes:
        mc, tc = resolve(toml_path=path)
        assert tc.max_steps > 0 and mc.n_loops >= 1


def test_demo_share_is_undefined_on_seeds_where_depth_does_not_pay():
    from loopnn.demo import gains

    rows = [
        dict(model="base", seed=1, val_loss=4.55), dict(model="loop", seed=1, val_loss=4.62),
        dict(model="deeper", seed=1, val_loss=4.56),  # depth does not pay on seed 1
        dict(model="base", seed=2, val_loss=4.00), dict(model="loop", seed=2, val_loss=3.95),
        dict(model="deeper", seed=2, val_loss=3.90),
    ]  # fmt: skip
    g = gains(rows)
    assert g["share"] == pytest.approx(0.5) and g["share_spread"] == 0
    assert g["depth_gain"] == pytest.approx((-0.01 + 0.10) / 2)
    assert gains(rows[:3])["share"] is None


def test_plots_of_evals_at_token_zero_warn_nothing(tmp_path):
    """Found by LOOPNN_EXAMPLES=2000: a metrics.jsonl whose evals sit at 0 tokens made the log-scaled FLOPs plot
    print matplotlib's "no positive values" warning under `compare`; such points are left off the log axis."""
    import warnings

    from loopnn.report import write_plots

    evals = [{"kind": "eval", "tokens": t, "val_loss": 5.0 - t / 1000} for t in (0, 0)]
    for extra in ([], [{"kind": "eval", "tokens": 512, "val_loss": 4.0}]):
        run = {"name": "r", "metrics": evals + extra, "summary": {"flops_per_token": {"total": 100}}}
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            paths = write_plots([run], tmp_path)
        assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)


def test_demo_verdict_reads_the_loop_gain_against_the_base_seed_spread():
    from loopnn.demo import gains, verdict

    def rows(base, loop, deeper=None):
        out = [dict(model="base", seed=s, val_loss=v) for s, v in enumerate(base, 1)]
        out += [dict(model="loop", seed=s, val_loss=v) for s, v in enumerate(loop, 1)]
        return out + [dict(model="deeper", seed=s, val_loss=v) for s, v in enumerate(deeper or [], 1)]

    pays = verdict(gains(rows([4.00, 4.02], [3.90, 3.91])), (1, 2), mode="lm", deeper=False)
    assert pays.startswith("**Verdict: looping pays here.**") and "0.1050 nats/token below" in pays
    assert re.search(r"\(5\.[23]x the base's seed spread, seeds 1, 2\)", pays) and "loopnn demo --full" in pays
    close = verdict(gains(rows([4.00, 4.10], [3.95, 4.05])), (1, 2), mode="lm", deeper=False)
    assert close.startswith("**Verdict: not resolved.**")  # gain 0.05 <= 2 x spread 0.10
    worse = verdict(gains(rows([4.00, 4.01], [4.10, 4.11])), (1, 2), mode="full", deeper=False)
    assert worse.startswith("**Verdict: looping did not pay here.**") and "0.1000 nats/token above" in worse
    assert "--full" not in worse
    share = verdict(gains(rows([4.0, 4.01], [3.9, 3.91], [3.8, 3.81])), (1, 2), mode="full", deeper=True)
    assert "recovers 0.50 of a second unique block's gain" in share
    # 3 seeds: the base's spread (0.041) hides a gain that every seed shows (paired gains 0.069-0.084)
    full = rows([3.0576, 3.0894, 3.0484], [2.9888, 3.0059, 2.9758])
    paired = verdict(gains(full), (1, 2, 3), mode="full", deeper=False)
    assert paired.startswith("**Verdict: looping pays here.**") and "on every seed, by 0.0750" in paired
    assert "(5.1x the spread of those gains, 0.0147; seeds 1, 2, 3; paired by seed" in paired
    one_worse = rows([3.0576, 3.0894, 3.0484], [2.9888, 3.0959, 2.9758])  # seed 2's loop above its base
    assert verdict(gains(one_worse), (1, 2, 3), mode="full", deeper=False).startswith("**Verdict: not resolved.**")
    two_seeds = rows([4.00, 4.10], [3.93, 4.02])  # paired gains 0.07 / 0.08, but two seeds are too few to pair
    assert verdict(gains(two_seeds), (1, 2), mode="lm", deeper=False).startswith("**Verdict: not resolved.**")
    one_seed = verdict(gains(rows([4.0], [3.9])), (1,), mode="lm", deeper=False)
    assert one_seed.startswith("**Verdict: not resolved.**")  # one seed has no spread to beat
    # the copy task names the task, the losses on the repeats, and where language modelling stands
    copy = verdict(
        gains(rows([2.4, 2.45], [1.2, 1.3])), (1, 2), mode="copy", deeper=False, split=dict(base=2.3, loop=0.4)
    )
    assert copy.startswith("**Verdict: looping pays here.**") and "base 2.30, loop 0.40 nats/token" in copy
    assert "ln 16 = 2.77" in copy and "loopnn demo --lm" in copy and "loopnn demo --full" in copy


def test_demo_roles_are_checked():
    from loopnn.demo import models
    from loopnn.errors import LoopnnError

    assert list(models(roles=("base", "loop"))) == ["base", "loop"]
    for bad in (("loop", "deeper"), ("base",), ("base", "wider")):
        with pytest.raises(LoopnnError, match="--roles takes base plus loop and/or deeper"):
            models(roles=bad)


def test_demo_ablation_builds_a_valid_config_for_every_rule_and_strategy(runs, monkeypatch):
    """The recipe's loop-boundary levers (injection, loop_norm) are dropped where the layer strategy has no boundary."""
    from loopnn import demo

    root, _ = runs
    planned = []

    class Planned(Exception):
        pass

    def capture(plan):
        planned.extend(plan)
        raise Planned

    monkeypatch.setattr(demo, "_train_all", capture)
    with pytest.raises(Planned):
        demo.ablation("unused", str(root / "data"), steps=2, seeds=(1,), progress=False)
    layer = [mc for name, mc, _ in planned if name.endswith("-layer")]
    assert layer and all(mc.loop_norm == "none" and mc.injection == "none" for mc in layer)
    assert any(mc.loop_norm == demo.RECIPE["loop_norm"] for name, mc, _ in planned if name.endswith("-stack"))
