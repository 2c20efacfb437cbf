"""`PipelineConfig`: a recipe (`pipelines/recipes/*.yaml`), validated before anything is compiled or run.

A recipe names the model preset, where the data comes from, how the starting checkpoint is made, each
training stage's settings with its resources, the Best-of-N evaluation, the registry entry, MLflow tracking
and the cluster settings (GPU type, tolerations, secrets, the work volume). Every section is validated with
the class its step validates with again inside the container (`PretrainStageConfig`, ..., `EvalConfig`),
with placeholder paths for what the pipeline wires at run time; cross-stage rules follow:

- one preset everywhere: random init for `tiny`/`small`, composed from a pretrained InternViT and LLM for the
  real presets, or any preset from an existing checkpoint (`init.checkpoint`, its shapes checked by the init
  step); steps that receive a checkpoint check its preset at run time;
- pretrain, sft and mpo can be switched off (`null`), one of pretrain/sft stays;
- each stage's global batch divides into micro-batches over its GPUs; bf16 and NCCL need GPUs;
- evaluation and PRM agree: Best-of-N needs n ≥ 2, and the PRM was trained on sequences at least as long as
  the prompts the evaluation admits; a GPU device or half precision needs GPUs;
- a training step that retries needs the work volume (a retried pod resumes from the checkpoints there), and so
  does a stage on several nodes (`nodes > 1`: a TrainJob whose nodes share the work directory), whose global
  batch divides into nodes x GPUs x micro-batch;
- nothing in the recipe is a credential: secrets are referenced by Kubernetes secret name, plain environment
  variables must not look like credentials, and URLs must not carry user info;
- promotion gates name metrics the register step records (`eval.<metric>` version tags), each once;
- deployment validates its service with `vlpipe.serving.deploy.ServingDeployment`, needs S3 storage (a fixed
  `storage_uri` or the MLflow server's S3 artifact destination), the cluster's MLflow server (the registry the
  champion is found in) and the same S3 endpoint as the pipeline's steps; `deploy.serve` is checked against
  `ServingLimits`, and `deploy.runtime: huggingface-vllm` refuses a PRM, limits vLLM has no flag for, CPU serving
  and a local `init.checkpoint` whose V2PE δ is not 1 (the deploy step checks the registered checkpoint's δ).

Torch-free: `load_recipe` runs on any machine.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from vlpipe.components.data.config import (
    DataSettings,
    InitModelConfig,
    InitSettings,
    MixConfig,
    Mixture,
    PrepareDataConfig,
)
from vlpipe.components.deploy.config import DeployConfig, DeploySettings
from vlpipe.components.pipeline_run.config import TaskConfig, TrackingSettings
from vlpipe.components.promote.config import PromoteConfig
from vlpipe.components.register.config import RegisterConfig, RegisterSettings
from vlpipe.components.stages import STAGES as STAGE_TABLE
from vlpipe.components.stages import TRAINING_STAGES, owned_keys_in
from vlpipe.components.training.config import TrainJobSettings
from vlpipe.serving.promote import DEFAULT_EVAL_METRICS, PromotionConfig

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
STAGES = tuple(name for name in TRAINING_STAGES if (STAGE_TABLE[name].recipe_key or "").startswith("stages."))
"""The training stages every recipe configures under `stages` (the stage table's `stages.<name>` entries)."""
_CREDENTIAL_NAME = re.compile(
    r"SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|CREDENTIAL|PRIVATE|API_KEY", re.IGNORECASE
)
_USERINFO = re.compile(r"^[a-z][a-z0-9+.\-]*://[^/@]+@", re.IGNORECASE)
_K8S_NAME = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
_EXPONENT_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")
_RESERVED_ENV = ("MLFLOW_TRACKING_URI", "VLPIPE_GIT_COMMIT", "VLPIPE_MODEL_STORE")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Resources(_Strict):
    """What one step's pod asks for.

    Attributes:
        gpus: GPUs on the node (the training world size; 0 trains on the CPU in one process).
        cpu, memory: Kubernetes requests and limits (`"8"`, `"500m"`; `"64Gi"`).
        retries: Kubernetes-level retries of an infrastructure failure (training steps: needs
            `cluster.work_volume`, where a retried pod resumes).
    """

    gpus: int = Field(0, ge=0, le=16)
    cpu: str | None = Field(None, pattern=r"^\d+(\.\d+)?m?$")
    memory: str | None = Field(None, pattern=r"^\d+(\.\d+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$")
    retries: int = Field(0, ge=0, le=10)

    @property
    def world_size(self) -> int:
        return max(1, self.gpus)


class Toleration(_Strict):
    """A Kubernetes toleration added to GPU steps (e.g. of a tainted GPU node pool)."""

    key: str = Field(min_length=1)
    operator: Literal["Equal", "Exists"] = "Exists"
    value: str | None = None
    effect: Literal["NoExecute", "NoSchedule", "PreferNoSchedule"] | None = None

    @model_validator(mode="after")
    def _value_matches_operator(self) -> Self:
        if (self.operator == "Equal") != (self.value is not None):
            raise ValueError(f"toleration {self.key}: operator Equal needs a value, Exists takes none")
        return self


class SecretEnv(_Strict):
    """Environment variables read from a Kubernetes secret (credentials never appear in a recipe).

    Attributes:
        secret: the secret's name.
        env: environment variable → key in the secret.
    """

    secret: str = Field(pattern=_K8S_NAME, max_length=253)
    env: dict[str, str] = Field(min_length=1)

    @model_validator(mode="after")
    def _env_names(self) -> Self:
        bad = [name for name in self.env if not re.match(_ENV_NAME, name)]
        if bad:
            raise ValueError(f"secret {self.secret}: invalid environment variable names {bad}")
        return self


class WorkVolume(_Strict):
    """A PersistentVolumeClaim mounted on the training steps for their resumable work directories."""

    pvc: str = Field(pattern=_K8S_NAME, max_length=253)
    mount_path: str = Field("/mnt/vlpipe-work", pattern=r"^/")


def _check_url(name: str, value: str) -> None:
    if _USERINFO.match(value):
        raise ValueError(f"{name} carries user info (credentials) in the URL; put them in a cluster secret")


class ClusterConfig(_Strict):
    """Kubernetes settings compiled into the pipeline (none of them a credential).

    Attributes:
        pipeline_root: where Kubeflow stores artifacts (`s3://bucket/prefix`); default the deployment's.
        tracking_uri: the MLflow server's URL, set as `MLFLOW_TRACKING_URI` on every step.
        env: plain environment variables on every step (e.g. `AWS_ENDPOINT_URL`).
        secrets: Kubernetes secrets exposed as environment variables on every step (S3, MLflow credentials).
        accelerator_type: the GPU resource name.
        tolerations: tolerations of GPU steps.
        node_selector: node labels GPU steps require (e.g. a GPU product).
        work_volume: the PVC for the training steps' resumable work directories.
        service_account: the Kubernetes ServiceAccount the run's pods use (`vlpipe submit` passes it to
            Kubeflow); its RBAC must allow what the steps do (`infra/k8s/base/rbac.yaml`:
            `vlpipe-pipeline-runner` may manage InferenceServices and TrainJobs). Default: Kubeflow's.
        model_store: where steps publish their checkpoints (`s3://bucket/prefix`): each `Model` artifact
            then points at `<store>/<run>/<task>/<output>` instead of holding a copy
            (`vlpipe.components.pipeline_run.model_store`); set as `VLPIPE_MODEL_STORE` on every step.
        default_resources: resources of the steps without their own (data, mix, register).
    """

    pipeline_root: str | None = Field(None, pattern=r"^(s3|gs|minio)://.+")
    tracking_uri: str | None = Field(None, pattern=r"^https?://.+")
    env: dict[str, str] = Field(default_factory=dict)
    secrets: list[SecretEnv] = Field(default_factory=list)
    accelerator_type: str = Field("nvidia.com/gpu", min_length=1)
    tolerations: list[Toleration] = Field(default_factory=list)
    node_selector: dict[str, str] = Field(default_factory=dict)
    work_volume: WorkVolume | None = None
    model_store: str | None = Field(None, pattern=r"^(s3|gs)://[^/]+(/.*)?$")
    service_account: str | None = Field(None, pattern=_K8S_NAME, max_length=253)
    default_resources: Resources = Resources()

    @model_validator(mode="after")
    def _no_credentials(self) -> Self:
        for name, value in self.env.items():
            if not re.match(_ENV_NAME, name):
                raise ValueError(f"cluster.env: invalid environment variable name {name!r}")
            if _CREDENTIAL_NAME.search(name):
                raise ValueError(
                    f"cluster.env.{name} looks like a credential; compiled pipelines hold env values in "
                    "plain text. Put it in a Kubernetes secret and list it under cluster.secrets"
                )
            if name in _RESERVED_ENV:
                raise ValueError(
                    f"cluster.env.{name} is set by the pipeline; remove it (tracking_uri sets MLflow's)"
                )
            _check_url(f"cluster.env.{name}", value)
        if self.tracking_uri:
            _check_url("cluster.tracking_uri", self.tracking_uri)
        if self.pipeline_root:
            _check_url("cluster.pipeline_root", self.pipeline_root)
        if self.model_store:
            _check_url("cluster.model_store", self.model_store)
        names = [name for s in self.secrets for name in s.env]
        duplicates = sorted({n for n in names if names.count(n) > 1} | (set(names) & set(self.env)))
        if duplicates:
            raise ValueError(f"cluster: environment variables set twice: {duplicates}")
        return self


class StageTask(_Strict):
    """A training stage in a recipe.

    Attributes:
        resources: the step's pod; with `nodes > 1`, each node's (GPUs, CPU, memory per node).
        nodes: training nodes. More than one: the step runs the stage as a Kubeflow Trainer TrainJob across
            them (`vlpipe.components.training.trainjob`; needs `cluster.work_volume`, a ReadWriteMany PVC every
            node mounts). The global batch divides into nodes x GPUs x micro-batch.
        trainjob: the TrainJob's runtime, extra environment (NCCL) and deadline (`TrainJobSettings`).
        shm_size: size limit of the memory-backed `/dev/shm` of the step (and of every node); None: up to the
            pod's memory limit.
        config: the stage's settings: a stage config (see `vlpipe.components.training.config`) without the keys the
            pipeline sets (the stage table's `owned`: paths, `data.meta`/`data.path`, tracking names and parent
            run).
    """

    resources: Resources = Resources()
    nodes: int = Field(1, ge=1, le=1024)
    trainjob: TrainJobSettings = TrainJobSettings()
    shm_size: str | None = Field(None, pattern=r"^\d+(\.\d+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$")
    config: dict[str, Any] = Field(default_factory=dict)


class EvalTask(_Strict):
    """The evaluation step: its pod and an `EvalConfig` without policy, prm and output_dir."""

    resources: Resources = Resources()
    config: dict[str, Any] = Field(default_factory=dict)


class PRMDataTask(_Strict):
    """On-policy PRM data (`sample-prm-data`): the policy's own solutions, every step labelled; the `prm`
    stage trains on them instead of the prepared `prm/train.jsonl`.

    Attributes:
        resources: the step's pod (it generates: a GPU on a cluster).
        config: a `vlpipe.components.prm_data.stage.PRMSampleConfig` without `policy` and `output` (the pipeline sets
            them: the MPO policy the evaluation judges); relative paths are read from the data root.
    """

    resources: Resources = Resources()
    config: dict[str, Any] = Field(default_factory=dict)


Stages = create_model(
    "Stages",
    __base__=_Strict,
    __doc__="The recipe's `stages` section: one `StageTask` per training stage of the stage table.",
    **{name: (StageTask | None, ...) for name in STAGES},
)
OPTIONAL_STAGES = ("pretrain", "sft", "mpo")
"""The stages a recipe can switch off (`stages.<name>: null`); the PRM judges the evaluation, so it stays."""


def _stage_key(stage: str) -> str:
    """Where a training stage's settings are in a recipe (the stage table's `recipe_key`)."""
    return str(STAGE_TABLE[stage].recipe_key)


def _prefix(where: str, exc: Exception) -> ValueError:
    """A `ValueError` naming `where` and each problem's key (without pydantic's union tags and prefixes)."""
    if not isinstance(exc, ValidationError):
        return ValueError(f"{where}: {exc}")
    problems = []
    for error in exc.errors(include_url=False):
        loc = [str(part) for part in error["loc"]]
        if loc and loc[0] in STAGES:  # the discriminated union's tag, not a key
            loc = loc[1:]
        message = error["msg"].removeprefix("Value error, ")
        problems.append(f"{'.'.join(loc)}: {message}" if loc else message)
    return ValueError(f"{where}: {'; '.join(problems)}")


class PipelineConfig(_Strict):
    """A validated recipe (see the module docstring for the cross-stage rules).

    Attributes:
        name: the recipe's name (tag `recipe` on every MLflow run).
        description: one line on what the recipe is for.
        preset: the model preset (`tiny`, `small`, `1b`, `2b`, `8b`).
        data, init: the data and init steps' settings.
        stages: pretrain, sft, mpo and prm; `null` switches pretrain, sft or mpo off (e.g. no pre-training when
            `init.checkpoint` starts from an InternVL3 checkpoint): the next stage starts from the previous one's
            checkpoint.
        critic: more SFT from the SFT checkpoint as the PRM's base (SFT stage settings; absent: the PRM starts
            from the SFT checkpoint). InternVL3 judges every model size with VisualPRM-8B, a critic stronger
            than the smaller policies.
        prm_data: on-policy PRM data sampled from the MPO policy (absent: the PRM trains on the prepared
            step-labelled file).
        eval: the Best-of-N evaluation (policy: the MPO model; judge: the PRM).
        registry: the registry entry of the final policy.
        promotion: the gates the registered version must pass to become `champion` (`vlpipe.serving.promote`).
        deploy: whether and how the champion is served with KServe after a promotion.
        tracking: MLflow settings shared by every step.
        cluster: Kubernetes settings.
    """

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9\-]*$", max_length=63)
    description: str = ""
    preset: str
    data: DataSettings
    init: InitSettings = InitSettings()
    stages: Stages
    critic: StageTask | None = None
    prm_data: PRMDataTask | None = None
    eval: EvalTask
    registry: RegisterSettings
    promotion: PromotionConfig = PromotionConfig()
    deploy: DeploySettings = DeploySettings()
    tracking: TrackingSettings
    cluster: ClusterConfig = ClusterConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> Self:
        self._check_preset()
        self._check_switched_off()
        for stage in self.trained_stages:
            self._check_stage(stage)
        self._check_prm_data()
        self._check_eval()
        self._check_promotion()
        self._check_deploy()
        return self

    def _check_preset(self) -> None:
        from vlpipe.model.presets import get_preset

        try:
            preset = get_preset(self.preset)
        except ValueError as exc:
            raise ValueError(f"preset: {exc}") from exc
        if self.init.from_checkpoint:
            return  # the init step checks the checkpoint's shapes against the preset
        fixed_vocabulary = preset.text.vocab_size is not None
        if fixed_vocabulary and not self.init.composed:
            raise ValueError(
                f"preset {self.preset} starts from pretrained parts: set init.vision and init.llm "
                "(InternViT and Qwen2.5 HF directories)"
            )
        if not fixed_vocabulary and self.init.composed:
            raise ValueError(f"preset {self.preset} is initialised randomly; remove init.vision and init.llm")

    def _check_switched_off(self) -> None:
        off = [name for name in STAGES if getattr(self.stages, name) is None]
        fixed = [name for name in off if name not in OPTIONAL_STAGES]
        if fixed:
            raise ValueError(
                f"stages.{fixed[0]} cannot be switched off (only {', '.join(OPTIONAL_STAGES)} can): the PRM "
                "judges the evaluation"
            )
        if "pretrain" in off and "sft" in off:
            raise ValueError(
                "stages.pretrain and stages.sft are both switched off: keep one (the mix step and the register "
                "step's data lineage need a mixture)"
            )
        if off and self.critic is not None and "sft" in off:
            raise ValueError("critic is more SFT from the SFT checkpoint: remove it or keep stages.sft")

    def _check_stage(self, stage: str) -> None:
        step = self.stage_step(stage)
        owned = owned_keys_in(step.config, STAGE_TABLE[stage].owned)
        where = _stage_key(stage)
        if owned:
            raise ValueError(f"{where}.config sets {owned}; the pipeline sets them")
        cfg = self.stage_config(stage)
        world = step.nodes * step.resources.world_size
        try:
            cfg.trainer.accumulation_steps(world)
        except ValueError as exc:
            nodes = f"{step.nodes} nodes x {step.resources.world_size} GPUs: " if step.nodes > 1 else ""
            raise _prefix(where, ValueError(f"{nodes}{exc}")) from exc
        self._check_nodes(stage, step)
        if step.resources.gpus == 0:
            if cfg.trainer.precision == "bf16":
                raise ValueError(f"{where}: trainer.precision bf16 needs GPUs (resources.gpus > 0)")
            if cfg.trainer.distributed.backend == "nccl":
                raise ValueError(f"{where}: distributed.backend nccl needs GPUs (resources.gpus > 0)")
        if step.resources.retries and self.cluster.work_volume is None:
            raise ValueError(
                f"{where}.resources.retries needs cluster.work_volume: without it a retried pod "
                "starts from step 0"
            )

    def _check_nodes(self, stage: str, step: StageTask) -> None:
        """A multi-node stage's shared work location and its TrainJob's environment."""
        where = _stage_key(stage)
        if step.nodes > 1 and self.cluster.work_volume is None:
            raise ValueError(
                f"{where}.nodes = {step.nodes} needs cluster.work_volume: a ReadWriteMany PVC every node mounts "
                "(the stage config, resumable checkpoints, final model and summary are shared there)"
            )
        for name, value in step.trainjob.env.items():
            if _CREDENTIAL_NAME.search(name):
                raise ValueError(
                    f"{where}.trainjob.env.{name} looks like a credential; TrainJobs and compiled pipelines hold "
                    "env values in plain text. Put it in a Kubernetes secret and list it under cluster.secrets"
                )
            if name in _RESERVED_ENV:
                raise ValueError(f"{where}.trainjob.env.{name} is set by the pipeline; remove it")
            _check_url(f"{where}.trainjob.env.{name}", value)

    def _check_prm_data(self) -> None:
        if self.prm_data is None:
            return
        owned = owned_keys_in(self.prm_data.config, STAGE_TABLE["prm-data"].owned)
        if owned:
            raise ValueError(f"prm_data.config sets {owned}; the pipeline sets them")
        cfg = self.prm_data_config()
        prm_length = self.stage_config("prm").data.max_length
        if cfg.max_new_tokens >= prm_length:
            raise ValueError(
                f"prm_data.config.max_new_tokens ({cfg.max_new_tokens}) leaves no room for the prompt in the "
                f"PRM's training length (stages.prm.config.data.max_length = {prm_length})"
            )
        if self.data.source == "demo" and cfg.labeler == "reference_steps":
            raise ValueError(
                "prm_data.config.labeler reference_steps compares exact text; the demo's listings come in any "
                "order: use demo_local (or demo_reference)"
            )

    def _check_eval(self) -> None:
        owned = owned_keys_in(self.eval.config, STAGE_TABLE["eval"].owned)
        if owned:
            raise ValueError(f"eval.config sets {owned}; the pipeline sets them")
        cfg = self.eval_config()
        if cfg.n < 2:
            raise ValueError("eval.config.n must be at least 2: Best-of-N picks among N sampled answers")
        prm_length = self.stage_config("prm").data.max_length
        if cfg.max_length > prm_length:
            raise ValueError(
                f"eval.config.max_length ({cfg.max_length}) exceeds the PRM's training length "
                f"(stages.prm.config.data.max_length = {prm_length}); the PRM would score longer sequences "
                "than it was trained on"
            )
        gpus = self.eval.resources.gpus
        if gpus == 0 and (cfg.device == "cuda" or cfg.dtype != "float32"):
            raise ValueError(
                "eval: device cuda and half-precision dtypes need GPUs (eval.resources.gpus > 0)"
            )
        if self.data.source == "demo" and any(b.format != "demo" for b in cfg.benchmarks):
            raise ValueError("eval: the demo data only has demo-format benchmarks")

    def _check_promotion(self) -> None:
        metrics = [gate.metric for gate in self.promotion.gates]
        unknown = [m for m in metrics if m not in DEFAULT_EVAL_METRICS]
        if unknown:
            raise ValueError(
                f"promotion.gates: unknown metrics {unknown}; the register step records "
                f"{', '.join(DEFAULT_EVAL_METRICS)}"
            )
        twice = sorted({m for m in metrics if metrics.count(m) > 1})
        if twice:
            raise ValueError(f"promotion.gates: one gate per metric, {twice} appear more than once")
        for gate in self.promotion.gates:
            if gate.minimum is not None and not 0 <= gate.minimum <= 1:
                raise ValueError(f"promotion.gates.{gate.metric}.minimum must be an accuracy within 0..1")
            if gate.tolerance > 1:
                raise ValueError(f"promotion.gates.{gate.metric}.tolerance must be within 0..1")

    def _check_deploy(self) -> None:
        deploy = self.deploy
        if not deploy.enabled and not deploy.service:
            return
        try:
            service = self.deploy_config().deploy.serving_deployment()
        except ValidationError as exc:
            raise _prefix("deploy.service", exc) from exc
        if "canary_traffic_percent" in deploy.service:
            raise ValueError(
                "deploy.service sets canary_traffic_percent; the rollout sets it (use deploy.canary.steps)"
            )
        if service.mlflow_tracking_uri:
            _check_url("deploy.service.mlflow_tracking_uri", service.mlflow_tracking_uri)
        self._check_deploy_runtime()
        if not deploy.enabled:
            return
        if "storage_uri" not in deploy.service and deploy.artifacts_destination is None:
            raise ValueError(
                "deploy needs S3 storage: set deploy.service.storage_uri (an s3:// checkpoint) or "
                "deploy.artifacts_destination (the MLflow server's S3 artifact destination, where the "
                "registered version's files are)"
            )
        if not self.cluster.tracking_uri:
            raise ValueError(
                "deploy.enabled needs cluster.tracking_uri: the promote and deploy steps find the champion "
                "in the cluster's MLflow registry"
            )
        pipeline_s3 = self.cluster.env.get("AWS_ENDPOINT_URL")
        if pipeline_s3 and pipeline_s3.rstrip("/") != service.s3.endpoint_url:
            raise ValueError(
                f"deploy.service.s3 points at {service.s3.endpoint_url} but the pipeline's steps use "
                f"cluster.env.AWS_ENDPOINT_URL = {pipeline_s3}: the predictor must read the S3 the pipeline "
                "writes (set deploy.service.s3.endpoint and use_https)"
            )

    def _check_deploy_runtime(self) -> None:
        """`huggingface-vllm` serves only V2PE δ = 1: a random or composed init writes δ = 1 and no stage
        changes it, so only a local `init.checkpoint` can say otherwise now (a remote one is read by the deploy
        step, which checks the registered checkpoint itself)."""
        from vlpipe.serving.deploy import V2PE_CONFIG_KEY, VLLM_RUNTIME

        checkpoint = self.init.checkpoint
        if self.deploy.runtime != VLLM_RUNTIME or checkpoint is None or "://" in checkpoint:
            return
        config_path = Path(checkpoint) / "config.json"
        if not config_path.is_file():
            return  # the init step reports a missing checkpoint
        try:
            delta = json.loads(config_path.read_text()).get(V2PE_CONFIG_KEY, 1.0)
        except (ValueError, AttributeError):
            return  # the init step reports an unreadable checkpoint
        if delta != 1:
            raise ValueError(
                f"deploy.runtime: {VLLM_RUNTIME} serves only checkpoints with V2PE δ = 1, but init.checkpoint "
                f"({checkpoint}) has {V2PE_CONFIG_KEY}={delta!r}; set deploy.runtime: vlpipe (its predictor "
                "applies the checkpoint's δ)"
            )

    # -- what each step receives ---------------------------------------------------------------------------
    @property
    def trained_stages(self) -> tuple[str, ...]:
        """The training stages the recipe runs: those under `stages` it does not switch off (`null`), then the
        optional ones it sets (critic)."""
        optional = (name for name in TRAINING_STAGES if name not in STAGES)
        under_stages = (name for name in STAGES if getattr(self.stages, name) is not None)
        return (*under_stages, *(name for name in optional if getattr(self, name, None) is not None))

    def stage_step(self, stage: str) -> StageTask:
        """A training stage's recipe entry (at the stage table's `recipe_key`: `stages.<name>` or top level)."""
        node: Any = self
        for part in _stage_key(stage).split("."):
            node = getattr(node, part)
        if node is None:
            raise ValueError(f"the recipe has no {_stage_key(stage)} section")
        return node

    def stage_settings(self, stage: str) -> dict[str, Any]:
        """The JSON-ready settings the stage's component receives: the recipe's plus tracking."""
        step = self.stage_step(stage)
        settings = json.loads(json.dumps(step.config))
        tracking = settings.get("tracking", {})
        settings["tracking"] = {
            "log_model": self.tracking.log_stage_models,
            "system_metrics": self.tracking.system_metrics,
            **tracking,
            "experiment": self.tracking.experiment,
            "recipe": self.name,
            "tags": {**self.tracking.tags, **tracking.get("tags", {})},
        }
        return settings

    def stage_config(self, stage: str) -> Any:
        """The stage's config with placeholder paths (what validation checks)."""
        from vlpipe.components.training.task import PLACEHOLDERS, wire_stage_config

        try:
            return wire_stage_config(
                stage,
                self.stage_settings(stage),
                init=PLACEHOLDERS["init"],
                output=PLACEHOLDERS["output"],
                work_dir=PLACEHOLDERS["work_dir"],
                data_file=PLACEHOLDERS["data"],
                parent_run_id=None,
            )
        except (ValidationError, ValueError) as exc:
            raise _prefix(f"{_stage_key(stage)}.config", exc) from exc

    def trainjob_launch(self, stage: str, commit: str = "") -> Any:
        """What the stage's step needs to create its TrainJob (`TrainJobLaunch`): the stage's nodes and per-node
        resources, the release image, the runtime, the environment every step gets plus the stage's, the
        secrets as references, the work volume, `/dev/shm`, GPU placement and the deadline.

        Raises:
            ValueError: the recipe has no work volume (a TrainJob's nodes share the work directory there).
        """
        from vlpipe.components.release import IMAGE
        from vlpipe.components.training.trainjob import SecretRef, TrainJobLaunch

        step, cluster = self.stage_step(stage), self.cluster
        if cluster.work_volume is None:
            raise ValueError(
                f"{_stage_key(stage)}: a TrainJob needs cluster.work_volume (shared by its nodes)"
            )
        env = dict(cluster.env)
        if cluster.tracking_uri:
            env["MLFLOW_TRACKING_URI"] = cluster.tracking_uri
        if cluster.model_store:
            env["VLPIPE_MODEL_STORE"] = cluster.model_store
        if commit:
            env["VLPIPE_GIT_COMMIT"] = commit
        env.update(step.trainjob.env)
        gpus = step.resources.gpus
        return TrainJobLaunch(
            nodes=step.nodes,
            gpus=gpus,
            cpu=step.resources.cpu,
            memory=step.resources.memory,
            accelerator_type=cluster.accelerator_type,
            shm_size=step.shm_size,
            image=IMAGE,
            runtime=step.trainjob.runtime,
            env=env,
            secrets=[
                SecretRef(env=name, secret=secret.secret, key=key)
                for secret in cluster.secrets
                for name, key in secret.env.items()
            ],
            work_volume=cluster.work_volume.model_dump(),
            node_selector=cluster.node_selector if gpus else {},
            tolerations=[t.model_dump() for t in cluster.tolerations] if gpus else [],
            service_account=cluster.service_account,
            deadline_seconds=step.trainjob.deadline_seconds,
            poll_seconds=step.trainjob.poll_seconds,
        )

    def prm_data_settings(self) -> tuple[dict[str, Any], TaskConfig]:
        """What the `sample-prm-data` component receives: the sampling settings and the tracking settings."""
        if self.prm_data is None:
            raise ValueError("the recipe has no prm_data section")
        return json.loads(json.dumps(self.prm_data.config)), TaskConfig(
            recipe=self.name, tracking=self.tracking
        )

    def prm_data_config(self) -> Any:
        """The `PRMSampleConfig` with placeholder paths (what validation checks)."""
        from vlpipe.components.prm_data.task import PLACEHOLDERS, wire_prm_data_config

        try:
            return wire_prm_data_config(
                self.prm_data_settings()[0],
                policy=PLACEHOLDERS["policy"],
                output=PLACEHOLDERS["output"],
                data_root="/pipeline/data",
            )
        except (ValidationError, ValueError) as exc:
            raise _prefix("prm_data.config", exc) from exc

    def eval_settings(self) -> dict[str, Any]:
        """The JSON-ready settings the evaluation component receives."""
        settings = json.loads(json.dumps(self.eval.config))
        mlflow = settings.get("mlflow", {})
        settings["mlflow"] = {
            **mlflow,
            "experiment": self.tracking.experiment,
            "tags": {"stage": "eval", "recipe": self.name, **self.tracking.tags, **mlflow.get("tags", {})},
        }
        return settings

    def eval_config(self) -> Any:
        """The `EvalConfig` with placeholder paths (what validation checks)."""
        from vlpipe.components.evaluate.task import PLACEHOLDERS, wire_eval_config

        try:
            return wire_eval_config(
                self.eval_settings(),
                policy=PLACEHOLDERS["policy"],
                prm=PLACEHOLDERS["prm"],
                output_dir=PLACEHOLDERS["output_dir"],
                data_root="/pipeline/data",
                parent_run_id=None,
            )
        except (ValidationError, ValueError) as exc:
            raise _prefix("eval.config", exc) from exc

    def prepare_data_config(self) -> PrepareDataConfig:
        return PrepareDataConfig(recipe=self.name, tracking=self.tracking, data=self.data)

    def init_model_config(self) -> InitModelConfig:
        return InitModelConfig(recipe=self.name, tracking=self.tracking, preset=self.preset, init=self.init)

    def mix_config(self, stages: tuple[str, ...] = ("pretrain", "sft")) -> MixConfig:
        """The mix step's settings for the mixtures of `stages`."""
        mixtures = []
        for stage in stages:
            settings = self.stage_settings(stage)
            mixtures.append(
                Mixture(stage=stage, data=settings.get("data", {}), packing=settings.get("packing"))
            )
        return MixConfig(recipe=self.name, tracking=self.tracking, data=self.data, mixtures=mixtures)

    def register_config(self) -> RegisterConfig:
        return RegisterConfig(
            recipe=self.name, tracking=self.tracking, preset=self.preset, registry=self.registry
        )

    def promote_config(self) -> PromoteConfig:
        return PromoteConfig(recipe=self.name, tracking=self.tracking, promotion=self.promotion)

    def deploy_config(self) -> DeployConfig:
        """The deploy step's settings: the recipe's, plus the serving image of this release and, for a PRM
        read from MLflow, the cluster's MLflow server."""
        from vlpipe.components.release import VERSION
        from vlpipe.serving.deploy import serving_image

        service = {"image": serving_image(VERSION), **self.deploy.service}
        prm_uri = str(service.get("prm_uri") or "")
        if prm_uri.startswith(("models:/", "runs:/")) and self.cluster.tracking_uri:
            service.setdefault("mlflow_tracking_uri", self.cluster.tracking_uri)
        deploy = self.deploy.model_copy(update={"service": service})
        return DeployConfig(recipe=self.name, tracking=self.tracking, deploy=deploy)


