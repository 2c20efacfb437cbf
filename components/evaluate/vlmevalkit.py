"""VLMEvalKit's evaluation protocol, rewritten from its code at commit e8e78f05f3080fe28154f2130321f17951c3be94.

Sources (open-compass/VLMEvalKit at that commit):

- prompts: `vlmeval/vlm/internvl/utils.py::build_multi_choice_prompt` (InternVL's model class prompts every
  multiple-choice image benchmark itself: hint line, question, `A. ...` option lines, then "Answer with the
  option's letter from the given choices directly." — the Chinese instruction for a Chinese prompt) and
  `internvl_chat.py::build_prompt` (MathVista: the `question` cell as it is, its hint and choices included);
- answer matching: `vlmeval/utils/matching_util.py::can_infer_option`, `can_infer_text`, `can_infer`;
- the judge prompts: `vlmeval/dataset/utils/multiple_choice.py::build_prompt` / `build_prompt_cn` (option
  matching), `vlmeval/dataset/utils/mathvista.py::build_mathvista_gpt4_prompt` (answer extraction, typos kept);
- MathVista's check: `mathvista.py::post_check` (multi_choice: `can_infer` against `choices`, compared with
  `answer_option`; integer: `int(...)`; float: `float(...)`; any other free-form type never matches there, and
  so never here);
- CircularEval: `multiple_choice.py::mcq_circular_eval` (rows grouped by `g_index`, default `index % 1e6`).

Pure functions, no I/O: the judge is passed in as a callable.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Callable, Mapping

Judge = Callable[[str], "str | None"]
"""Prompt in, the judge model's reply out (None when the endpoint gave none)."""

MCQ_INSTRUCTION_EN = "Answer with the option's letter from the given choices directly."
MCQ_INSTRUCTION_CN = "请直接回答选项字母。"
QA_INSTRUCTION_EN = "Answer the question directly."
QA_INSTRUCTION_CN = "请直接回答问题。"
JUDGE_ATTEMPTS_MCQ = 3  # `extract_answer_from_item`: retry = 3
JUDGE_ATTEMPTS_MATHVISTA = 5  # `MathVista_auxeval`: retry = 5
# pandas' default NA strings: VLMEvalKit reads TSVs with pandas, so these cells are NaN there.
PANDAS_NA = frozenset(
    [
        "#N/A",
        "#N/A N/A",
        "#NA",
        "-1.#IND",
        "-1.#QNAN",
        "-NaN",
        "-nan",
        "1.#IND",
        "1.#QNAN",
        "<NA>",
        "N/A",
        "NA",
        "NULL",
        "NaN",
        "None",
        "n/a",
        "nan",
        "null",
    ]
)
_REJECTIONS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
_VERBOSE_ANSWER = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")
_FAIL_MSG = "Failed to obtain answer via API"
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def is_na(value: str | None) -> bool:
    """Whether pandas (VLMEvalKit's TSV reader) reads this cell as NaN."""
    return value is None or value.strip() == "" or value.strip() in PANDAS_NA


def cn_string(text: str) -> bool:
    """VLMEvalKit's `cn_string`: the text holds a CJK ideograph."""
    return re.search("[\u4e00-\u9fff]", text) is not None


def build_mcq_prompt(question: str, hint: str | None, options: Mapping[str, str]) -> str:
    """InternVL's multiple-choice prompt: `[hint\\n]question[\\nA. a\\nB. b...]\\n<instruction>`."""
    if hint is not None:
        question = hint + "\n" + question
    for letter, text in options.items():
        question += f"\n{letter}. {text}"
    prompt = question
    if options:
        prompt += "\n" + (MCQ_INSTRUCTION_CN if cn_string(prompt) else MCQ_INSTRUCTION_EN)
    else:
        prompt += "\n" + (QA_INSTRUCTION_CN if cn_string(prompt) else QA_INSTRUCTION_EN)
    return prompt


def can_infer_option(answer: str, choices: Mapping[str, str]) -> str | None:
    """The option letter an answer names (a lone letter among the last five words), `Z` for a refusal."""
    if _FAIL_MSG in answer:
        return None
    for refusal in _REJECTIONS:
        if refusal in answer:
            return "Z"
    modified = answer
    for char in ".()[],:;!*#{}":
        modified = modified.replace(char, " ")
    splits = [x.strip() for x in modified.split()]
    count = sum(1 for c in choices if c in splits)
    if count == 1:
        for letter in choices:
            if letter in splits and splits.index(letter) > len(splits) - 5:
                return letter
    elif count == 0 and sum(1 for c in ("Z", "") if c in splits) == 1:
        return "Z"
    match = _VERBOSE_ANSWER.search(answer or "")
    if match and match.group(1).upper() in choices:
        return match.group(1).upper()
    return None


