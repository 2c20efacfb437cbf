"""`check_sampling`: the sampling settings `generate` refuses before any work (they overflow or crash inside)."""

from __future__ import annotations

import pytest

from vlpipe.model.generate import MIN_TEMPERATURE, SEED_MAX, SEED_MIN, check_sampling


def test_check_sampling_bounds():
    for temperature, top_p, seed in [
        (0.0, 1.0, None),
        (MIN_TEMPERATURE, 0.5, SEED_MAX),
        (50.0, 1e-9, SEED_MIN),
    ]:
        check_sampling(temperature, top_p, seed)
    for temperature, top_p, seed, match in [
        (1e-45, 1.0, None, "temperature"),  # logits / 1e-45 = inf -> NaN probabilities
        (1e-300, 1.0, None, "temperature"),
        (float("nan"), 1.0, None, "temperature"),
        (float("inf"), 1.0, None, "temperature"),
        (-1.0, 1.0, None, "temperature"),
        (1.0, 0.0, None, "top_p"),
        (1.0, float("nan"), None, "top_p"),
        (1.0, 1.0, 2**64, "seed"),  # torch.manual_seed overflows past 64 bits
        (1.0, 1.0, -(2**70), "seed"),
        (1.0, 1.0, True, "seed"),
    ]:
        with pytest.raises(ValueError, match=match):
            check_sampling(temperature, top_p, seed)
