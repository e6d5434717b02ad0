"""The one loop driver: slot order, the per-loop hook (states, row exits), and no second walker of the loop."""

import ast
from pathlib import Path

import pytest
import torch

import loopnn
from loopnn import LoopGPT, ModelConfig, loop, preset


def make(strategy="stack", region=(1, 3), n_loops=3, **kw):
    torch.manual_seed(0)
    base = preset("debug") | dict(n_layer=4, n_loops=n_loops, loop_rule="gated", loop_strategy=strategy)
    return LoopGPT(ModelConfig(**(base | dict(loop_start=region[0], loop_end=region[1]) | kw))).eval()


@pytest.mark.parametrize("strategy", ["stack", "layer"])
@pytest.mark.parametrize("n_loops", [1, 3])
def test_run_applies_blocks_in_slot_order(strategy, n_loops):
    """Every block application gets the next slot: slot() is the order run() walks the blocks in."""
    model = make(strategy)
    cfg, seen = model.config, []

    def call(i, s, h, rows):
        seen.append((s, i))
        return model.transformer.h[i](h)

    loop.run(cfg, model.embed(torch.randint(0, 256, (1, 5))), n_loops, model.loop_gate, call)
    assert [s for s, _ in seen] == list(range(cfg.effective_depth(n_loops)))
    region = range(cfg.loop_start, cfg.loop_end)
    looped = [i for _, i in seen if i in region]
    per_loop = list(region) * n_loops if strategy == "stack" else [i for i in region for _ in range(n_loops)]
    assert looped == per_loop
    if strategy == "stack":
        assert [i for s, i in seen if s in loop.region_slots(cfg, n_loops, n_loops - 1)] == list(region)


def test_hook_sees_each_loop_and_exited_rows_stop():
    model = make(n_loops=4)
    x = model.embed(torch.randint(0, 256, (3, 6)))
    states = []
    full = model.body(x, loop_states=states)
    assert len(states) == 4 and torch.equal(model.coda(states[-1]), full)
    seen = []

    def exit_row_1_after_loop_2(step: loop.LoopState):
        seen.append((step.n, None if step.rows is None else step.rows.tolist(), step.x.shape[0]))
        if step.n == 1:
            return torch.tensor([False, True, False])
        return None

    out = model.body(x, after_loop=exit_row_1_after_loop_2)
    assert seen == [(0, None, 3), (1, None, 3), (2, [0, 2], 2), (3, [0, 2], 2)]
    # rows 0 and 2 ran all 4 loops; row 1 left after 2 loops and went through the coda from there
    torch.testing.assert_close(out[[0, 2]], full[[0, 2]], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[1], model.coda(states[1])[1], rtol=0, atol=1e-6)
    assert not torch.allclose(out[1], full[1])


def test_one_loop_driver():
    """No module but loop.py walks the prelude, the loop region or the coda (the issue's grep, as a test)."""
    src = Path(loopnn.__file__).parent
    offenders = []
    for path in src.rglob("*.py"):
        if path.name == "loop.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "range":
                names = {a.attr for a in node.args if isinstance(a, ast.Attribute)}
                if names & {"loop_start", "loop_end"}:
                    offenders.append(f"{path.relative_to(src)}:{node.lineno}")
    assert offenders == []
