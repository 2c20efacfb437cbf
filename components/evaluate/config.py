"""Settings of the Best-of-N evaluation stage (`EvalConfig`), loaded from YAML or JSON.

Imports pydantic and yaml only (no torch), so pipelines can validate an evaluation recipe on a machine without
torch. Invalid settings fail when the file is loaded, before any checkpoint is read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from vlpipe.objectives.config import Aggregation

BenchmarkFormat = Literal["demo", "tsv"]
OVERALL = "overall"
"""Name of the all-benchmarks scope in the metrics; no benchmark may use it."""
# Benchmark names end up in MLflow metric keys ("<name>/best_of_n"), which allow only these characters.
_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"


class BenchmarkSpec(BaseModel):
    """One benchmark to evaluate.

    Attributes:
        name: short name used in metric keys and file names (letters, digits, `_`, `.`, `-`).
        path: the benchmark file, a local path or an fsspec URL (`s3://bucket/MathVista_MINI.tsv`).
        format: `demo` (JSONL lines `{"id", "image", "question", "answer", "solution"}`, as
            `vlpipe.model.data.demo.write_demo_dataset` writes `reasoning/test.jsonl`) or `tsv` (VLMEvalKit: columns
            `index`, `image` as base64, `question`, `answer`, optional option columns `A`, `B`, ...).
        image_root: root of the JSONL's relative `image` paths; default `<file's directory>/../images` (the
            demo layout). Not used by `tsv`.
        limit: evaluate at most this many usable items (the first ones in the file); None for all.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=_NAME_PATTERN, max_length=64)
    path: str = Field(min_length=1)
    format: BenchmarkFormat
    image_root: str | None = None
    limit: int | None = Field(default=None, gt=0)
    video_frames: int = Field(default=8, ge=1, le=64, description="Frames sampled from a row's video.")

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.name == OVERALL:
            raise ValueError(f"benchmark name {OVERALL!r} is reserved for the all-benchmarks metrics")
        if self.image_root is not None and self.format == "tsv":
            raise ValueError(
                f"benchmark {self.name!r}: image_root applies to format 'demo' only (TSV images are inline)"
            )
        return self


class MLflowSettings(BaseModel):
    """Where the evaluation run is recorded. The tracking URI comes from `MLFLOW_TRACKING_URI`, default
    `sqlite:///<VLPIPE_HOME>/mlflow.db`.

    Attributes:
        experiment: experiment name (ignored when `parent_run_id` is set: the run then goes into the parent's
            experiment, the only place MLflow shows nested runs).
        run_name: the run's name; default `eval-<policy directory name>`.
        parent_run_id: make this a nested run of that run (tag `mlflow.parentRunId`), e.g. the pipeline run.
        tags: extra run tags; `stage` defaults to `eval`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    experiment: str = Field(default="vlpipe-eval", min_length=1)
    run_name: str | None = None
    parent_run_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_\-]+$")
    tags: dict[str, str] = Field(default_factory=lambda: {"stage": "eval"})


class EvalConfig(BaseModel):
    """The Best-of-N evaluation: policy and PRM checkpoints, benchmarks, sampling and scoring settings.

    Attributes:
        policy: checkpoint URI (local or `s3://`) of the model that answers.
        prm: checkpoint URI of the process reward model (may equal `policy`; it is then loaded once).
        benchmarks: what to evaluate; names must be unique.
        n: sampled answers per item (Best-of-N); Best-of-k is reported for k = 1, 2, 4, ... and n.
        temperature, top_p: sampling settings of the n answers (the pass@1 answer is greedy).
        max_new_tokens: length cap of every answer.
        max_length: the longest prompt in tokens; longer items are skipped (reason `too_long`).
        seed: sampling seed; each item's samples use a seed derived from it, the benchmark name and item id,
            so an item's samples do not change with `limit`, `batch_items` or the order of benchmarks.
        aggregation: how step scores become an answer score (`mean`, `min` or `last`).
        batch_items: items whose greedy answers are generated in one batch.
        output_dir: where `metrics.json`, `items.jsonl` and the plots go (local or `s3://`).
        device: `auto` (CUDA when available), `cpu` or `cuda`.
        dtype: weights' dtype at inference.
        mlflow: run settings.

    Raises:
        pydantic.ValidationError: on an unknown key, a value out of range or duplicate benchmark names.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: str = Field(min_length=1)
    prm: str = Field(min_length=1)
    benchmarks: list[BenchmarkSpec] = Field(min_length=1)
    n: int = Field(default=8, ge=1, le=1024)
    temperature: float = Field(default=0.7, gt=0, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_new_tokens: int = Field(default=256, ge=1)
    max_length: int = Field(default=8192, ge=8)
    seed: int = 0
    aggregation: Aggregation = "mean"
    batch_items: int = Field(default=8, ge=1)
    output_dir: str = Field(min_length=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    mlflow: MLflowSettings = Field(default_factory=MLflowSettings)

    @model_validator(mode="after")
    def _unique_names(self) -> Self:
        names = [b.name for b in self.benchmarks]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"benchmark names must be unique; repeated: {', '.join(duplicates)}")
        return self


def load_eval_config(path: str | os.PathLike) -> EvalConfig:
    """Read and validate an `EvalConfig` from a YAML (`.yaml`/`.yml`) or JSON file.

    Args:
        path: the config file.

    Returns:
        The validated config.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a YAML/JSON mapping.
        pydantic.ValidationError: the settings are invalid (the message names the key).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"evaluation config {path} does not exist")
    text = path.read_text(encoding="utf-8")
    data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(
            f"{path}: an evaluation config must be a mapping of settings, got {type(data).__name__}"
        )
    return EvalConfig.model_validate(data)
