"""Compile a recipe's pipelines to Kubeflow IR YAML, one file per pipeline, named with its version.

The version is the package version, the source commit and a digest of the compiled pipeline itself:
`internvl3-recipe-0.1.0+<commit12>.<digest12>.yaml`. Compiling the same recipe at the same commit gives
byte-identical files (the IR holds only the recipe, the commit and the component sources: no timestamps, no
environment), so an identical compile has the same version, and any change to the recipe, an override or the
code gives a new one. Nothing from the environment but `VLPIPE_GIT_COMMIT` (when set, instead of asking git) is
read, so no credential can end up in a compiled file.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from pathlib import Path
from typing import Any

from vlpipe.components.release import VERSION
from vlpipe.pipelines.config import PipelineConfig

log = logging.getLogger(__name__)


def source_commit() -> str:
    """The source commit: `VLPIPE_GIT_COMMIT`, or `git rev-parse HEAD`, or "unknown"."""
    from vlpipe.tracking.runs import git_commit

    return git_commit()


DIGEST_CHARS = 12
PIPELINE_VERSION_PARAM = "pipeline_version"
"""Every pipeline's parameter that names its version (set by `vlpipe submit` and `vlpipe run --local`; the
parent MLflow run records it and its digest)."""


def pipeline_digest(path: str | Path) -> str:
    """The first 12 hex characters of the SHA-256 of a compiled pipeline file."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:DIGEST_CHARS]


def pipeline_version(commit: str | None = None, digest: str | None = None) -> str:
    """`<package version>+<commit12>[.<digest12>]` (a PEP 440 local version): `0.1.0+1a2b3c4d5e6f.0f9e8d7c6b5a`.

    Without `digest` it names the code only (what the compiled pipelines' descriptions say).
    """
    commit = commit or source_commit()
    code = f"{VERSION}+{commit[:12]}"
    return f"{code}.{digest}" if digest else code


def compile_recipe(
    recipe: PipelineConfig, out_dir: str | Path, *, commit: str | None = None
) -> dict[str, Path]:
    """Write the IR YAML of every pipeline of `recipe` into `out_dir`.

    Args:
        recipe: the validated recipe.
        out_dir: destination directory (created).
        commit: the source commit; default `source_commit()`.

    Returns:
        Pipeline name → written file (`<pipeline>-<version>.yaml`; see `pipeline_version`).
    """
    from vlpipe.pipelines.dag import build_pipelines

    commit = commit or source_commit()
    if commit == "unknown":
        log.warning(
            "no source commit (not a git checkout and VLPIPE_GIT_COMMIT unset); version says 'unknown'"
        )
    pipelines = build_pipelines(recipe, commit=commit, version=pipeline_version(commit))
    return {
        name: compile_pipeline(name, pipeline, out_dir, commit=commit) for name, pipeline in pipelines.items()
    }


def compile_pipeline(name: str, pipeline: Any, out_dir: str | Path, *, commit: str) -> Path:
    """Write one built pipeline (`vlpipe.pipelines.dag.build_pipelines`) as `<name>-<version>.yaml` in `out_dir`."""
    from kfp import compiler

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Compile beside the target and rename, so a reader never sees a half-written file.
    with tempfile.NamedTemporaryFile(dir=out, prefix=".tmp-", suffix=".yaml", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    compiler.Compiler().compile(pipeline_func=pipeline, package_path=str(tmp_path))
    tmp_path.chmod(0o644)
    path = out / f"{name}-{pipeline_version(commit, pipeline_digest(tmp_path))}.yaml"
    tmp_path.replace(path)
    return path
