"""Validated settings of the four training stages: pretrain, sft, mpo and prm.

Torch-free (pydantic only), so a pipeline recipe is validated on any machine before anything is compiled,
submitted or put on a GPU; the stage validates the same class again inside its container. Every model here
is `extra="forbid", frozen=True`: an unknown key, a wrong type or an out-of-range value fails at load time
with the key's path in the message.

Batch sizes: `global_batch_size` is the number of training units per optimizer step over all ranks (packed
rows for packed pretrain/SFT/PRM (a micro-batch is `micro_batch_size` rows), samples without packing, preference pairs for MPO). Gradient accumulation
is derived: `global_batch_size / (micro_batch_size * world_size)`, which must divide exactly.
"""

from __future__ import annotations

import re
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from vlpipe.model.data.config import DataConfig, PackingConfig
from vlpipe.model.files import ReadLimits
from vlpipe.objectives.config import LMLossConfig, MPOConfig

StageName = Literal["pretrain", "sft", "mpo", "prm"]
Precision = Literal["auto", "fp32", "bf16"]
AttnImplementation = Literal["sdpa", "eager", "flash_attention_2"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OptimizerConfig(_Strict):
    """AdamW with linear warmup then cosine decay to `min_lr_ratio * lr`.

    Attributes:
        lr: peak learning rate.
        weight_decay: decoupled weight decay (not applied to biases and norm weights).
        betas, eps: AdamW settings.
        warmup_steps: linear warmup from 0 to `lr` over this many optimizer steps.
        min_lr_ratio: the cosine ends at `min_lr_ratio * lr`.
        grad_clip: global gradient-norm clip; 0 disables clipping.
    """

    lr: float = Field(2e-5, gt=0, allow_inf_nan=False)
    weight_decay: float = Field(0.05, ge=0, allow_inf_nan=False)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    grad_clip: float = Field(1.0, ge=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _betas_in_range(self) -> Self:
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optimizer.betas must lie in [0, 1); got {self.betas}")
        return self


class FreezeConfig(_Strict):
    """Which of the three parts stay fixed in this stage (InternVL3's native pre-training trains all)."""

    vision: bool = False
    projector: bool = False
    llm: bool = False

    @model_validator(mode="after")
    def _something_trains(self) -> Self:
        if self.vision and self.projector and self.llm:
            raise ValueError("freeze: vision, projector and llm are all frozen; nothing would train")
        return self


class DistributedConfig(_Strict):
    """DeepSpeed settings (rendered by `infra.deepspeed`).

    Attributes:
        zero_stage: ZeRO stage 0 (plain data parallel), 1 (optimizer states), 2 (+ gradients) or 3 (+ params).
        offload_optimizer: keep optimizer states in CPU memory (ZeRO 1–3).
        backend: process-group backend; "auto" is nccl with CUDA, gloo without.
    """

    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    backend: Literal["auto", "nccl", "gloo"] = "auto"

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> Self:
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("distributed.offload_optimizer needs zero_stage >= 1")
        return self


class TrainerConfig(_Strict):
    """How long and how a stage trains.

    Attributes:
        global_batch_size: training units per optimizer step over all ranks (see the module docstring).
        micro_batch_size: units per forward/backward on one rank.
        max_steps: optimizer steps; exactly one of `max_steps` and `epochs` is set.
        epochs: passes over the data, converted to steps when the stage starts (an estimate for packed
            streams: estimated tokens per epoch over tokens per step).
        precision: "auto" is bf16 on a GPU that supports it and fp32 otherwise.
        gradient_checkpointing: recompute activations in the backward pass (less memory, ~30% more compute).
        attn_implementation: attention kernel; packed batches use a block-diagonal mask for sdpa/eager and
            cu_seqlens for flash_attention_2.
        seed: seed of initialisation-independent randomness (dropout, sampling order comes from the data).
        log_every: steps between progress log lines (metrics go to MLflow every step).
    """

    global_batch_size: int = Field(8, ge=1)
    micro_batch_size: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)
    epochs: float | None = Field(None, gt=0)
    precision: Precision = "auto"
    gradient_checkpointing: bool = False
    attn_implementation: AttnImplementation = "sdpa"
    seed: int = 0
    log_every: int = Field(10, ge=1)
    optimizer: OptimizerConfig = OptimizerConfig()
    freeze: FreezeConfig = FreezeConfig()
    distributed: DistributedConfig = DistributedConfig()

    @model_validator(mode="after")
    def _one_length(self) -> Self:
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("trainer: set exactly one of max_steps and epochs")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"trainer.global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"micro_batch_size ({self.micro_batch_size})"
            )
        return self

    def accumulation_steps(self, world_size: int) -> int:
        """Gradient accumulation steps for `world_size` ranks.

        Raises:
            ValueError: when global_batch_size is not divisible by micro_batch_size * world_size.
        """
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ValueError(
                f"trainer.global_batch_size ({self.global_batch_size}) is not divisible by micro_batch_size "
                f"({self.micro_batch_size}) x world size ({world_size}); change one of them"
            )
        return self.global_batch_size // per_step


