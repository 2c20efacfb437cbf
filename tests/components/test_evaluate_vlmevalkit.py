"""VLMEvalKit's protocol on VLMEvalKit-format rows: prompts, rule-based matching, CircularEval, MathVista's
check, and a judge endpoint on 127.0.0.1, all with hand-computed expectations.

The rows reproduce VLMEvalKit's TSVs (VLMEvalKit commit e8e78f05f3080fe28154f2130321f17951c3be94): MMBench
(`index question hint A B C D answer category image l2-category split`, rotations at index + k * 1e6 whose
`image` cell names the first row's index, NaN hints and options, test-split rows without an answer) and
MathVista_MINI (`question` holding hint and choices, `answer` as the option text, `answer_option`, `choices`
as a list literal, `question_type`, `answer_type`, `precision`).
"""

from __future__ import annotations

import base64
import csv
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image
from pydantic import ValidationError

from vlpipe.components.evaluate.benchmarks import load_benchmark
from vlpipe.components.evaluate.config import BenchmarkSpec, EvalConfig, JudgeSettings, protocol_record
from vlpipe.components.evaluate.judge import JudgeError, OpenAIJudge
from vlpipe.components.evaluate.metrics import ItemOutcome, compute_metrics
from vlpipe.components.evaluate.vlmevalkit import (
    MCQ_INSTRUCTION_EN,
    can_infer,
    mathvista_judge_prompt,
    mcq_judge_prompt,
)

MMB_COLUMNS = [
    "index",
    "question",
    "hint",
    "A",
    "B",
    "C",
    "D",
    "answer",
    "category",
    "image",
    "l2-category",
    "split",
]
MV_COLUMNS = [
    "index",
    "image",
    "question",
    "answer",
    "answer_option",
    "choices",
    "question_type",
    "answer_type",
    "precision",
    "task",
    "skills",
]