def recipe_path(name_or_path: str | Path, relative_to: Path | None = None) -> Path:
    """A shipped recipe's file (`tiny` → `pipelines/recipes/tiny.yaml`) or the given file (a relative path is
    read from `relative_to`, the directory of the recipe that names it as its `base`, when it exists there).

    Raises:
        FileNotFoundError: naming the shipped recipes.
    """
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        for candidate in ([relative_to / path] if relative_to and not path.is_absolute() else []) + [path]:
            if candidate.exists():
                return candidate
    shipped = RECIPES_DIR / f"{name_or_path}.yaml"
    if shipped.exists():
        return shipped
    raise FileNotFoundError(f"no recipe {str(name_or_path)!r}; shipped recipes: {', '.join(list_recipes())}")


def list_recipes() -> list[str]:
    """Names of the shipped recipes."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` on top of `base`: mappings merge key by key, anything else (lists included) is replaced."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_recipe(name_or_path: str | Path, *, _relative_to: Path | None = None, _seen: tuple = ()) -> dict:
    """A recipe's settings as a mapping, its `base` chain resolved (each file on top of its base, deep-merged).

    Raises:
        FileNotFoundError: a recipe or base that does not exist.
        ValueError: a file that is not a mapping, an invalid `base`, or a cycle of bases (naming the files).
    """
    path = recipe_path(name_or_path, _relative_to).resolve()
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise ValueError(f"recipe bases form a cycle: {chain}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a recipe must be a mapping of settings")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ValueError(f"{path}: base must name a recipe (a shipped name or a YAML file), got {base!r}")
    try:
        parent = read_recipe(base, _relative_to=path.parent, _seen=(*_seen, path))
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{path}: base: {exc}") from exc
    return deep_merge(parent, data)


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`KEY=VALUE` overrides (`stages.sft.config.trainer.optimizer.lr=1e-5`) set into a recipe's settings.

    The value is read as YAML (`1e-5` is a number, `[a, b]` a list, `{...}` a mapping that replaces the key's);
    missing mappings on the way are created. Unknown keys fail when the recipe is validated, naming the key.

    Raises:
        ValueError: an override that is not `KEY=VALUE`, or one that goes through a value that is not a mapping.
    """
    result = json.loads(json.dumps(data))
    for override in overrides:
        key, sep, raw = override.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ValueError(
                f"--set {override!r}: expected KEY=VALUE with a dotted KEY (stages.sft.config.x=1)"
            )
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ValueError(f"--set {override!r}: the value is not valid YAML: {exc}") from exc
        if isinstance(value, str) and _EXPONENT_NUMBER.match(value):  # YAML 1.1 reads 1e-5 as a string
            value = float(value)
        node = result
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise ValueError(f"--set {override!r}: {where} is {child!r}, not a mapping of settings")
            node = child
        node[parts[-1]] = value
    return result


def load_recipe(name_or_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Read a recipe (its `base` chain merged), apply `--set` overrides, and validate it.

    Raises:
        FileNotFoundError: no such recipe (or base).
        ValueError: the file is not a mapping, a bad base or override, or any setting is invalid (the message
            names the file and the key).
    """
    path = recipe_path(name_or_path)
    data = apply_overrides(read_recipe(name_or_path), overrides)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        where = f"{path} with --set {', '.join(overrides)}" if overrides else str(path)
        raise _prefix(where, exc) from exc
