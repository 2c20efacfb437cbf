"""The demo task's step-local PRM labels (`local_step_labels`), by hand."""

from __future__ import annotations

import random

import pytest

from vlpipe.model.data.reasoning import (
    Question,
    local_step_labels,
    parse_describe_step,
    parse_question,
    perturb,
    sample_item,
    solution_steps,
)

RED = Question("colour", "red")
TRUTH = solution_steps(RED, [("red", "circle"), ("blue", "square"), ("red", "triangle")])


def test_parse_question_and_describe_step():
    assert parse_question("<image>\nHow many red shapes are there?") == RED
    assert parse_question("How many circles are there?") == Question("shape", "circle")
    assert parse_question("What colour is the sky?") is None
    assert parse_describe_step("I see a red circle and a blue square.") == [
        ("red", "circle"),
        ("blue", "square"),
    ]
    assert parse_describe_step("I see a red circle.") == [("red", "circle")]
    assert parse_describe_step("I see red things.") is None
    assert parse_describe_step("The red ones are the circle and the triangle.") is None


def test_the_reference_is_right_everywhere():
    assert local_step_labels(RED, TRUTH, TRUTH) == [True, True, True]
    rng = random.Random(0)
    for kind in ("colour", "shape"):
        for target in range(5):
            item = sample_item(rng, kind, target)
            assert local_step_labels(item.question, list(item.steps), list(item.steps)) == [True] * 3


def test_harmless_misreads_keep_step_one_right():
    # The kind of a red shape and the colour of a non-red shape do not change the count of red shapes.
    steps = solution_steps(RED, [("red", "square"), ("green", "square"), ("red", "triangle")])
    assert local_step_labels(RED, steps, TRUTH) == [True, True, True]


def test_a_wrong_count_in_step_one_is_wrong_and_later_steps_judged_on_their_own():
    seen = [("red", "circle"), ("red", "square"), ("red", "triangle")]  # three red shapes: one too many
    steps = solution_steps(RED, seen)  # steps 2 and 3 follow correctly from the misread
    assert local_step_labels(RED, steps, TRUTH) == [False, True, True]


def test_a_filter_that_does_not_follow_from_step_one_is_wrong():
    steps = [TRUTH[0], "The red one is the circle.", "So the answer is 1."]  # misses the triangle
    assert local_step_labels(RED, steps, TRUTH) == [True, False, True]
    # Naming other shapes than step 1 but as many is harmless for a count.
    steps = [TRUTH[0], "The red ones are the square and the square.", "So the answer is 2."]
    assert local_step_labels(RED, steps, TRUTH) == [True, True, True]
    # A filter for another question is wrong, and so is the count after it (it names nothing for RED).
    steps = [TRUTH[0], "The blue one is the square.", "So the answer is 1."]
    assert local_step_labels(RED, steps, TRUTH) == [True, False, False]


def test_an_answer_line_that_does_not_follow_from_step_two_is_wrong():
    steps = [*TRUTH[:2], "So the answer is 3."]
    assert local_step_labels(RED, steps, TRUTH) == [True, True, False]
    steps = [*TRUTH[:2], "So the answer is two."]
    assert local_step_labels(RED, steps, TRUTH) == [True, True, False]


@pytest.mark.parametrize(
    ("steps", "labels"),
    [
        ([TRUTH[0]], [False]),  # stopped before the answer line
        (TRUTH[:2], [True, False]),
        ([*TRUTH, "So the answer is 2."], [True, True, True, False]),  # beyond the answer line
        (["I think there are two.", *TRUTH[1:]], [False, False, True]),  # step 3 still follows step 2
        ([], []),
    ],
)
def test_malformed_solutions(steps, labels):
    assert local_step_labels(RED, steps, TRUTH) == labels


def test_no_shapes_of_the_kind():
    circles = Question("shape", "circle")
    truth = solution_steps(circles, [("red", "square")])
    assert truth[1:] == ["There are no circles.", "So the answer is 0."]
    assert local_step_labels(circles, truth, truth) == [True, True, True]
    wrong = solution_steps(circles, [("red", "circle")])
    assert local_step_labels(circles, wrong, truth) == [False, True, True]
    assert local_step_labels(circles, [truth[0], "The circle is red.", "So the answer is 1."], truth) == [
        True,
        False,
        True,
    ]


def test_all_steps_right_means_the_final_answer_is_right():
    rng = random.Random(1)
    for _ in range(300):
        item = sample_item(rng, rng.choice(["colour", "shape"]), rng.randrange(5))
        for error in ("misread", "miscount", "drop_or_add"):
            wrong, _ = perturb(rng, item, error=error)
            labels = local_step_labels(item.question, list(wrong), list(item.steps))
            if all(labels):
                assert wrong[-1] == item.steps[-1]


def test_refuses_a_reference_that_is_not_a_scene_description():
    with pytest.raises(ValueError, match="reference step 1"):
        local_step_labels(RED, TRUTH, ["So the answer is 2."])
