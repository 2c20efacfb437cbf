"""Run a recipe's pipeline locally with `kfp.local` (`vlpipe run --local`): the same pipeline as on a cluster,
each step a subprocess of this Python (`SubprocessRunner(use_venv=False)`, no containers).

The MLflow parent run is opened here, before the pipeline starts, and passed in as `parent_run_id`; the
first step adopts it, every step nests its run under it, and the exit handler closes it. Artifacts go under
`<VLPIPE_HOME>/pipeline-root`, MLflow runs to `MLFLOW_TRACKING_URI` (default `<VLPIPE_HOME>/mlflow.db`).
Kubernetes settings in the pipeline (GPUs, tolerations, secrets, volumes) do not apply locally.
"""

from __future__ import annotations

import builtins
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from vlpipe.pipelines.config import PipelineConfig

log = logging.getLogger(__name__)


def run_local(
    recipe: PipelineConfig,
    *,
    pipeline: str = "internvl3-recipe",
    arguments: dict[str, str] | None = None,
    cache: bool = True,
) -> dict[str, Any]:
    """Run one of the recipe's pipelines with `kfp.local` and return its summary (from MLflow).

    Args:
        recipe: the validated recipe.
        pipeline: which pipeline (`vlpipe.pipelines.dag.PIPELINES`).
        arguments: the pipeline's parameters (`checkpoint_uri` for sft-mpo; `policy_uri`, `prm_uri` for
            evaluate; `model_version` and optionally `model_name` for promote-deploy).
        cache: reuse the outputs of tasks that already ran with the same inputs (kfp.local's cache under
            `<VLPIPE_HOME>/kfp-cache`); False runs every task again.

    Returns:
        `vlpipe.pipelines.summary.collect_summary`'s result plus `seconds` and `tracking_uri`.

    Raises:
        RuntimeError: a step failed (the parent run is closed as FAILED; the step's log is above).
    """
    from kfp import local

    from vlpipe.model.storage import vlpipe_home
    from vlpipe.pipelines.compile import (
        PIPELINE_VERSION_PARAM,
        compile_pipeline,
        pipeline_digest,
        pipeline_version,
        source_commit,
    )
    from vlpipe.pipelines.dag import build_pipelines, typed_arguments
    from vlpipe.pipelines.summary import collect_summary
    from vlpipe.tracking.pipeline import PIPELINE_TAG, version_tags
    from vlpipe.tracking.runs import base_tags, ensure_experiment, tracking_uri

    home = vlpipe_home()
    home.mkdir(parents=True, exist_ok=True)
    # Steps are subprocesses: they must see the same (absolute) home and store as this process.
    os.environ["VLPIPE_HOME"] = str(home)
    uri = tracking_uri()
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    commit = source_commit()
    pipelines = build_pipelines(recipe, commit=commit, version=pipeline_version(commit))
    if pipeline not in pipelines:
        raise ValueError(f"unknown pipeline {pipeline!r}; choose one of {', '.join(pipelines)}")
    arguments = typed_arguments(pipelines[pipeline], arguments or {})
    with tempfile.TemporaryDirectory(prefix="vlpipe-version-") as tmp:  # the version a submit would give it
        compiled = compile_pipeline(pipeline, pipelines[pipeline], tmp, commit=commit)
        version = pipeline_version(commit, pipeline_digest(compiled))

    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment_id = ensure_experiment(arguments.get("mlflow_experiment", recipe.tracking.experiment))
    tags = {
        **base_tags(recipe.name),
        **recipe.tracking.tags,
        PIPELINE_TAG: pipeline,
        "mode": "kfp.local",
        **version_tags(version),
    }
    parent_run_id = client.create_run(
        experiment_id, run_name=f"{pipeline}-{recipe.name}", tags=tags
    ).info.run_id
    log.info("MLflow parent run %s in experiment %s (%s)", parent_run_id, experiment_id, uri)

    root = home / "pipeline-root"
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(root),
        raise_on_error=True,
        enable_caching=cache,
        cache_root=str(home / "kfp-cache"),
    )
    started = time.perf_counter()
    # kfp 2.17's local runner indents a task's log by swapping `builtins.print` for the task's duration
    # (kfp/local/logging_utils.py `indented_print`); ParallelFor iterations run on a thread pool, so
    # interleaved swaps can leave the indenting print in place for the rest of the process. Put it back.
    print_before = builtins.print
    try:
        with warnings.catch_warnings():
            # kfp warns that the vlpipe image name does not look like a Python image; the subprocess runs in
            # this environment, where vlpipe is installed.
            warnings.filterwarnings("ignore", message=".*non-Python base image.*")
            arguments = {PIPELINE_VERSION_PARAM: version, **arguments}
            pipelines[pipeline](parent_run_id=parent_run_id, **arguments)
    finally:
        builtins.print = print_before
        status = client.get_run(parent_run_id).info.status
        if status == "RUNNING":  # the exit handler did not run (interrupted): do not leave it open
            client.set_terminated(parent_run_id, "FAILED")
    seconds = time.perf_counter() - started
    summary = collect_summary(parent_run_id, uri)
    summary.update(
        seconds=round(seconds, 1), tracking_uri=uri, pipeline_root=str(Path(root)), pipeline_version=version
    )
    return summary
