"""Settings of the data and init steps (torch-free: recipes validate them on any machine).

`DataSettings` says where the training data comes from: the demo dataset, written by the `prepare-data` step
into its output artifact, or existing InternVL meta files and JSONL files at URIs (`s3://...`). `InitSettings`
says how the starting checkpoint is made: a random model with a BPE tokenizer trained on the data's texts
(the `tiny` and `small` presets), or composed from a pretrained InternViT and a pretrained base LLM (the real
presets).
"""

from __future__ import annotations

from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from vlpipe.components.pipeline_run.config import TaskConfig
from vlpipe.model.data.config import DataConfig, PackingConfig
from vlpipe.model.data.demo import DemoSizes

DataSource = Literal["demo", "meta"]
DATA_FILES = ("pretrain_meta", "sft_meta", "mpo_pairs", "prm_steps")
"""The data files the stages read, by `DataSettings` field name."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DemoData(_Strict):
    """The demo dataset to write (`vlpipe.model.data.demo.write_demo_dataset`)."""

    seed: int = 0
    sizes: DemoSizes = DemoSizes()


class DataSettings(_Strict):
    """Where the stages' data lives.

    Attributes:
        source: `demo` (the `prepare-data` step writes the demo dataset into its output artifact) or `meta`
            (existing files under `root` or at absolute URIs).
        demo: what to write for `source: demo`.
        root: base of the relative paths below for `source: meta` (a local directory or `s3://` prefix).
        pretrain_meta, sft_meta: InternVL meta files of the pre-training and SFT mixtures.
        mpo_pairs: MPO preference pairs: a JSONL file, or an InternVL meta file over many (MMPR's `meta.json`).
        prm_steps: step-labelled solutions for the PRM (VisualPRM400K or vlpipe steps): a JSONL file or a meta file.
        mix_samples: samples the `mix-data` step encodes per mixture to measure the achieved token ratio
            (0: counts and estimates only).
    """

    source: DataSource
    demo: DemoData | None = None
    root: str | None = None
    pretrain_meta: str = Field("meta_pretrain.json", min_length=1)
    sft_meta: str = Field("meta_sft.json", min_length=1)
    mpo_pairs: str = Field("mpo/pairs.jsonl", min_length=1)
    prm_steps: str = Field("prm/train.jsonl", min_length=1)
    mix_samples: int = Field(64, ge=0, le=100_000)

    @model_validator(mode="after")
    def _source_settings(self) -> Self:
        relative = [name for name in DATA_FILES if not is_absolute(getattr(self, name))]
        if self.source == "demo":
            if self.demo is None:
                raise ValueError("data.source is demo: set data.demo (seed and sizes), e.g. `demo: {}`")
            if self.root is not None:
                raise ValueError("data.root applies to source meta; the demo data lives in its artifact")
            if len(relative) != len(DATA_FILES):
                raise ValueError("data.source is demo: the data file paths must be relative to the demo root")
        else:
            if self.demo is not None:
                raise ValueError("data.demo applies to source demo only; remove it or set source: demo")
            if relative and self.root is None:
                raise ValueError(
                    f"data.root is required for the relative paths {', '.join(f'data.{n}' for n in relative)}"
                )
        return self


def is_absolute(path: str) -> bool:
    """True for URLs (`s3://...`) and absolute local paths."""
    return "://" in path or path.startswith("/")


def under_root(root: str, path: str) -> str:
    """`path` read from `root` when it is relative (and a root is given), else `path` itself."""
    from vlpipe.model.storage import join

    return join(root, path) if root and not is_absolute(path) else path


class InitSettings(_Strict):
    """How the starting checkpoint is made.

    Attributes:
        seed: initialisation seed.
        vocab_size: BPE vocabulary size of a random init (trained on the data's conversation texts).
        vision: pretrained InternViT HF directory (composed init of the real presets).
        llm: pretrained base LLM HF directory (Qwen2.5) for the composed init.
        tokenizer: tokenizer directory; default the LLM's.
        checkpoint: start from an existing checkpoint instead (local or `s3://`): a published InternVL3
            checkpoint in the transformers format (`OpenGVLab/InternVL3-1B-hf`'s files) or one vlpipe wrote. Its
            weights, tokenizer, chat template and image settings are kept (`vlpipe.model.init.init_from_checkpoint`).
    """

    seed: int = 0
    vocab_size: int = Field(512, ge=64, le=1_000_000)
    vision: str | None = Field(None, min_length=1)
    llm: str | None = Field(None, min_length=1)
    tokenizer: str | None = Field(None, min_length=1)
    checkpoint: str | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _both_parts(self) -> Self:
        if self.checkpoint is not None and (self.vision or self.llm or self.tokenizer):
            raise ValueError("init: set checkpoint, or vision and llm (composed init), not both")
        if (self.vision is None) != (self.llm is None):
            raise ValueError("init: set both vision and llm (composed init), or neither (random init)")
        if self.tokenizer is not None and self.llm is None:
            raise ValueError("init.tokenizer applies to the composed init (with vision and llm)")
        return self

    @property
    def composed(self) -> bool:
        return self.vision is not None

    @property
    def from_checkpoint(self) -> bool:
        return self.checkpoint is not None


class Mixture(_Strict):
    """A training mixture the `mix-data` step checks: the stage's data settings without the meta path
    (the pipeline wires it) and its packing.

    Attributes:
        stage: the stage that trains on it (`pretrain` or `sft`), which also picks the meta file.
        data: `vlpipe.model.data.config.DataConfig` settings without `meta`.
        packing: the stage's packing settings (part of the manifest's identity).
    """

    stage: Literal["pretrain", "sft"]
    data: dict[str, Any] = Field(default_factory=dict)
    packing: PackingConfig | None = None

    @model_validator(mode="after")
    def _valid_data(self) -> Self:
        if "meta" in self.data:
            raise ValueError(f"{self.stage}: data.meta is set by the pipeline from the data step's output")
        self.data_config("<meta from the data step>")
        return self

    def data_config(self, meta: str) -> DataConfig:
        """The stage's `DataConfig` with its meta file."""
        return DataConfig(meta=meta, **self.data)


class PrepareDataConfig(TaskConfig):
    """The `prepare-data` step's settings."""

    data: DataSettings


class InitModelConfig(TaskConfig):
    """The `init-model` step's settings."""

    preset: str = Field(min_length=1)
    init: InitSettings


class MixConfig(TaskConfig):
    """The `mix-data` step's settings."""

    data: DataSettings
    mixtures: list[Mixture] = Field(min_length=1)