def can_infer_text(answer: str, choices: Mapping[str, str]) -> str | None:
    """The option whose text (lower-cased) is the only one contained in the answer; answers longer than twice
    the options' total length never match."""
    answer = answer.lower()
    if len(answer) > 2 * sum(len(str(v)) for v in choices.values()):
        return None
    candidates = [k for k, v in choices.items() if str(v).lower() in answer]
    return candidates[0] if len(candidates) == 1 else None


def can_infer(answer: str, choices: Mapping[str, str]) -> str | None:
    """VLMEvalKit's rule-based matching: the option letter, else the option text; None when neither matches."""
    answer = str(answer)
    return can_infer_option(answer, choices) or can_infer_text(answer, choices)


def mcq_judge_prompt(question: str, choices: Mapping[str, str], prediction: str) -> str:
    """The prompt VLMEvalKit sends its judge to match an answer with an option (`build_prompt[_cn]`)."""
    options = "There are several options: \n" + "".join(f"{c}. {t}\n" for c, t in choices.items())
    if cn_string(question):
        template = (
            "你是一个帮助我匹配答案与单选题中多个选项的 AI 助手。"
            "你会被提供：一个问题，多个选项，一个答案。你的任务是找到与答案意义最相近的选项。"
            "如果所有选项的意义都与答案显著不同，则输出 Z。"
            "你应该输出一个单个的大写字母，例如 A, B, C, D（如果它们是有效选项），或 Z。"
            "例 1:"
            "问题: 图中最主要的物体是什么?\n选项: A. 泰迪熊 B. 兔子 C. 猫 D. 狗\n答案: 一只可爱的泰迪熊\n输出: A\n"
            "例 2: \n"
            "问题: 图中最主要的物体是什么?\n选项: A. 泰迪熊 B. 兔子 C. 猫 D. 狗\n答案: 蜘蛛\n输出: Z\n"
            "例 3: \n"
            "问题: {}?\n选项: {}\n答案: {}\n输出: "
        )
    else:
        template = (
            "You are an AI assistant who will help me to match "
            "an answer with several options of a single-choice question. "
            "You are provided with a question, several options, and an answer, "
            "and you need to find which option is most similar to the answer. "
            "If the meaning of all options are significantly different from the answer, output Z. "
            "Your should output a single uppercase character in A, B, C, D (if they are valid options), and Z. \n"
            "Example 1: \n"
            "Question: What is the main object in image?\nOptions: A. teddy bear B. rabbit C. cat D. dog\n"
            "Answer: a cute teddy bear\nYour output: A\n"
            "Example 2: \n"
            "Question: What is the main object in image?\nOptions: A. teddy bear B. rabbit C. cat D. dog\n"
            "Answer: Spider\nYour output: Z\n"
            "Example 3: \n"
            "Question: {}?\nOptions: {}\nAnswer: {}\nYour output: "
        )
    return template.format(question, options, prediction)


def match_mcq(prediction: str, question: str, choices: Mapping[str, str], judge: Judge | None) -> str | None:
    """The option letter an answer picks (`extract_answer_from_item`): the rules first; if they fail, the judge
    (up to 3 replies, each matched by the rules). `Z` (none of the options) and no match both give None; where
    VLMEvalKit draws a random option after three failed judge replies, this counts the answer as unanswered."""
    letter = can_infer(prediction, choices)
    if letter is None and judge is not None:
        prompt = mcq_judge_prompt(question, choices, prediction)
        for _ in range(JUDGE_ATTEMPTS_MCQ):
            reply = judge(prompt)
            letter = can_infer(reply, choices) if reply else None
            if letter is not None:
                break
    return None if letter in (None, "Z") else letter


_MATHVISTA_EXAMPLES = (
    """
Hint: Please answer the question requiring an integer answer and provide the final value,
e.g., 1, 2, 3, at the end.\n
Question: Which number is missing?\n
Model response: The number missing in the sequence is 14.\n
Extracted answer: 14
""",
    """
Hint: Please answer the question requiring a floating-point number with one decimal place and provide the final value,
e.g., 1.2, 1.3, 1.4, at the end.\n
Question: What is the fraction of females facing the camera?\n
Model response: The fraction of females facing the camera is 0.6,
which means that six out of ten females in the group are facing the camera.\n
Extracted answer: 0.6
""",
    """
Hint: Please answer the question requiring a floating-point number with two decimal places and provide the final value,
e.g., 1.23, 1.34, 1.45, at the end.\n
Question: How much money does Luca need to buy a sour apple candy and a butter-scotch candy? (Unit: $)\n
Model response: Luca needs $1.45 to buy a sour apple candy and a butterscotch candy.\n
Extracted answer: 1.45
""",
    """
Hint: Please answer the question requiring a Python list as an answer and provide the final list,
e.g., [1, 2, 3], [1.2, 1.3, 1.4], at the end.\n
Question: Between which two years does the line graph saw its maximum peak?\n
Model response: The line graph saw its maximum peak between 2007 and 2008.\n
Extracted answer: [2007, 2008]
""",
    """
Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end.\n
Question: What fraction of the shape is blue?\n
Choices: (A) 3/11 (B) 8/11 (C) 6/11 (D) 3/5\n
Model response: The correct answer is (B) 8/11.\n
Extracted answer: B
""",
)


