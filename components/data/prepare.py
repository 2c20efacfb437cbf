"""The `prepare-data` step: write the demo dataset (demo recipes) and validate the data every stage reads.

validate settings → (demo) write the demo dataset into the output directory → read both meta files and
every annotation through the quarantine → check the MPO pairs and PRM solutions exist → write
`dataset.json` (where each file is, records and hashes per dataset, skips) → log it to a child MLflow run.

The output directory is the step's `Dataset` artifact. For the demo it holds the data itself; for
`source: meta` it holds only `dataset.json`, pointing at the files (large data stays where it is).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from vlpipe.components.data.config import DATA_FILES, DataSettings, PrepareDataConfig, is_absolute
from vlpipe.model.storage import join
from vlpipe.tracking.runs import child_run

log = logging.getLogger(__name__)
DATASET_FILE = "dataset.json"


def resolve(settings: DataSettings, root: str) -> dict[str, str]:
    """Absolute path or URL of every data file (`DATA_FILES`), relative ones joined onto `root`."""
    return {
        name: path if is_absolute(path) else join(root, path)
        for name in DATA_FILES
        for path in [getattr(settings, name)]
    }


def _jsonl_facts(uri: str, name: str) -> dict[str, Any]:
    """Lines and hash of a JSONL file from its annotation index (one streaming pass, cached; nothing parsed)."""
    from vlpipe.model.data.index import annotation_index
    from vlpipe.model.files import DEFAULT_LIMITS

    try:
        index = annotation_index(uri, max_line_bytes=DEFAULT_LIMITS.max_line_bytes)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{name}: {uri} does not exist; check the recipe's data settings") from exc
    return {"path": uri, "lines": index.lines, "sha256": index.sha256}


def record_file_facts(uri: str, name: str) -> dict[str, Any]:
    """Facts of the MPO pairs or PRM steps: one JSONL file, or an InternVL meta file over many (MMPR's layout).

    Raises:
        vlpipe.model.data.meta.MetaError: a wrong meta file.
        FileNotFoundError: the file, or an annotation its meta file names, does not exist.
    """
    from vlpipe.components.training.config import is_meta_file
    from vlpipe.model.data.meta import load_meta

    if not is_meta_file(uri):
        return _jsonl_facts(uri, name)
    meta = load_meta(uri)
    datasets = {ds: _jsonl_facts(spec.annotation, ds) for ds, spec in meta.datasets.items()}
    hashes = {"meta": meta.sha256, "annotations": {ds: f["sha256"] for ds, f in datasets.items()}}
    return {
        "path": uri,
        "lines": sum(f["lines"] for f in datasets.values()),
        "sha256": hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest(),
        "datasets": datasets,
    }


def validate_files(files: dict[str, str]) -> dict[str, Any]:
    """Read both meta files and every annotation they name (bad lines into a quarantine), and count and hash
    the pair and step files (a JSONL file, or a meta file over many).

    Returns:
        `{"datasets": {name: {...}}, "quarantine": {...}, "jsonl": {mpo_pairs/prm_steps: {...}}}`.

    Raises:
        vlpipe.model.data.meta.MetaError: a meta file is wrong (names the dataset and key).
        FileNotFoundError: a meta file, annotation or data file does not exist.
    """
    from vlpipe.model.data.meta import Quarantine, load_meta, read_dataset

    quarantine = Quarantine()
    datasets: dict[str, Any] = {}
    for meta_name in ("pretrain_meta", "sft_meta"):
        meta = load_meta(files[meta_name])
        for name, spec in meta.datasets.items():
            if name in datasets:
                continue
            dataset = read_dataset(name, spec, quarantine)
            usable = sum(1 for _ in dataset.scan(quarantine))  # every record parsed and checked once, here
            dataset.close()
            datasets[name] = {
                "annotation": spec.annotation,
                "sha256": dataset.sha256,
                "records": usable,
                "modality": "multimodal" if dataset.is_multimodal else "language",
                "meta": meta_name,
            }
    others = {name: record_file_facts(files[name], name) for name in ("mpo_pairs", "prm_steps")}
    return {"datasets": datasets, "quarantine": quarantine.report(), "jsonl": others}


def prepare_data(config: PrepareDataConfig, *, out_dir: str, parent_run_id: str) -> dict[str, Any]:
    """Run the step; returns what `dataset.json` holds.

    Args:
        config: the step's settings (validated again here).
        out_dir: the output artifact's directory.
        parent_run_id: the pipeline's MLflow run ("" for none).
    """
    config = PrepareDataConfig.model_validate(config.model_dump())
    settings = config.data
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with child_run(
        parent_run_id,
        "data",
        experiment=config.tracking.experiment,
        recipe=config.recipe,
        tags=config.tracking.tags,
    ) as run_id:
        import mlflow

        if settings.source == "demo":
            from vlpipe.model.data.demo import write_demo_dataset

            assert settings.demo is not None  # checked by DataSettings
            summary = write_demo_dataset(
                str(out), seed=settings.demo.seed, sizes=settings.demo.sizes, overwrite=True
            )
            root = summary.out
            mlflow.log_params({f"demo.{k}": v for k, v in settings.demo.sizes.model_dump().items()})
        else:
            assert settings.root is not None or all(is_absolute(getattr(settings, n)) for n in DATA_FILES)
            root = settings.root or ""
        files = resolve(settings, root)
        facts = validate_files(files)
        info = {
            "source": settings.source,
            "root": root,
            "artifact_dir": str(out.resolve()),
            "files": files,
            **facts,
            "mlflow_run_id": run_id,
        }
        (out / DATASET_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        mlflow.log_params({"source": settings.source, **{k: v[:6000] for k, v in files.items()}})
        mlflow.log_dict(info, "data/dataset.json")
        records = sum(d["records"] for d in facts["datasets"].values())
        mlflow.log_metrics(
            {
                "records": records,
                "quarantined": facts["quarantine"]["total"],
                "mpo_pairs": facts["jsonl"]["mpo_pairs"]["lines"],
                "prm_solutions": facts["jsonl"]["prm_steps"]["lines"],
                "seconds": time.perf_counter() - started,
            }
        )
    log.info(
        "data: %d datasets, %d records, %d quarantined",
        len(facts["datasets"]),
        records,
        facts["quarantine"]["total"],
    )
    return info


def load_dataset_info(dataset_dir: str) -> dict[str, Any]:
    """Read a `prepare-data` artifact's `dataset.json`.

    Raises:
        FileNotFoundError: the directory is not a `prepare-data` output.
        ValueError: a demo dataset was moved (its meta files name absolute paths of where it was written).
    """
    path = Path(dataset_dir) / DATASET_FILE
    if not path.exists():
        raise FileNotFoundError(f"{dataset_dir} has no {DATASET_FILE}; pass the prepare-data step's output")
    info = json.loads(path.read_text())
    if info["source"] == "demo" and Path(info["artifact_dir"]) != Path(dataset_dir).resolve():
        raise ValueError(
            f"the demo dataset was written to {info['artifact_dir']} but is read from {dataset_dir}; its "
            "meta files name absolute paths. Run prepare-data again where the data is read, or use source: meta"
        )
    return info


def dataset_summary_markdown(info: dict[str, Any]) -> str:
    """A Markdown table of the datasets (the step's visualisation)."""
    lines = [
        f"### Data ({info['source']})",
        "",
        "| dataset | modality | records | sha256 |",
        "|---|---|---:|---|",
    ]
    for name, d in sorted(info["datasets"].items()):
        lines.append(f"| {name} | {d['modality']} | {d['records']} | `{d['sha256'][:12]}` |")
    for name, f in sorted(info["jsonl"].items()):
        lines.append(f"| {name} | - | {f['lines']} | `{f['sha256'][:12]}` |")
    lines += ["", f"Quarantined lines: {info['quarantine']['total']} {info['quarantine']['counts'] or ''}"]
    return "\n".join(lines) + "\n"


def prepare_data_task(
    config_json: str,
    *,
    parent_run_id: str | None = None,
    dataset: Any,
    metrics: Any,
    report: Any,
    data_root: str = "",
) -> None:
    """The component's entrypoint: validate `config_json`, run the step, fill the output artifacts.

    Args:
        config_json: `PrepareDataConfig` as JSON.
        parent_run_id: the pipeline's MLflow run; None (in a pipeline): found through dataset's URI
            (`vlpipe.tracking.pipeline.find_parent_run`), so the task takes no per-run input and can be cached.
        dataset: output `Dataset` artifact (the data, or a pointer to it, plus `dataset.json`).
        metrics: output `Metrics` artifact.
        report: output `Markdown` artifact (the dataset table).
        data_root: the pipeline parameter `data_root` ("": the recipe's `data.root`).
    """
    from vlpipe.components.pipeline_run.task import pipeline_parent, write_metrics_file

    parent_run_id = pipeline_parent(parent_run_id, dataset)
    settings = json.loads(config_json)
    if data_root:
        settings["data"]["root"] = data_root
    try:
        config = PrepareDataConfig.model_validate(settings)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError: name the UI's parameter too
        raise ValueError(f"prepare-data: invalid data settings with data_root={data_root!r}: {exc}") from exc
    info = prepare_data(config, out_dir=dataset.path, parent_run_id=parent_run_id)
    dataset.metadata.update(
        {"source": info["source"], "root": info["root"], "mlflow_run_id": info["mlflow_run_id"]}
    )
    metrics.log_metric("datasets", len(info["datasets"]))
    metrics.log_metric("records", sum(d["records"] for d in info["datasets"].values()))
    metrics.log_metric("quarantined", info["quarantine"]["total"])
    write_metrics_file(metrics)  # an artifact with a file: a cache entry of this task stays valid
    Path(report.path).parent.mkdir(parents=True, exist_ok=True)
    Path(report.path).write_text(dataset_summary_markdown(info))
