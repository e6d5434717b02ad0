"""The KV cache's operations on their own: append, rewind, padding masks, joining/dropping/shifting left-padded rows,
preallocation and KV sharing for adaptive exit. Small hand-made tensors, so each expected value is written out."""

import pytest
import torch

from loopnn import LoopnnError, ModelConfig, preset
from loopnn.kvcache import KVCache, RowsKV, left_pad, one_query_mask, padding_mask, positions_from_padding
from loopnn.loop import region_slots

NH, HS = 2, 3


def kv(B: int, T: int, start: float) -> torch.Tensor:
    """(B, NH, T, HS) whose every entry at (b, :, t, :) is start + 100 b + t: positions are readable."""
    t = torch.arange(T, dtype=torch.float32)[None, None, :, None] + start
    b = 100 * torch.arange(B, dtype=torch.float32)[:, None, None, None]
    return (t + b).expand(B, NH, T, HS).clone()


def prefilled(P: int, n_slots: int = 2, start: float = 0.0) -> KVCache:
    """A batch-of-one cache of P positions in n_slots slots (slot i holds start + 10 i + t in k, minus that in v)."""
    cache = KVCache(P)
    for i in range(n_slots):
        k = kv(1, P, start + 10 * i)
        cache.slot(i).update(k, -k)
    cache.advance(P)
    return cache


def test_update_appends_and_returns_the_history():
    cache = KVCache(8)
    slot = cache.slot(0)
    first, _ = slot.update(kv(2, 3, 0.0), kv(2, 3, 0.0))
    assert first.shape == (2, NH, 3, HS)
    cache.advance(3)
    k, v = slot.update(kv(2, 2, 3.0), -kv(2, 2, 3.0))
    cache.advance(2)
    assert k.shape == (2, NH, 5, HS) and cache.length == 5
    assert torch.equal(k, kv(2, 5, 0.0))  # positions 0..4 in order, the second write after the first
    assert torch.equal(v[:, :, 3:], -kv(2, 2, 3.0))


def test_rewind_forgets_positions_and_refuses_to_go_forward():
    cache = prefilled(4)
    cache.rewind(2)
    assert cache.length == 2
    with pytest.raises(LoopnnError, match="rewind"):
        cache.rewind(3)


def test_padding_mask():
    assert padding_mask(4, 0, None, torch.device("cpu")) is None  # causal fast path
    assert padding_mask(1, 5, torch.ones(2, 6), torch.device("cpu")) is None  # nothing padded, one query
    with pytest.raises(LoopnnError, match="padding has length 5"):
        padding_mask(2, 2, torch.ones(1, 5), torch.device("cpu"))
    _, padding = left_pad([[7, 8, 9], [4]])
    mask = padding_mask(3, 0, padding, torch.device("cpu"))  # (2, 1, 3, 3)
    assert mask[0, 0].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    # row 1: two padding positions; its padding queries see only themselves, its real query only itself
    assert mask[1, 0].tolist() == [[True, False, False], [False, True, False], [False, False, True]]
    assert one_query_mask(None) is None
    assert one_query_mask(padding).shape == (2, 1, 1, 3)


def test_left_pad_and_positions():
    idx, padding = left_pad([[1, 2], [3, 4, 5, 6]], pad_id=0)
    assert idx.tolist() == [[0, 0, 1, 2], [3, 4, 5, 6]]
    assert padding.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert positions_from_padding(padding.bool()).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]
    with pytest.raises(LoopnnError, match="at least one token"):
        left_pad([[1], []])


def test_join_left_pads_and_a_longer_row_shifts_the_batch():
    batch = KVCache(8)
    batch.join(prefilled(2, start=0.0))
    assert batch.rows == 1 and batch.length == 2
    batch.join(prefilled(4, start=1000.0))  # longer: row 0 moves right by 2
    assert batch.rows == 2 and batch.length == 4
    assert batch.padding[:, :4].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    for i in range(2):
        k = batch.slot(i).k
        assert torch.equal(k[0:1, :, 2:4], kv(1, 2, 10.0 * i))  # row 0's two positions, now at 2..3
        assert torch.equal(k[1:2, :, 0:4], kv(1, 4, 1000.0 + 10 * i))
        assert torch.equal(batch.slot(i).v[1:2, :, 0:4], -kv(1, 4, 1000.0 + 10 * i))
    batch.join(prefilled(1, start=500.0))  # shorter: padded on the left, nothing moves
    assert batch.length == 4 and batch.padding[2, :4].tolist() == [0, 0, 0, 1]
    assert torch.equal(batch.slot(1).k[2:3, :, 3:4], kv(1, 1, 510.0))


