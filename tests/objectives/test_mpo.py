"""Tests of vlpipe.objectives.mpo: each MPO term, the reward shift's updates and checkpointing, sequence_logps."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from tests.objectives._gloo import run_on_gloo
from vlpipe.objectives.config import MPOConfig
from vlpipe.objectives.lm import IGNORE_INDEX
from vlpipe.objectives.mpo import MPOLoss, sequence_logps

X = IGNORE_INDEX


def _softplus(x: float) -> float:
    """-log sigmoid(-x) = log(1 + e^x)."""
    return math.log1p(math.exp(x))


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_each_term_hand_computed() -> None:
    loss_fn = MPOLoss(beta=0.5, preference_weight=0.8, quality_weight=0.2, generation_weight=1.0)
    # Pair 1: r_c = 0.5 * (-1 - -3) = 1,  r_r = 0.5 * (-4 - -2) = -1
    # Pair 2: r_c = 0.5 * (-2 - -2) = 0,  r_r = 0.5 * (-1 - -3) = 1
    out = loss_fn(_t(-1, -2), _t(-4, -1), _t(-3, -2), _t(-2, -3), chosen_nll=_t(0.5, 1.5))
    # delta folds in this batch first: mean(1, 0, -1, 1) = 1/4
    delta = (1 + 0 - 1 + 1) / 4
    # -log sigmoid(m) = log(1 + e^-m); margins 2 and -1
    preference = (_softplus(-2) + _softplus(1)) / 2
    quality = (
        (_softplus(-(1 - delta)) + _softplus(-1 - delta))  # pair 1
        + (_softplus(-(0 - delta)) + _softplus(1 - delta))  # pair 2
    ) / 2
    generation = (0.5 + 1.5) / 2
    assert out["reward_shift"].item() == pytest.approx(delta)
    assert out["preference"].item() == pytest.approx(preference, rel=1e-6)
    assert out["quality"].item() == pytest.approx(quality, rel=1e-6)
    assert out["generation"].item() == pytest.approx(generation, rel=1e-6)
    assert out["loss"].item() == pytest.approx(0.8 * preference + 0.2 * quality + 1.0 * generation, rel=1e-6)
    assert out["reward_accuracy"].item() == pytest.approx(1 / 2)  # only pair 1 has r_c > r_r
    assert out["reward_margin"].item() == pytest.approx((2 + -1) / 2)


def test_gradients_treat_delta_and_reference_as_constants() -> None:
    loss_fn = MPOLoss(beta=0.5, preference_weight=0.0, quality_weight=1.0, generation_weight=0.0)
    policy_chosen = _t(-1).requires_grad_()
    ref_chosen = _t(-3).requires_grad_()
    out = loss_fn(policy_chosen, _t(-4), ref_chosen, _t(-2), chosen_nll=_t(0.0))
    out["loss"].backward()
    # r_c = 1, r_r = -1, delta = 0; d/dpi_c of -log sigmoid(beta * (pi_c - ref_c) - delta)
    # = -beta * (1 - sigmoid(r_c - delta)) = -0.5 * sigmoid(-1)
    expected = -0.5 * (1 / (1 + math.exp(1)))
    assert policy_chosen.grad.item() == pytest.approx(expected, rel=1e-6)
    assert ref_chosen.grad is None


def test_reward_shift_sequence_and_checkpoint_round_trip() -> None:
    # beta = 1 and reference 0, so rewards are the policy log-probs.
    loss_fn = MPOLoss(beta=1.0)
    zero = _t(0)
    shifts = []
    for chosen, rejected in [(2.0, 0.0), (4.0, 2.0), (3.0, 1.0)]:  # batch means 1, 3, 2
        out = loss_fn(_t(chosen), _t(rejected), zero, zero, chosen_nll=zero)
        shifts.append(out["reward_shift"].item())
    # running means of [1], [1, 3], [1, 3, 2]
    assert shifts == pytest.approx([1.0, (1 + 3) / 2, (1 + 3 + 2) / 3])
    assert loss_fn.num_shift_updates.item() == 3

    state = loss_fn.state_dict()
    assert set(state) == {"reward_shift", "num_shift_updates"}
    restored = MPOLoss(beta=1.0)
    restored.load_state_dict(state)
    assert restored.reward_shift.item() == pytest.approx(2.0)

    out = restored(_t(7.0), _t(5.0), zero, zero, chosen_nll=zero)  # batch mean 6
    delta = (1 + 3 + 2 + 6) / 4
    assert out["reward_shift"].item() == pytest.approx(delta)
    # the quality term uses the updated delta = 3: -log sigmoid(7 - 3) - log sigmoid(-(5 - 3))
    assert out["quality"].item() == pytest.approx(_softplus(-(7 - delta)) + _softplus(5 - delta), rel=1e-6)


def test_eval_mode_and_update_shift_false_only_read_delta() -> None:
    loss_fn = MPOLoss(beta=1.0)
    zero = _t(0)
    loss_fn(_t(2.0), _t(0.0), zero, zero, chosen_nll=zero)  # delta = 1
    loss_fn.eval()
    out = loss_fn(_t(10.0), _t(10.0), zero, zero, chosen_nll=zero)
    assert out["reward_shift"].item() == pytest.approx(1.0)
    # -log sigmoid(10 - 1) - log sigmoid(-(10 - 1))
    assert out["quality"].item() == pytest.approx(_softplus(-9) + _softplus(9), rel=1e-6)
    loss_fn.train()
    out = loss_fn(_t(10.0), _t(10.0), zero, zero, chosen_nll=zero, update_shift=False)
    assert out["reward_shift"].item() == pytest.approx(1.0)
    assert loss_fn.num_shift_updates.item() == 1
    out = loss_fn.eval()(_t(10.0), _t(10.0), zero, zero, chosen_nll=zero, update_shift=True)
    assert out["reward_shift"].item() == pytest.approx((1 + 10) / 2)


def test_returned_shift_is_a_snapshot() -> None:
    loss_fn = MPOLoss(beta=1.0)
    zero = _t(0)
    first = loss_fn(_t(2.0), _t(0.0), zero, zero, chosen_nll=zero)["reward_shift"]
    loss_fn(_t(6.0), _t(4.0), zero, zero, chosen_nll=zero)
    assert first.item() == pytest.approx(1.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"beta": 0.0},
        {"beta": -0.1},
        {"preference_weight": -0.1},
        {"quality_weight": -1.0},
        {"generation_weight": -1e-3},
        {"generation_weight": float("nan")},
        {"preference_weight": 0.0, "quality_weight": 0.0, "generation_weight": 0.0},
    ],
)
def test_invalid_settings_fail_at_construction(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValidationError):
        MPOLoss(**kwargs)
    with pytest.raises(ValidationError):
        MPOConfig(**kwargs)


def test_config_round_trip_and_unknown_key() -> None:
    config = MPOConfig(beta=0.2, quality_weight=0.0)
    loss_fn = MPOLoss.from_config(config)
    assert loss_fn.config == config
    with pytest.raises(ValidationError):
        MPOConfig(beta=0.1, label_smoothing=0.1)  # type: ignore[call-arg]


def test_mismatched_inputs_fail() -> None:
    with pytest.raises(ValueError, match="same non-zero length"):
        MPOLoss()(_t(1, 2), _t(1), _t(1), _t(1), _t(1))


def test_sequence_logps_hand_computed() -> None:
    # V = 2, logits log([p, 1 - p]); labels 0 pick p, 1 pick 1 - p.
    p = torch.tensor([[1 / 2, 1 / 4, 3 / 4, 1 / 2], [1 / 2, 1 / 8, 1 / 2, 1 / 2]], dtype=torch.float64)
    logits = torch.stack([p.log(), (1 - p).log()], dim=-1).float()
    # Row 0: positions 1..3 labelled 0, 1, X -> predicted at 0, 1: log(1/2) + log(1 - 1/4)
    # Row 1: nothing labelled.
    labels = torch.tensor([[X, 0, 1, X], [X, X, X, X]])
    sum_logps, mean_nll, num_tokens = sequence_logps(logits, labels)
    expected_sum = math.log(1 / 2) + math.log(3 / 4)
    assert sum_logps.tolist() == pytest.approx([expected_sum, 0.0], rel=1e-6)
    assert mean_nll.tolist() == pytest.approx([-expected_sum / 2, 0.0], rel=1e-6)
    assert num_tokens.tolist() == [2, 0]


def _shift_worker(rank: int, world_size: int, out_dir: str) -> None:
    loss_fn = MPOLoss(beta=1.0)
    # First call: rank 0 holds 1 pair, rank 1 holds 2 pairs. Second call: every reward is 1.
    first = {0: ([2.0], [0.0]), 1: ([4.0, 6.0], [2.0, 0.0])}[rank]
    shifts = []
    for chosen, rejected in [first, ([1.0] * len(first[0]), [1.0] * len(first[0]))]:
        zeros = torch.zeros(len(chosen))
        out = loss_fn(torch.tensor(chosen), torch.tensor(rejected), zeros, zeros, chosen_nll=zeros)
        shifts.append(out["reward_shift"].item())
    torch.save(shifts, Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.slow
def test_reward_shift_is_all_reduced_over_gloo_ranks(tmp_path: Path) -> None:
    run_on_gloo(_shift_worker, 2, str(tmp_path))
    # call 1: mean over all 6 rewards of both ranks (2 + 0 + 4 + 6 + 2 + 0) / 6 = 7/3; call 2: mean 1
    expected = [7 / 3, (7 / 3 + 1) / 2]
    for rank in range(2):
        assert torch.load(tmp_path / f"rank{rank}.pt") == pytest.approx(expected, rel=1e-6)
