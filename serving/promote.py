"""Evaluation-gated promotion in the MLflow model registry, and rollback.

Aliases carry the state: `challenger` (the newest registered candidate), `champion` (what serves) and
`previous` (the champion before the last promotion). `promote` compares a candidate version's evaluation
metrics with the champion's and moves `champion` to it only if every gate passes; otherwise it records why on
the version (tags `promotion.decision`, `promotion.reasons`) and leaves the champion untouched. Promoting the
current champion again changes nothing. `rollback` moves `champion` back to `previous`.

Evaluation metrics travel as model-version tags `eval.<metric>` (copied from the evaluation run's `overall/`
metrics by `attach_eval_metrics`), so a decision never depends on which run is still around. The protocol the
numbers were measured under (the evaluation run's `protocol` tag: each benchmark's prompts, scoring,
CircularEval and judge) travels as the version tag `eval_protocol`; numbers measured under different protocols
are never compared: the candidate is rejected, with the two protocols in the reason.
"""

from __future__ import annotations

import json
import logging
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

CHALLENGER, CHAMPION, PREVIOUS = "challenger", "champion", "previous"
EVAL_TAG_PREFIX = "eval."
PROTOCOL_TAG = "eval_protocol"
"""Model-version tag: the evaluation protocol (`vlpipe.components.evaluate.config.protocol_record`)."""
RUN_PROTOCOL_TAG = "protocol"
"""The evaluation run's tag holding the same value."""
DEFAULT_EVAL_METRICS = ("pass_at_1", "best_of_n", "majority", "oracle")


class Gate(BaseModel):
    """One promotion rule on an evaluation metric.

    Attributes:
        metric: the metric name (e.g. `best_of_n`, `pass_at_1`), read from the `eval.<metric>` version tags.
        tolerance: the candidate passes when `candidate >= champion - tolerance` (0: not lower).
        minimum: an absolute floor the candidate must reach (applies also when there is no champion).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: str = Field(min_length=1)
    tolerance: float = Field(0.0, ge=0)
    minimum: float | None = None


class PromotionConfig(BaseModel):
    """The gates of a recipe; all must pass. Defaults: Best-of-N may drop by at most 1 point, pass@1 not at all."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gates: tuple[Gate, ...] = (Gate(metric="best_of_n", tolerance=0.01), Gate(metric="pass_at_1"))


class Decision(BaseModel):
    """The outcome of `promote`."""

    model_name: str
    version: str
    decision: Literal["promoted", "rejected", "already_champion"]
    champion_before: str | None
    champion_after: str | None
    reasons: list[str]


def _client():
    from mlflow import MlflowClient

    from vlpipe.tracking.runs import tracking_uri

    return MlflowClient(tracking_uri(), registry_uri=tracking_uri())