def test_select_rows_then_shift_left_trims_the_shared_padding():
    batch = KVCache(8)
    for P, start in [(2, 0.0), (4, 1000.0), (3, 2000.0)]:
        batch.join(prefilled(P, start=start))
    batch.select_rows(torch.tensor([2, 0]))  # drop the longest row, reorder the others
    assert batch.rows == 2 and batch.padding[:, :4].tolist() == [[0, 1, 1, 1], [0, 0, 1, 1]]
    batch.shift(-1)
    assert batch.length == 3
    assert batch.padding[:, :4].tolist() == [[1, 1, 1, 0], [0, 1, 1, 0]]
    assert torch.equal(batch.slot(0).k[0:1, :, 0:3], kv(1, 3, 2000.0))
    assert torch.equal(batch.slot(0).k[1:2, :, 1:3], kv(1, 2, 0.0))
    step = batch.padding_for_step()
    assert step.tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]


def config() -> ModelConfig:
    return ModelConfig(**dict(preset("debug"), n_layer=3, n_head=NH, n_embd=NH * HS, loop_start=1, loop_end=2))


def test_allocate_views_the_region_and_select_rows_breaks_it():
    cfg = config()
    cache = KVCache(5)
    cache.allocate(cfg, batch=2, n_loops=3, like=torch.zeros(()))
    assert len(cache.slots) == cfg.effective_depth(3)
    assert all(s.k.shape == (2, NH, 5, HS) and not s.k.any() for s in cache.slots)
    assert cache.region_intact(cfg, 3) and not cache.region_intact(cfg, 2)
    cache.select_rows(torch.tensor([1, 0]))
    assert not cache.region_intact(cfg, 3)


@pytest.mark.parametrize("one_copy", [True, False])
def test_share_exit_copies_the_exit_loop_into_the_skipped_loops(one_copy):
    cfg = config()
    cache = KVCache(4)
    cache.allocate(cfg, batch=3, n_loops=3, like=torch.zeros(()))
    slots = [region_slots(cfg, 3, n)[0] for n in range(3)]  # the one looped block in loops 0, 1, 2
    for n, s in enumerate(slots):
        RowsKV(cache, s, None, 1).update(kv(3, 1, 10.0 * (n + 1)), -kv(3, 1, 10.0 * (n + 1)))
    if not one_copy:  # separate tensors, as a serving batch holds them
        cache.select_rows(torch.arange(3))
    cache.share_exit(cfg, 3, 0, torch.tensor([1]), 1, one_copy=one_copy)  # row 1 exited after loop 0
    k = [cache.slot(s).k[:, :, 1:2] for s in slots]
    assert torch.equal(k[1][1], k[0][1]) and torch.equal(k[2][1], k[0][1])  # row 1: loop 0's entry everywhere
    assert torch.equal(cache.slot(slots[2]).v[1, :, 1:2], -kv(3, 1, 10.0)[1])
    assert torch.equal(k[2][0], kv(3, 1, 30.0)[0]) and torch.equal(k[1][2], kv(3, 1, 20.0)[2])  # others kept
    assert not cache.slot(slots[2]).k[:, :, 0].any()  # other positions untouched


def test_rows_kv_writes_only_its_rows():
    cache = KVCache(3)
    cache.allocate(config(), batch=3, n_loops=1, like=torch.zeros(()))
    rows = torch.tensor([0, 2])
    k, v = RowsKV(cache, 0, rows, 0).update(kv(2, 1, 7.0), -kv(2, 1, 7.0))
    assert k.shape == (2, NH, 1, HS) and torch.equal(k, kv(2, 1, 7.0))
    assert not cache.slot(0).k[1].any()  # row 1 was not given: still zeros
    assert torch.equal(cache.slot(0).k[2, :, 0], kv(2, 1, 7.0)[1, :, 0])
