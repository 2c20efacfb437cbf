"""The `init-model` step: the pipeline's starting checkpoint.

validate settings → random model of a `tiny`/`small` preset with a byte-level BPE trained on the conversation
texts of the pre-training mixture (`vlpipe.model.init.init_random`), the real presets' native pre-training start
composed from a pretrained InternViT and a pretrained base LLM (`vlpipe.model.init.init_composed`), or an existing
checkpoint (`init.checkpoint`: `vlpipe.model.init.init_from_checkpoint`) → log to a child MLflow run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vlpipe.components.data.config import InitModelConfig
from vlpipe.components.data.prepare import load_dataset_info
from vlpipe.tracking.runs import child_run


def conversation_texts(meta_uri: str) -> Iterator[str]:
    """Every turn of every conversation of a meta file's datasets, `<image>` placeholders removed (the
    tokenizer's training corpus; for the demo data these are the texts `vlpipe.model.data.demo.iter_demo_texts`
    yields)."""
    from vlpipe.model.data.meta import Quarantine, load_meta, read_dataset

    meta = load_meta(meta_uri)
    for name, spec in meta.datasets.items():
        for record in read_dataset(name, spec, Quarantine()).scan(Quarantine()):
            for turn in record["conversations"]:
                value = str(turn.get("value", ""))
                yield value.replace("<image>\n", "").replace("<image>", "")


def init_model(
    config: InitModelConfig, *, dataset_dir: str, out_dir: str, parent_run_id: str
) -> dict[str, Any]:
    """Write the starting checkpoint to `out_dir`; returns its `vlpipe.json` facts.

    Raises:
        ValueError: a random init of a real preset or a composed init of a random one (the recipe check
            catches both first).
    """
    from vlpipe.model.init import init_composed, init_from_checkpoint, init_random

    config = InitModelConfig.model_validate(config.model_dump())
    init = config.init
    started = time.perf_counter()
    with child_run(
        parent_run_id,
        "init",
        experiment=config.tracking.experiment,
        recipe=config.recipe,
        tags=config.tracking.tags,
    ) as run_id:
        import mlflow

        if init.from_checkpoint:
            assert init.checkpoint is not None
            init_from_checkpoint(config.preset, out_dir, checkpoint_uri=init.checkpoint)
        elif init.composed:
            assert init.vision is not None and init.llm is not None
            init_composed(
                config.preset,
                out_dir,
                vision_uri=init.vision,
                llm_uri=init.llm,
                tokenizer_uri=init.tokenizer,
                seed=init.seed,
            )
        else:
            info = load_dataset_info(dataset_dir)
            corpus = list(conversation_texts(info["files"]["pretrain_meta"]))
            init_random(config.preset, out_dir, corpus=corpus, vocab_size=init.vocab_size, seed=init.seed)
        facts = json.loads((Path(out_dir) / "vlpipe.json").read_text())
        mlflow.log_params({"preset": config.preset, **{k: str(v) for k, v in init.model_dump().items()}})
        mlflow.set_tag("preset", config.preset)
        mlflow.log_metric("seconds", time.perf_counter() - started)
    return {**facts, "mlflow_run_id": run_id}


def init_model_task(
    config_json: str, *, parent_run_id: str | None = None, dataset: Any, model: Any, metrics: Any
) -> None:
    """The component's entrypoint: validate `config_json`, write the checkpoint into the `Model` artifact.

    Args:
        config_json: `InitModelConfig` as JSON.
        parent_run_id: the pipeline's MLflow run; None (in a pipeline): found through model's URI
            (`vlpipe.tracking.pipeline.find_parent_run`), so the task takes no per-run input and can be cached.
        dataset: the `prepare-data` output (its texts train a random init's tokenizer).
        model: output `Model` artifact.
        metrics: output `Metrics` artifact.
    """
    from vlpipe.components.pipeline_run.task import pipeline_parent, write_metrics_file

    parent_run_id = pipeline_parent(parent_run_id, model, (dataset,))
    from vlpipe.components.pipeline_run.model_store import checkpoint_output

    config = InitModelConfig.model_validate_json(config_json)
    with checkpoint_output(model) as out_dir:
        facts = init_model(config, dataset_dir=dataset.path, out_dir=out_dir, parent_run_id=parent_run_id)
        hf_config = json.loads((Path(out_dir) / "config.json").read_text())
    model.metadata.update(
        {"preset": config.preset, "stage": "init", "lineage": {"init": facts["mlflow_run_id"]}}
    )
    metrics.log_metric("vocab_size", hf_config["text_config"]["vocab_size"])
    write_metrics_file(metrics)  # an artifact with a file: a cache entry of this task stays valid
