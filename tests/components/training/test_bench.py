"""The SFT packing benchmark's measurement: both modes over the same samples (same real tokens), interleaved
repetitions, the speedup as the median of per-repetition ratios with its spread."""

from __future__ import annotations

import statistics

import pytest

from vlpipe.components.training.bench import bench_sft_packing, schedule, spread


def test_spread_is_range_over_median():
    assert spread([1.0, 2.0, 3.0]) == pytest.approx((3 - 1) / 2)
    assert spread([0.9, 1.0, 1.05, 1.1]) == pytest.approx((1.1 - 0.9) / 1.025)
    assert spread([2.0]) == 0.0


def test_schedule_interleaves_by_progress_and_alternates_ties():
    # a0, b0; then a at 1/2 and b at 1/4: b1; a tie at 1/2: a1 (rep 0) ...
    assert schedule({"a": 2, "b": 4}, 0) == [("a", 0), ("b", 0), ("b", 1), ("a", 1), ("b", 2), ("b", 3)]
    # ... and b first on odd repetitions.
    assert schedule({"a": 2, "b": 4}, 1) == [("b", 0), ("a", 0), ("b", 1), ("b", 2), ("a", 1), ("b", 3)]
    assert sorted(schedule({"a": 3, "b": 5}, 0)) == [("a", i) for i in range(3)] + [
        ("b", i) for i in range(5)
    ]


def test_both_modes_count_the_same_real_tokens_and_repeat(workspace):
    result = bench_sft_packing(
        workspace["init"], workspace["data"] / "meta_sft.json", samples=9, max_tokens=256, repeats=2
    )
    packed, padded = result["packed"], result["padded"]
    assert packed["real_tokens"] == padded["real_tokens"] > 0  # the same samples in both modes
    assert packed["micro_batches"] < padded["micro_batches"] == 2  # 9 samples, 8 per padded micro-batch
    assert len(packed["tokens_per_s_runs"]) == len(padded["tokens_per_s_runs"]) == 2
    assert packed["tokens_per_s"] == pytest.approx(statistics.median(packed["tokens_per_s_runs"]), abs=0.1)
    ratios = [a / b for a, b in zip(packed["tokens_per_s_runs"], padded["tokens_per_s_runs"], strict=True)]
    assert result["speedup_runs"] == pytest.approx(ratios, abs=2e-3)
    assert result["speedup_tokens_per_s"] == pytest.approx(statistics.median(ratios), abs=2e-3)
    assert result["speedup_spread"] == pytest.approx(spread(ratios), abs=2e-3)
    assert 0 < padded["token_utilisation"] <= 1 and 0 < packed["token_utilisation"] <= 1
    assert "mfu" not in packed  # CPU: no peak FLOP/s to divide by
    assert result["threads"] == 1


def test_mfu_is_six_parameters_per_token_over_peak(workspace):
    result = bench_sft_packing(
        workspace["init"], workspace["data"] / "meta_sft.json", samples=9, max_tokens=256, repeats=1, peak=1e9
    )
    for mode in ("packed", "padded"):
        expected = 6 * result["parameters"] * result[mode]["tokens_per_s"] / 1e9
        assert result[mode]["mfu"] == pytest.approx(expected, rel=1e-3, abs=1e-4)
