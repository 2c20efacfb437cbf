"""What the `evaluate` component calls: wire the recipe's evaluation settings to the pipeline's artifacts,
validate them with `EvalConfig`, run `run_evaluation`, fill the output artifacts (metrics, the Markdown
table and an HTML report with the Best-of-k plot).

Torch-free at import. Benchmark paths in a recipe may be relative: they are read from the data root (the
demo dataset's artifact, or the recipe's `data.root`).
"""

from __future__ import annotations

import base64
import copy
import html
import json
from pathlib import Path
from typing import Any

from vlpipe.components.evaluate.config import OVERALL, EvalConfig

PLACEHOLDERS = {"policy": "/pipeline/policy", "prm": "/pipeline/prm", "output_dir": "/pipeline/eval"}


def wire_eval_config(
    settings: dict[str, Any],
    *,
    policy: str,
    prm: str,
    output_dir: str,
    data_root: str,
    parent_run_id: str | None,
) -> EvalConfig:
    """The full, validated `EvalConfig`: `settings` plus checkpoints, output directory and parent run.

    Relative benchmark paths (and image roots) are joined onto `data_root`.

    Raises:
        pydantic.ValidationError: an invalid setting (the message names the key).
    """
    from vlpipe.components.data.config import under_root

    cfg = copy.deepcopy(settings)
    benchmarks = []
    for spec in cfg.get("benchmarks", []):
        spec = dict(spec)
        for key in ("path", "image_root"):
            if spec.get(key):
                spec[key] = under_root(data_root, spec[key])
        benchmarks.append(spec)
    cfg["benchmarks"] = benchmarks
    cfg["mlflow"] = {"run_name": "eval", **cfg.get("mlflow", {}), "parent_run_id": parent_run_id or None}
    cfg.update(policy=policy, prm=prm, output_dir=output_dir)
    return EvalConfig.model_validate(cfg)


