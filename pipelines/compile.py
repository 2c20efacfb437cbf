"""Compile a recipe's pipelines to Kubeflow IR YAML, one file per pipeline, named with its version.

The version is the package version plus the source commit: `internvl3-recipe-0.1.0+<sha12>.yaml`.
Compiling the same commit gives byte-identical files: the IR holds only the recipe, the commit and the
component sources (no timestamps, no environment). Nothing from the environment but `VLPIPE_GIT_COMMIT`
(when set, instead of asking git) is read, so no credential can end up in a compiled file.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from vlpipe.components.release import VERSION
from vlpipe.pipelines.config import PipelineConfig

log = logging.getLogger(__name__)


def source_commit() -> str:
    """The source commit: `VLPIPE_GIT_COMMIT`, or `git rev-parse HEAD`, or "unknown"."""
    from vlpipe.tracking.runs import git_commit

    return git_commit()


def pipeline_version(commit: str | None = None) -> str:
    """`<package version>+<12 characters of the commit>` (a PEP 440 local version): `0.1.0+1a2b3c4d5e6f`."""
    commit = commit or source_commit()
    return f"{VERSION}+{commit[:12]}"


def compile_recipe(
    recipe: PipelineConfig, out_dir: str | Path, *, commit: str | None = None
) -> dict[str, Path]:
    """Write the IR YAML of every pipeline of `recipe` into `out_dir`.

    Args:
        recipe: the validated recipe.
        out_dir: destination directory (created).
        commit: the source commit; default `source_commit()`.

    Returns:
        Pipeline name → written file.
    """
    from kfp import compiler

    from vlpipe.pipelines.dag import build_pipelines

    commit = commit or source_commit()
    if commit == "unknown":
        log.warning(
            "no source commit (not a git checkout and VLPIPE_GIT_COMMIT unset); version says 'unknown'"
        )
    version = pipeline_version(commit)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, pipeline in build_pipelines(recipe, commit=commit, version=version).items():
        path = out / f"{name}-{version}.yaml"
        # Compile beside the target and rename, so a reader never sees a half-written file.
        with tempfile.NamedTemporaryFile(dir=out, prefix=".tmp-", suffix=".yaml", delete=False) as tmp:
            tmp_path = Path(tmp.name)
        compiler.Compiler().compile(pipeline_func=pipeline, package_path=str(tmp_path))
        tmp_path.chmod(0o644)
        tmp_path.replace(path)
        written[name] = path
    return written