def mathvista_judge_prompt(question: str, prediction: str) -> str:
    """`build_mathvista_gpt4_prompt`, byte for byte (its "respone" typo and missing newline included)."""
    prompt = "\nPlease read the following example.\nThen extract the answer from the model response and type it at the end of the prompt.\n\n"  # noqa: E501
    for example in _MATHVISTA_EXAMPLES:
        prompt += example + "\n"
    prompt += question + "\n"
    prompt += "Model respone: " + prediction
    prompt += "Extracted answer:"
    return prompt


def parse_choices(cell: str) -> list[str]:
    """A MathVista `choices` cell (a Python list literal) as a list of strings.

    Raises:
        ValueError: not a list literal of scalars.
    """
    try:
        value = ast.literal_eval(cell.strip())
    except (ValueError, SyntaxError) as exc:
        raise ValueError(f"choices {cell[:80]!r} is not a list literal") from exc
    if not isinstance(value, list | tuple) or not all(isinstance(v, str | int | float) for v in value):
        raise ValueError(f"choices {cell[:80]!r} must be a list of option texts")
    return [str(v) for v in value]


def mathvista_value(
    response: str, question_type: str, answer_type: str, choices: Mapping[str, str]
) -> str | None:
    """`post_check`'s reading of a response as a canonical string, or None where it raises or finds nothing:
    multi_choice: the letter `can_infer` finds; integer: `str(int(response))`; float: `repr(float(response))`;
    other free-form types: None (`post_check` never matches them)."""
    if question_type == "multi_choice":
        letter = can_infer(response, choices)
        return None if letter in (None, "Z") else letter
    try:
        if answer_type == "integer":
            return str(int(response))
        if answer_type == "float":
            value = float(response)
            return None if math.isnan(value) or math.isinf(value) else repr(value)
    except ValueError:
        return None
    return None


def rule_extract_number(response: str, answer_type: str, precision: int | None) -> str | None:
    """The rule-based fallback where VLMEvalKit asks its judge: the last number in the response, read as
    `post_check` reads the judge's reply (integer: integral values only; float: rounded to `precision`
    decimals as MathVista's own normalisation does)."""
    numbers = _NUMBER.findall(response)
    if not numbers:
        return None
    text = numbers[-1].replace(",", "")
    try:
        value = float(text)
    except ValueError:
        return None
    if answer_type == "integer":
        return str(int(value)) if value.is_integer() else None
    if answer_type == "float":
        if precision is not None:
            value = round(value, precision)
        return repr(float(value))
    return None


def extract_mathvista(
    prediction: str,
    *,
    question: str,
    question_type: str,
    answer_type: str,
    choices: Mapping[str, str],
    precision: int | None,
    reference: str,
    judge: Judge | None,
) -> str | None:
    """A MathVista answer in canonical form (`MathVista_auxeval` + `post_check`): the raw response as
    `post_check` reads it when that matches the reference (VLMEvalKit's prefetch); else the judge's extraction
    (the first of up to 5 replies) read the same way; without a judge, the rule-based fallback (`can_infer` for
    multi_choice, `rule_extract_number` for numbers)."""
    value = mathvista_value(prediction, question_type, answer_type, choices)
    if value is not None and value == reference:
        return value
    if judge is not None:
        prompt = mathvista_judge_prompt(question, prediction)
        for _ in range(JUDGE_ATTEMPTS_MATHVISTA):
            reply = judge(prompt)
            if reply:  # VLMEvalKit takes the first reply it gets, whatever it says
                return mathvista_value(reply.strip(), question_type, answer_type, choices)
        return None
    if question_type == "multi_choice":
        return value  # the letter can_infer found (a wrong one), or None
    return rule_extract_number(prediction, answer_type, precision)


def circular_group(index: str, g_index: str | None) -> str:
    """The CircularEval group of a row: its `g_index` cell, else `int(index) % 1e6` (MMBench's rotations sit at
    index + k * 1e6).

    Raises:
        ValueError: the index is not an integer.
    """
    if g_index is not None and not is_na(g_index):
        return str(int(float(g_index)))
    return str(int(int(float(index)) % 1_000_000))