def _alias_version(client, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def eval_metrics_of(client, name: str, version: str) -> dict[str, float]:
    """The `eval.<metric>` tags of a model version as floats."""
    tags = client.get_model_version(name, version).tags
    return {k[len(EVAL_TAG_PREFIX) :]: float(v) for k, v in tags.items() if k.startswith(EVAL_TAG_PREFIX)}


def protocol_of(client, name: str, version: str) -> str | None:
    """The `eval_protocol` tag of a model version (None: not recorded, an evaluation from before protocols)."""
    return client.get_model_version(name, version).tags.get(PROTOCOL_TAG)


def check_protocol(candidate: str | None, champion: str | None) -> list[str]:
    """Why the candidate's numbers cannot be compared with the champion's (empty when they can).

    Both unrecorded (evaluations from before protocols were recorded) compare as before; one recorded and the
    other not, or two different protocols, refuse.
    """
    if candidate == champion:
        return []
    return [
        f"protocol: the candidate was evaluated under {candidate or '(not recorded)'!r} but the champion under "
        f"{champion or '(not recorded)'!r}; numbers from different evaluation protocols are not comparable. "
        "Evaluate both with the same benchmarks, protocols and judge (or re-evaluate the champion) first"
    ]


def attach_eval_metrics(
    name: str, version: str, eval_run_id: str, metrics: tuple[str, ...] = DEFAULT_EVAL_METRICS
) -> dict[str, float]:
    """Copy the evaluation run's `overall/<metric>` values onto the model version as `eval.<metric>` tags.

    Raises:
        ValueError: when the run has none of the metrics.
    """
    client = _client()
    run = client.get_run(eval_run_id)
    run_metrics = run.data.metrics
    found = {m: run_metrics[f"overall/{m}"] for m in metrics if f"overall/{m}" in run_metrics}
    if not found:
        raise ValueError(
            f"evaluation run {eval_run_id} has none of {[f'overall/{m}' for m in metrics]}; is it an eval run?"
        )
    for metric, value in found.items():
        client.set_model_version_tag(name, version, f"{EVAL_TAG_PREFIX}{metric}", str(value))
    client.set_model_version_tag(name, version, "eval_run_id", eval_run_id)
    protocol = run.data.tags.get(RUN_PROTOCOL_TAG)
    if protocol:
        client.set_model_version_tag(name, version, PROTOCOL_TAG, protocol)
    return found


def check_gates(
    candidate: dict[str, float], champion: dict[str, float] | None, config: PromotionConfig
) -> list[str]:
    """Reasons the candidate fails the gates (empty when it passes).

    A gate fails when the candidate lacks the metric, is below its `minimum`, or (with a champion that has the
    metric) is below `champion - tolerance`.
    """
    failures = []
    for gate in config.gates:
        value = candidate.get(gate.metric)
        if value is None:
            failures.append(f"{gate.metric}: the candidate has no eval.{gate.metric} tag")
            continue
        if gate.minimum is not None and value < gate.minimum:
            failures.append(f"{gate.metric}: {value:.4f} is below the minimum {gate.minimum:.4f}")
        if champion is not None and gate.metric in champion:
            floor = champion[gate.metric] - gate.tolerance
            if value < floor:
                failures.append(
                    f"{gate.metric}: {value:.4f} < champion {champion[gate.metric]:.4f} - tolerance "
                    f"{gate.tolerance:.4f}"
                )
    return failures


def promote(name: str, version: str | int, config: PromotionConfig = PromotionConfig()) -> Decision:
    """Promote a model version to `champion` if it passes every gate against the current champion, evaluated
    under the same protocol (`check_protocol`).

    On success: the old champion gets `previous`, the candidate gets `champion`, and `challenger` is removed
    if it pointed at the candidate. On failure nothing moves; the reasons are stored on the version.

    Raises:
        mlflow.exceptions.MlflowException: when the model or version does not exist.
    """
    client = _client()
    version = str(version)
    client.get_model_version(name, version)  # raises for an unknown model/version
    champion = _alias_version(client, name, CHAMPION)
    if champion == version:
        return Decision(
            model_name=name,
            version=version,
            decision="already_champion",
            champion_before=champion,
            champion_after=champion,
            reasons=["the version is already the champion; nothing changed"],
        )
    candidate_metrics = eval_metrics_of(client, name, version)
    champion_metrics = eval_metrics_of(client, name, champion) if champion else None
    failures = check_gates(candidate_metrics, champion_metrics, config)
    if champion is not None:
        failures = (
            check_protocol(protocol_of(client, name, version), protocol_of(client, name, champion)) + failures
        )
    if failures:
        client.set_model_version_tag(name, version, "promotion.decision", "rejected")
        client.set_model_version_tag(name, version, "promotion.reasons", json.dumps(failures))
        log.info("model %s version %s not promoted: %s", name, version, "; ".join(failures))
        return Decision(
            model_name=name,
            version=version,
            decision="rejected",
            champion_before=champion,
            champion_after=champion,
            reasons=failures,
        )
    if champion is not None:
        client.set_registered_model_alias(name, PREVIOUS, champion)
    client.set_registered_model_alias(name, CHAMPION, version)
    if _alias_version(client, name, CHALLENGER) == version:
        client.delete_registered_model_alias(name, CHALLENGER)
    reasons = [f"passed {len(config.gates)} gate(s)" + (f" against champion {champion}" if champion else "")]
    client.set_model_version_tag(name, version, "promotion.decision", "promoted")
    client.set_model_version_tag(name, version, "promotion.reasons", json.dumps(reasons))
    return Decision(
        model_name=name,
        version=version,
        decision="promoted",
        champion_before=champion,
        champion_after=version,
        reasons=reasons,
    )


def rollback(name: str) -> Decision:
    """Make the `previous` version the champion again (the demoted version is tagged `rolled_back`).

    Raises:
        ValueError: when there is no `previous` version to go back to.
    """
    client = _client()
    previous = _alias_version(client, name, PREVIOUS)
    champion = _alias_version(client, name, CHAMPION)
    if previous is None:
        raise ValueError(f"model {name!r} has no '{PREVIOUS}' version to roll back to")
    client.set_registered_model_alias(name, CHAMPION, previous)
    client.delete_registered_model_alias(name, PREVIOUS)
    if champion is not None:
        client.set_model_version_tag(name, champion, "promotion.decision", "rolled_back")
    return Decision(
        model_name=name,
        version=previous,
        decision="promoted",
        champion_before=champion,
        champion_after=previous,
        reasons=[f"rolled back from version {champion} to {previous}"],
    )
