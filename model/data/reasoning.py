"""The demo reasoning task: counting questions about shape scenes, with three-step solutions.

Questions are "How many <colour> shapes are there?" or "How many <kind>s are there?". A solution is three
lines joined by "\\n":

    I see a red circle, a blue square and a red triangle.     (every shape, left to right)
    The red ones are the circle and the triangle.             (the shapes the question asks about)
    So the answer is 2.

Answer extraction rule: the final answer is N in a last line (after stripping whitespace) that reads exactly
"So the answer is N." with N a non-negative integer written in digits; anything else extracts to None and
counts as wrong. `extract_answer` and `is_correct` implement it; evaluation and reward code use them.

Step labels follow "true until the first wrong step, false from there on": a step is right when it equals the
reference step (the phrasing is canonical, so each scene and question has exactly one right solution). A
misread that does not change the count (a wrong colour on a shape the question does not ask about) makes
step 1 and everything after it false even though the final answer is right.

Wrong solutions are made by perturbations that mimic a small model's mistakes: misreading one shape's colour
or kind in step 1 (`misread`), listing the shapes right but filtering or counting wrong (`miscount`), and
dropping or inventing a shape in step 1 (`drop_or_add`). Later steps follow consistently from the mistake.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Literal

from vlpipe.model.data.scenes import COLOURS, KINDS, MAX_SHAPES, Scene, sample_scene

QuestionKind = Literal["colour", "shape"]
ErrorKind = Literal["misread", "miscount", "drop_or_add"]
ERROR_WEIGHTS: dict[str, float] = {"misread": 0.5, "miscount": 0.25, "drop_or_add": 0.25}
MAX_TARGET = 4
MISREAD_ASKED_ATTRIBUTE = 0.7  # probability a misread changes the attribute the question asks about

_ANSWER_RE = re.compile(r"So the answer is (\d+)\.")

Obj = tuple[str, str]  # (colour, kind)


@dataclass(frozen=True)
class Question:
    """A counting question: by colour (`value` is a colour) or by shape (`value` is a kind)."""

    kind: QuestionKind
    value: str

    def text(self) -> str:
        if self.kind == "colour":
            return f"How many {self.value} shapes are there?"
        return f"How many {self.value}s are there?"

    def matches(self, obj: Obj) -> bool:
        colour, kind = obj
        return colour == self.value if self.kind == "colour" else kind == self.value


@dataclass(frozen=True)
class ReasoningItem:
    """A scene, a question about it and its reference solution steps."""

    scene: Scene
    question: Question
    answer: str
    steps: tuple[str, ...]

    @property
    def solution(self) -> str:
        return "\n".join(self.steps)


def join_words(words: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + " and " + words[-1]


def describe_step(objects: list[Obj]) -> str:
    """Step 1: every shape, left to right."""
    return "I see " + join_words([f"a {colour} {kind}" for colour, kind in objects]) + "."


def filter_step(question: Question, selected: list[Obj]) -> str:
    """Step 2: the shapes the question asks about (as the solver believes them to be)."""
    if question.kind == "colour":
        c = question.value
        if not selected:
            return f"There are no {c} ones."
        if len(selected) == 1:
            return f"The {c} one is the {selected[0][1]}."
        return f"The {c} ones are " + join_words([f"the {kind}" for _, kind in selected]) + "."
    k = question.value
    if not selected:
        return f"There are no {k}s."
    if len(selected) == 1:
        return f"The {k} is {selected[0][0]}."
    return f"The {k}s are " + join_words([colour for colour, _ in selected]) + "."


def answer_step(count: int) -> str:
    """Step 3: the final answer line."""
    return f"So the answer is {count}."


def solution_steps(question: Question, objects: list[Obj]) -> list[str]:
    """The three steps a solver writes when it sees `objects` (left to right)."""
    selected = [o for o in objects if question.matches(o)]
    return [describe_step(objects), filter_step(question, selected), answer_step(len(selected))]


def extract_answer(solution: str) -> str | None:
    """The final answer of a solution: N from a last line "So the answer is N.", else None."""
    lines = solution.strip().splitlines()
    if not lines:
        return None
    match = _ANSWER_RE.fullmatch(lines[-1].strip())
    return str(int(match.group(1))) if match else None


def is_correct(solution: str, answer: str) -> bool:
    """Whether the solution's extracted final answer equals `answer`."""
    extracted = extract_answer(solution)
    return extracted is not None and extracted == str(answer).strip()


_LISTING = re.compile(r"^(I see |The \w+ ones are |The \w+s are )(.+)\.$")