class CheckpointConfig(_Strict):
    """Periodic training-state checkpoints for resume (the final output is a separate HF checkpoint).

    Attributes:
        every_steps: save every this many optimizer steps; 0 saves only at the end.
        keep_last: how many of the most recent checkpoints to keep.
        resume: continue from the newest committed checkpoint at `location` when there is one.
        location: where the checkpoints go, a directory or an `s3://` prefix every node of the stage sees
            (default `<work_dir>/checkpoints`); several nodes need a shared (ReadWriteMany) volume or `s3://`.
    """

    every_steps: int = Field(0, ge=0)
    keep_last: int = Field(2, ge=1)
    resume: bool = True
    location: str | None = Field(None, min_length=1)


class TrackingConfig(_Strict):
    """MLflow settings (the tracking URI comes from `MLFLOW_TRACKING_URI`, never from a config file).

    Attributes:
        experiment: MLflow experiment name.
        run_name: run name; defaults to the stage name.
        parent_run_id: nest this stage's run under a pipeline run.
        recipe: recipe name, a tag that makes runs comparable.
        tags: extra tags.
        log_model: log the final checkpoint as an MLflow pyfunc model.
        system_metrics: log CPU/GPU/memory system metrics.
    """

    experiment: str = "vlpipe"
    run_name: str | None = None
    parent_run_id: str | None = None
    recipe: str = "custom"
    tags: dict[str, str] = Field(default_factory=dict)
    log_model: bool = True
    system_metrics: bool = True


_K8S_NAME = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


class TrainJobSettings(_Strict):
    """How a stage with `nodes > 1` runs as a Kubeflow Trainer TrainJob (a recipe's `stages.<name>.trainjob`).

    Attributes:
        runtime: the `ClusterTrainingRuntime` the TrainJob references; `torch-distributed` (installed with
            Kubeflow Trainer) gives every node torchrun's rendezvous settings (`PET_NNODES`, `PET_NODE_RANK`,
            `PET_MASTER_ADDR`, ...).
        env: extra environment variables on every node, e.g. NCCL settings (`NCCL_IB_HCA`,
            `NCCL_SOCKET_IFNAME`); never credentials (those are the cluster's secrets).
        deadline_seconds: the TrainJob's `activeDeadlineSeconds`: past it Kubeflow Trainer stops the pods
            and the TrainJob (and the step) fails with reason `DeadlineExceeded`. None: no deadline.
        poll_seconds: how often the step reads the TrainJob's status.
    """

    runtime: str = Field("torch-distributed", pattern=_K8S_NAME, max_length=253)
    env: dict[str, str] = Field(default_factory=dict)
    deadline_seconds: int | None = Field(None, ge=60)
    poll_seconds: float = Field(15.0, gt=0, le=600, allow_inf_nan=False)

    @model_validator(mode="after")
    def _env_names(self) -> Self:
        bad = [name for name in self.env if not re.match(_ENV_NAME, name)]
        if bad:
            raise ValueError(f"trainjob.env: invalid environment variable names {bad}")
        return self


def is_meta_file(uri: str) -> bool:
    """True when `uri` names an InternVL meta file (`*.json`) rather than a JSONL file (`*.jsonl`)."""
    return uri.rstrip("/").lower().endswith(".json")


class _RecordData(_Strict):
    """Where a record-file stage (MPO, PRM) reads its records: one JSONL file or an InternVL meta file.

    Attributes:
        path: a JSONL file, or an InternVL meta file (`*.json`: `{name: {root, annotation, repeat_time,
            length, max_dynamic_patch, data_augment, allowed_roots}}`, as MMPR ships it) over many JSONL files
            (local or s3://).
        image_root: directory a single JSONL's `image` paths are relative to; defaults to `images/` beside
            the JSONL's directory (the demo dataset's layout). A meta file gives each dataset its `root`.
        max_length: longest sample in tokens; longer ones are skipped (and counted).
        max_bad_fraction: fail when more than this share of lines is bad.
        seed: shuffling seed (a new permutation every epoch).
        limits: read limits per image file and per JSONL line (hostile-data bounds).
    """

    path: str = Field(min_length=1)
    image_root: str | None = None
    max_length: int = Field(2048, gt=0)
    max_bad_fraction: float = Field(0.05, ge=0, le=1)
    seed: int = 0
    limits: ReadLimits = ReadLimits()

    @model_validator(mode="after")
    def _root_for_jsonl_only(self) -> Self:
        if self.image_root is not None and is_meta_file(self.path):
            raise ValueError(
                f"data.image_root applies to a JSONL path; {self.path} is a meta file whose datasets each "
                "name their own 'root'"
            )
        return self


class PairDataConfig(_RecordData):
    """Preference pairs for MPO, MMPR's records `{"image", "question", "chosen", "rejected"}` (`id` optional).

    `image` is a path, a list of paths (one `<image>` placeholder per image in the question), or absent for
    a text-only pair; a single image without a placeholder goes in front of the question (InternVL's MPO
    reader does the same). See `_RecordData` for the keys.
    """