def metrics_markdown(metrics: dict[str, Any]) -> str:
    """The evaluation table: pass@1 against Best-of-N (and majority, oracle) per benchmark and overall."""
    n = metrics["n"]
    lines = [
        f"### Best-of-{n} evaluation ({metrics['aggregation']} PRM aggregation)",
        "",
        f"| benchmark | items | pass@1 | Best-of-{n} | majority@{n} | oracle@{n} |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    scopes = [*metrics["benchmarks"].items(), (OVERALL, metrics[OVERALL])]
    for name, m in scopes:
        lines.append(
            f"| {name} | {m['items']} | {m['pass_at_1']:.3f} | {m['best_of_n']:.3f} | "
            f"{m['majority']:.3f} | {m['oracle']:.3f} |"
        )
    overall = metrics[OVERALL]
    ks = ", ".join(f"{k}: {v:.3f}" for k, v in overall["best_of_k"].items())
    lines += ["", f"Best-of-k (overall): {ks}"]
    if metrics.get("protocol"):  # what the numbers may be compared with (docs/evaluation.md#protocols-...)
        lines += ["", f"Protocol: `{metrics['protocol']}`"]
    return "\n".join(lines) + "\n"


def metrics_html(metrics: dict[str, Any], plot: Path | None) -> str:
    """A self-contained HTML report: the evaluation table and the Best-of-k plot (embedded PNG)."""
    n = metrics["n"]
    head = ["benchmark", "items", "pass@1", f"Best-of-{n}", f"majority@{n}", f"oracle@{n}"]
    rows = []
    for name, m in [*metrics["benchmarks"].items(), (OVERALL, metrics[OVERALL])]:
        cells = [name, m["items"], *(f"{m[k]:.3f}" for k in ("pass_at_1", "best_of_n", "majority", "oracle"))]
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    image = ""
    if plot is not None and plot.exists():
        encoded = base64.b64encode(plot.read_bytes()).decode()
        image = f'<img alt="Best-of-k" src="data:image/png;base64,{encoded}"/>'
    return (
        "<html><head><meta charset='utf-8'><title>Best-of-N evaluation</title></head><body>"
        f"<h3>Best-of-{n} evaluation ({html.escape(metrics['aggregation'])} PRM aggregation)</h3>"
        "<table border='1' cellpadding='4'><tr>"
        + "".join(f"<th>{h}</th>" for h in head)
        + "</tr>"
        + "".join(rows)
        + f"</table>{image}</body></html>\n"
    )


def _wired(
    config_json: str,
    *,
    preset: str,
    policy: Any,
    prm: Any,
    data: Any,
    output_dir: str,
    parent_run_id: str | None,
    n: int,
    temperature: float,
) -> EvalConfig:
    """The task's `EvalConfig` (recipe settings, pipeline parameters, artifacts' paths), presets checked."""
    from vlpipe.components.data.prepare import load_dataset_info
    from vlpipe.components.pipeline_run.model_store import checkpoint_path
    from vlpipe.components.training.task import check_preset

    info = load_dataset_info(data.path)
    policy_dir, prm_dir = checkpoint_path(policy.path), checkpoint_path(prm.path)
    settings = json.loads(config_json)
    given = {name: value for name, value in (("n", n), ("temperature", temperature)) if value != -1}
    try:
        config = wire_eval_config(
            {**settings, **given},
            policy=policy_dir,
            prm=prm_dir,
            output_dir=output_dir,
            data_root=info["root"],
            parent_run_id=parent_run_id,
        )
    except ValueError as exc:  # pydantic's ValidationError is a ValueError: name the UI's parameters too
        named = {f"eval_{k}": v for k, v in given.items()}
        raise ValueError(
            f"eval: invalid settings{f' with the pipeline parameters {named}' if named else ''}: {exc}"
        ) from exc
    check_preset(policy_dir, preset)
    check_preset(prm_dir, preset)
    return config


def run_eval_task(
    config_json: str,
    *,
    preset: str,
    parent_run_id: str | None = None,
    policy: Any,
    prm: Any,
    data: Any,
    results: Any,
    metrics: Any,
    table: Any,
    report: Any,
    n: int = -1,
    temperature: float = -1.0,
) -> dict[str, Any]:
    """The `evaluate` component's entrypoint.

    Args:
        config_json: the recipe's evaluation settings (an `EvalConfig` without the pipeline's keys) as JSON.
        preset: the recipe's preset (policy and PRM must be ones).
        parent_run_id: the pipeline's MLflow run; None (in a pipeline): found through results's URI
            (`vlpipe.tracking.pipeline.find_parent_run`), so the task takes no per-run input and can be cached.
        policy, prm: input `Model` artifacts.
        data: the `prepare-data` output (root of relative benchmark paths).
        results: output `Dataset` artifact: `metrics.json`, `items.jsonl`, plots.
        metrics: output `Metrics` artifact (overall pass@1, Best-of-N, majority, oracle).
        table: output `Markdown` artifact (the evaluation table).
        report: output `HTML` artifact (table + Best-of-k plot).
        n, temperature: the pipeline parameters `eval_n`, `eval_temperature` (-1: the recipe's value).

    Returns:
        The evaluation metrics (`run_evaluation`'s result).
    """
    from vlpipe.components.evaluate.stage import run_evaluation
    from vlpipe.components.pipeline_run.task import pipeline_parent

    parent_run_id = pipeline_parent(parent_run_id, results, (policy, prm, data))
    config = _wired(
        config_json,
        preset=preset,
        policy=policy,
        prm=prm,
        data=data,
        output_dir=results.path,
        parent_run_id=parent_run_id,
        n=n,
        temperature=temperature,
    )
    result = run_evaluation(config)
    fill_eval_outputs(result, results=results, metrics=metrics, table=table, report=report)
    return result


def fill_eval_outputs(result: dict[str, Any], *, results: Any, metrics: Any, table: Any, report: Any) -> None:
    """The evaluation's output artifacts from its metrics: `results` metadata, the `Metrics` values, the
    Markdown table and the HTML report (what `evaluate` and `merge-evaluation` both give)."""
    from vlpipe.components.pipeline_run.task import write_metrics_file

    overall = result[OVERALL]
    results.metadata.update(
        {
            "mlflow_run_id": result["mlflow"]["run_id"],
            "n": result["n"],
            "pass_at_1": overall["pass_at_1"],
            "best_of_n": overall["best_of_n"],
        }
    )
    for key in ("items", "pass_at_1", "best_of_n", "majority", "oracle", "sample_accuracy"):
        if overall.get(key) is not None:
            metrics.log_metric(key, float(overall[key]))
    write_metrics_file(metrics)  # an artifact with a file: a cache entry of this task stays valid
    for path, text in (
        (table.path, metrics_markdown(result)),
        (report.path, metrics_html(result, Path(results.path) / "best_of_k.png")),
    ):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)