def canonical_step(step: str) -> str:
    """A step with the order of its listed items removed ("I see a red circle and a blue square." and
    "I see a blue square and a red circle." are the same observation); other steps unchanged."""
    text = step.strip()
    match = _LISTING.match(text)
    if not match:
        return text
    items = re.split(r", | and ", match.group(2))
    return match.group(1) + " | ".join(sorted(items))


def label_steps(steps: list[str], reference: list[str]) -> list[bool]:
    """Per-step labels: true while each step equals the reference step, false from the first mismatch on.

    Steps beyond the reference's length are false.
    """
    labels: list[bool] = []
    ok = True
    for i, step in enumerate(steps):
        ok = ok and i < len(reference) and step.strip() == reference[i]
        labels.append(ok)
    return labels


_COLOUR_Q = re.compile(r"How many (\w+) shapes are there\?")
_SHAPE_Q = re.compile(r"How many (\w+)s are there\?")
_OBJECT = re.compile(r"a (\w+) (\w+)")


def parse_question(text: str) -> Question | None:
    """The demo question in `text` (an "<image>" line is ignored), or None when it is not one."""
    text = text.replace("<image>", "").strip()
    if match := _COLOUR_Q.fullmatch(text):
        return Question("colour", match.group(1))
    if match := _SHAPE_Q.fullmatch(text):
        return Question("shape", match.group(1))
    return None


def parse_describe_step(step: str) -> list[Obj] | None:
    """The shapes a step 1 ("I see a red circle and a blue square.") lists, or None when it is not one."""
    match = _LISTING.match(step.strip())
    if not match or match.group(1) != "I see ":
        return None
    objects = []
    for word in re.split(r", | and ", match.group(2)):
        obj = _OBJECT.fullmatch(word)
        if not obj:
            return None
        objects.append((obj.group(1), obj.group(2)))
    return objects


def local_step_labels(question: Question, steps: list[str], reference: list[str]) -> list[bool]:
    """Per-step labels, each step judged on its own: against the image, or against the step before it.

    The question asks for a count, so a step is right when a solution can still reach the right count from it:

    * step 1 (the shapes seen) is right when it lists as many shapes matching the question as the image has.
      Misreading a shape the question does not ask about, or the kind of a red shape when the question asks
      for red ones, is harmless; every continuation can still answer right (what a Monte Carlo step label
      measures);
    * step 2 (the filter) is right when it names as many shapes as step 1 lists for the question, whatever
      step 1 got wrong;
    * step 3 (the answer line) is right when its count is the number of shapes step 2 names.

    A step that cannot be parsed, any step beyond the third, and the last step of a solution that stops before
    its answer line are wrong. An answer whose steps are all right is right (so score with `min`
    aggregation), and a PRM learns perception (step 1) apart from following the steps (2 and 3, no image).

    Raises:
        ValueError: when the reference's step 1 is not a demo scene description.
    """
    truth = parse_describe_step(reference[0]) if reference else None
    if truth is None:
        raise ValueError(f"reference step 1 is not a demo scene description: {reference[:1]!r}")
    seen = parse_describe_step(steps[0]) if steps else None
    listed = None if seen is None else sum(question.matches(o) for o in seen)
    named = _filter_count(steps[1], question) if len(steps) > 1 else None
    labels = [
        listed is not None and listed == sum(question.matches(o) for o in truth),
        listed is not None and named == listed,
        named is not None and steps[2].strip() == answer_step(named) if len(steps) > 2 else False,
    ][: len(steps)]
    labels += [False] * (len(steps) - len(labels))  # steps beyond the answer line
    if len(steps) < 3 and labels:
        labels[-1] = False  # stopped before the answer line
    return labels


def _filter_count(step: str, question: Question) -> int | None:
    """How many shapes a step 2 names (None when it is not a step 2 for `question`)."""
    text = step.strip()
    noun = f"{question.value} ones" if question.kind == "colour" else f"{question.value}s"
    if text == f"There are no {noun}.":
        return 0
    single = f"The {question.value} one is the " if question.kind == "colour" else f"The {question.value} is "
    if text.startswith(single) and text.endswith(".") and " and " not in text and "," not in text:
        return 1
    match = _LISTING.match(text)
    if not match or match.group(1) != f"The {noun} are ":
        return None
    return len(re.split(r", | and ", match.group(2)))


