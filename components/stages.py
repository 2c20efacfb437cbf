"""The stage table: one declaration per pipeline stage, read by the DAG builder (`vlpipe.pipelines.dag`), the
recipe schema (`vlpipe.pipelines.config.PipelineConfig`), the container entry
(`vlpipe.components.training.entrypoint`, `vlpipe.components.training.task`), the run summary
(`vlpipe.pipelines.summary`) and the CLI (`vlpipe train`).

Adding a stage: a folder `components/<name>/` with `component.py` (the Kubeflow shell) and `stage.py` (the
stage's flow, `main(config)`), and one `Stage(...)` entry below (README "Architecture"; tests/components/
test_stages_table.py keeps both true). A training stage also names its config class, the recipe key of its
settings and the data file it trains on; the DAG edge that feeds it is written in `vlpipe.pipelines.dag`.

Torch- and kfp-free: components and entry functions are named as `module:attribute` and imported on use.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from vlpipe.components.training.config import (
    MPOStageConfig,
    PretrainStageConfig,
    PRMStageConfig,
    SFTStageConfig,
)

_C = "vlpipe.components"
TRAINING_OWNED = ("stage", "init", "output", "work_dir") + tuple(
    f"tracking.{key}" for key in ("experiment", "run_name", "parent_run_id", "recipe")
)
"""Keys of a training stage's config that the pipeline sets (with the stage's `data` key)."""


@dataclass(frozen=True)
class Stage:
    """One pipeline stage.

    Attributes:
        name: the stage's name: its MLflow run name and `stage` tag, its `vlpipe train` name (training stages)
            and its work directory.
        task: the Kubeflow task (and component) name.
        component: the Kubeflow component, `module:function` (None: the stage has no component of its own).
        entry: the function that runs the stage from its validated config, `module:function`.
        summary: the metrics `vlpipe run` shows for the stage, in order (the table's order is the summary's).
        recipe_key: where the stage's settings are in a recipe (dotted; None: the recipe does not configure it
            as a stage).
        config: the training stage's config class (validated when the recipe loads and again in the container).
        trains_as: the stage whose code trains this one (the critic is more SFT).
        data: the training stage's `(data key, prepared data file)`: the `data.<key>` the pipeline sets and
            the `prepare-data` file it comes from.
        inputs: artifact inputs of the training component besides `init_model` and `data`.
        owned: dotted keys of the stage's settings that the pipeline sets (a recipe must not).
    """

    name: str
    task: str
    component: str | None = None
    entry: str | None = None
    summary: tuple[str, ...] = ()
    recipe_key: str | None = None
    config: type[BaseModel] | None = None
    trains_as: str | None = None
    data: tuple[str, str] | None = None
    inputs: tuple[str, ...] = ()
    owned: tuple[str, ...] = ()

    @property
    def trained(self) -> bool:
        return self.config is not None

    def load_component(self) -> Any:
        """The Kubeflow component (imports kfp)."""
        if self.component is None:
            raise ValueError(f"stage {self.name} has no component of its own")
        return _resolve(self.component)

    def load_entry(self) -> Any:
        """The stage's main function (imports the stage, torch included)."""
        if self.entry is None:
            raise ValueError(f"stage {self.name} has no entry function")
        return _resolve(self.entry)


def _resolve(reference: str) -> Any:
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)


