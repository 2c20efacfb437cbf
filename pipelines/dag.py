"""The Kubeflow pipelines of a recipe: the full InternVL3 recipe and three sub-pipelines.

```
internvl3-recipe  start-pipeline-run → prepare-data → init-model → mix-data → pretrain → sft
                  (init-model: random, composed from ViT + LLM, or an existing checkpoint (`init.checkpoint`);
                  pretrain, sft or mpo switched off (`null`): the next stage starts from the one before)
                  sft → mpo, sft → prm;  mpo + prm → evaluate → register-model (+ mpo, prm, mix-data)
                  (a benchmark with `shards: K`: evaluate = ParallelFor(evaluate-shard × K) → merge-evaluation)
                  with `prm_data`: mpo → sample-prm-data → prm (the PRM learns the policy's own mistakes;
                  `shards: K`: ParallelFor(sample-prm-data-shard × K) → merge-prm-data)
                  with `critic`: sft → critic → prm (the PRM starts from a stronger model than the policy)
                  register-model → promote-model → [if promoted] deploy-model
sft-mpo           start-pipeline-run → prepare-data → importer(checkpoint_uri) → mix-data → sft → mpo
evaluate          start-pipeline-run → prepare-data → importer(policy_uri), importer(prm_uri) → evaluate
promote-deploy    start-pipeline-run → promote-model(model_name, model_version) → [if promoted] deploy-model
```

Every pipeline runs its body inside an exit handler whose `finish-pipeline-run` task closes the MLflow
parent run with the final state. The recipe is compiled in: each step receives its settings as a JSON
constant and gets the recipe's resources (GPUs via `set_accelerator_type`/`set_accelerator_limit`, CPU and
memory), GPU tolerations and node selector, Kubernetes secrets as environment variables, the work volume
(training steps), `MLFLOW_TRACKING_URI` and the source commit (`VLPIPE_GIT_COMMIT`). Caching is off: every
step records MLflow runs, and a cached parent run id would be another pipeline run's.

The PRM starts from the SFT checkpoint (VisualPRM is trained from an instruction-tuned model) and trains in
parallel with MPO on the prepared step-labelled file, or, when the recipe has a `prm_data` section, after MPO on
solutions sampled from the MPO policy and labelled step by step (`sample-prm-data`). `promote-model` gates the registered version (`models:/<name>/<version>`, the register
step's output) against the champion with the recipe's `promotion.gates`; its output (`promoted`, `rejected`,
`already_champion`) is the condition of `deploy-model`, which exists only in recipes with `deploy.enabled`
(it needs a cluster with KServe) and is bounded in time by its canary's step timeouts.

Training steps get a memory-backed `/dev/shm` (NCCL and DataLoader workers outgrow the 64 MiB default). A stage
with `nodes > 1` trains as a Kubeflow Trainer TrainJob: its step receives the TrainJob's settings (`launch`),
its pod's name, uid and namespace through the downward API (the TrainJob's owner), and asks for no GPUs itself
(it creates the TrainJob and waits; `vlpipe.components.training.trainjob`).

Each task's component comes from the stage table (`vlpipe.components.stages.STAGES`); the edges are here.
"""

# No `from __future__ import annotations` here: kfp reads the pipeline parameters' annotations as types.
import inspect
import json
from collections.abc import Callable
from typing import Any

from kfp import dsl, kubernetes

from vlpipe.components.pipeline_run.component import finish_pipeline_run, start_pipeline_run
from vlpipe.components.stages import STAGES
from vlpipe.components.training.trainjob import POD_ENV
from vlpipe.pipelines.config import PipelineConfig, Resources
from vlpipe.pipelines.parameters import recipe_parameters

RECIPE_PIPELINE = "internvl3-recipe"
SFT_MPO_PIPELINE = "sft-mpo"
EVALUATE_PIPELINE = "evaluate"
PROMOTE_DEPLOY_PIPELINE = "promote-deploy"
PIPELINES = (RECIPE_PIPELINE, SFT_MPO_PIPELINE, EVALUATE_PIPELINE, PROMOTE_DEPLOY_PIPELINE)
PROMOTED = "promoted"
"""The promote step's output that lets the deploy step run."""
DEPLOY_TIMEOUT_MARGIN_S = 600
"""Beyond the canary's step timeouts: registry calls, the first patch, the report."""
JOB_ID = dsl.PIPELINE_JOB_ID_PLACEHOLDER
JOB_NAME = dsl.PIPELINE_JOB_NAME_PLACEHOLDER