def sample_item(rng: random.Random, question_kind: QuestionKind, target: int) -> ReasoningItem:
    """A scene with exactly `target` shapes matching a random question of `question_kind`, plus distractors.

    The total number of shapes is uniform over max(1, target)..MAX_SHAPES.
    """
    if not 0 <= target <= MAX_TARGET:
        raise ValueError(f"target must be in 0..{MAX_TARGET}, got {target}")
    colours, kinds = list(COLOURS), list(KINDS)
    if question_kind == "colour":
        question = Question("colour", rng.choice(colours))
    else:
        question = Question("shape", rng.choice(kinds))
    every = [(c, k) for c in colours for k in kinds]
    matching = [o for o in every if question.matches(o)]
    others = [o for o in every if not question.matches(o)]
    total = rng.randint(max(1, target), MAX_SHAPES)
    objects = [rng.choice(matching) for _ in range(target)] + [
        rng.choice(others) for _ in range(total - target)
    ]
    scene = sample_scene(rng, objects)
    steps = solution_steps(question, scene.objects())
    return ReasoningItem(scene=scene, question=question, answer=str(target), steps=tuple(steps))


def balanced_plan(rng: random.Random, n: int) -> list[tuple[QuestionKind, int]]:
    """n (question kind, target) pairs: half colour and half shape questions, targets uniform over 0..4."""
    plan: list[tuple[QuestionKind, int]] = [
        ("colour" if (i // (MAX_TARGET + 1)) % 2 == 0 else "shape", i % (MAX_TARGET + 1)) for i in range(n)
    ]
    rng.shuffle(plan)
    return plan


def _misread(rng: random.Random, question: Question, objects: list[Obj]) -> list[Obj]:
    # Misread the asked-about attribute more often than the other one, so that most misreads change the
    # answer; otherwise the PRM data would be dominated by harmless misreads.
    i = rng.randrange(len(objects))
    colour, kind = objects[i]
    if (question.kind == "colour") == (rng.random() < MISREAD_ASKED_ATTRIBUTE):
        colour = rng.choice([c for c in COLOURS if c != colour])
    else:
        kind = rng.choice([k for k in KINDS if k != kind])
    return objects[:i] + [(colour, kind)] + objects[i + 1 :]


def _drop_or_add(rng: random.Random, objects: list[Obj]) -> list[Obj]:
    if len(objects) > 1 and rng.random() < 0.5:
        i = rng.randrange(len(objects))
        return objects[:i] + objects[i + 1 :]
    i = rng.randint(0, len(objects))
    return objects[:i] + [(rng.choice(list(COLOURS)), rng.choice(KINDS))] + objects[i:]


def _miscount(rng: random.Random, question: Question, objects: list[Obj]) -> list[str]:
    selected = [o for o in objects if question.matches(o)]
    unselected = [o for o in objects if not question.matches(o)]
    if rng.random() < 0.5:
        # Right filter, wrong number.
        count = len(selected)
        wrong = rng.choice([c for c in (count - 1, count + 1) if c >= 0])
        return [describe_step(objects), filter_step(question, selected), answer_step(wrong)]
    # Wrong filter: take in a shape that does not match, leave out one that does, or swap one for the other.
    options = []
    if unselected:
        options.append("add")
    if selected:
        options.append("drop")
    if selected and unselected:
        options.append("swap")
    action = rng.choice(options)
    chosen = list(selected)
    if action in ("drop", "swap"):
        chosen.pop(rng.randrange(len(chosen)))
    if action in ("add", "swap"):
        extra = rng.choice(unselected)
        chosen.append(extra)
        chosen.sort(key=objects.index)  # keep left-to-right order
    return [describe_step(objects), filter_step(question, chosen), answer_step(len(chosen))]


def perturb(
    rng: random.Random,
    item: ReasoningItem,
    *,
    error: ErrorKind | None = None,
    require_wrong_answer: bool = False,
) -> tuple[list[str], ErrorKind]:
    """A wrong solution for `item` (steps and the kind of error made).

    Args:
        rng: the random source.
        item: the item with its reference solution.
        error: which kind of mistake; default drawn from `ERROR_WEIGHTS`.
        require_wrong_answer: retry until the final answer is wrong (for preference pairs); falls back to a
            wrong number in step 3 if the drawn kind of mistake keeps the answer right.

    Returns:
        The steps (at least one differs from the reference) and the error kind used.
    """
    reference = list(item.steps)
    objects = item.scene.objects()
    for _ in range(20):
        kind: ErrorKind = error or rng.choices(list(ERROR_WEIGHTS), weights=list(ERROR_WEIGHTS.values()))[0]
        if kind == "misread":
            steps = solution_steps(item.question, _misread(rng, item.question, objects))
        elif kind == "drop_or_add":
            steps = solution_steps(item.question, _drop_or_add(rng, objects))
        else:
            steps = _miscount(rng, item.question, objects)
        if steps == reference:
            continue
        if require_wrong_answer and is_correct("\n".join(steps), item.answer):
            continue
        return steps, kind
    count = int(item.answer)
    wrong = count + 1 if count < MAX_SHAPES else count - 1
    return reference[:2] + [answer_step(wrong)], "miscount"
