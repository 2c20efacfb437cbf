"""The summary of a pipeline run, read back from MLflow: per-stage metrics, the evaluation table, the
registered model, and how to open the MLflow UI.

Everything comes from the MLflow store (the parent run and its child runs), so the summary describes what
was recorded, not what the local process believes happened.
"""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.table import Table

from vlpipe.components.stages import STAGES
from vlpipe.tracking.pipeline import REUSED_TAG

STAGE_ORDER = tuple(STAGES)
"""The summary's stage order: the stage table's."""
_STAGE_METRICS = {name: stage.summary for name, stage in STAGES.items() if stage.summary}


_EVAL_KEYS = ("items", "pass_at_1", "best_of_n", "majority", "oracle")


def _first_loss(client: Any, run_id: str) -> float | None:
    history = client.get_metric_history(run_id, "loss")
    return min(history, key=lambda m: m.step).value if history else None


def collect_summary(parent_run_id: str, tracking_uri: str) -> dict[str, Any]:
    """Read a pipeline run's summary from MLflow.

    Args:
        parent_run_id: the pipeline's parent run.
        tracking_uri: the MLflow store.

    Returns:
        `parent` (id, status, experiment), `stages` (name → run id, status, selected metrics, first loss, and
        `reused_from`, the earlier parent run, for a stage whose task came from the cache),
        `eval` (n, overall and per-benchmark items, pass@1, Best-of-N, majority, oracle), `registered`
        (name, version, aliases, model URI), `promotion` (decision, reasons, champion before and after, the
        champion's aliases now) and `deployment` (status, InferenceService), each when the run has the step.
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    parent = client.get_run(parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'"
    )
    # Stages whose task came from the cache ran in an earlier pipeline run: the register task tagged them here.
    reused = {
        key.removeprefix(REUSED_TAG): run_id
        for key, run_id in parent.data.tags.items()
        if key.startswith(REUSED_TAG)
    }
    reused_runs = [client.get_run(run_id) for run_id in reused.values()]
    stages: dict[str, Any] = {}
    for run in [*children, *reused_runs]:
        name = run.data.tags.get("stage", run.info.run_name)
        if name in stages:
            continue
        metrics = run.data.metrics
        wanted = _STAGE_METRICS.get(name, ())
        entry = {
            "run_id": run.info.run_id,
            "status": run.info.status,
            "metrics": {k: metrics[k] for k in wanted if k in metrics},
            "preset": run.data.tags.get("preset"),
        }
        if run.data.tags.get("mlflow.parentRunId") != parent_run_id:
            entry["reused_from"] = run.data.tags.get("mlflow.parentRunId")
        if "loss" in metrics:
            entry["metrics"]["loss_first"] = _first_loss(client, run.info.run_id)
            entry["metrics"]["loss_last"] = metrics["loss"]
            entry["metrics"].pop("loss", None)
        stages[name] = entry
    summary: dict[str, Any] = {
        "parent": {
            "run_id": parent_run_id,
            "status": parent.info.status,
            "experiment_id": parent.info.experiment_id,
            "recipe": parent.data.tags.get("recipe"),
            "git_commit": parent.data.tags.get("git_commit"),
        },
        "stages": {name: stages[name] for name in (*STAGE_ORDER, *sorted(stages)) if name in stages},
    }
    if "eval" in stages:
        run = client.get_run(stages["eval"]["run_id"])
        metrics = run.data.metrics
        scopes: dict[str, dict[str, Any]] = {}
        for key in sorted(metrics):
            scope, _, name = key.rpartition("/")
            if name in _EVAL_KEYS and scope:
                scopes.setdefault(scope, {})[name] = int(metrics[key]) if name == "items" else metrics[key]
        overall = scopes.pop("overall", {})
        summary["eval"] = {"n": int(run.data.params.get("n", 0)), "overall": overall, "benchmarks": scopes}
    if "register" in stages:
        tags = client.get_run(stages["register"]["run_id"]).data.tags
        name, version = tags.get("registered_model"), tags.get("registered_version")
        if name and version:
            aliases = client.get_model_version(name, version).aliases
            summary["registered"] = {
                "name": name,
                "version": version,
                "aliases": list(aliases),
                "model_uri": f"models:/{name}/{version}",
            }
    if "promote" in stages:
        summary["promotion"] = _promotion(client, stages["promote"]["run_id"])
    if "deploy" in stages:
        tags = client.get_run(stages["deploy"]["run_id"]).data.tags
        summary["deployment"] = {"status": tags.get("deployment.status"), "isvc": tags.get("deployment.isvc")}
    return summary


def _promotion(client: Any, run_id: str) -> dict[str, Any]:
    """The promote step's decision (from its run's tags) and the registry's aliases now."""
    tags = client.get_run(run_id).data.tags
    name, version = tags.get("registered_model"), tags.get("registered_version")
    promotion = {
        "decision": tags.get("promotion.decision"),
        "name": name,
        "version": version,
        "reasons": json.loads(tags.get("promotion.reasons", "[]")),
        "champion_before": tags.get("champion_before") or None,
        "champion_after": tags.get("champion_after") or None,
    }
    if name and version:
        promotion["aliases"] = sorted(client.get_model_version(name, version).aliases)
    return promotion


def promotion_line(promotion: dict[str, Any]) -> str:
    """One line: the decision and where `champion` points."""
    decision, version = promotion["decision"], promotion["version"]
    before, after = promotion["champion_before"], promotion["champion_after"]
    if decision == "promoted":
        was = f"version {before}" if before else "none"
        return f"promoted: version {version} is the champion (was: {was})"
    if decision == "already_champion":
        return f"already champion: version {version}, nothing changed"
    return f"rejected: the champion stays {f'version {after}' if after else 'unset'}"


