"""Provenance of a mixture: which data, in which amounts, produced a model.

The manifest holds content hashes of the meta file and of each annotation file, samples and tokens used per
dataset, the target and achieved language:multimodal token ratio, the seed and the packing settings, and the
quarantine counts. Its own hash (`manifest_sha256`, over everything that identifies the data, not the counts
of a particular run) tags MLflow runs so they can be compared by data.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vlpipe.model.data.loader import MixtureLoader


def build_manifest(loader: MixtureLoader, packing: dict | None = None) -> dict:
    """The provenance manifest of `loader`'s mixture so far."""
    stream = loader.stream
    datasets = {}
    for d in loader.datasets:
        datasets[d.name] = {
            "annotation": d.spec.annotation,
            "annotation_sha256": d.sha256,
            "root": d.spec.root,
            "modality": "multimodal" if d.is_multimodal else "language",
            "records": len(d),
            "repeat_time": d.spec.repeat_time,
            "target_token_share": round(stream.target_share[d.name], 6),
            "estimated_tokens_per_sample": round(stream.mean_tokens[d.name], 2),
            "samples_used": loader.stats.samples[d.name],
            "tokens_used": loader.stats.tokens[d.name],
        }
    identity = {
        "meta_sha256": loader.meta.sha256,
        "annotations": {n: v["annotation_sha256"] for n, v in datasets.items()},
        "mixture": loader.config.mixture.model_dump(mode="json"),
        "max_length": loader.config.max_length,
        "mode": loader.config.mode,
        "packing": packing,
    }
    target_language = sum(v["target_token_share"] for v in datasets.values() if v["modality"] == "language")
    return {
        "manifest_sha256": hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest(),
        "meta": {"path": loader.meta.path, "sha256": loader.meta.sha256},
        "datasets": datasets,
        "seed": loader.config.mixture.seed,
        "target_language_share": round(target_language, 6),
        "achieved_language_share": round(loader.achieved_language_share, 6),
        "stream_position": stream.index,
        "packing": packing,
        "max_length": loader.config.max_length,
        "mode": loader.config.mode,
        "quarantine": {"total": len(loader.quarantine), "counts": loader.quarantine.counts},
    }


def log_manifest_to_mlflow(
    manifest: dict, quarantine_report: dict | None = None, context: str = "train"
) -> None:
    """Log each dataset as an MLflow dataset input (name, source, content digest) and the manifest (and the
    quarantine report) as JSON artifacts of the active run; tag the run with the manifest hash."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    for name, info in manifest["datasets"].items():
        source = resolve_dataset_source(info["annotation"])
        dataset = MetaDataset(source=source, name=name, digest=info["annotation_sha256"][:16])
        mlflow.log_input(dataset, context=context, tags={"modality": info["modality"]})
    mlflow.log_dict(manifest, "data/manifest.json")
    if quarantine_report is not None:
        mlflow.log_dict(quarantine_report, "data/quarantine.json")
    mlflow.set_tag("data_manifest_sha256", manifest["manifest_sha256"])
    mlflow.log_metric("data_achieved_language_share", manifest["achieved_language_share"])
