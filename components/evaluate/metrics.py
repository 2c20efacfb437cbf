"""Best-of-N metrics: pure functions over per-item outcomes (no torch, no I/O), hand-testable.

Definitions (for one item with greedy answer g and samples s_1..s_N in generation order):

- pass@1: g is correct.
- Best-of-k: the sample among s_1..s_k with the highest PRM score is correct. Ties go to the earliest sample;
  a sample without a score (NaN: the answer had no step) ranks below every scored one. Best-of-N = Best-of-k
  with k = N, so Best-of-k for all k comes from the same N samples.
- majority@k: the most frequent extracted answer among s_1..s_k is correct. Samples without an extractable
  answer do not vote. Tie rule: among the answers with the highest count, the one that occurs first in
  s_1..s_k wins. No vote at all counts as wrong.
- oracle@k: any of s_1..s_k is correct.
- PRM score means: the mean PRM score over all sampled answers that are correct (resp. incorrect), answers
  without a score left out; None when there is no such answer.

A scope's accuracy is the mean over its items; `overall` averages over the items of all benchmarks together
(micro average), so a larger benchmark weighs more.

CircularEval (VLMEvalKit's MMBench protocol): outcomes that share a `group` (the rotations of one question's
options) make one item, correct under a metric only if every rotation is correct under it (pass@1: every greedy
answer; Best-of-k: every rotation's best-scored sample; majority@k, oracle@k likewise). `items` counts such
items, `rows` the outcomes; sample accuracy and the PRM score means stay per sample.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ItemOutcome:
    """What metrics need from one evaluated item.

    Attributes:
        benchmark: the benchmark's name.
        item_id: the item's id.
        greedy_correct: whether the greedy answer is correct.
        sample_answers: the extracted answer of each sample (None when none could be extracted), in order.
        sample_correct: whether each sample is correct.
        sample_scores: the aggregated PRM score of each sample (NaN when it had no step).
        group: the CircularEval group the item is a rotation in; None: the item stands alone.
    """

    benchmark: str
    item_id: str
    greedy_correct: bool
    sample_answers: tuple[str | None, ...]
    sample_correct: tuple[bool, ...]
    sample_scores: tuple[float, ...]
    group: str | None = None

    def __post_init__(self) -> None:
        n = len(self.sample_answers)
        if n == 0 or len(self.sample_correct) != n or len(self.sample_scores) != n:
            raise ValueError(
                f"item {self.item_id}: need the same non-zero number of sample answers, correctness flags and "
                f"scores; got {n}, {len(self.sample_correct)} and {len(self.sample_scores)}"
            )


def ks_for(n: int) -> list[int]:
    """The k of Best-of-k: powers of two up to n, then n itself (1, 2, 4, 8 for n = 8; 1, 2, 4, 6 for 6)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    ks = []
    k = 1
    while k < n:
        ks.append(k)
        k *= 2
    return [*ks, n]


def _first(values: Sequence, k: int | None) -> Sequence:
    if k is not None and not 1 <= k <= len(values):
        raise ValueError(f"k must be in 1..{len(values)}, got {k}")
    return values if k is None else values[:k]


def select_best(scores: Sequence[float], k: int | None = None) -> int:
    """Index of the best-scored sample among the first k (all when k is None).

    Ties go to the earliest sample; NaN scores rank below every real score (all NaN: sample 0).
    """
    best, best_score = 0, -math.inf
    for i, score in enumerate(_first(scores, k)):
        if not math.isnan(score) and score > best_score:
            best, best_score = i, score
    return best