def _png_b64() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (0, 128, 255)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _tsv(path, columns, rows) -> str:
    """Written as pandas' `to_csv(sep="\\t")` writes VLMEvalKit's TSVs: multi-line cells quoted."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([str(row.get(c, "")) for c in columns] for row in rows)
    path.write_text(buffer.getvalue(), encoding="utf-8")
    return str(path)


@pytest.fixture()
def mmbench(tmp_path):
    image = _png_b64()
    q1, q2 = "What is the main animal?", "Which is bigger?"
    rows = [
        # Group 1: three rotations of (cat, dog, cow), answer dog; D is NaN.
        dict(index=1, question=q1, hint="The photo was taken on a farm.", A="cat", B="dog", C="cow", D="nan",
             answer="B", image=image, split="dev"),
        dict(index=1000001, question=q1, hint="The photo was taken on a farm.", A="dog", B="cow", C="cat",
             D="", answer="A", image="1", split="dev"),
        dict(index=2000001, question=q1, hint="The photo was taken on a farm.", A="cow", B="cat", C="dog",
             D="", answer="C", image="1", split="dev"),
        # Group 2: two options, no hint (pandas' NaN), two rotations.
        dict(index=2, question=q2, hint="nan", A="sun", B="moon", C="", D="", answer="A", image=image,
             split="dev"),
        dict(index=1000002, question=q2, hint="", A="moon", B="sun", C="", D="", answer="B", image="2",
             split="dev"),
        # A test-split row: no answer (VLMEvalKit leaves these to the MMBench server).
        dict(index=3, question="Where is it?", hint="", A="x", B="y", C="", D="", answer="", image=image,
             split="test"),
    ]  # fmt: skip
    return _tsv(tmp_path / "MMBench_DEV_EN.tsv", MMB_COLUMNS, rows)


def test_mmbench_rows_prompts_groups_and_the_test_split(mmbench):
    loaded = load_benchmark(
        BenchmarkSpec(name="MMBench_DEV_EN", path=mmbench, format="tsv", protocol="vlmevalkit-mcq")
    )
    assert loaded.spec.circular is True  # VLMEvalKit: "mmbench" in the name
    assert [(i.item_id, i.group, i.answer) for i in loaded.items] == [
        ("1", "1", "B"), ("1000001", "1", "A"), ("2000001", "1", "C"), ("2", "2", "A"), ("1000002", "2", "B"),
    ]  # fmt: skip
    assert [(s.item_id, s.reason) for s in loaded.skipped] == [("3", "missing_answer")]
    assert "split 'test'" in loaded.skipped[0].detail
    first, no_hint = loaded.items[0], loaded.items[3]
    # InternVL's build_multi_choice_prompt: hint, question, the non-NaN options, the instruction.
    assert first.question == (
        "The photo was taken on a farm.\nWhat is the main animal?\nA. cat\nB. dog\nC. cow\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert no_hint.question == f"Which is bigger?\nA. sun\nB. moon\n{MCQ_INSTRUCTION_EN}"
    assert first.prompt_text.startswith("<image>\nThe photo") and first.options == (
        ("A", "cat"),
        ("B", "dog"),
        ("C", "cow"),
    )
    assert loaded.items[1].images == first.images  # rotation rows reuse row 1's image by index


def test_can_infer_reads_letters_and_option_text_as_vlmevalkit_does():
    choices = {"A": "cat", "B": "dog", "C": "cow"}
    assert can_infer("B", choices) == "B"
    assert can_infer("(B) dog.", choices) == "B"
    assert can_infer("The answer is dog", choices) == "B"  # no letter; "dog" is the only option text in it
    assert can_infer("Cannot determine the answer", choices) == "Z"
    assert can_infer("A or B", choices) is None  # two letters: no option; no option text either
    assert can_infer("a cat and a dog", choices) is None  # two option texts
    assert can_infer("it is a " + "very " * 10 + "big dog", choices) is None  # longer than 2 x 9 characters


def test_circular_eval_scores_by_hand(mmbench):
    loaded = load_benchmark(
        BenchmarkSpec(name="MMBench_DEV_EN", path=mmbench, format="tsv", protocol="vlmevalkit-mcq")
    )
    items = {i.item_id: i for i in loaded.items}
    # Greedy answer and two sampled answers (with PRM scores) per row.
    script = {
        "1": ("B", [("A", 0.9), ("dog", 0.2)]),
        "1000001": ("The answer is dog", [("A.", 0.8), ("cow", 0.1)]),
        "2000001": ("A", [("C", 0.7), ("C", 0.6)]),  # greedy wrong (A = cow)
        "2": ("A", [("B", 0.9), ("sun", 0.3)]),
        "1000002": ("B. sun", [("B", 0.9), ("moon", 0.3)]),
    }
    outcomes = []
    for item_id, (greedy, samples) in script.items():
        item = items[item_id]
        extracted = [item.extract(text) for text, _ in samples]
        outcomes.append(
            ItemOutcome(
                item.benchmark, item_id, item.is_correct(item.extract(greedy)), tuple(extracted),
                tuple(item.is_correct(e) for e in extracted), tuple(score for _, score in samples), group=item.group,
            )
        )  # fmt: skip
    m = compute_metrics(outcomes, [1, 2])["benchmarks"]["MMBench_DEV_EN"]
    assert (m["items"], m["rows"]) == (2, 5)
    # pass@1: group 1 has a wrong rotation (2000001), group 2 is right in both: 1/2 (per row it would be 4/5).
    assert m["pass_at_1"] == 0.5
    # Best-of-2 picks the higher score: group 1 -> A (wrong, B is right) fails; group 2 -> B (wrong) fails: 0/2.
    assert m["best_of_k"] == {1: 0.0, 2: 0.0}
    # oracle@1: first samples A, A, C | B, B -> group 1: wrong, right, right; group 2: wrong, right -> 0/2;
    # oracle@2 adds "dog" (right) for row 1 and "sun" (right) for row 2 -> both groups right: 2/2.
    assert m["oracle_at_k"] == {1: 0.0, 2: 1.0}
    # Samples stay per sample: right are dog | A. | C, C | sun | B -> 6 of 10.
    assert m["sample_accuracy"] == pytest.approx(6 / 10)


def test_circular_group_with_a_skipped_rotation_is_skipped_whole_and_limit_counts_groups(tmp_path):
    image = _png_b64()
    rows = [
        dict(index=1, question="Q?", A="a", B="b", answer="A", image=image),
        dict(index=1000001, question="Q?", A="b", B="a", answer="B", image="not base64!"),
        dict(index=2, question="R?", A="a", B="b", answer="B", image=image),
        dict(index=1000002, question="R?", A="b", B="a", answer="A", image="2"),
        dict(index=4, question="S?", A="a", B="b", answer="B", image=image),
    ]
    path = _tsv(tmp_path / "circ.tsv", ["index", "question", "A", "B", "answer", "image"], rows)
    spec = BenchmarkSpec(name="x", path=path, format="tsv", protocol="vlmevalkit-mcq", circular=True, limit=1)
    loaded = load_benchmark(spec)
    assert [i.item_id for i in loaded.items] == ["2", "1000002"]
    assert [(s.item_id, s.reason) for s in loaded.skipped] == [
        ("1000001", "corrupt_image"), ("1", "incomplete_circular_group"),
    ]  # fmt: skip


@pytest.fixture()
def mathvista(tmp_path):
    image = _png_b64()
    mc_hint = "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end."
    rows = [
        dict(index=1, image=image, question=f"{mc_hint}\nQuestion: What colour is the sky?\nChoices:\n(A) red\n"
             "(B) blue\n(C) green", answer="blue", answer_option="B", choices="['red', 'blue', 'green']",
             question_type="multi_choice", answer_type="text", precision="nan"),
        dict(index=2, image=image, question="Question: Which is a plant?", answer="tree", answer_option="nan",
             choices="['cat', 'tree']", question_type="multi_choice", answer_type="text", precision=""),
        dict(index=3, image=image, question="Hint: ... integer answer ...\nQuestion: Which number is missing?",
             answer="14", answer_option="", choices="", question_type="free_form", answer_type="integer",
             precision=""),
        dict(index=4, image=image, question="Hint: ... two decimal places ...\nQuestion: How much money?",
             answer="1.45", answer_option="", choices="", question_type="free_form", answer_type="float",
             precision="2.0"),
        dict(index=5, image=image, question="Question: Between which years?", answer="[2007, 2008]",
             answer_option="", choices="", question_type="free_form", answer_type="list", precision=""),
    ]  # fmt: skip
    return _tsv(tmp_path / "MathVista_MINI.tsv", MV_COLUMNS, rows)


def test_mathvista_rows_score_by_hand_with_the_rule_based_fallback(mathvista):
    spec = BenchmarkSpec(name="MathVista_MINI", path=mathvista, format="tsv", protocol="vlmevalkit-mathvista")
    items = {i.item_id: i for i in load_benchmark(spec).items}
    assert [(k, i.answer) for k, i in items.items()] == [
        ("1", "B"), ("2", "B"), ("3", "14"), ("4", "1.45"), ("5", "[2007, 2008]"),
    ]  # fmt: skip
    assert items["1"].question.startswith("Hint: Please answer") and items["1"].question.endswith("(C) green")

    def right(item_id: str, answer: str) -> bool:
        item = items[item_id]
        return item.is_correct(item.extract(answer))

    # multi_choice: the letter or the option's text (the case: answer "blue", model says "B").
    assert right("1", "B") and right("1", "blue") and right("1", "The answer is (B) blue.")
    assert not right("1", "(A) red") and not right("1", "purple")
    assert right("2", "tree") and right("2", "B")  # no answer_option: the choice whose text is the answer
    # integer: int(response) as VLMEvalKit's prefetch; else the last number (the fallback for its judge).
    assert right("3", "14") and right("3", "The missing number is 14.") and not right("3", "14.5")
    # float with precision 2: float(response) exactly, else the last number rounded to 2 decimals.
    assert right("4", "1.45") and right("4", "Luca needs $1.449.") and not right("4", "1.46")
    # list answers: VLMEvalKit's post_check never matches them.
    assert not right("5", "[2007, 2008]")
    # One answer per item: 1 "B" right, 2 "tree" right, 3 "14" right, 4 "1.46" wrong, 5 the list wrong -> 3/5.
    outcomes = [
        ItemOutcome("MathVista_MINI", k, right(k, a), (items[k].extract(a),), (right(k, a),), (0.5,))
        for k, a in [("1", "B"), ("2", "tree"), ("3", "14"), ("4", "1.46"), ("5", "[2007, 2008]")]
    ]
    assert compute_metrics(outcomes, [1])["overall"]["pass_at_1"] == pytest.approx(3 / 5)


class _FakeJudge(BaseHTTPRequestHandler):
    """An OpenAI-compatible /v1/chat/completions that answers from `verdicts` (first key found in the prompt)."""

    verdicts: dict[str, str] = {}
    requests: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        type(self).requests.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
        reply = next((v for k, v in self.verdicts.items() if k in prompt), "no idea")
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def judge_server():
    _FakeJudge.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeJudge)
    server.timeout = 5
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_judge_endpoint_gets_vlmevalkit_prompts_and_its_verdicts_count(
    judge_server, mathvista, mmbench, monkeypatch
):
    monkeypatch.setenv("VLPIPE_TEST_JUDGE_KEY", "sk-test-secret")
    judge = OpenAIJudge(
        JudgeSettings(base_url=judge_server, model="fake-judge", api_key_env="VLPIPE_TEST_JUDGE_KEY", timeout_s=60,
                      max_retries=0)
    )  # fmt: skip
    _FakeJudge.verdicts = {"Model respone: fourteen": "14", "Model respone: about a dollar fifty": "1.5",
                           "Answer: the barking one": "B", "Answer: a pet": "Z"}  # fmt: skip
    mv = {i.item_id: i for i in load_benchmark(BenchmarkSpec(name="mv", path=mathvista, format="tsv",
                                                             protocol="vlmevalkit-mathvista")).items}  # fmt: skip
    mmb = load_benchmark(
        BenchmarkSpec(name="MMBench", path=mmbench, format="tsv", protocol="vlmevalkit-mcq")
    ).items[0]

    # MathVista: the rules cannot read "fourteen"; the judge extracts 14, which post_check accepts.
    assert mv["3"].extract("fourteen", judge) == "14" and mv["3"].is_correct("14")
    # The judge's verdict is what counts (the rules find no number in this answer).
    assert mv["4"].extract("about a dollar fifty", judge) == repr(1.5)
    # A response the prefetch already reads right never reaches the judge.
    assert mv["3"].extract("14", judge) == "14"
    # MCQ: the judge matches "the barking one" with B (dog); its Z (no option) counts as no answer.
    assert mmb.extract("the barking one", judge) == "B" and mmb.is_correct("B")
    assert mmb.extract("a pet", judge) is None
    # Cached: asking again sends nothing.
    assert mmb.extract("the barking one", judge) == "B"

    sent = _FakeJudge.requests
    assert len(sent) == judge.calls == 4
    assert all(r["path"] == "/v1/chat/completions" and r["model"] == "fake-judge" for r in sent)
    assert all(r["auth"] == "Bearer sk-test-secret" and r["temperature"] == 0 for r in sent)
    prompts = [r["messages"][0]["content"] for r in sent]
    assert prompts[0] == mathvista_judge_prompt(mv["3"].question, "fourteen")
    assert prompts[0].endswith(
        "Extracted answer: B\n\nHint: ... integer answer ...\nQuestion: Which number is missing?\n"
        "Model respone: fourteenExtracted answer:"
    )
    assert prompts[2] == mcq_judge_prompt(
        "What is the main animal?", {"A": "cat", "B": "dog", "C": "cow"}, "the barking one"
    )
    assert prompts[2].endswith(
        "Question: What is the main animal??\nOptions: There are several options: \nA. cat\nB. dog\nC. cow\n\n"
        "Answer: the barking one\nYour output: "
    )


def test_protocol_settings_defaults_and_record():
    demo = BenchmarkSpec(name="demo", path="d.jsonl", format="demo")
    tsv = BenchmarkSpec(name="mmmu", path="m.tsv", format="tsv")
    mmb = BenchmarkSpec(name="MMBench_DEV_EN", path="m.tsv", format="tsv", protocol="vlmevalkit-mcq")
    star = BenchmarkSpec(name="MMStar", path="s.tsv", format="tsv", protocol="vlmevalkit-mcq")
    assert (demo.protocol, tsv.protocol, mmb.circular, star.circular) == ("demo", "vlpipe", True, False)
    with pytest.raises(ValidationError, match="protocol 'demo' needs format 'demo'"):
        BenchmarkSpec(name="x", path="x.tsv", format="tsv", protocol="demo")
    with pytest.raises(ValidationError, match="circular applies to protocol 'vlmevalkit-mcq' only"):
        BenchmarkSpec(name="x", path="x.tsv", format="tsv", circular=True)
    with pytest.raises(ValidationError, match="base_url"):
        JudgeSettings(base_url="https://user:sk-secret@api.example.com/v1", model="m")
    with pytest.raises(ValidationError, match="base_url"):
        JudgeSettings(base_url="https://api.example.com/v1?key=sk-secret", model="m")
    config = EvalConfig(policy="p", prm="p", output_dir="o", benchmarks=[mmb, demo, star])
    assert (
        protocol_record(config)
        == "MMBench_DEV_EN=vlmevalkit-mcq+circular+rule;MMStar=vlmevalkit-mcq+rule;demo=demo"
    )
    judged = config.model_copy(
        update={"judge": JudgeSettings(base_url="http://127.0.0.1:1/v1", model="gpt-x")}
    )
    assert protocol_record(judged).startswith("MMBench_DEV_EN=vlmevalkit-mcq+circular+judge:gpt-x;")
    # The resolved protocol survives the stage's re-validation of a dumped config.
    assert EvalConfig.model_validate(config.model_dump()) == config


class _FlakyJudge(BaseHTTPRequestHandler):
    """Answers with the next status of `statuses` (200: a verdict)."""

    statuses: list[int] = []

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        status = type(self).statuses.pop(0)
        data = json.dumps(
            {"choices": [{"message": {"content": "B"}}]} if status == 200 else {"error": "x"}
        ).encode()
        self.send_response(status)
        if 300 <= status < 400:
            self.send_header("Location", "http://127.0.0.1:1/v1/chat/completions")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


def test_judge_retries_server_errors_and_stops_on_a_refusal(monkeypatch):
    monkeypatch.delenv("VLPIPE_TEST_JUDGE_KEY", raising=False)
    monkeypatch.setattr("vlpipe.components.evaluate.judge.time.sleep", lambda seconds: None)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FlakyJudge)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        settings = JudgeSettings(
            base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", model="m",
            api_key_env="VLPIPE_TEST_JUDGE_KEY", timeout_s=60, max_retries=1,
        )  # fmt: skip
        _FlakyJudge.statuses = [503, 200]
        assert OpenAIJudge(settings)("prompt") == "B"  # one retry after the 503
        _FlakyJudge.statuses = [503, 503]
        assert (
            OpenAIJudge(settings)("prompt") is None
        )  # retries spent: no verdict (the answer counts as unread)
        _FlakyJudge.statuses = [401]
        with pytest.raises(JudgeError, match=r"HTTP 401.*\$VLPIPE_TEST_JUDGE_KEY"):
            OpenAIJudge(settings)("prompt")
        _FlakyJudge.statuses = [302]  # a redirect is not followed (it would carry the key elsewhere)
        with pytest.raises(JudgeError, match="HTTP 302"):
            OpenAIJudge(settings)("prompt")
        assert _FlakyJudge.statuses == []
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