def _json(value: Any) -> str:
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json")
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


class _Builder:
    """Adds the recipe's steps, with their Kubernetes settings, to the pipeline being defined."""

    def __init__(self, recipe: PipelineConfig, commit: str) -> None:
        self.recipe = recipe
        self.commit = commit
        self.started: Any = None  # the pipeline's start-pipeline-run task (cacheable tasks run after it)
        self.inputs: dict[tuple[str, str], Any] = {}  # (stage, task input) → the pipeline parameter's channel

    def parameter_inputs(self, stage: str) -> dict[str, Any]:
        """The task inputs of `stage` that the pipeline's parameters feed."""
        return {name: channel for (task, name), channel in self.inputs.items() if task == stage}

    # -- Kubernetes settings --------------------------------------------------------------------------------
    def configure(
        self, task: Any, resources: Resources | None = None, *, work_volume: bool = False, cache: bool = False
    ) -> Any:
        """Caching, environment, secrets, resources, GPU scheduling, retries and the work volume.

        A cacheable task (`cache=True`: its outputs depend only on its inputs) runs after the start task, which
        opens the MLflow parent run it finds through its output URI; the tasks with side effects (the parent
        run, register, promote, deploy) always run.
        """
        cluster = self.recipe.cluster
        resources = resources or cluster.default_resources
        task.set_caching_options(cache)
        if cache:
            task.after(self.started)
        task.set_env_variable("VLPIPE_GIT_COMMIT", self.commit)
        if cluster.tracking_uri:
            task.set_env_variable("MLFLOW_TRACKING_URI", cluster.tracking_uri)
        if cluster.model_store:
            task.set_env_variable("VLPIPE_MODEL_STORE", cluster.model_store)
        for name, value in sorted(cluster.env.items()):
            task.set_env_variable(name, value)
        for secret in cluster.secrets:
            kubernetes.use_secret_as_env(
                task,
                secret_name=secret.secret,
                secret_key_to_env={key: env for env, key in secret.env.items()},
            )
        if resources.cpu:
            task.set_cpu_request(resources.cpu).set_cpu_limit(resources.cpu)
        if resources.memory:
            task.set_memory_request(resources.memory).set_memory_limit(resources.memory)
        if resources.gpus:
            task.set_accelerator_type(cluster.accelerator_type).set_accelerator_limit(resources.gpus)
            for toleration in cluster.tolerations:
                kubernetes.add_toleration(task, **toleration.model_dump())
            for key, value in sorted(cluster.node_selector.items()):
                kubernetes.add_node_selector(task, label_key=key, label_value=value)
        if resources.retries:
            task.set_retry(num_retries=resources.retries, backoff_duration="60s", backoff_factor=2.0)
        if work_volume and cluster.work_volume is not None:
            kubernetes.mount_pvc(
                task, pvc_name=cluster.work_volume.pvc, mount_path=cluster.work_volume.mount_path
            )
        return task

    @property
    def work_root(self) -> str:
        volume = self.recipe.cluster.work_volume
        return volume.mount_path if volume is not None else ""

    # -- steps ----------------------------------------------------------------------------------------------
    def finish(self, parent_run_id: Any) -> Any:
        return self.configure(finish_pipeline_run(parent_run_id=parent_run_id, job_id=JOB_ID))

    def start(self, pipeline: str, parent_run_id: Any, version: Any) -> Any:
        task = start_pipeline_run(
            tracking=_json(self.recipe.tracking),
            pipeline=pipeline,
            pipeline_version=version,
            recipe=self.recipe.name,
            parent_run_id=parent_run_id,
            job_id=JOB_ID,
            job_name=JOB_NAME,
            **self.parameter_inputs("start"),
        )
        self.started = self.configure(task)
        return self.started

    def prepare_data(self) -> Any:
        task = STAGES["data"].load_component()(
            config=_json(self.recipe.prepare_data_config()), **self.parameter_inputs("data")
        )
        return self.configure(task, cache=True)

    def init_model(self, data: Any) -> Any:
        task = STAGES["init"].load_component()(config=_json(self.recipe.init_model_config()), data=data)
        return self.configure(task, cache=True)

    def mix(self, data: Any, model: Any, stages: tuple[str, ...]) -> Any:
        config = _json(self.recipe.mix_config(stages))
        mix_data = STAGES["mix"].load_component()
        return self.configure(mix_data(config=config, data=data, model=model), cache=True)

    def stage(self, stage: str, *, init: Any, data: Any, mixture: Any = None, steps: Any = None) -> Any:
        step = self.recipe.stage_step(stage)
        accepted = STAGES[stage].inputs
        inputs = {"mixture": mixture} if "mixture" in accepted else {}
        if steps is not None and "steps" in accepted:
            inputs["steps"] = steps
        resources = step.resources
        if step.nodes > 1:  # the TrainJob's nodes train; this step's pod creates it and waits
            inputs["launch"] = _json(self.recipe.trainjob_launch(stage, self.commit))
            default = self.recipe.cluster.default_resources
            resources = default.model_copy(update={"gpus": 0, "retries": step.resources.retries})
        task = STAGES[stage].load_component()(
            config=_json(self.recipe.stage_settings(stage)),
            preset=self.recipe.preset,
            work_root=self.work_root,
            world_size=step.resources.world_size,
            init_model=init,
            data=data,
            **inputs,
            **self.parameter_inputs(stage),
        )
        kubernetes.empty_dir_mount(
            task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=step.shm_size
        )
        if step.nodes > 1:
            for field, env in POD_ENV.items():
                kubernetes.use_field_path_as_env(task, env_name=env, field_path=f"metadata.{field}")
        return self.configure(task, resources, work_volume=True, cache=True)

    def prm_data(self, *, policy: Any, data: Any) -> Any:
        """On-policy PRM data: one `sample-prm-data` task, or, with `prm_data.config.shards` K > 1, K
        `sample-prm-data-shard` tasks (`dsl.ParallelFor`, each in its own pod) and `merge-prm-data` over their
        parts. Either task's outputs are `steps` and `metrics`."""
        settings, step = self.recipe.prm_data_settings()
        shards = self.recipe.prm_data_config().shards
        resources = self.recipe.prm_data.resources
        if shards == 1:
            task = STAGES["prm-data"].load_component()(
                config=_json(settings),
                step=_json(step),
                preset=self.recipe.preset,
                policy=policy,
                data=data,
            )
            return self.configure(task, resources, cache=True)
        # Loop items and constants only, as in `evaluate` (kfp.local's ParallelFor and task-output parameters).
        with dsl.ParallelFor(list(range(shards)), name="prm-data-shards") as index:
            part = STAGES["prm-data-shard"].load_component()(
                config=_json(settings),
                preset=self.recipe.preset,
                index=index,
                count=shards,
                policy=policy,
                data=data,
            )
            self.configure(part, resources, cache=True)
        merge = STAGES["prm-data-merge"].load_component()(
            step=_json(step), parts=dsl.Collected(part.outputs["part"]), data=data
        )
        return self.configure(merge, cache=True)

    def prm(self, *, sft_model: Any, policy: Any, data: Any) -> Any:
        """The PRM: from the SFT checkpoint (or the `critic` stage's, more SFT from it) on the prepared step
        labels, or on the policy's own solutions when the recipe has `prm_data`."""
        base = sft_model
        if self.recipe.critic is not None:
            base = self.stage("critic", init=sft_model, data=data).outputs["model"]
        steps = None
        if self.recipe.prm_data is not None:
            steps = self.prm_data(policy=policy, data=data).outputs["steps"]
        return self.stage("prm", init=base, data=data, steps=steps)

    def evaluate(self, *, policy: Any, prm_model: Any, data: Any) -> Any:
        """The evaluation: one `evaluate` task, or, when a benchmark has `shards` > 1, an `evaluate-shard` task
        per shard (`dsl.ParallelFor`, each in its own pod with the eval resources) and `merge-evaluation`
        over their parts (`dsl.Collected`). Either task's outputs are `results`, `metrics`, `table`, `report`."""
        config = _json(self.recipe.eval_settings())
        cfg = self.recipe.eval_config()
        if not cfg.sharded:
            task = STAGES["eval"].load_component()(
                config=config,
                preset=self.recipe.preset,
                policy=policy,
                prm=prm_model,
                data=data,
                **self.parameter_inputs("eval"),
            )
            return self.configure(task, self.recipe.eval.resources, cache=True)
        # The loop's items are constants and its other inputs pipeline parameters and artifacts: kfp.local
        # 2.17 replaces a task-output *parameter* input of a ParallelFor body with the loop item
        # (kfp/local/orchestrator/task_spec_utils.py, create_parameter_loop_iteration_task_spec).
        with dsl.ParallelFor([s.model_dump_json() for s in cfg.shard_plan], name="eval-shards") as shard:
            part = STAGES["eval-shard"].load_component()(
                config=config,
                preset=self.recipe.preset,
                shard=shard,
                policy=policy,
                prm=prm_model,
                data=data,
                **self.parameter_inputs("eval"),
            )
            self.configure(part, self.recipe.eval.resources, cache=True)
        merge = STAGES["eval-merge"].load_component()(parts=dsl.Collected(part.outputs["part"]))
        return self.configure(merge, cache=True)

    def register(self, parent: Any, *, policy: Any, prm_model: Any, mixture: Any, results: Any) -> Any:
        task = STAGES["register"].load_component()(
            config=_json(self.recipe.register_config()),
            parent_run_id=parent,
            job_id=JOB_ID,
            policy=policy,
            prm=prm_model,
            mixture=mixture,
            eval_results=results,
        )
        return self.configure(task)

    def promote(self, parent: Any, model_uri: Any) -> Any:
        task = STAGES["promote"].load_component()(
            config=_json(self.recipe.promote_config()),
            parent_run_id=parent,
            model_uri=model_uri,
            **self.parameter_inputs("promote"),
        )
        return self.configure(task)

    def deploy(self, parent: Any, model_uri: Any) -> Any:
        task = STAGES["deploy"].load_component()(
            config=_json(self.recipe.deploy_config()), parent_run_id=parent, model_uri=model_uri
        )
        kubernetes.set_timeout(task, self.recipe.deploy.canary.max_seconds + DEPLOY_TIMEOUT_MARGIN_S)
        return self.configure(task)

    def promote_and_deploy(self, parent: Any, model_uri: Any) -> Any:
        """promote-model, then, when the recipe enables deployment and the version was promoted, deploy-model."""
        promotion = self.promote(parent, model_uri)
        if self.recipe.deploy.enabled:
            # The decision is the component's return value (`Output`) on purpose: kfp.local resolves a
            # condition on a task output only when it is named `Output` (a NamedTuple field is skipped).
            with dsl.If(promotion.outputs["Output"] == PROMOTED, name="promoted"):
                self.deploy(parent, model_uri)
        return promotion

    @staticmethod
    def checkpoint(uri: Any) -> Any:
        """An existing checkpoint (local path or `s3://`) as a `Model` artifact."""
        return dsl.importer(artifact_uri=uri, artifact_class=dsl.Model, reimport=False)