class StepDataConfig(_RecordData):
    """Step-labelled solutions for the PRM, in any of three shapes per record (see `vlpipe.components.prm.data`):

    vlpipe's `{"id", "image", "question", "steps", "labels"}`, VisualPRM400K's raw records `{"image",
    "question", "answer", "response", "steps_with_score": [{"step", "score", "num_mc_correct",
    "num_mc_total"}]}` and VisualPRM400K's conversations (`+`/`-` assistant turns). Keys of `_RecordData`, plus:

    Attributes:
        augment: JPEG augmentation of the images (where a meta file's `data_augment` is on).
        mc_threshold: a raw record's step is `+` when its Monte Carlo score is above this, else `-`
            (VisualPRM's converter, `--mc-threshold`, default 0: a step is correct when any rollout from it
            reaches the right answer).
        early_stop: end a raw record's conversation at its first `-` step (the converter's `--early-stop`).
        style: the first human turn of a converted record: `vlpipe` (question + newline + step 1; what
            `vlpipe.serving.scoring` scores) or `visualprm` (`### Question:` / `### Solution Process:` headers,
            as VisualPRM's converter writes and VisualPRM400K's conversations hold). VisualPRM400K
            conversations are re-framed to `vlpipe`, and kept as they are with `visualprm`.
        system_prompt: a system turn for converted records (VisualPRM's converter writes its PRM system prompt
            there); VisualPRM400K conversations keep their own under `visualprm` and drop it under `vlpipe`.
    """

    augment: bool = False
    mc_threshold: float = Field(0.0, ge=0, le=1, allow_inf_nan=False)
    early_stop: bool = False
    style: Literal["vlpipe", "visualprm"] = "vlpipe"
    system_prompt: str | None = Field(None, min_length=1)


class _StageBase(_Strict):
    """Fields every stage has.

    Attributes:
        init: checkpoint to start from (local or s3://), HF format as written by vlpipe.
        output: where the final HF checkpoint goes (local or s3://).
        work_dir: local/shared directory for resumable checkpoints and the metrics log; defaults to
            `<output>.work` for a local output.
        chat_template: a Jinja chat template for the output checkpoint's tokenizer (what runtimes render
            prompts with); default: the starting checkpoint's (a published InternVL3 checkpoint's is kept).
    """

    init: str = Field(min_length=1)
    output: str = Field(min_length=1)
    work_dir: str | None = None
    chat_template: str | None = Field(None, min_length=1)
    trainer: TrainerConfig = TrainerConfig(max_steps=100)
    checkpoint: CheckpointConfig = CheckpointConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _work_dir_for_remote_output(self) -> Self:
        if self.work_dir is None and "://" in self.output:
            raise ValueError(
                f"work_dir is required when output is remote ({self.output}); point it at a local or "
                "shared-volume directory for resumable checkpoints"
            )
        return self

    @property
    def resolved_work_dir(self) -> str:
        return self.work_dir or f"{self.output.rstrip('/')}.work"


def _check_packing(packing: PackingConfig | None, trainer: TrainerConfig) -> None:
    if packing is not None and packing.rows_per_batch not in (1, trainer.micro_batch_size):
        raise ValueError(
            "packing.rows_per_batch is set by trainer.micro_batch_size in a training stage (a micro-batch is "
            "micro_batch_size packed rows); remove packing.rows_per_batch"
        )


class PretrainStageConfig(_StageBase):
    """Native multimodal pre-training: all of ViT, MLP and LLM on the mixed text + image-text stream."""

    stage: Literal["pretrain"] = "pretrain"
    data: DataConfig
    packing: PackingConfig | None = None
    loss: LMLossConfig = LMLossConfig()

    @model_validator(mode="after")
    def _pretrain_labels(self) -> Self:
        if self.data.mode != "pretrain":
            raise ValueError('pretrain: data.mode must be "pretrain" (loss on every text token)')
        _check_packing(self.packing, self.trainer)
        return self


class SFTStageConfig(_StageBase):
    """Supervised fine-tuning on chat data with packing, square averaging and JPEG augmentation."""

    stage: Literal["sft"] = "sft"
    data: DataConfig
    packing: PackingConfig | None = None
    loss: LMLossConfig = LMLossConfig()

    @model_validator(mode="after")
    def _sft_labels(self) -> Self:
        if self.data.mode != "sft":
            raise ValueError('sft: data.mode must be "sft" (loss on the assistant replies)')
        _check_packing(self.packing, self.trainer)
        return self


class MPOStageConfig(_StageBase):
    """Mixed preference optimisation against a frozen copy of the starting policy."""

    stage: Literal["mpo"] = "mpo"
    data: PairDataConfig
    mpo: MPOConfig = MPOConfig()


class PRMStageConfig(_StageBase):
    """Process reward model training: SFT on the `+`/`-` step-judgement conversations."""

    stage: Literal["prm"] = "prm"
    data: StepDataConfig
    packing: PackingConfig | None = None
    loss: LMLossConfig = LMLossConfig(reduction="token")

    @model_validator(mode="after")
    def _packing_rows(self) -> Self:
        _check_packing(self.packing, self.trainer)
        return self