_LM_SUMMARY = ("loss", "tokens_per_s", "token_utilisation")
_TABLE = (
    Stage(
        "data",
        task="prepare-data",
        component=f"{_C}.data.component:prepare_data",
        entry=f"{_C}.data.prepare:prepare_data_task",
        summary=("records", "quarantined", "mpo_pairs", "prm_solutions"),
    ),
    Stage(
        "init",
        task="init-model",
        component=f"{_C}.data.component:init_model",
        entry=f"{_C}.data.init_model:init_model_task",
        summary=("seconds",),
    ),
    Stage(
        "mix",
        task="mix-data",
        component=f"{_C}.data.component:mix_data",
        entry=f"{_C}.data.mix:mix_data_task",
        summary=("pretrain/achieved_language_share", "sft/achieved_language_share"),
    ),
    Stage(
        "pretrain",
        task="pretrain",
        component=f"{_C}.pretrain.component:pretrain",
        entry=f"{_C}.pretrain.stage:main",
        summary=_LM_SUMMARY,
        recipe_key="stages.pretrain",
        config=PretrainStageConfig,
        data=("meta", "pretrain_meta"),
        inputs=("mixture",),
        owned=(*TRAINING_OWNED, "data.meta"),
    ),
    Stage(
        "sft",
        task="sft",
        component=f"{_C}.sft.component:sft",
        entry=f"{_C}.sft.stage:main",
        summary=_LM_SUMMARY,
        recipe_key="stages.sft",
        config=SFTStageConfig,
        data=("meta", "sft_meta"),
        inputs=("mixture",),
        owned=(*TRAINING_OWNED, "data.meta"),
    ),
    Stage(
        "mpo",
        task="mpo",
        component=f"{_C}.mpo.component:mpo",
        entry=f"{_C}.mpo.stage:main",
        summary=("loss", "reward_accuracy", "reward_margin"),
        recipe_key="stages.mpo",
        config=MPOStageConfig,
        data=("path", "mpo_pairs"),
        owned=(*TRAINING_OWNED, "data.path"),
    ),
    Stage(
        "critic",
        task="critic",
        component=f"{_C}.critic.component:critic",
        entry=f"{_C}.sft.stage:main",
        summary=_LM_SUMMARY,
        recipe_key="critic",
        config=SFTStageConfig,
        trains_as="sft",
        data=("meta", "sft_meta"),
        owned=(*TRAINING_OWNED, "data.meta"),
    ),
    Stage(
        "prm-data",
        task="sample-prm-data",
        component=f"{_C}.prm_data.component:sample_prm_data",
        entry=f"{_C}.prm_data.stage:sample_prm_data",
        summary=("items", "solutions", "sample_accuracy", "positive_step_fraction", "skipped_items"),
        recipe_key="prm_data",
        owned=("policy", "output"),
    ),
    # `prm_data.config.shards` > 1: `sample-prm-data-shard` tasks (one pod each) and `merge-prm-data`, which
    # records the `prm-data` run (vlpipe.components.prm_data.stage).
    Stage(
        "prm-data-shard",
        task="sample-prm-data-shard",
        component=f"{_C}.prm_data.component:sample_prm_data_shard",
        entry=f"{_C}.prm_data.stage:sample_prm_shard",
    ),
    Stage(
        "prm-data-merge",
        task="merge-prm-data",
        component=f"{_C}.prm_data.component:merge_prm_data",
        entry=f"{_C}.prm_data.stage:merge_prm_data",
    ),
    Stage(
        "prm",
        task="prm",
        component=f"{_C}.prm.component:prm",
        entry=f"{_C}.prm.stage:main",
        summary=("loss", "step_accuracy"),
        recipe_key="stages.prm",
        config=PRMStageConfig,
        data=("path", "prm_steps"),
        inputs=("steps",),
        owned=(*TRAINING_OWNED, "data.path"),
    ),
    Stage(
        "eval",
        task="evaluate",
        component=f"{_C}.evaluate.component:evaluate",
        entry=f"{_C}.evaluate.stage:run_evaluation",
        summary=("overall/pass_at_1", "overall/best_of_n", "overall/majority", "overall/oracle"),
        recipe_key="eval",
        owned=("policy", "prm", "output_dir", "mlflow.parent_run_id"),
    ),
    # A benchmark with `shards` > 1 runs as `evaluate-shard` tasks (one pod each) and `merge-evaluation`, which
    # records the `eval` run; `evaluate` is both in one pod (vlpipe.components.evaluate.stage).
    Stage(
        "eval-shard",
        task="evaluate-shard",
        component=f"{_C}.evaluate.component:evaluate_shard",
        entry=f"{_C}.evaluate.stage:evaluate_shards",
    ),
    Stage(
        "eval-merge",
        task="merge-evaluation",
        component=f"{_C}.evaluate.component:merge_evaluation",
        entry=f"{_C}.evaluate.stage:merge_evaluation",
    ),
    Stage(
        "register",
        task="register-model",
        component=f"{_C}.register.component:register_model",
        entry=f"{_C}.register.register:register_task",
    ),
    Stage(
        "promote",
        task="promote-model",
        component=f"{_C}.promote.component:promote_model",
        entry=f"{_C}.promote.promote:promote_task",
    ),
    Stage(
        "deploy",
        task="deploy-model",
        component=f"{_C}.deploy.component:deploy_model",
        entry=f"{_C}.deploy.deploy:deploy_task",
    ),
)
STAGES: dict[str, Stage] = {stage.name: stage for stage in _TABLE}
"""Every stage by name, in the order of a pipeline run (and of its summary)."""
TRAINING_STAGES: tuple[str, ...] = tuple(name for name, stage in STAGES.items() if stage.trained)
"""The stages a training component runs (pretrain, sft, mpo, critic, prm)."""
TRAIN_COMMANDS: tuple[str, ...] = tuple(name for name in TRAINING_STAGES if STAGES[name].trains_as is None)
"""What `vlpipe train STAGE` and `python -m vlpipe.components.training STAGE` run (the critic is `sft`)."""


def stage_config_class(stage: str) -> type[BaseModel]:
    """The config class a training stage's code validates with (a stage trained as another is run as that one).

    Raises:
        ValueError: naming the training stages.
    """
    found = STAGES.get(stage)
    if found is None or found.config is None or found.trains_as is not None:
        raise ValueError(f"unknown stage {stage!r}; choose one of {', '.join(TRAIN_COMMANDS)}")
    return found.config


def parse_stage_config(data: dict[str, Any], stage: str | None = None) -> Any:
    """Validate a training stage's config from a dict.

    Args:
        data: the config; its "stage" key picks the class (or `stage` when the key is absent).
        stage: the expected stage; a config for another stage is an error.

    Returns:
        The validated stage config.

    Raises:
        ValueError: when `stage` and the config's stage disagree, or the stage is unknown.
        pydantic.ValidationError: on any invalid field.
    """
    data = dict(data)
    if stage is not None:
        stage_config_class(stage)
        data.setdefault("stage", stage)
        if data["stage"] != stage:
            raise ValueError(f"the config is for stage {data['stage']!r}, not {stage!r}")
    elif "stage" not in data:
        raise ValueError(f"the config has no 'stage' key; set it to one of {', '.join(TRAIN_COMMANDS)}")
    return stage_config_class(str(data["stage"])).model_validate(data)


def load_stage_config(path: str | Path, stage: str | None = None) -> Any:
    """Read and validate a training stage's config from a YAML or JSON file.

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: when the file is not a mapping, or see `parse_stage_config`.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"stage config {path} does not exist")
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a stage config must be a mapping of keys to values")
    return parse_stage_config(data, stage)


_MISSING = object()


def owned_keys_in(settings: dict[str, Any], owned: tuple[str, ...]) -> list[str]:
    """The dotted keys of `owned` that a recipe's stage settings set (the pipeline sets them; a recipe must not)."""
    found = []
    for key in owned:
        node: Any = settings
        for part in key.split("."):
            node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
        if node is not _MISSING:
            found.append(key)
    return found
