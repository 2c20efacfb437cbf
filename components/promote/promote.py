"""The `promote-model` step: the registered version against the champion, by the recipe's gates.

validate settings → child MLflow run `promote` → `vlpipe.serving.promote.promote` (moves `champion` to the version and
keeps the old one as `previous`, or records on the version why not) → the decision, the gates and the metrics
compared in the run (tags, metrics, `promotion.md`) and in the step's Markdown report → the decision as the
step's output: `promoted`, `rejected` or `already_champion`.

A rejection is an outcome, not a failure: the step succeeds and the pipeline's deploy branch is skipped.
"""

from __future__ import annotations

import json
from typing import Any

from vlpipe.components.promote.config import PromoteConfig, parse_model_uri
from vlpipe.serving.promote import (
    DEFAULT_EVAL_METRICS,
    PromotionConfig,
    check_gates,
    eval_metrics_of,
    promote,
    protocol_of,
)
from vlpipe.tracking.runs import child_run

DECISIONS = ("promoted", "rejected", "already_champion")
"""The step's output values (`vlpipe.serving.promote.Decision.decision`)."""


def _accuracies(metrics: dict[str, float]) -> dict[str, float]:
    """The evaluation's accuracies among a version's `eval.*` tags (not `eval.n`, the sample count)."""
    return {k: v for k, v in metrics.items() if k in DEFAULT_EVAL_METRICS}


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def gate_rows(
    config: PromoteConfig, candidate: dict[str, float], champion: dict[str, float] | None
) -> list[dict[str, Any]]:
    """One row per metric compared: the gated ones first (with their rule and result), then the others."""
    rows = []
    for gate in config.promotion.gates:
        rules = [f"≥ champion − {gate.tolerance:g}"]
        if gate.minimum is not None:
            rules.append(f"≥ {gate.minimum:g}")
        failures = check_gates(candidate, champion, PromotionConfig(gates=(gate,)))
        rows.append(
            {
                "metric": gate.metric,
                "candidate": candidate.get(gate.metric),
                "champion": (champion or {}).get(gate.metric),
                "gate": ", ".join(rules),
                "result": "fail" if failures else "pass",
            }
        )
    gated = {gate.metric for gate in config.promotion.gates}
    others = [m for m in DEFAULT_EVAL_METRICS if m not in gated and (m in candidate or m in (champion or {}))]
    for metric in others:
        rows.append(
            {
                "metric": metric,
                "candidate": candidate.get(metric),
                "champion": (champion or {}).get(metric),
                "gate": "–",
                "result": "–",
            }
        )
    return rows


def promotion_markdown(result: dict[str, Any]) -> str:
    """The report: decision, champion before and after, the metrics compared and the reasons."""
    before = f"version {result['champion_before']}" if result["champion_before"] else "none"
    after = f"version {result['champion_after']}" if result["champion_after"] else "none"
    lines = [
        f"### `{result['name']}` version {result['version']}: {result['decision']}",
        "",
        f"Champion before: {before}; after: {after}.",
        "",
        f"Evaluation protocol: candidate `{result.get('protocol') or 'not recorded'}`; champion "
        f"`{result.get('champion_protocol') or ('–' if not result['champion_before'] else 'not recorded')}`.",
        "",
        "| metric | candidate | champion | gate | result |",
        "|---|---|---|---|---|",
        *(
            f"| {r['metric']} | {_fmt(r['candidate'])} | {_fmt(r['champion'])} | {r['gate']} | {r['result']} |"
            for r in result["rows"]
        ),
        "",
        "Reasons:",
        "",
        *(f"- {reason}" for reason in result["reasons"]),
    ]
    return "\n".join(lines) + "\n"


def promote_version(config: PromoteConfig, *, model_uri: str, parent_run_id: str) -> dict[str, Any]:
    """Gate the version in a child run of the pipeline's run; returns the decision and what was compared.

    Raises:
        ValueError: `model_uri` is not `models:/<name>/<version>`.
        mlflow.exceptions.MlflowException: the registry does not know the model or version.
    """
    from mlflow import MlflowClient

    from vlpipe.tracking.runs import tracking_uri

    config = PromoteConfig.model_validate(config.model_dump())
    name, version = parse_model_uri(model_uri)
    with child_run(
        parent_run_id, "promote", experiment=config.tracking.experiment, recipe=config.recipe,
        tags=config.tracking.tags,
    ) as run_id:  # fmt: skip
        import mlflow

        decision = promote(name, version, config.promotion)
        client = MlflowClient(tracking_uri(), registry_uri=tracking_uri())
        candidate = _accuracies(eval_metrics_of(client, name, version))
        before = decision.champion_before
        champion = (
            _accuracies(eval_metrics_of(client, name, before)) if before and before != version else None
        )
        result = {
            "name": name,
            "version": version,
            "model_uri": model_uri,
            "decision": decision.decision,
            "champion_before": before,
            "champion_after": decision.champion_after,
            "reasons": decision.reasons,
            "rows": gate_rows(config, candidate, champion),
            "protocol": protocol_of(client, name, version),
            "champion_protocol": protocol_of(client, name, before) if before and before != version else None,
            "mlflow_run_id": run_id,
        }
        mlflow.log_params(
            {"gates": json.dumps([g.model_dump() for g in config.promotion.gates], sort_keys=True)}
        )
        mlflow.set_tags(
            {
                "registered_model": name,
                "registered_version": version,
                "promotion.decision": decision.decision,
                "promotion.reasons": json.dumps(decision.reasons),
                "champion_before": before or "",
                "champion_after": decision.champion_after or "",
            }
        )
        mlflow.log_metrics({f"candidate/{k}": v for k, v in candidate.items()})
        mlflow.log_metrics({f"champion/{k}": v for k, v in (champion or {}).items()})
        mlflow.log_text(promotion_markdown(result), "promotion.md")
    return result


def promote_task(
    config_json: str,
    *,
    parent_run_id: str,
    model_uri: str,
    report: Any,
    tolerances: dict[str, float] | None = None,
) -> str:
    """The component's entrypoint; returns the decision (`promoted`, `rejected` or `already_champion`).

    Args:
        config_json: `PromoteConfig` as JSON.
        parent_run_id: the pipeline's MLflow run.
        model_uri: the registered version, `models:/<name>/<version>` (the register step's output).
        report: output `Markdown` artifact (decision, metrics compared, reasons).
        tolerances: gate metric → tolerance from the pipeline parameters `gate_<metric>_tolerance` (-1, or a
            metric without a gate: the recipe's gates as they are).
    """
    from pathlib import Path

    settings = json.loads(config_json)
    given = {metric: value for metric, value in (tolerances or {}).items() if value != -1}
    for gate in settings.get("promotion", {}).get("gates", []):
        if gate["metric"] in given:
            gate["tolerance"] = given[gate["metric"]]
    try:
        config = PromoteConfig.model_validate(settings)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError: name the UI's parameters too
        named = {f"gate_{metric}_tolerance": value for metric, value in given.items()}
        raise ValueError(f"promote: invalid gates with the pipeline parameters {named}: {exc}") from exc
    result = promote_version(config, model_uri=model_uri, parent_run_id=parent_run_id)
    Path(report.path).parent.mkdir(parents=True, exist_ok=True)
    Path(report.path).write_text(promotion_markdown(result))
    report.metadata.update({"decision": result["decision"], "champion": result["champion_after"] or ""})
    return result["decision"]
