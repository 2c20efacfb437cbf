"""Best-of-N metrics on hand-computed cases, ties included."""

from __future__ import annotations

import ast
import math
import subprocess
import sys
from pathlib import Path

import pytest

import vlpipe.components.evaluate as components_evaluate
from vlpipe.components.evaluate.metrics import (
    ItemOutcome,
    compute_metrics,
    ks_for,
    majority_vote,
    select_best,
    summarize,
)

NAN = math.nan

# Item A (reference "2"): greedy right. Samples "1" "2" "2" "1" with scores .9 .5 .5 .1.
A = ItemOutcome("b1", "a", True, ("1", "2", "2", "1"), (False, True, True, False), (0.9, 0.5, 0.5, 0.1))
# Item B (reference "3"): greedy wrong. Sample 1 has no answer and no step (NaN score); .7 tie between 3 and 4.
B = ItemOutcome("b1", "b", False, (None, "3", "4", "3"), (False, True, False, True), (NAN, 0.2, 0.7, 0.7))
# Item C (reference "0"): greedy wrong, every sample right.
C = ItemOutcome("b2", "c", False, ("0",) * 4, (True,) * 4, (0.3, 0.6, 0.2, 0.6))


def test_ks_are_powers_of_two_then_n():
    assert ks_for(8) == [1, 2, 4, 8]
    assert ks_for(6) == [1, 2, 4, 6]
    assert ks_for(1) == [1]
    with pytest.raises(ValueError):
        ks_for(0)


def test_select_best_ties_go_to_the_earliest_and_nan_ranks_last():
    assert select_best([0.1, 0.9, 0.9]) == 1  # tie between 1 and 2 -> 1
    assert select_best([0.5, 0.5]) == 0
    assert select_best([NAN, 0.2, 0.7, 0.7]) == 2
    assert select_best([NAN, 0.2, 0.7, 0.7], k=2) == 1  # NaN below any score
    assert select_best([NAN, NAN]) == 0  # nothing scored: the first sample
    assert select_best([0.9, 0.95], k=1) == 0  # only the first k count
    with pytest.raises(ValueError, match="k must be in 1..2"):
        select_best([0.1, 0.2], k=3)


def test_majority_vote_tie_rule_and_abstentions():
    assert majority_vote(["1", "2", "2", "1"]) == 0  # 2-2 tie: "1" occurs first
    assert majority_vote(["1", "2", "2", "1"], k=3) == 1  # "2" twice among the first 3
    assert majority_vote([None, "3", "4", "3"]) == 1  # None does not vote
    assert majority_vote([None, None]) is None
    assert majority_vote([None, "4", "3", "3", "4"]) == 1  # tie: "4" occurs first, at index 1


def test_item_outcome_checks_lengths():
    with pytest.raises(ValueError, match="same non-zero number"):
        ItemOutcome("b", "x", True, ("1",), (True, False), (0.5, 0.5))


def test_summary_hand_computed():
    m = summarize([A, B, C], [1, 2, 4])
    assert m["items"] == 3
    assert m["pass_at_1"] == pytest.approx(1 / 3)  # only A's greedy answer
    # Best-of-k picks: k=1 -> A0 F, B0 F (all NaN -> first), C0 T;  k=2 -> A0 F (.9), B1 T (.2 > NaN), C1 T;
    # k=4 -> A0 F, B2 F (.7 tie of B2/B3 -> earliest, wrong), C1 T.
    assert m["best_of_k"] == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 4: pytest.approx(1 / 3)}
    assert m["best_of_n"] == pytest.approx(1 / 3)
    # Majority: k=1 -> A "1" F, B no vote F, C T; k=2 -> A tie "1"/"2" -> "1" F, B "3" T, C T;
    # k=4 -> A tie 2-2 -> "1" F, B "3" x2 T, C T.
    assert m["majority_at_k"] == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 4: pytest.approx(2 / 3)}
    assert m["majority"] == pytest.approx(2 / 3)
    # Oracle: k=1 -> only C; k=2 -> A1, B1, C0 all right.
    assert m["oracle_at_k"] == {1: pytest.approx(1 / 3), 2: 1.0, 4: 1.0}
    assert m["oracle"] == 1.0
    # 2 + 2 + 4 = 8 correct samples of 12.
    assert m["sample_accuracy"] == pytest.approx(8 / 12)
    assert (m["correct_samples"], m["incorrect_samples"]) == (8, 4)
    # Correct: A .5 .5, B .2 .7, C .3 .6 .2 .6 -> 3.6 / 8; incorrect: A .9 .1, B .7 (NaN left out) -> 1.7 / 3.
    assert m["prm_score_correct_mean"] == pytest.approx(3.6 / 8)
    assert m["prm_score_incorrect_mean"] == pytest.approx(1.7 / 3)


def test_score_means_are_none_without_such_answers():
    m = summarize([C], [1, 2, 4])
    assert m["prm_score_incorrect_mean"] is None
    assert m["prm_score_correct_mean"] == pytest.approx((0.3 + 0.6 + 0.2 + 0.6) / 4)
    with pytest.raises(ValueError, match="without items"):
        summarize([], [1])


def test_metrics_per_benchmark_and_overall_micro_average():
    m = compute_metrics([A, B, C], [1, 2, 4])
    assert list(m["benchmarks"]) == ["b1", "b2"]
    b1 = m["benchmarks"]["b1"]
    assert (b1["items"], b1["pass_at_1"], b1["best_of_n"], b1["majority"], b1["oracle"]) == (
        2,
        0.5,
        0.0,
        0.5,
        1.0,
    )
    b2 = m["benchmarks"]["b2"]
    assert (b2["pass_at_1"], b2["best_of_n"], b2["majority"], b2["oracle"]) == (0.0, 1.0, 1.0, 1.0)
    # Overall averages over the 3 items: best-of-4 = 1/3, not the mean of the benchmarks, (0 + 1) / 2.
    assert m["overall"]["best_of_n"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="no evaluated items"):
        compute_metrics([], [1])


def test_light_modules_import_without_torch_and_nothing_imports_kfp():
    code = (
        "import sys, vlpipe.components.evaluate, vlpipe.components.evaluate.config, vlpipe.components.evaluate.metrics, "
        "vlpipe.components.evaluate.cli; assert 'torch' not in sys.modules, 'torch imported'"
    )
    root = Path(components_evaluate.__file__).parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
    for path in Path(components_evaluate.__file__).parent.glob("*.py"):
        if path.name == "component.py":  # the Kubeflow component definition is the one place kfp belongs
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert all(n.split(".")[0] != "kfp" for n in names), f"{path.name} imports kfp"