def _description(recipe: PipelineConfig, what: str, version: str) -> str:
    return f"{what} — recipe {recipe.name} ({recipe.preset}), vlpipe {version}. {recipe.description}".strip()


_FIXED_HELP = {
    "parent_run_id": "an MLflow run to adopt as the pipeline's parent run (set by `vlpipe run --local`)",
    "pipeline_version": "the compiled pipeline's version (set by `vlpipe submit` and `vlpipe run --local`)",
    "checkpoint_uri": "the checkpoint to start SFT from (local path or s3://)",
    "policy_uri": "the policy checkpoint to evaluate",
    "prm_uri": "the PRM checkpoint that scores the policy's answers",
    "model_version": "the registered version to promote",
    "model_name": "the registered model",
}
_REQUIRED = inspect.Parameter.empty


def _with_parameters(
    b: _Builder, body: Callable, fixed: list[tuple[str, Any]], tasks: set[str], doc: str
) -> Callable:
    """A pipeline function whose signature is `fixed` ((name, default) string inputs) plus the recipe's pipeline
    parameters for `tasks` (`vlpipe.pipelines.parameters`), which kfp turns into the pipeline's typed inputs with
    the recipe's values as defaults. `body` receives the fixed inputs; the parameters go to their tasks'
    inputs through the builder."""
    params = recipe_parameters(b.recipe, tasks)
    names = [name for name, _ in fixed] + [p.name for p in params]
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    signature = [inspect.Parameter(name, kind, default=default, annotation=str) for name, default in fixed]
    signature += [inspect.Parameter(p.name, kind, default=p.default, annotation=p.type) for p in params]

    def pipeline(*args: Any) -> None:  # kfp calls a pipeline function with one channel per input, in order
        values = dict(zip(names, args, strict=True))
        b.inputs = {(p.task, p.input): values[p.name] for p in params}
        body(**{name: values[name] for name, _ in fixed})

    pipeline.__signature__ = inspect.Signature(signature)  # type: ignore[attr-defined]
    pipeline.__name__ = body.__name__
    lines = [f"    {name}: {_FIXED_HELP[name]}." for name, _ in fixed]
    lines += [f"    {p.name}: {p.key} (default: the recipe's value)." for p in params]
    pipeline.__doc__ = f"{doc}\n\nArgs:\n" + "\n".join(lines)
    return pipeline


