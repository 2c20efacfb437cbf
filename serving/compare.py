"""`vlpipe compare RUN_OR_PIPELINE_ID...`: key params and final metrics per stage across runs, and loss curves.

An id may be a stage run or a pipeline (parent) run; a parent expands to its child stage runs. Everything
comes from MLflow's search API, so runs logged on a cluster compare the same as local ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

KEY_PARAMS = {
    "lr": "trainer.optimizer.lr",
    "global_batch": "trainer.global_batch_size",
    "steps": "derived.total_steps",
    "zero": "trainer.distributed.zero_stage",
    "world": "derived.world_size",
}
KEY_METRICS = ("loss", "overall/pass_at_1", "overall/best_of_n", "overall/oracle", "step_accuracy")


def _client():
    from mlflow import MlflowClient

    from vlpipe.tracking.runs import tracking_uri

    return MlflowClient(tracking_uri())


def expand(ids: list[str]) -> list[tuple[str | None, Any]]:
    """(pipeline id or None, run) for every stage run behind `ids` (parents expand to their children).

    Raises:
        ValueError: for an id that is not a run in this tracking server.
    """
    from mlflow.exceptions import MlflowException

    client = _client()
    out = []
    for run_id in ids:
        try:
            run = client.get_run(run_id)
        except MlflowException as exc:
            raise ValueError(f"{run_id} is not an MLflow run in {client.tracking_uri}") from exc
        children = client.search_runs(
            [run.info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{run_id}'",
            order_by=["start_time ASC"],
        )
        if children:
            out += [(run_id, child) for child in children]
        else:
            out.append((run.data.tags.get("mlflow.parentRunId"), run))
    return out


def comparison_rows(ids: list[str]) -> list[dict[str, Any]]:
    """One row per stage run: ids, stage, recipe, status, key params and final metrics."""
    rows = []
    for pipeline, run in expand(ids):
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        row: dict[str, Any] = {
            "pipeline": (pipeline or "")[:8],
            "run": run.info.run_id[:8],
            "run_id": run.info.run_id,
            "stage": tags.get("stage", "?"),
            "recipe": tags.get("recipe", ""),
            "status": run.info.status,
        }
        row.update({name: params.get(key, "") for name, key in KEY_PARAMS.items()})
        row.update({name: metrics[name] for name in KEY_METRICS if name in metrics})
        rows.append(row)
    return rows


def plot_loss_curves(rows: list[dict[str, Any]], path: Path) -> Path:
    """A PNG with one panel per stage and one loss curve per run."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    client = _client()
    stages = sorted({r["stage"] for r in rows})
    figure = Figure(figsize=(5 * max(1, len(stages)), 3.5))
    FigureCanvasAgg(figure)
    for i, stage in enumerate(stages):
        ax = figure.add_subplot(1, len(stages), i + 1)
        for row in (r for r in rows if r["stage"] == stage):
            history = client.get_metric_history(row["run_id"], "loss")
            if history:
                ax.plot(
                    [m.step for m in history],
                    [m.value for m in history],
                    label=f"{row['pipeline'] or row['run']}",
                )
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        if ax.lines:
            ax.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path
