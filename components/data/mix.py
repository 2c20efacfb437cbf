"""The `mix-data` step: the provenance manifest of each training mixture before any GPU is used.

validate settings → load the starting checkpoint's tokenizer and image settings (no weights) → for the
pre-training and SFT mixtures: `MixtureLoader` (meta file checks, annotations read with quarantine, token
estimates per dataset) → encode `mix_samples` samples to measure the achieved language:multimodal token
ratio → manifest (hashes, counts, target and achieved ratio, packing) → files + child MLflow run.

The manifest's hash identifies the data (not the counts of this run); the training stage computes the same
hash from the same settings and the pipeline checks they agree.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any

from vlpipe.components.data.config import MixConfig
from vlpipe.components.data.prepare import load_dataset_info
from vlpipe.tracking.runs import child_run

MIXTURE_FILE = "mixture.json"


def load_text_side(model_dir: str) -> tuple[Any, Any, int]:
    """Tokenizer (with InternVL's tokens), image settings and tokens per tile of a checkpoint, without
    loading its weights."""
    from transformers import AutoTokenizer

    from vlpipe.model.image import ImageProcessingConfig
    from vlpipe.model.tokenizer import add_internvl_tokens

    tokenizer = add_internvl_tokens(AutoTokenizer.from_pretrained(model_dir))
    image_cfg = ImageProcessingConfig.from_pretrained(model_dir)
    hf_config = json.loads((Path(model_dir) / "config.json").read_text())
    return tokenizer, image_cfg, int(hf_config["image_seq_length"])


def _log_manifest(stage: str, manifest: dict[str, Any], quarantine: dict[str, Any]) -> None:
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    for name, info in manifest["datasets"].items():
        source = resolve_dataset_source(info["annotation"])
        dataset = MetaDataset(source=source, name=name, digest=info["annotation_sha256"][:16])
        mlflow.log_input(dataset, context=stage, tags={"modality": info["modality"]})
    mlflow.log_dict(manifest, f"data/{stage}/manifest.json")
    mlflow.log_dict(quarantine, f"data/{stage}/quarantine.json")
    mlflow.set_tag(f"{stage}.data_manifest_sha256", manifest["manifest_sha256"])
    mlflow.log_metrics(
        {
            f"{stage}/target_language_share": manifest["target_language_share"],
            f"{stage}/achieved_language_share": manifest["achieved_language_share"],
            f"{stage}/quarantined": manifest["quarantine"]["total"],
        }
    )


def mix_data(
    config: MixConfig, *, dataset_dir: str, model_dir: str, out_dir: str, parent_run_id: str
) -> dict:
    """Run the step; returns `{stage: manifest}` (also written to `out_dir`).

    Raises:
        vlpipe.model.data.meta.MetaError, FileNotFoundError: bad meta files or missing data.
        ValueError: more bad samples than a mixture's `max_bad_fraction` allows.
    """
    from vlpipe.model.data.loader import MixtureLoader

    config = MixConfig.model_validate(config.model_dump())
    started = time.perf_counter()
    info = load_dataset_info(dataset_dir)
    tokenizer, image_cfg, tokens_per_tile = load_text_side(model_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifests: dict[str, Any] = {}
    with child_run(
        parent_run_id,
        "mix",
        experiment=config.tracking.experiment,
        recipe=config.recipe,
        tags=config.tracking.tags,
    ) as run_id:
        import mlflow

        for mixture in config.mixtures:
            data = mixture.data_config(info["files"][f"{mixture.stage}_meta"])
            loader = MixtureLoader(data, tokenizer, image_cfg, tokens_per_tile)
            for _ in itertools.islice(loader, config.data.mix_samples):
                pass
            packing = mixture.packing.model_dump() if mixture.packing else None
            manifest = loader.manifest(packing=packing)
            quarantine = loader.quarantine.report()
            (out / f"manifest_{mixture.stage}.json").write_text(json.dumps(manifest, indent=2) + "\n")
            (out / f"quarantine_{mixture.stage}.json").write_text(json.dumps(quarantine, indent=2) + "\n")
            _log_manifest(mixture.stage, manifest, quarantine)
            manifests[mixture.stage] = manifest
        mlflow.log_metric("seconds", time.perf_counter() - started)
    summary = {
        "mlflow_run_id": run_id,
        "manifest_sha256": {stage: m["manifest_sha256"] for stage, m in manifests.items()},
    }
    (out / MIXTURE_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return manifests


def mixture_markdown(manifests: dict[str, Any]) -> str:
    """A Markdown table per mixture: datasets, target share, samples and tokens drawn (the visualisation)."""
    lines: list[str] = []
    for stage, m in manifests.items():
        lines += [
            f"### {stage} mixture `{m['manifest_sha256'][:12]}`",
            "",
            f"Language token share: target {m['target_language_share']:.3f}, "
            f"achieved {m['achieved_language_share']:.3f} over {m['stream_position']} drawn samples; "
            f"{m['quarantine']['total']} quarantined.",
            "",
            "| dataset | modality | records | target share | tokens/sample | samples | tokens |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for name, d in m["datasets"].items():
            lines.append(
                f"| {name} | {d['modality']} | {d['records']} | {d['target_token_share']:.3f} | "
                f"{d['estimated_tokens_per_sample']:.1f} | {d['samples_used']} | {d['tokens_used']} |"
            )
        lines.append("")
    return "\n".join(lines)


def mix_data_task(
    config_json: str,
    *,
    parent_run_id: str | None = None,
    dataset: Any,
    model: Any,
    mixture: Any,
    metrics: Any,
    report: Any,
) -> None:
    """The component's entrypoint: validate `config_json`, run the step, fill the output artifacts.

    Args:
        config_json: `MixConfig` as JSON.
        parent_run_id: the pipeline's MLflow run; None (in a pipeline): found through mixture's URI
            (`vlpipe.tracking.pipeline.find_parent_run`), so the task takes no per-run input and can be cached.
        dataset: the `prepare-data` output.
        model: the starting checkpoint (its tokenizer counts tokens).
        mixture: output `Dataset` artifact: manifests, quarantine reports and `mixture.json`.
        metrics: output `Metrics` artifact.
        report: output `Markdown` artifact (the mixture tables).
    """
    from vlpipe.components.pipeline_run.task import pipeline_parent, write_metrics_file

    parent_run_id = pipeline_parent(parent_run_id, mixture, (dataset, model))
    from vlpipe.components.pipeline_run.model_store import checkpoint_path

    config = MixConfig.model_validate_json(config_json)
    manifests = mix_data(
        config,
        dataset_dir=dataset.path,
        model_dir=checkpoint_path(model.path),
        out_dir=mixture.path,
        parent_run_id=parent_run_id,
    )
    mixture.metadata.update(
        {f"{stage}_manifest_sha256": m["manifest_sha256"] for stage, m in manifests.items()}
    )
    written = json.loads((Path(mixture.path) / MIXTURE_FILE).read_text())
    mixture.metadata["mlflow_run_id"] = written["mlflow_run_id"]
    mixture.metadata["lineage"] = {
        "data": str(dataset.metadata.get("mlflow_run_id", ""))
    }  # for reuse records
    for stage, m in manifests.items():
        metrics.log_metric(f"{stage}_target_language_share", m["target_language_share"])
        metrics.log_metric(f"{stage}_achieved_language_share", m["achieved_language_share"])
        metrics.log_metric(f"{stage}_quarantined", m["quarantine"]["total"])
    write_metrics_file(metrics)  # an artifact with a file: a cache entry of this task stays valid
    Path(report.path).parent.mkdir(parents=True, exist_ok=True)
    Path(report.path).write_text(mixture_markdown(manifests))
