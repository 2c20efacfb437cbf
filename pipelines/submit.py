"""Submit a recipe's pipeline to a Kubeflow Pipelines deployment (`vlpipe submit`).

compile (into a temporary directory) → find the pipeline `<pipeline>-<recipe>` on the server: upload it, or
add this version (`<package version>+<commit12>.<digest12>`, the digest of the compiled file) unless it is there
already → create or reuse the experiment → start a run with the given parameters and `pipeline_version` (the
parent MLflow run records it). An identical compile reuses its version; any change uploads a new one.

Credentials never come from arguments: `kfp.Client` reads the kube config, an in-cluster service account
token or its own environment variables (`KF_PIPELINES_*`); a bearer token, where the deployment needs one, is
read from `KFP_BEARER_TOKEN`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Any

from vlpipe.pipelines.config import PipelineConfig

log = logging.getLogger(__name__)
TOKEN_ENV = "KFP_BEARER_TOKEN"


@dataclass(frozen=True)
class Submission:
    """What `submit_recipe` did."""

    pipeline_name: str
    pipeline_id: str
    version_name: str
    version_id: str
    experiment: str
    run_id: str
    uploaded: bool  # False when the version was on the server already


def make_client(host: str) -> Any:
    """A `kfp.Client` for `host`, authenticated from the environment or kube config only."""
    import kfp

    token = os.environ.get(TOKEN_ENV) or None
    return kfp.Client(host=host, existing_token=token)


def registry_name(pipeline: str, recipe: PipelineConfig) -> str:
    """The pipeline's name on the server: `<pipeline>-<recipe>` (recipes differ in resources and settings)."""
    return f"{pipeline}-{recipe.name}"


def _find_version(client: Any, pipeline_id: str, version_name: str) -> str | None:
    flt = json.dumps(
        {"predicates": [{"operation": "EQUALS", "key": "display_name", "string_value": version_name}]}
    )
    response = client.list_pipeline_versions(pipeline_id=pipeline_id, page_size=1, filter=flt)
    versions = getattr(response, "pipeline_versions", None) or []
    return versions[0].pipeline_version_id if versions else None


def submit_recipe(
    recipe: PipelineConfig,
    *,
    host: str,
    pipeline: str = "internvl3-recipe",
    experiment: str | None = None,
    arguments: dict[str, str] | None = None,
    client: Any = None,
    cache: bool = True,
) -> Submission:
    """Upload the pipeline (or a new version of it) and start a run.

    Args:
        recipe: the validated recipe.
        host: the Kubeflow Pipelines API endpoint.
        pipeline: which pipeline (`vlpipe.pipelines.dag.PIPELINES`).
        experiment: the Kubeflow experiment; default the recipe's MLflow experiment name.
        arguments: the pipeline's parameters.
        client: a `kfp.Client`-like object (default `make_client(host)`).
        cache: let Kubeflow reuse the outputs of cacheable tasks that ran with the same inputs; False runs
            every task again.

    Raises:
        ValueError: an unknown pipeline.
    """
    from vlpipe.pipelines.compile import (
        PIPELINE_VERSION_PARAM,
        compile_pipeline,
        pipeline_digest,
        pipeline_version,
        source_commit,
    )
    from vlpipe.pipelines.dag import build_pipelines, typed_arguments

    commit = source_commit()
    pipelines = build_pipelines(recipe, commit=commit, version=pipeline_version(commit))
    if pipeline not in pipelines:
        raise ValueError(f"unknown pipeline {pipeline!r}; choose one of {', '.join(pipelines)}")
    typed = typed_arguments(pipelines[pipeline], arguments or {})  # before anything is uploaded
    client = client or make_client(host)
    with tempfile.TemporaryDirectory(prefix="vlpipe-submit-") as tmp:
        package = str(compile_pipeline(pipeline, pipelines[pipeline], tmp, commit=commit))
        version = pipeline_version(commit, pipeline_digest(package))
        name = registry_name(pipeline, recipe)
        description = f"{pipeline} of recipe {recipe.name} ({recipe.preset}). {recipe.description}".strip()
        pipeline_id = client.get_pipeline_id(name)
        uploaded = True
        if pipeline_id is None:
            created = client.upload_pipeline(package, pipeline_name=name, description=description)
            pipeline_id = created.pipeline_id
            # The first upload creates a default version named after the pipeline; add ours by name too.
            version_id = client.upload_pipeline_version(
                package, pipeline_version_name=version, pipeline_id=pipeline_id, description=description
            ).pipeline_version_id
        else:
            version_id = _find_version(client, pipeline_id, version)
            if version_id is None:
                version_id = client.upload_pipeline_version(
                    package, pipeline_version_name=version, pipeline_id=pipeline_id, description=description
                ).pipeline_version_id
            else:
                uploaded = False
    experiment_name = experiment or recipe.tracking.experiment
    experiment_id = client.create_experiment(name=experiment_name).experiment_id
    run = client.run_pipeline(
        experiment_id=experiment_id,
        job_name=f"{name}-{version}",
        pipeline_id=pipeline_id,
        version_id=version_id,
        params={PIPELINE_VERSION_PARAM: version, **typed},
        service_account=recipe.cluster.service_account,
        **({} if cache else {"enable_caching": False}),
    )
    log.info("started run %s of %s version %s", run.run_id, name, version)
    return Submission(
        pipeline_name=name,
        pipeline_id=pipeline_id,
        version_name=version,
        version_id=version_id,
        experiment=experiment_name,
        run_id=run.run_id,
        uploaded=uploaded,
    )
