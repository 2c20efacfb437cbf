"""Settings of the Best-of-N evaluation stage (`EvalConfig`), loaded from YAML or JSON.

Imports pydantic and yaml only (no torch), so pipelines can validate an evaluation recipe on a machine without
torch. Invalid settings fail when the file is loaded, before any checkpoint is read.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from vlpipe.objectives.config import Aggregation

BenchmarkFormat = Literal["demo", "tsv"]
Protocol = Literal["demo", "vlpipe", "vlmevalkit-mcq", "vlmevalkit-mathvista"]
"""How items are prompted and scored (docs/evaluation.md#protocols): `demo` (the demo task's rule), `vlpipe`
(vlpipe's strict TSV rules), `vlmevalkit-mcq` (VLMEvalKit's multiple-choice image benchmarks as InternVL's model
class prompts them: MMBench, MMStar, AI2D, ...), `vlmevalkit-mathvista` (VLMEvalKit's MathVista)."""
_DEFAULT_PROTOCOL: dict[str, Protocol] = {"demo": "demo", "tsv": "vlpipe"}
# VLMEvalKit scores a multiple-choice benchmark with CircularEval when its name contains one of these.
_CIRCULAR_NAMES = ("mmbench", "ccbench", "circular", "mmcr")
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
        limit: evaluate at most this many usable items (the first ones in the file; with `circular`, this many
            circular groups); None for all.
        protocol: how items are prompted and scored; default `demo` for `demo` files and `vlpipe` for `tsv`
            files. The `vlmevalkit-*` protocols need `format: tsv`.
        circular: CircularEval (an item counts only if every rotation of its options is answered right); only
            with `vlmevalkit-mcq`; default as VLMEvalKit decides: on when the name contains mmbench, ccbench,
            circular or mmcr (case-insensitive).
        shards: K, the pods this benchmark's items are spread over in a pipeline (`evaluate-shard` tasks, one
            GPU each, then `merge-evaluation`); the items are cut on generation-batch boundaries
            (`batch_items`) into K contiguous runs of whole batches, so the numbers equal a one-pod run's
            (docs/evaluation.md#sharded-evaluation). 1 (default): no fan-out.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=_NAME_PATTERN, max_length=64)
    path: str = Field(min_length=1)
    format: BenchmarkFormat
    image_root: str | None = None
    limit: int | None = Field(default=None, gt=0)
    video_frames: int = Field(default=8, ge=1, le=64, description="Frames sampled from a row's video.")
    protocol: Protocol | None = None
    circular: bool | None = None
    shards: int = Field(default=1, ge=1, le=256)

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        # Resolved here so the logged config (and a re-validated copy) names the protocol actually used.
        if isinstance(data, dict) and data.get("format") in _DEFAULT_PROTOCOL:
            data = dict(data)
            if data.get("protocol") is None:
                data["protocol"] = _DEFAULT_PROTOCOL[data["format"]]
            if data.get("circular") is None:
                name = str(data.get("name", "")).lower()
                data["circular"] = data["protocol"] == "vlmevalkit-mcq" and any(
                    key in name for key in _CIRCULAR_NAMES
                )
        return data

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.protocol != "demo" and self.format == "demo":
            raise ValueError(
                f"benchmark {self.name!r}: format 'demo' is scored by protocol 'demo' only, not {self.protocol!r}"
            )
        if self.protocol == "demo" and self.format == "tsv":
            raise ValueError(
                f"benchmark {self.name!r}: protocol 'demo' needs format 'demo'; a TSV takes 'vlpipe', "
                "'vlmevalkit-mcq' or 'vlmevalkit-mathvista'"
            )
        if self.circular and self.protocol != "vlmevalkit-mcq":
            raise ValueError(
                f"benchmark {self.name!r}: circular applies to protocol 'vlmevalkit-mcq' only, not {self.protocol!r}"
            )
        if self.name == OVERALL:
            raise ValueError(f"benchmark name {OVERALL!r} is reserved for the all-benchmarks metrics")
        if self.image_root is not None and self.format == "tsv":
            raise ValueError(
                f"benchmark {self.name!r}: image_root applies to format 'demo' only (TSV images are inline)"
            )
        return self


class JudgeSettings(BaseModel):
    """An OpenAI-compatible chat-completions endpoint that extracts answers where VLMEvalKit uses a judge model
    (`vlmevalkit-*` protocols only; without one, the rule-based fallback is used and recorded).

    Attributes:
        base_url: the API root, e.g. `https://api.openai.com/v1` or `http://127.0.0.1:8000/v1`
            (`/chat/completions` is appended); no user info, query or fragment (no credentials in it).
        model: the judge model's name (recorded with the metrics).
        api_key_env: the environment variable holding the API key (never logged); unset or empty: no
            `Authorization` header (a local server).
        timeout_s: per-request timeout.
        max_retries: extra attempts after a failed request (network error, 5xx, 429).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str = Field(pattern=r"^https?://[^/@\s?#]+(/[^\s?#]*)?$")
    model: str = Field(min_length=1, max_length=200)
    api_key_env: str = Field(default="OPENAI_API_KEY", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    timeout_s: float = Field(default=60.0, gt=0, le=600)
    max_retries: int = Field(default=2, ge=0, le=10)


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


class EvalShard(BaseModel):
    """One shard of a benchmark: the `index`-th of `count` contiguous runs of its generation batches.

    Attributes:
        benchmark: the benchmark's name.
        index: which run (0-based).
        count: how many runs the benchmark is cut into (its `shards`; 1: the whole benchmark).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    benchmark: str = Field(pattern=_NAME_PATTERN, max_length=64)
    index: int = Field(ge=0)
    count: int = Field(ge=1, le=256)

    @model_validator(mode="after")
    def _index_in_range(self) -> Self:
        if self.index >= self.count:
            raise ValueError(
                f"shard index {self.index} of benchmark {self.benchmark!r} must be below its count {self.count}"
            )
        return self

    def batch_range(self, batches: int) -> range:
        """The batches (of `batches`) this shard evaluates: balanced contiguous runs, in order.

        Raises:
            ValueError: more shards than batches (the message says what to lower).
        """
        if self.count > batches:
            raise ValueError(
                f"benchmark {self.benchmark!r}: shards ({self.count}) exceeds its {batches} generation batches; "
                "lower its shards or batch_items"
            )
        return range(self.index * batches // self.count, (self.index + 1) * batches // self.count)


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
        batch_items: items whose greedy answers are generated in one batch (also the unit a benchmark's
            `shards` are cut in).
        output_dir: where `metrics.json`, `items.jsonl` and the plots go (local or `s3://`).
        device: `auto` (CUDA when available), `cpu` or `cuda`.
        dtype: weights' dtype at inference.
        mlflow: run settings.
        judge: optional judge endpoint for the `vlmevalkit-*` protocols; None: rule-based extraction.

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
    judge: JudgeSettings | None = None

    @model_validator(mode="after")
    def _unique_names(self) -> Self:
        names = [b.name for b in self.benchmarks]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"benchmark names must be unique; repeated: {', '.join(duplicates)}")
        for b in self.benchmarks:
            # With `limit` the batch count is known now (at least this many: a circular group is several rows);
            # without, `evaluate_shards` checks it once the file is read.
            batches = math.ceil(b.limit / self.batch_items) if b.limit is not None else None
            if batches is not None and b.shards > batches:
                raise ValueError(
                    f"benchmark {b.name!r}: shards ({b.shards}) exceeds its generation batches ({batches} = "
                    f"limit {b.limit} / batch_items {self.batch_items}, rounded up); every shard needs a whole "
                    "batch: lower shards or batch_items"
                )
        return self

    @property
    def shard_plan(self) -> list[EvalShard]:
        """Every shard of the evaluation, benchmark by benchmark (the pipeline's fan-out, in order)."""
        return [
            EvalShard(benchmark=b.name, index=i, count=b.shards)
            for b in self.benchmarks
            for i in range(b.shards)
        ]

    @property
    def sharded(self) -> bool:
        """Whether a pipeline fans this evaluation out (some benchmark has `shards` > 1)."""
        return any(b.shards > 1 for b in self.benchmarks)


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


def protocol_label(spec: BenchmarkSpec, judge: JudgeSettings | None) -> str:
    """What a benchmark's numbers were measured under, e.g. `vlmevalkit-mcq+circular+rule` or
    `vlmevalkit-mathvista+judge:gpt-4o-mini` (`demo` and `vlpipe` use no judge)."""
    label = str(spec.protocol)
    if spec.circular:
        label += "+circular"
    if label.startswith("vlmevalkit"):
        label += f"+judge:{judge.model}" if judge is not None else "+rule"
    return label


def protocol_record(config: EvalConfig) -> str:
    """The whole evaluation's protocol, `name=label` per benchmark sorted by name and joined by `;` (the run tag
    `protocol` and the model-version tag `eval_protocol` the promotion gate compares)."""
    return ";".join(
        f"{b.name}={protocol_label(b, config.judge)}" for b in sorted(config.benchmarks, key=lambda b: b.name)
    )