def run_eval_shard_task(
    config_json: str,
    *,
    preset: str,
    shard: str,
    policy: Any,
    prm: Any,
    data: Any,
    part: Any,
    n: int = -1,
    temperature: float = -1.0,
) -> dict[str, Any]:
    """The `evaluate-shard` component's entrypoint: one shard of one benchmark, its per-item results in `part`.

    Args:
        config_json, preset, policy, prm, data, n, temperature: as `run_eval_task`.
        shard: the shard, an `EvalShard` as JSON: the `index`-th of `count` runs of the benchmark's generation
            batches.
        part: output `Dataset` artifact (a directory: `items.jsonl`, `part.json`), read by `merge-evaluation`.

    Returns:
        The part's manifest (`evaluate_shards`'s result).
    """
    from vlpipe.components.evaluate.config import EvalShard
    from vlpipe.components.evaluate.stage import evaluate_shards

    config = _wired(
        config_json,
        preset=preset,
        policy=policy,
        prm=prm,
        data=data,
        output_dir=part.path,
        parent_run_id=None,
        n=n,
        temperature=temperature,
    )
    picked = EvalShard.model_validate_json(shard)
    manifest = evaluate_shards(config, [picked], part.path)
    part.metadata.update({**picked.model_dump(), "items": manifest["shards"][0]["items"]})
    return manifest


def run_eval_merge_task(
    *,
    parent_run_id: str | None = None,
    parts: list[Any],
    results: Any,
    metrics: Any,
    table: Any,
    report: Any,
) -> dict[str, Any]:
    """The `merge-evaluation` component's entrypoint: the metrics, tables, plots and MLflow run of a sharded
    evaluation from its `evaluate-shard` parts (the settings are the ones the shards ran, checked equal).

    Args:
        parent_run_id: as `run_eval_task`.
        parts: the `evaluate-shard` outputs (`dsl.Collected`), in any order.
        results, metrics, table, report: as `run_eval_task`.

    Returns:
        The evaluation metrics (`merge_evaluation`'s result).
    """
    from vlpipe.components.evaluate.stage import PART_FILE, merge_evaluation
    from vlpipe.components.pipeline_run.task import pipeline_parent

    if not parts:
        raise ValueError("merge-evaluation: no evaluate-shard part to merge")
    parent_run_id = pipeline_parent(parent_run_id, results, tuple(parts))
    ran = json.loads((Path(parts[0].path) / PART_FILE).read_text())["config"]
    config = EvalConfig.model_validate(
        {
            **ran,
            "output_dir": results.path,
            "mlflow": {**ran["mlflow"], "parent_run_id": parent_run_id or None},
        }
    )
    result = merge_evaluation(config, [p.path for p in parts])
    fill_eval_outputs(result, results=results, metrics=metrics, table=table, report=report)
    return result
