"""Tests of vlpipe.objectives.lm: hand-computed reductions, packing equivalence, data parallelism."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

import vlpipe.objectives.lm as lm
from tests.objectives._gloo import run_on_gloo
from vlpipe.objectives.lm import IGNORE_INDEX, LMLossConfig, lm_loss, lm_loss_terms, token_weights

X = IGNORE_INDEX
REDUCTIONS = ["token", "sample", "square"]


def _two_class_logits(target_probs: list[list[float]]) -> torch.Tensor:
    """(B, T, 2) logits log([p, 1 - p]): with target class 0 the CE at that position is -log p."""
    p = torch.tensor(target_probs, dtype=torch.float64)
    return torch.stack([p.log(), (1 - p).log()], dim=-1).float()


# Sample A (row 0): one supervised target, predicted at position 0 with p = 1/2.
# Sample B (row 1): four supervised targets, predicted at positions 0..3 with p = 1/4, 3/4, 1/2, 1/8.
# The last position of each row predicts nothing; its logits are a don't-care 1/2.
UNPACKED_LOGITS = _two_class_logits(
    [[1 / 2, 1 / 2, 1 / 2, 1 / 2, 1 / 2], [1 / 4, 3 / 4, 1 / 2, 1 / 8, 1 / 2]]
)
UNPACKED_LABELS = torch.tensor([[X, 0, X, X, X], [X, 0, 0, 0, 0]])
CE_A = [math.log(2)]
CE_B = [math.log(4), math.log(4 / 3), math.log(2), math.log(8)]

# The same two samples packed in one row: A = tokens 0-1, B = tokens 2-6. B's first token is labelled -100
# (the packer's job), so position 1 (A's last token) predicts nothing.
PACKED_LOGITS = _two_class_logits([[1 / 2, 1 / 2, 1 / 4, 3 / 4, 1 / 2, 1 / 8, 1 / 2]])
PACKED_LABELS = torch.tensor([[X, 0, X, 0, 0, 0, 0]])
PACKED_INDEX = torch.tensor([[0, 0, 1, 1, 1, 1, 1]])

EXPECTED = {
    # every token weight 1
    "token": (CE_A[0] + sum(CE_B)) / 5,
    # weights 1/1 for A's token, 1/4 for each of B's
    "sample": (1 * CE_A[0] + 1 / 4 * sum(CE_B)) / (1 * 1 + 4 * (1 / 4)),
    # weights 1/sqrt(1) for A's token, 1/sqrt(4) for each of B's
    "square": (1 * CE_A[0] + 1 / math.sqrt(4) * sum(CE_B)) / (1 * 1 + 4 * (1 / math.sqrt(4))),
}


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_hand_computed_unpacked(reduction: str) -> None:
    loss = lm_loss(UNPACKED_LOGITS, UNPACKED_LABELS, reduction=reduction)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(EXPECTED[reduction], rel=1e-6)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_hand_computed_packed(reduction: str) -> None:
    loss = lm_loss(PACKED_LOGITS, PACKED_LABELS, sample_index=PACKED_INDEX, reduction=reduction)
    assert loss.item() == pytest.approx(EXPECTED[reduction], rel=1e-6)


def test_default_reduction_is_square() -> None:
    assert LMLossConfig().reduction == "square"
    assert lm_loss(UNPACKED_LOGITS, UNPACKED_LABELS).item() == pytest.approx(EXPECTED["square"], rel=1e-6)


def test_packed_without_sample_index_is_one_sample() -> None:
    # Without sample_index the packed row counts as a single 5-token sample: every square weight is
    # 1/sqrt(5), which cancels, so the result is the token average.
    loss = lm_loss(PACKED_LOGITS, PACKED_LABELS, reduction="square")
    assert loss.item() == pytest.approx((CE_A[0] + sum(CE_B)) / 5, rel=1e-6)
    assert loss.item() != pytest.approx(EXPECTED["square"], rel=1e-3)


def test_token_weights_and_terms() -> None:
    # Shifted targets of the packed row: [0, X, 0, 0, 0, 0]; A has 1 target, B has 4.
    weights = token_weights(PACKED_LABELS, PACKED_INDEX, reduction="square")
    torch.testing.assert_close(weights, torch.tensor([[1.0, 0.0, 0.5, 0.5, 0.5, 0.5]]))
    weights = token_weights(PACKED_LABELS, PACKED_INDEX, reduction="sample")
    torch.testing.assert_close(weights, torch.tensor([[1.0, 0.0, 0.25, 0.25, 0.25, 0.25]]))

    terms = lm_loss_terms(PACKED_LOGITS, PACKED_LABELS, PACKED_INDEX, reduction="square")
    assert terms.weighted_sum.item() == pytest.approx(1 * CE_A[0] + 0.5 * sum(CE_B), rel=1e-6)
    assert terms.weight_sum.item() == pytest.approx(1 + 4 * 0.5)
    assert terms.num_tokens.item() == 5
    assert terms.weighted_sum.requires_grad is False  # inputs are not leaves requiring grad


def test_sub_sample_ids_are_per_row() -> None:
    # Both rows reuse ids 0 and 1; (row, id) pairs are 4 samples with 1, 2, 3 and 1 targets.
    labels = torch.tensor([[X, 0, X, 0, 0], [X, 0, 0, 0, X]])
    index = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 0, 1]])
    # row 0 targets: pos1 (id 0), pos3, pos4 (id 1) -> n = 1, 2, 2
    # row 1 targets: pos1, pos2, pos3 (id 0) -> n = 3
    expected = torch.tensor(
        [[1 / math.sqrt(1), 0.0, 1 / math.sqrt(2), 1 / math.sqrt(2)], [1 / math.sqrt(3)] * 3 + [0.0]]
    )
    torch.testing.assert_close(token_weights(labels, index, reduction="square"), expected)


def _random_pair(vocab: int = 7) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    logits_a = torch.randn(3, vocab, generator=generator)
    logits_b = torch.randn(5, vocab, generator=generator)
    labels_a = torch.tensor([X, 2, 5])
    labels_b = torch.tensor([4, 1, X, 6, 0])
    return logits_a, logits_b, labels_a, labels_b


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_packed_equals_unpacked_loss_and_gradients(reduction: str) -> None:
    logits_a, logits_b, labels_a, labels_b = _random_pair()
    vocab = logits_a.shape[-1]

    # Unpacked: A padded to B's length with random logits and -100 labels.
    pad_logits = torch.randn(2, vocab, generator=torch.Generator().manual_seed(1))
    unpacked = torch.stack([torch.cat([logits_a, pad_logits]), logits_b]).requires_grad_()
    unpacked_labels = torch.stack([torch.cat([labels_a, torch.tensor([X, X])]), labels_b])

    # Packed: one row A + B; B's first label becomes -100 (the packer's job).
    packed = torch.cat([logits_a, logits_b]).unsqueeze(0).requires_grad_()
    packed_labels = torch.cat([labels_a, torch.tensor([X]), labels_b[1:]]).unsqueeze(0)
    packed_index = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])

    loss_unpacked = lm_loss(unpacked, unpacked_labels, reduction=reduction)
    loss_packed = lm_loss(packed, packed_labels, sample_index=packed_index, reduction=reduction)
    torch.testing.assert_close(loss_packed, loss_unpacked)

    loss_unpacked.backward()
    loss_packed.backward()
    torch.testing.assert_close(packed.grad[0, :3], unpacked.grad[0, :3])
    torch.testing.assert_close(packed.grad[0, 3:], unpacked.grad[1])
    assert torch.count_nonzero(unpacked.grad[0, 3:]) == 0  # padding gets no gradient
    assert torch.count_nonzero(packed.grad) > 0


def test_unmasked_boundary_breaks_equivalence() -> None:
    # If the packer forgot to mask B's first token, A's last token would be trained to predict it.
    logits_a, logits_b, labels_a, labels_b = _random_pair()
    packed = torch.cat([logits_a, logits_b]).unsqueeze(0)
    packed_index = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    masked = torch.cat([labels_a, torch.tensor([X]), labels_b[1:]]).unsqueeze(0)
    unmasked = torch.cat([labels_a, labels_b]).unsqueeze(0)
    assert lm_loss(packed, unmasked, packed_index, "token").item() != pytest.approx(
        lm_loss(packed, masked, packed_index, "token").item(), rel=1e-3
    )


def test_computes_in_float32() -> None:
    logits = UNPACKED_LOGITS.to(torch.bfloat16)
    loss = lm_loss(logits, UNPACKED_LABELS, reduction="token")
    assert loss.dtype == torch.float32
    expected = lm_loss(logits.float(), UNPACKED_LABELS, reduction="token")
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_no_supervised_tokens_gives_connected_zero(reduction: str) -> None:
    logits = torch.randn(2, 4, 5, requires_grad=True)
    labels = torch.full((2, 4), X)
    labels[:, 0] = 3  # position 0 is never a target after the shift
    loss = lm_loss(logits, labels, reduction=reduction)
    assert loss.item() == 0.0
    assert loss.grad_fn is not None
    loss.backward()
    assert logits.grad is not None
    assert torch.count_nonzero(logits.grad) == 0


def test_unknown_reduction_fails() -> None:
    with pytest.raises(ValueError, match="token, sample, square"):
        lm_loss(UNPACKED_LOGITS, UNPACKED_LABELS, reduction="mean")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        LMLossConfig(reduction="mean")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        LMLossConfig(reduction="square", extra_key=1)  # type: ignore[call-arg]


def test_shape_mismatch_fails() -> None:
    with pytest.raises(ValueError, match="logits"):
        lm_loss(UNPACKED_LOGITS[:, :-1], UNPACKED_LABELS)
    with pytest.raises(ValueError, match="sample_index"):
        lm_loss(PACKED_LOGITS, PACKED_LABELS, sample_index=PACKED_INDEX[:, :-1])


def test_data_parallel_formula_with_simulated_all_reduce(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pretend this rank holds sample A only and a second rank holds B: the all-reduced weight sum adds
    # B's square weights 4 * 1/sqrt(4) = 2 to A's 1.
    monkeypatch.setattr(lm, "get_world_size", lambda: 2)
    monkeypatch.setattr(lm, "all_reduce_sum", lambda t: t.detach() + 2.0)
    loss = lm_loss(UNPACKED_LOGITS[:1], UNPACKED_LABELS[:1], reduction="square")
    # world_size * local sum(w * CE) / global sum(w)
    assert loss.item() == pytest.approx(2 * (1 * CE_A[0]) / (1 + 2), rel=1e-6)


def _dp_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """3 rows, row 2 packed with two sub-samples; ranks get rows [0] and [1, 2]."""
    logits = torch.randn(3, 6, 5, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([[X, 1, 2, X, X, X], [X, 0, 4, 4, 3, 1], [X, 2, X, 1, 1, 0]])
    index = torch.tensor([[0, 0, 0, -1, -1, -1], [0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1]])
    return logits, labels, index


RANK_ROWS = [slice(0, 1), slice(1, 3)]


def _dp_worker(rank: int, world_size: int, out_dir: str) -> None:
    logits, labels, index = _dp_batch()
    rows = RANK_ROWS[rank]
    results = {}
    for reduction in REDUCTIONS:
        local = logits[rows].clone().requires_grad_()
        loss = lm_loss(local, labels[rows], index[rows], reduction)
        loss.backward()
        results[reduction] = (loss.detach(), local.grad)
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(tmp_path: Path) -> None:
    run_on_gloo(_dp_worker, 2, str(tmp_path))
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    logits, labels, index = _dp_batch()
    for reduction in REDUCTIONS:
        full = logits.clone().requires_grad_()
        reference = lm_loss(full, labels, index, reduction)
        reference.backward()
        # The mean of the per-rank losses is the global loss ...
        torch.testing.assert_close((per_rank[0][reduction][0] + per_rank[1][reduction][0]) / 2, reference)
        # ... and the gradient averaged over 2 ranks (what DDP does) is the global loss's gradient.
        for rank, rows in enumerate(RANK_ROWS):
            torch.testing.assert_close(per_rank[rank][reduction][1] / 2, full.grad[rows])
