"""The evaluation entrypoint: config, PRM scoring equivalence, V2PE generation, end-to-end runs with MLflow."""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import pytest
import torch
import typer
from pydantic import ValidationError
from typer.testing import CliRunner

from vlpipe.components.evaluate.benchmarks import BenchmarkError, load_benchmark
from vlpipe.components.evaluate.cli import eval_command
from vlpipe.components.evaluate.config import BenchmarkSpec, EvalConfig, load_eval_config
from vlpipe.components.evaluate.metrics import ItemOutcome, compute_metrics, select_best
from vlpipe.components.evaluate.stage import item_seed, prepare_item, run_evaluation
from vlpipe.model.checkpoint import load_checkpoint, save_checkpoint
from vlpipe.model.conversation import ConversationEncoder
from vlpipe.model.data.demo import DemoSizes, iter_demo_texts, write_demo_dataset
from vlpipe.model.generate import generate
from vlpipe.model.init import init_random
from vlpipe.model.tokenizer import IM_END
from vlpipe.objectives.prm import PLUS
from vlpipe.serving.scoring import PRMScorer, score_steps_per_prefix


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Demo data, a tiny policy with V2PE δ = 0.25 and a separately initialised tiny PRM."""
    root = tmp_path_factory.mktemp("eval")
    sizes = DemoSizes(
        text_corpus=20,
        captions=5,
        reasoning_train=20,
        reasoning_test=6,
        mpo_pairs=1,
        prm_solutions=1,
        reasoning_prm=1,
    )
    write_demo_dataset(str(root / "data"), seed=0, sizes=sizes)
    corpus = list(iter_demo_texts(str(root / "data")))
    init_random("tiny", str(root / "policy"), corpus=corpus, seed=0, v2pe_delta=0.25)
    init_random("tiny", str(root / "prm"), corpus=corpus, seed=1)
    return root


def _demo_spec(workdir: Path, limit: int) -> dict:
    return {
        "name": "demo",
        "path": str(workdir / "data/reasoning/test.jsonl"),
        "format": "demo",
        "limit": limit,
    }


# -- config ------------------------------------------------------------------------------------------------------
EXAMPLE_YAML = """
policy: s3://models/internvl3-1b-mpo
prm: s3://models/visualprm-1b
benchmarks:
  - {name: demo, path: s3://data/demo/reasoning/test.jsonl, format: demo, limit: 200}
  - {name: MathVista_MINI, path: s3://bench/MathVista_MINI.tsv, format: tsv}
n: 8
aggregation: min
output_dir: s3://runs/eval/1
mlflow: {experiment: internvl3, parent_run_id: 0123abcd, tags: {stage: eval, recipe: 1b}}
"""


def test_config_loads_from_yaml_and_json_and_rejects_mistakes(tmp_path):
    (tmp_path / "eval.yaml").write_text(EXAMPLE_YAML)
    cfg = load_eval_config(tmp_path / "eval.yaml")
    assert (cfg.n, cfg.temperature, cfg.top_p, cfg.aggregation, cfg.batch_items) == (8, 0.7, 1.0, "min", 8)
    assert cfg.benchmarks[1].format == "tsv" and cfg.benchmarks[0].limit == 200
    assert cfg.mlflow.parent_run_id == "0123abcd" and cfg.mlflow.tags["recipe"] == "1b"
    (tmp_path / "eval.json").write_text(cfg.model_dump_json())
    assert load_eval_config(tmp_path / "eval.json") == cfg
    with pytest.raises(ValidationError):
        cfg.n = 4  # frozen

    base = {
        "policy": "p",
        "prm": "q",
        "output_dir": "o",
        "benchmarks": [{"name": "a", "path": "x", "format": "demo"}],
    }
    assert EvalConfig.model_validate(base).mlflow.tags == {"stage": "eval"}
    for change, message in [
        ({"temprature": 0.5}, "Extra inputs are not permitted"),
        ({"n": 0}, "greater than or equal to 1"),
        ({"aggregation": "max"}, "'mean', 'min' or 'last'"),
        ({"top_p": 1.5}, "less than or equal to 1"),
        ({"benchmarks": []}, "at least 1 item"),
        ({"benchmarks": [{"name": "a", "path": "x", "format": "csv"}]}, "'demo' or 'tsv'"),
        ({"benchmarks": [{"name": "a", "path": "x", "format": "demo"}] * 2}, "repeated: a"),
        ({"benchmarks": [{"name": "overall", "path": "x", "format": "demo"}]}, "reserved"),
        ({"benchmarks": [{"name": "a b", "path": "x", "format": "demo"}]}, "should match pattern"),
    ]:
        with pytest.raises(ValidationError, match=message):
            EvalConfig.model_validate({**base, **change})
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ValueError, match="must be a mapping"):
        load_eval_config(tmp_path / "list.yaml")


def test_item_seed_is_stable_and_distinct():
    assert item_seed(0, "demo", "a") == item_seed(0, "demo", "a")
    assert len({item_seed(0, "demo", "a"), item_seed(1, "demo", "a"), item_seed(0, "demo", "b")}) == 3


# -- PRM scoring -------------------------------------------------------------------------------------------------
def test_one_forward_scores_equal_per_prefix_scores(workdir):
    prm = load_checkpoint(workdir / "prm")
    scorer = PRMScorer(prm, "mean")
    with (
        torch.no_grad()
    ):  # random +/- rows spread the scores (~0.44 each otherwise), so equality means something
        weight = prm.model.lm_head.weight
        weight[[scorer.plus_id, scorer.minus_id]] = 0.2 * torch.randn(
            2, weight.shape[1], generator=torch.Generator().manual_seed(0)
        )
    item = load_benchmark(BenchmarkSpec(**_demo_spec(workdir, 1))).items[0]
    prepared = prepare_item(item, prm, ConversationEncoder(prm.tokenizer, prm.tokens_per_tile, 4096), prm)
    tiles, pixels = prepared.prm_tiles, prepared.prm_pixels
    assert tiles == [5]  # 64x64 demo image, 32-pixel tiles: 2x2 + thumbnail
    answers = [
        "I see a red circle and a blue square.\nThe red one is the circle.\nSo the answer is 1.",
        "So the answer is 2.",
        "",  # no step: NaN, ranked last
        "I see a green triangle.\n\nThere are no red ones.\nMaybe two.\nOr three.\nSo the answer is 0.",
    ]
    scored = scorer.score_answers(item.prompt_text, answers, tiles, pixels)
    assert [len(s.steps) for s in scored] == [3, 1, 0, 5]
    assert math.isnan(scored[2].score) and scored[2].step_scores == ()
    for answer, s in zip(answers, scored, strict=True):
        if not s.steps:
            continue
        reference = score_steps_per_prefix(scorer, item.prompt_text, list(s.steps), tiles, pixels)
        assert max(abs(a - b) for a, b in zip(s.step_scores, reference, strict=True)) < 1e-4
        assert s.score == pytest.approx(sum(s.step_scores) / len(s.step_scores), abs=1e-6)
        # Padding-invariant: the same answer alone gives the same scores as inside the padded batch.
        alone = scorer.score_answers(item.prompt_text, [answer], tiles, pixels)[0]
        assert max(abs(a - b) for a, b in zip(s.step_scores, alone.step_scores, strict=True)) < 1e-5
    all_scores = [x for s in scored for x in s.step_scores]
    assert max(all_scores) - min(all_scores) > 1e-2
    last = PRMScorer(prm, "last").score_answers(item.prompt_text, answers[:1], tiles, pixels)[0]
    lowest = PRMScorer(prm, "min").score_answers(item.prompt_text, answers[:1], tiles, pixels)[0]
    assert last.score == pytest.approx(scored[0].step_scores[-1], abs=1e-6)
    assert lowest.score == pytest.approx(min(scored[0].step_scores), abs=1e-6)


# -- generation --------------------------------------------------------------------------------------------------
def test_prompts_use_v2pe_positions_and_cached_generation_matches_a_plain_loop(workdir):
    policy = load_checkpoint(workdir / "policy")
    assert policy.v2pe_delta == 0.25
    encoder = ConversationEncoder(policy.tokenizer, policy.tokens_per_tile, 4096)
    items = load_benchmark(BenchmarkSpec(**_demo_spec(workdir, 2))).items
    prompts = [prepare_item(item, policy, encoder, policy).prompt for item in items]
    prompt = prompts[0]
    image = prompt.input_ids == policy.image_token_id
    assert int(image.sum()) == 5 * 4  # 5 tiles x 4 tokens per tile
    image_positions = prompt.position_ids[image]
    assert torch.allclose(torch.diff(image_positions), torch.full((19,), 0.25))
    assert bool((prompt.position_ids != prompt.position_ids.round()).any())  # fractional positions
    after = int(torch.nonzero(image).max()) + 1  # </img>: ceil(last visual position) + 1
    assert float(prompt.position_ids[after]) == math.ceil(float(image_positions[-1])) + 1

    eos = policy.tokenizer.convert_tokens_to_ids(IM_END)
    pad = policy.tokenizer.pad_token_id
    steps = 8
    expected = []
    for p in prompts:  # no cache: every step re-reads the whole sequence with explicit V2PE positions
        ids, pos = p.input_ids.clone(), p.position_ids.clone()
        with torch.no_grad():
            for _ in range(steps):
                logits = policy.model(
                    input_ids=ids[None], position_ids=pos[None], attention_mask=torch.ones(1, len(ids)),
                    pixel_values=p.pixel_values,
                ).logits[0, -1]  # fmt: skip
                nxt = int(logits.argmax())
                if nxt == eos:
                    break
                ids, pos = torch.cat([ids, torch.tensor([nxt])]), torch.cat([pos, pos[-1:] + 1])
        expected.append(ids[len(p) :].tolist())
    assert (
        generate(policy.model, prompts[:1], eos_token_id=eos, pad_token_id=pad, max_new_tokens=steps)
        == expected[:1]
    )
    # Greedy answers of several items in one left-padded batch equal the one-by-one answers.
    assert len(prompts[0]) != len(prompts[1])
    assert (
        generate(policy.model, prompts, eos_token_id=eos, pad_token_id=pad, max_new_tokens=steps) == expected
    )


# -- end to end --------------------------------------------------------------------------------------------------
def _tsv(workdir: Path) -> Path:
    png = (workdir / "data/images/reasoning/test/000000.png").read_bytes()
    b64 = base64.b64encode(png).decode()
    rows = [
        ["index", "image", "question", "A", "B", "answer"],
        ["10", b64, "Is there a shape?", "yes", "no", "A"],
        ["11", "bad base64 !!!", "Is there a shape?", "yes", "no", "A"],
        ["12", "10", "How many shapes?", "", "", "3"],
    ]
    path = workdir / "mini.tsv"
    path.write_text("\n".join("\t".join(r) for r in rows) + "\n")
    return path


@pytest.mark.slow
def test_end_to_end_writes_metrics_items_and_a_nested_mlflow_run(workdir, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    parent = client.create_run(client.create_experiment("pipeline"), run_name="pipeline").info.run_id
    config = EvalConfig(
        policy=str(workdir / "policy"),
        prm=str(workdir / "prm"),
        benchmarks=[_demo_spec(workdir, 3), {"name": "mini", "path": str(_tsv(workdir)), "format": "tsv"}],
        n=4,
        max_new_tokens=10,
        batch_items=2,
        output_dir=str(tmp_path / "out"),
        mlflow={"parent_run_id": parent, "tags": {"stage": "eval", "recipe": "test"}},
    )
    metrics = run_evaluation(config)

    out = tmp_path / "out"
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert metrics["evaluated_items"] == 5 and metrics["ks"] == [1, 2, 4] and metrics["n"] == 4
    assert metrics["items_per_second"] > 0
    assert metrics["benchmarks"]["mini"]["skipped"] == 1
    assert metrics["benchmarks"]["mini"]["skipped_reasons"] == {"corrupt_image": 1}
    assert metrics["skipped"] == [
        {"benchmark": "mini", "path": str(workdir / "mini.tsv"), "item": "11", "reason": "corrupt_image",
         "detail": metrics["skipped"][0]["detail"]}
    ]  # fmt: skip
    records = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert [(r["benchmark"], r["id"]) for r in records][3:] == [("mini", "10"), ("mini", "12")]
    assert records[3]["question"] == "Is there a shape?\nA. yes\nB. no"
    outcomes = []
    for r in records:
        assert len(r["samples"]) == 4
        scores = [math.nan if s["score"] is None else s["score"] for s in r["samples"]]
        assert r["chosen"] == select_best(scores)
        for s in r["samples"]:
            assert len(s["step_scores"]) == len(s["steps"])
        outcomes.append(
            ItemOutcome(r["benchmark"], r["id"], r["greedy"]["correct"], tuple(s["extracted"] for s in r["samples"]),
                        tuple(s["correct"] for s in r["samples"]), tuple(scores))
        )  # fmt: skip
    recomputed = json.loads(json.dumps(compute_metrics(outcomes, [1, 2, 4])))
    for scope in ("demo", "mini"):
        for key, value in recomputed["benchmarks"][scope].items():
            assert metrics["benchmarks"][scope][key] == value, (scope, key)
    assert (out / "best_of_k.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "best_of_k_demo.png").exists() and (out / "best_of_k_mini.png").exists()

    run = client.get_run(metrics["mlflow"]["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["stage"] == "eval"
    assert run.info.experiment_id == client.get_run(parent).info.experiment_id
    assert run.data.metrics["overall/best_of_n"] == metrics["overall"]["best_of_n"]
    assert run.data.metrics["mini/skipped"] == 1.0
    assert run.data.params["n"] == "4" and run.data.params["benchmark.mini.format"] == "tsv"
    # The protocol each benchmark was scored under, recorded with the numbers (what the promotion gate compares).
    assert run.data.tags["protocol"] == metrics["protocol"] == "demo=demo;mini=vlpipe"
    assert run.data.tags["protocol.mini"] == metrics["benchmarks"]["mini"]["protocol"] == "vlpipe"
    assert run.data.params["benchmark.mini.protocol"] == "vlpipe" and metrics["judge"] is None
    history = client.get_metric_history(run.info.run_id, "overall/best_of_k")
    assert sorted(m.step for m in history) == [1, 2, 4]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert {"eval/metrics.json", "eval/items.jsonl", "eval/items_table.json", "eval/config.json"} <= artifacts
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "eval/plots")}
    assert "eval/plots/best_of_k.png" in plots
    table = json.loads(
        Path(client.download_artifacts(run.info.run_id, "eval/items_table.json", str(tmp_path))).read_text()
    )
    assert len(table["data"]) == 5 and "step_scores" in table["columns"]


@pytest.mark.slow
def test_scripted_answers_give_hand_computed_metrics(workdir, tmp_path, monkeypatch):
    """Generation replaced by fixed answers and a PRM whose +/- logits are zero (every step scores exactly 0.5,
    so Best-of-k always ties and must pick the first sample)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    prm = load_checkpoint(workdir / "prm")
    plus, minus = PRMScorer(prm).plus_id, PRMScorer(prm).minus_id
    assert prm.tokenizer.convert_ids_to_tokens(plus) == PLUS
    with torch.no_grad():
        prm.model.lm_head.weight[[plus, minus]] = 0.0
    save_checkpoint(tmp_path / "flat-prm", prm.model, prm.tokenizer, prm.image_cfg)
    items = load_benchmark(BenchmarkSpec(**_demo_spec(workdir, 2))).items
    rows = {
        json.loads(line)["id"]: json.loads(line) for line in (workdir / "data/reasoning/test.jsonl").open()
    }

    def answer(item_id: str, delta: int) -> str:
        solution = rows[item_id]["solution"]
        return solution.rsplit("\n", 1)[0] + f"\nSo the answer is {int(rows[item_id]['answer']) + delta}."

    a, b = items[0].item_id, items[1].item_id
    scripted = {
        (a, False): [answer(a, 0)],  # greedy right
        (a, True): [answer(a, 1), answer(a, 0), answer(a, 0), ""],  # majority right, first sample wrong
        (b, False): [answer(b, 2)],  # greedy wrong
        (b, True): [answer(b, 0), answer(b, 1), answer(b, 1), answer(b, 2)],  # majority wrong, first right
    }
    policy_tok = load_checkpoint(workdir / "policy").tokenizer

    def fake_generate(model, prompts, *, do_sample=False, **kwargs):
        texts = [t for p in prompts[: 1 if do_sample else None] for t in scripted[(p.sample_id, do_sample)]]
        return [policy_tok(t, add_special_tokens=False)["input_ids"] for t in texts]

    monkeypatch.setattr("vlpipe.components.evaluate.stage.generate", fake_generate)
    config = EvalConfig(
        policy=str(workdir / "policy"), prm=str(tmp_path / "flat-prm"), benchmarks=[_demo_spec(workdir, 2)],
        n=4, batch_items=2, output_dir=str(tmp_path / "out"),
    )  # fmt: skip
    m = run_evaluation(config)["overall"]
    assert m["pass_at_1"] == 0.5  # a right, b wrong
    # Ties everywhere: Best-of-k picks sample 0 (a: wrong, b: right), for every k.
    assert m["best_of_k"] == {"1": 0.5, "2": 0.5, "4": 0.5} and m["best_of_n"] == 0.5
    # a: votes (wrong, right, right; "" abstains) -> right; b: (right, wrong, wrong, other) -> wrong.
    assert m["majority"] == 0.5 and m["majority_at_k"] == {"1": 0.5, "2": 0.5, "4": 0.5}
    assert m["oracle"] == 1.0 and m["oracle_at_k"] == {"1": 0.5, "2": 1.0, "4": 1.0}
    assert m["sample_accuracy"] == 3 / 8
    assert m["prm_score_correct_mean"] == pytest.approx(0.5) and m[
        "prm_score_incorrect_mean"
    ] == pytest.approx(0.5)
    record = json.loads((tmp_path / "out/items.jsonl").read_text().splitlines()[0])
    assert record["samples"][3]["score"] is None and record["samples"][3]["steps"] == []
    assert record["samples"][0]["step_scores"] == [0.5, 0.5, 0.5]
    assert record["majority_answer"] == rows[a]["answer"] and record["chosen"] == 0


# -- bad input ---------------------------------------------------------------------------------------------------
def test_empty_benchmark_fails_before_any_model_or_run(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    empty = tmp_path / "empty.tsv"
    empty.write_text("index\timage\tquestion\tanswer\n")
    config = EvalConfig(
        policy=str(tmp_path / "no-policy"), prm=str(tmp_path / "no-prm"), output_dir=str(tmp_path / "out"),
        benchmarks=[{"name": "empty", "path": str(empty), "format": "tsv"}],
    )  # fmt: skip
    with pytest.raises(BenchmarkError, match=f"{empty} has no rows"):
        run_evaluation(config)
    assert not (tmp_path / "mlflow.db").exists()

    app = typer.Typer()
    app.command()(eval_command)
    path = tmp_path / "eval.yaml"
    path.write_text(config.model_dump_json())
    result = CliRunner().invoke(app, ["--config", str(path)])
    assert result.exit_code == 1 and f"{empty} has no rows" in " ".join(result.output.split())
    path.write_text("policy: p\n")
    result = CliRunner().invoke(app, ["--config", str(path)])
    assert result.exit_code == 2 and "prm" in result.output


@pytest.mark.slow
def test_circular_mmbench_with_a_judge_through_the_stage(workdir, tmp_path, monkeypatch):
    """VLMEvalKit's MCQ protocol through `run_evaluation`: CircularEval groups in the metrics, the judge called
    where the rules fail (and only there), the protocol recorded in metrics.json and on the MLflow run."""
    import threading
    from http.server import ThreadingHTTPServer

    from tests.components.test_evaluate_vlmevalkit import MMB_COLUMNS, _FakeJudge, _png_b64, _tsv

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    prm = load_checkpoint(workdir / "prm")
    with torch.no_grad():  # every step scores 0.5: Best-of-k picks sample 0
        prm.model.lm_head.weight[[PRMScorer(prm).plus_id, PRMScorer(prm).minus_id]] = 0.0
    save_checkpoint(tmp_path / "flat-prm", prm.model, prm.tokenizer, prm.image_cfg)
    image = _png_b64()
    rows = [
        dict(index=1, question="Which animal?", hint="nan", A="cat", B="dog", answer="B", image=image, split="dev"),
        dict(index=1000001, question="Which animal?", hint="", A="dog", B="cat", answer="A", image="1", split="dev"),
        dict(index=2, question="Which is bigger?", hint="", A="sun", B="moon", answer="A", image=image, split="dev"),
        dict(index=1000002, question="Which is bigger?", hint="", A="moon", B="sun", answer="B", image="2",
             split="dev"),
    ]  # fmt: skip
    path = _tsv(tmp_path / "MMBench_DEV_EN.tsv", MMB_COLUMNS, rows)
    scripted = {  # (item, sampled) -> answers; n = 2
        ("1", False): ["B"], ("1", True): ["B", "A"],
        ("1000001", False): ["the barking one"], ("1000001", True): ["A", "B"],  # the judge reads the greedy one
        ("2", False): ["A"], ("2", True): ["B", "A"],
        ("1000002", False): ["A"], ("1000002", True): ["B", "B"],  # greedy wrong: group 2 fails pass@1
    }  # fmt: skip
    policy_tok = load_checkpoint(workdir / "policy").tokenizer

    def fake_generate(model, prompts, *, do_sample=False, **kwargs):
        texts = [t for p in prompts[: 1 if do_sample else None] for t in scripted[(p.sample_id, do_sample)]]
        return [policy_tok(t, add_special_tokens=False)["input_ids"] for t in texts]

    monkeypatch.setattr("vlpipe.components.evaluate.stage.generate", fake_generate)
    _FakeJudge.requests, _FakeJudge.verdicts = [], {"Answer: the barking one": "A"}
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeJudge)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        config = EvalConfig(
            policy=str(workdir / "policy"), prm=str(tmp_path / "flat-prm"), n=2, output_dir=str(tmp_path / "out"),
            benchmarks=[{"name": "MMBench_DEV_EN", "path": path, "format": "tsv", "protocol": "vlmevalkit-mcq"}],
            judge={"base_url": f"http://127.0.0.1:{server.server_address[1]}/v1", "model": "fake-judge",
                   "timeout_s": 60, "max_retries": 0},
        )  # fmt: skip
        metrics = run_evaluation(config)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    m = metrics["benchmarks"]["MMBench_DEV_EN"]
    assert (m["items"], m["rows"]) == (2, 4)
    # Group 1: greedy B ✓ and "the barking one" -> judge A ✓; group 2: A ✓, A ✗ -> 1/2.
    assert m["pass_at_1"] == 0.5
    # Sample 0 (ties): group 1 B ✓ A ✓; group 2 B ✗ -> 1/2. oracle@2: group 2 has A ✓ and B ✓ -> 2/2.
    assert m["best_of_n"] == 0.5 and m["oracle_at_k"] == {"1": 0.5, "2": 1.0}
    assert len(_FakeJudge.requests) == 1 and metrics["judge"]["calls"] == 1
    assert "Answer: the barking one" in _FakeJudge.requests[0]["messages"][0]["content"]
    label = "MMBench_DEV_EN=vlmevalkit-mcq+circular+judge:fake-judge"
    assert metrics["protocol"] == label and m["protocol"] == "vlmevalkit-mcq+circular+judge:fake-judge"
    from mlflow import MlflowClient

    run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(metrics["mlflow"]["run_id"])
    assert (
        run.data.tags["protocol"] == label and run.data.params["benchmark.MMBench_DEV_EN.circular"] == "True"
    )
    record = json.loads((tmp_path / "out/items.jsonl").read_text().splitlines()[1])
    assert record["group"] == "1" and record["greedy"]["extracted"] == "A"
