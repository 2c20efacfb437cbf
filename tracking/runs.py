"""MLflow runs: the tracking URI, experiments, and `Run`, the one run helper of every stage and step.

The tracking URI comes from `MLFLOW_TRACKING_URI`; without it runs go to a local sqlite store
`<VLPIPE_HOME>/mlflow.db` with artifacts under `<VLPIPE_HOME>/mlartifacts` (open it with
`mlflow ui --backend-store-uri sqlite:///.vlpipe/mlflow.db`). Credentials for a remote server
(`MLFLOW_TRACKING_USERNAME`/`PASSWORD`, AWS keys) are read by MLflow from the environment; nothing here
logs environment variables.

A pipeline run is one parent run (`vlpipe.tracking.pipeline`) with one child run per step: training stages
and the evaluation open theirs with `Run.start`, the other steps with `child_run`. A child run goes into its
parent's experiment (where MLflow shows nested runs). Every run carries the tags `stage`, `recipe`,
`git_commit` and `vlpipe_version`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vlpipe.model.storage import vlpipe_home

log = logging.getLogger(__name__)
PARAM_VALUE_LIMIT = 6000
"""MLflow rejects longer param values."""
RECIPE_TAG = "recipe"


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI`, or the local sqlite store under VLPIPE_HOME."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    home = Path(vlpipe_home()).resolve()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'mlflow.db'}"


def client() -> Any:
    """An `MlflowClient` of the tracking URI (also the registry)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri(), registry_uri=tracking_uri())


def ensure_experiment(name: str) -> str:
    """The id of experiment `name`, created if missing (local stores keep artifacts under VLPIPE_HOME)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if tracking_uri().startswith("sqlite:") and "MLFLOW_ARTIFACT_ROOT" not in os.environ:
        artifact_location = (Path(vlpipe_home()).resolve() / "mlartifacts" / name).as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # created concurrently by another stage
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def git_commit() -> str:
    """The source commit: `VLPIPE_GIT_COMMIT` (set in images) or `git rev-parse HEAD`, else "unknown"."""
    if os.environ.get("VLPIPE_GIT_COMMIT"):
        return os.environ["VLPIPE_GIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_version() -> str:
    """The installed vlpipe version ("0+unknown" when not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vlpipe")
    except PackageNotFoundError:
        return "0+unknown"


def base_tags(recipe: str | None) -> dict[str, str]:
    """Tags every vlpipe run carries: recipe (when known), source commit and package version."""
    tags = {RECIPE_TAG: recipe} if recipe else {}
    return {**tags, "git_commit": git_commit(), "vlpipe_version": package_version()}


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config → `{"a.b.c": "value"}` MLflow params (long values cut to MLflow's limit)."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:PARAM_VALUE_LIMIT]
    return flat


class Run:
    """The MLflow run of one stage or step; with `enabled=False` (ranks other than 0) every method is a no-op.

    The run is MLflow's active run while it is open, so MLflow's own loggers (datasets, models) write to it.
    Used as a context manager it ends FAILED when the body raises and FINISHED otherwise.

    Args:
        enabled: True on rank 0 (the only rank that logs).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.run_id: str | None = None
        self.experiment_id: str | None = None

    @property
    def active(self) -> bool:
        return self.enabled and self.run_id is not None

    def start(
        self,
        name: str,
        *,
        experiment: str,
        recipe: str | None = None,
        parent_run_id: str | None = None,
        tags: dict[str, str] | None = None,
        stage: str | None = None,
        config: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
        resume_run_id: str | None = None,
        system_metrics: bool = False,
    ) -> str | None:
        """Start (or, on resume, reopen) the run; log its tags, params and config.

        Args:
            name: the run name (and the `stage` tag unless `stage` is given).
            experiment: the experiment of a run without a parent.
            recipe: the recipe (tag `recipe`).
            parent_run_id: the pipeline's parent run (the run goes into its experiment).
            tags: more tags (they win over the base tags).
            stage: the `stage` tag, when not the run name.
            config: the fully resolved config: flattened into params and logged as `config/resolved.json`.
            params: more params (nested dicts are flattened).
            resume_run_id: the run to continue after a restart (tags are set again, params are not).
            system_metrics: log MLflow's system metrics (CPU, GPU, memory).

        Returns:
            The run id (None when disabled).

        Raises:
            mlflow.exceptions.MlflowException: when `parent_run_id` does not exist or the server is unreachable.
        """
        if not self.enabled:
            return None
        import mlflow

        mlflow.set_tracking_uri(tracking_uri())
        if parent_run_id:  # MLflow shows nested runs inside their parent's experiment only
            self.experiment_id = client().get_run(parent_run_id).info.experiment_id
        else:
            self.experiment_id = ensure_experiment(experiment)
        run_tags = {**base_tags(recipe), "stage": stage or name, **(tags or {})}
        if resume_run_id:
            run = mlflow.start_run(run_id=resume_run_id, log_system_metrics=system_metrics)
            mlflow.set_tags(run_tags)
        else:
            run = mlflow.start_run(
                experiment_id=self.experiment_id,
                run_name=name,
                parent_run_id=parent_run_id or None,
                tags=run_tags,
                log_system_metrics=system_metrics,
            )
        self.run_id = run.info.run_id
        if not resume_run_id:
            flat = {**flatten(config or {}), **flatten(params or {})}
            items = list(flat.items())
            for begin in range(0, len(items), 100):  # MLflow's batch limit
                mlflow.log_params(dict(items[begin : begin + 100]))
            if config is not None:
                mlflow.log_dict(config, "config/resolved.json")
        return self.run_id

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        if self.active:
            import mlflow

            mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_metric_series(self, values: list[tuple[str, float, int]]) -> None:
        """Metrics as (key, value, step) triples, in batches (e.g. Best-of-k for every k)."""
        if self.active:
            import time

            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            items = [Metric(key, float(value), now, step) for key, value, step in values]
            for begin in range(0, len(items), 500):
                client().log_batch(self.run_id, metrics=items[begin : begin + 500])

    def log_dict(self, data: dict[str, Any] | list[Any], artifact_file: str) -> None:
        if self.active:
            import mlflow

            mlflow.log_dict(data, artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.active:
            import mlflow

            mlflow.log_artifact(str(path), artifact_path)

    def log_table(self, data: dict[str, list[Any]], artifact_file: str) -> None:
        if self.active:
            import mlflow

            mlflow.log_table(data=data, artifact_file=artifact_file)

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with `status` (FINISHED, FAILED, KILLED)."""
        if self.active:
            import mlflow

            mlflow.end_run(status=status)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.finish("FINISHED" if exc_type is None else "FAILED")


@contextlib.contextmanager
def child_run(
    parent_run_id: str, name: str, *, experiment: str, recipe: str, tags: dict[str, str] | None = None
) -> Iterator[str]:
    """An open `Run` named `name` nested under `parent_run_id` (MLflow's fluent `mlflow.log_*` write to it).

    Without a parent it is a top-level run in `experiment`. It ends FAILED when the body raises.

    Yields:
        The run id.
    """
    with Run() as run:
        yield run.start(name, experiment=experiment, recipe=recipe, parent_run_id=parent_run_id, tags=tags)