def build_pipelines(recipe: PipelineConfig, *, commit: str, version: str) -> dict[str, Callable]:
    """The recipe's pipelines (`PIPELINES` → `@dsl.pipeline` function), ready to compile or run locally.

    Each pipeline's inputs are its own (a checkpoint URI, ...), `parent_run_id`, `pipeline_version` and the
    recipe's pipeline parameters (`vlpipe.pipelines.parameters`: learning rates, steps, N, gate tolerances, ...).

    Args:
        recipe: the validated recipe (compiled into every step's settings).
        commit: the source commit (`VLPIPE_GIT_COMMIT` on every step).
        version: the pipeline version (package version + commit), for the descriptions.
    """
    b = _Builder(recipe, commit)
    root = recipe.cluster.pipeline_root
    serve = " → deploy" if recipe.deploy.enabled else ""
    run_inputs = [("parent_run_id", ""), ("pipeline_version", "")]

    def internvl3_recipe(parent_run_id: str, pipeline_version: str) -> None:
        with dsl.ExitHandler(b.finish(parent_run_id), name="recipe"):
            parent = b.start(RECIPE_PIPELINE, parent_run_id, pipeline_version).outputs["Output"]
            data = b.prepare_data().outputs["data"]
            init = b.init_model(data).outputs["model"]
            # pretrain, sft and mpo may be switched off: the next stage starts from the one before.
            runs = recipe.trained_stages
            mixture = b.mix(data, init, tuple(s for s in ("pretrain", "sft") if s in runs)).outputs["mixture"]
            model = init
            for stage in ("pretrain", "sft"):
                if stage in runs:
                    model = b.stage(stage, init=model, data=data, mixture=mixture).outputs["model"]
            sft_model = model
            policy = sft_model
            if "mpo" in runs:
                policy = b.stage("mpo", init=sft_model, data=data).outputs["model"]
            prm = b.prm(sft_model=sft_model, policy=policy, data=data).outputs["model"]
            results = b.evaluate(policy=policy, prm_model=prm, data=data).outputs["results"]
            registered = b.register(parent, policy=policy, prm_model=prm, mixture=mixture, results=results)
            b.promote_and_deploy(parent, registered.outputs["Output"])

    def sft_mpo(checkpoint_uri: str, parent_run_id: str, pipeline_version: str) -> None:
        with dsl.ExitHandler(b.finish(parent_run_id), name="sft-mpo"):
            b.start(SFT_MPO_PIPELINE, parent_run_id, pipeline_version)
            data = b.prepare_data().outputs["data"]
            start_model = b.checkpoint(checkpoint_uri).output
            mixture = b.mix(data, start_model, ("sft",)).outputs["mixture"]
            sft_model = b.stage("sft", init=start_model, data=data, mixture=mixture).outputs["model"]
            b.stage("mpo", init=sft_model, data=data)

    def evaluate_pipeline(policy_uri: str, prm_uri: str, parent_run_id: str, pipeline_version: str) -> None:
        with dsl.ExitHandler(b.finish(parent_run_id), name="evaluate"):
            b.start(EVALUATE_PIPELINE, parent_run_id, pipeline_version)
            data = b.prepare_data().outputs["data"]
            policy = b.checkpoint(policy_uri).output
            prm = b.checkpoint(prm_uri).output
            b.evaluate(policy=policy, prm_model=prm, data=data)

    def promote_deploy(
        model_version: str, model_name: str, parent_run_id: str, pipeline_version: str
    ) -> None:
        with dsl.ExitHandler(b.finish(parent_run_id), name="promote-deploy"):
            parent = b.start(PROMOTE_DEPLOY_PIPELINE, parent_run_id, pipeline_version).outputs["Output"]
            b.promote_and_deploy(parent, f"models:/{model_name}/{model_version}")

    everything = {"start", *STAGES}
    specs = {
        RECIPE_PIPELINE: (
            internvl3_recipe,
            run_inputs,
            everything,
            f"The InternVL3 recipe: data → pretrain → SFT → MPO, PRM → eval → register → promote{serve}",
        ),
        SFT_MPO_PIPELINE: (
            sft_mpo,
            [("checkpoint_uri", _REQUIRED), *run_inputs],
            {"start", "data", "mix", "sft", "mpo"},
            "SFT then MPO from a given checkpoint",
        ),
        EVALUATE_PIPELINE: (
            evaluate_pipeline,
            [("policy_uri", _REQUIRED), ("prm_uri", _REQUIRED), *run_inputs],
            {"start", "data", "eval"},
            "Best-of-N evaluation of a given policy with a given PRM",
        ),
        PROMOTE_DEPLOY_PIPELINE: (
            promote_deploy,
            [("model_version", _REQUIRED), ("model_name", recipe.registry.model_name), *run_inputs],
            {"start", "promote", "deploy"},
            f"Gated promotion of a registered model version{serve}",
        ),
    }
    if not {"sft", "mpo"} <= set(recipe.trained_stages):
        del specs[SFT_MPO_PIPELINE]  # a recipe without SFT or MPO has no sft-mpo pipeline
    pipelines = {}
    for name, (body, fixed, tasks, what) in specs.items():
        description = _description(recipe, what, version)
        func = _with_parameters(b, body, fixed, tasks, description)
        pipelines[name] = dsl.pipeline(name=name, description=description, pipeline_root=root)(func)
    return pipelines


def typed_arguments(pipeline: Any, arguments: dict[str, str]) -> dict[str, Any]:
    """`--param NAME=VALUE` strings as the pipeline's input types (Float, Integer, Boolean, String).

    Raises:
        ValueError: an unknown parameter (naming the pipeline's) or a value that is not of its type.
    """
    inputs = pipeline.component_spec.inputs or {}
    typed: dict[str, Any] = {}
    for name, value in arguments.items():
        if name not in inputs:
            raise ValueError(
                f"{pipeline.name} has no parameter {name!r}; its parameters: {', '.join(inputs)}"
            )
        kind = inputs[name].type
        try:
            if kind == "Float":
                typed[name] = float(value)
            elif kind == "Integer":
                typed[name] = int(value)
            elif kind == "Boolean":
                if value.lower() not in ("true", "false"):
                    raise ValueError("expected true or false")
                typed[name] = value.lower() == "true"
            else:
                typed[name] = value
        except ValueError as exc:
            raise ValueError(f"parameter {name}={value!r}: not a {kind} ({exc})") from exc
    return typed