def _loss(m: dict[str, Any]) -> str:
    return f"loss {m['loss_first']:.3f} → {m['loss_last']:.3f}" if "loss_first" in m else ""


def stage_line(name: str, metrics: dict[str, Any]) -> str:
    """One line of a stage's key metrics."""
    m = metrics
    parts: list[str] = []
    if name == "data":
        parts = [f"{m.get('records', 0):.0f} records", f"{m.get('quarantined', 0):.0f} quarantined"]
        parts += [f"{m.get('mpo_pairs', 0):.0f} MPO pairs", f"{m.get('prm_solutions', 0):.0f} PRM solutions"]
    elif name == "mix":
        parts = [
            f"{stage} language share {m[f'{stage}/achieved_language_share']:.3f}"
            for stage in ("pretrain", "sft")
            if f"{stage}/achieved_language_share" in m
        ]
    elif name in ("pretrain", "sft", "critic"):
        parts = [_loss(m), f"{m.get('token_utilisation', 0):.1%} token utilisation"]
    elif name == "mpo":
        parts = [_loss(m), f"reward accuracy {m.get('reward_accuracy', float('nan')):.2f}"]
    elif name == "prm-data":
        parts = [
            f"{m.get('solutions', 0):.0f} solutions of {m.get('items', 0):.0f} items",
            f"{m.get('sample_accuracy', float('nan')):.1%} right",
            f"{m.get('positive_step_fraction', float('nan')):.1%} steps right",
            f"{m.get('skipped_items', 0):.0f} skipped",
        ]
    elif name == "prm":
        parts = [_loss(m), f"step accuracy {m.get('step_accuracy', float('nan')):.2f}"]
    elif name == "init":
        parts = [f"{m['seconds']:.1f} s" if "seconds" in m else ""]
    elif name == "eval":
        parts = [
            f"pass@1 {m.get('overall/pass_at_1', float('nan')):.3f}",
            f"Best-of-N {m.get('overall/best_of_n', float('nan')):.3f}",
        ]
    return ", ".join(p for p in parts if p)


def print_summary(
    summary: dict[str, Any], console: Console, *, tracking_uri: str, seconds: float | None = None
) -> None:
    """Print the summary: stage table, evaluation table, registered model, how to open the MLflow UI."""
    parent = summary["parent"]
    title = f"Pipeline run {parent['run_id']}: {parent['status']} (recipe {parent['recipe']}"
    title += f", {seconds:.0f} s)" if seconds is not None else ")"
    stages = Table(title=title)
    for column in ("stage", "status", "metrics", "MLflow run"):
        stages.add_column(column, no_wrap=column != "metrics")
    for name, stage in summary["stages"].items():
        line = stage_line(name, stage["metrics"])
        if name == "init" and stage.get("preset"):
            line = f"{stage['preset']} checkpoint, {line}"
        if name == "register" and "registered" in summary:
            line = f"{summary['registered']['name']} version {summary['registered']['version']}"
        if name == "promote" and "promotion" in summary:
            line = promotion_line(summary["promotion"])
        if name == "deploy" and "deployment" in summary:
            line = f"{summary['deployment']['status']}: {summary['deployment']['isvc']}"
        status = f"reused ({stage['reused_from'][:12]})" if stage.get("reused_from") else stage["status"]
        stages.add_row(name, status, line, stage["run_id"][:12])
    console.print(stages)
    if "eval" in summary:
        n = summary["eval"]["n"]
        table = Table(title=f"Best-of-{n} evaluation (policy: MPO model, judge: PRM)")
        for column in ("benchmark", "items", "pass@1", f"Best-of-{n}", f"majority@{n}", f"oracle@{n}"):
            table.add_column(column, justify="left" if column == "benchmark" else "right")
        rows = [*summary["eval"]["benchmarks"].items(), ("overall", summary["eval"]["overall"])]
        for name, m in rows:
            table.add_row(
                name,
                str(m["items"]),
                *(f"{m[k]:.3f}" for k in ("pass_at_1", "best_of_n", "majority", "oracle")),
            )
        console.print(table)
    if "registered" in summary:
        r = summary["registered"]
        aliases = ", ".join(r["aliases"]) or "none"
        console.print(
            f"Registered model: {r['name']} version {r['version']} (alias: {aliases}) — {r['model_uri']}"
        )
    if "promotion" in summary:
        p = summary["promotion"]
        aliases = ", ".join(p.get("aliases", [])) or "none"
        console.print(
            f"Promotion of {p['name']} version {p['version']}: {p['decision']} (aliases now: {aliases})"
        )
        for reason in p["reasons"]:
            console.print(f"  - {reason}")
        if p["champion_after"]:
            console.print(f"Champion: models:/{p['name']}@champion (version {p['champion_after']})")
    if "deployment" in summary:
        d = summary["deployment"]
        console.print(f"Deployment: {d['status']} — InferenceService {d['isvc']}")
    if tracking_uri.startswith("sqlite:"):
        console.print(
            f"MLflow UI: mlflow ui --backend-store-uri {ui_store_uri(tracking_uri)}  → http://127.0.0.1:5000"
        )
    else:
        console.print(f"MLflow: {tracking_uri}")


def ui_store_uri(tracking_uri: str) -> str:
    """The sqlite URI relative to the working directory when the store lies below it (shorter to type)."""
    from pathlib import Path

    path = Path(tracking_uri.removeprefix("sqlite:///"))
    try:
        return f"sqlite:///{path.relative_to(Path.cwd())}"
    except ValueError:
        return tracking_uri
