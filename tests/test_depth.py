"""The effective-depth exponent (loopnn.depth) on hand-made numbers, and its place in `compare`."""

import math

import pytest

from loopnn.depth import dense_equivalent_depth, depth_table, label_of, markdown


def rows_from(plain: dict[int, list[float]], looped: dict[tuple[int, int], list[float]], label="loop"):
    rows = []
    for d, losses in plain.items():
        for seed, loss in enumerate(losses, 1):
            rows.append(dict(label=f"plain-{d}", unique_blocks=d, loops=1, effective_depth=d, val_loss=loss, seed=seed))
    for (k, r), losses in looped.items():
        for seed, loss in enumerate(losses, 1):
            rows.append(dict(label=f"{label}-{k}x{r}", unique_blocks=k, loops=r, effective_depth=k * r,
                             val_loss=loss, seed=seed))  # fmt: skip
    return rows


def test_dense_equivalent_depth_interpolates_in_log_depth():
    plain = {1: 5.0, 2: 4.0, 4: 3.5}
    assert dense_equivalent_depth(plain, 4.0) == (pytest.approx(2.0), False)
    assert dense_equivalent_depth(plain, 4.5) == (pytest.approx(math.sqrt(2)), False)  # halfway in log depth
    assert dense_equivalent_depth(plain, 3.75) == (pytest.approx(2 * math.sqrt(2)), False)
    d, extrapolated = dense_equivalent_depth(plain, 5.5)  # worse than 1 block: first segment extended
    assert extrapolated and d == pytest.approx(2**-0.5)
    assert dense_equivalent_depth({1: 5.0}, 4.0) == (None, False)


def test_phi_and_share_from_hand_made_losses():
    # plain 1 -> 2 -> 4 blocks: 5.0, 4.0, 3.5 (both seeds); loop 1x2 at 4.5: halfway in log depth -> phi 0.5,
    # share (5.0 - 4.5) / (5.0 - 4.0) = 0.5. loop 1x4 at 4.0: worth 2 blocks -> phi = log 2 / log 4 = 0.5,
    # share (5.0 - 4.0) / (5.0 - 3.5) = 2/3.
    rows = rows_from({1: [5.0, 5.0], 2: [4.0, 4.0], 4: [3.5, 3.5]}, {(1, 2): [4.5, 4.5], (1, 4): [4.0, 4.0]})
    table = {e["label"]: e for e in depth_table(rows)}
    assert table["loop-1x2"]["phi"] == pytest.approx(0.5) and table["loop-1x2"]["share"] == pytest.approx(0.5)
    assert table["loop-1x4"]["phi"] == pytest.approx(0.5) and table["loop-1x4"]["share"] == pytest.approx(2 / 3)
    assert table["loop-1x2"]["phi_spread"] == 0 and table["loop-1x2"]["seeds"] == 2
    assert "loop-1x2 | 1 x 2 | 2 | 4.5000" in markdown(list(table.values()))


def test_phi_is_paired_by_seed_and_reports_spread():
    # seed 1: plain 5.0 / 4.0, loop 4.0 (worth the second block: phi 1); seed 2: plain 5.2 / 4.2, loop 5.2 (phi 0)
    rows = rows_from({1: [5.0, 5.2], 2: [4.0, 4.2]}, {(1, 2): [4.0, 5.2]})
    (e,) = depth_table(rows)
    assert e["phi"] == pytest.approx(0.5) and e["phi_spread"] == pytest.approx(1.0)
    assert e["share"] == pytest.approx(0.5) and e["loss"] == pytest.approx(4.6)


def test_a_loop_that_hurts_has_negative_phi():
    (e,) = depth_table(rows_from({1: [5.0], 2: [4.0]}, {(1, 2): [5.5]}))
    assert e["phi"] == pytest.approx(-0.5) and e["share"] == pytest.approx(-0.5) and e["extrapolated"]


def test_label_strips_the_seed_suffix():
    assert label_of("loop-1x2-embed-s1337") == "loop-1x2-embed" and label_of("base") == "base"


def test_phi_is_undefined_where_depth_does_not_pay():
    (e,) = depth_table(rows_from({2: [4.65], 4: [4.71]}, {(2, 2): [4.79]}))
    assert e["phi"] is None and e["share"] is None and e["loss"] == pytest.approx(4.79)
    assert "n/a" in markdown([e])
