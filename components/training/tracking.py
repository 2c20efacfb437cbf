"""MLflow tracking of a stage (rank 0 only): run, tags, params, metrics, data manifest, model.

The tracking URI comes from `MLFLOW_TRACKING_URI`; without it runs go to a local sqlite store
`<VLPIPE_HOME>/mlflow.db` with artifacts under `<VLPIPE_HOME>/mlartifacts` (open it with
`mlflow ui --backend-store-uri sqlite:///.vlpipe/mlflow.db`). Credentials for a remote server
(`MLFLOW_TRACKING_USERNAME`/`PASSWORD`, AWS keys) are read by MLflow from the environment; nothing here
logs environment variables.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import Any

from model.storage import vlpipe_home

log = logging.getLogger(__name__)
_PARAM_VALUE_LIMIT = 6000  # MLflow rejects longer param values


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI`, or the local sqlite store under VLPIPE_HOME."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    home = Path(vlpipe_home()).resolve()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'mlflow.db'}"


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


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config → `{"a.b.c": "value"}` MLflow params (long values cut to MLflow's limit)."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:_PARAM_VALUE_LIMIT]
    return flat


class Tracker:
    """A stage's MLflow run; every method is a no-op on ranks other than 0.

    Args:
        enabled: True on rank 0.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.run_id: str | None = None

    def start(
        self,
        *,
        stage: str,
        tracking: Any,
        resolved_config: dict[str, Any],
        extra_tags: dict[str, str],
        resume_run_id: str | None = None,
    ) -> str | None:
        """Start (or, on resume, reopen) the stage's run; log tags, params and the config artifact.

        Args:
            stage: stage name (tag `stage`).
            tracking: the stage's `TrackingConfig`.
            resolved_config: the fully resolved config (params + `config/resolved.json`).
            extra_tags: more tags (preset, data manifest hash, ...).
            resume_run_id: the run to continue after a restart.

        Returns:
            The run id (None on other ranks).
        """
        if not self.enabled:
            return None
        import mlflow

        if tracking.parent_run_id:  # MLflow shows nested runs inside their parent's experiment only
            experiment_id = (
                mlflow.MlflowClient(tracking_uri()).get_run(tracking.parent_run_id).info.experiment_id
            )
        else:
            experiment_id = ensure_experiment(tracking.experiment)
        tags = {
            "stage": stage,
            "recipe": tracking.recipe,
            "git_commit": git_commit(),
            "vlpipe_version": _version(),
            **tracking.tags,
            **extra_tags,
        }
        if resume_run_id:
            run = mlflow.start_run(run_id=resume_run_id, log_system_metrics=tracking.system_metrics)
        else:
            run = mlflow.start_run(
                experiment_id=experiment_id,
                run_name=tracking.run_name or stage,
                parent_run_id=tracking.parent_run_id,
                tags=tags,
                log_system_metrics=tracking.system_metrics,
            )
        mlflow.set_tags(tags)
        self.run_id = run.info.run_id
        if not resume_run_id:
            mlflow.log_params(flatten(resolved_config))
            mlflow.log_dict(resolved_config, "config/resolved.json")
        return self.run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.enabled and self.run_id:
            import mlflow

            mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.enabled and self.run_id:
            import mlflow

            mlflow.set_tags(tags)

    def log_dict(self, data: dict[str, Any], artifact_file: str) -> None:
        if self.enabled and self.run_id:
            import mlflow

            mlflow.log_dict(data, artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled and self.run_id:
            import mlflow

            mlflow.log_artifact(str(path), artifact_path)

    def log_manifest(self, manifest: dict[str, Any], quarantine_report: dict[str, Any] | None) -> None:
        """The data manifest as MLflow dataset inputs + artifact, and its hash as a tag."""
        if self.enabled and self.run_id:
            from model.data.provenance import log_manifest_to_mlflow

            log_manifest_to_mlflow(manifest, quarantine_report)

    def log_model(self, checkpoint: str, metadata: dict[str, Any]) -> str | None:
        """Log the final checkpoint as an MLflow pyfunc model; returns its model URI."""
        if not (self.enabled and self.run_id):
            return None
        from serving.pyfunc import log_checkpoint_model

        info = log_checkpoint_model(checkpoint, name="model", metadata=metadata)
        return info.model_uri

    def finish(self, status: str = "FINISHED") -> None:
        if self.enabled and self.run_id:
            import mlflow

            mlflow.end_run(status=status)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vlpipe")
    except PackageNotFoundError:
        return "0+unknown"