def majority_vote(answers: Sequence[str | None], k: int | None = None) -> int | None:
    """Index of the sample whose answer wins the vote among the first k samples, or None without a vote.

    None answers do not vote; among the answers with the highest count, the one occurring first wins, and the
    returned index is its first occurrence.
    """
    window = _first(answers, k)
    counts = Counter(a for a in window if a is not None)
    if not counts:
        return None
    top = max(counts.values())
    return next(i for i, a in enumerate(window) if a is not None and counts[a] == top)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(outcomes: Sequence[ItemOutcome], ks: Sequence[int]) -> dict:
    """Metrics of one scope (a benchmark, or all items).

    Args:
        outcomes: the scope's items; each has at least max(ks) samples.
        ks: the k of Best-of-k, majority@k and oracle@k; the largest is N.

    Returns:
        `items` (questions: a CircularEval group is one), `rows` (outcomes), `pass_at_1`, `best_of_n`, `majority`, `oracle` (the last three at k = N), `sample_accuracy`
        (the fraction of correct samples), `best_of_k`, `majority_at_k`, `oracle_at_k` (dicts k -> accuracy),
        `prm_score_correct_mean`, `prm_score_incorrect_mean` (None when undefined), `correct_samples`,
        `incorrect_samples`.

    Raises:
        ValueError: for an empty scope or a k above an item's number of samples.
    """
    if not outcomes:
        raise ValueError("cannot summarize a scope without items")
    units: dict[tuple[str, str], list[ItemOutcome]] = {}
    for i, o in enumerate(outcomes):
        key = (o.benchmark, f"group {o.group}") if o.group is not None else (o.benchmark, f"row {i}")
        units.setdefault(key, []).append(o)
    n_items = len(units)

    def accuracy(hit) -> float:  # an item is right when all its rows are
        return sum(all(hit(o) for o in rows) for rows in units.values()) / n_items

    best_of_k, majority_at_k, oracle_at_k = {}, {}, {}
    for k in ks:
        best_of_k[k] = accuracy(lambda o, k=k: o.sample_correct[select_best(o.sample_scores, k)])
        majority_at_k[k] = accuracy(
            lambda o, k=k: (v := majority_vote(o.sample_answers, k)) is not None and o.sample_correct[v]
        )
        oracle_at_k[k] = accuracy(lambda o, k=k: any(o.sample_correct[:k]))
    n = max(ks)
    correct_scores = [
        s
        for o in outcomes
        for s, c in zip(o.sample_scores, o.sample_correct, strict=True)
        if c and not math.isnan(s)
    ]
    incorrect_scores = [
        s
        for o in outcomes
        for s, c in zip(o.sample_scores, o.sample_correct, strict=True)
        if not c and not math.isnan(s)
    ]
    n_samples = sum(len(o.sample_correct) for o in outcomes)
    n_correct = sum(sum(o.sample_correct) for o in outcomes)
    return {
        "items": n_items,
        "rows": len(outcomes),
        "pass_at_1": accuracy(lambda o: o.greedy_correct),
        "best_of_n": best_of_k[n],
        "majority": majority_at_k[n],
        "oracle": oracle_at_k[n],
        "sample_accuracy": n_correct / n_samples,
        "best_of_k": best_of_k,
        "majority_at_k": majority_at_k,
        "oracle_at_k": oracle_at_k,
        "prm_score_correct_mean": _mean(correct_scores),
        "prm_score_incorrect_mean": _mean(incorrect_scores),
        "correct_samples": n_correct,
        "incorrect_samples": n_samples - n_correct,
    }


def compute_metrics(outcomes: Sequence[ItemOutcome], ks: Sequence[int]) -> dict:
    """Metrics per benchmark (in order of first appearance) and overall.

    Returns:
        `{"benchmarks": {name: summarize(...)}, "overall": summarize(all outcomes)}`.

    Raises:
        ValueError: without any outcome.
    """
    if not outcomes:
        raise ValueError("no evaluated items: nothing to compute metrics from")
    names = list(dict.fromkeys(o.benchmark for o in outcomes))
    return {
        "benchmarks": {name: summarize([o for o in outcomes if o.benchmark == name], ks) for name in names},
        "overall": summarize(outcomes, ks),
    }
