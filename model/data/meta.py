"""InternVL meta JSON: dataset descriptions, their validation, and reading annotations with a quarantine.

A meta file maps dataset names to `{"root", "annotation", "repeat_time", "length", "data_augment",
"max_dynamic_patch"}`; `root` (images) and `annotation` (JSONL) are local paths or `s3://` URLs read through
fsspec. Bad lines are never dropped silently: each is recorded in a `Quarantine` with dataset, line and reason.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vlpipe.model.storage import filesystem, join


class DatasetSpec(BaseModel):
    """One entry of an InternVL meta file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    root: str = Field(default="", description="Image root (local path or s3:// URL); empty for pure text.")
    annotation: str = Field(min_length=1, description="JSONL annotation file (local path or s3:// URL).")
    repeat_time: float = Field(default=1.0, gt=0, description="Times per epoch; fractional takes a subset.")
    length: int | None = Field(default=None, ge=0, description="Number of lines, checked when read.")
    data_augment: bool = False
    max_dynamic_patch: int | None = Field(default=None, ge=1, description="Per-dataset max_tiles override.")


class MetaFile(BaseModel):
    """A validated meta file: dataset name → spec."""

    model_config = ConfigDict(frozen=True)

    path: str
    sha256: str
    datasets: dict[str, DatasetSpec]


class MetaError(ValueError):
    """A meta file is wrong (user mistake: fix the file, do not retry)."""


def load_meta(uri: str, *, storage_options: dict | None = None) -> MetaFile:
    """Read and validate a meta JSON file.

    Raises:
        MetaError: naming the dataset and key that is wrong, or the file when it is not a JSON object.
        FileNotFoundError: when the file does not exist.
    """
    fs, path = filesystem(uri, storage_options)
    if not fs.exists(path):
        raise FileNotFoundError(f"meta file {uri} does not exist")
    with fs.open(path, "rb") as f:
        raw = f.read()
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise MetaError(f"{uri}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or not data:
        raise MetaError(f"{uri}: expected a non-empty JSON object mapping dataset names to specs")
    datasets = {}
    for name, entry in data.items():
        if not isinstance(entry, dict):
            raise MetaError(f"{uri}: dataset {name!r} must be an object with root/annotation/repeat_time/...")
        try:
            datasets[name] = DatasetSpec.model_validate(entry)
        except ValidationError as exc:
            problems = "; ".join(f"key {'.'.join(map(str, e['loc']))!r}: {e['msg']}" for e in exc.errors())
            raise MetaError(f"{uri}: dataset {name!r}: {problems}") from exc
    return MetaFile(path=uri, sha256=hashlib.sha256(raw).hexdigest(), datasets=datasets)


@dataclass
class Quarantine:
    """Skipped items with reasons. Every skip is recorded; nothing is dropped silently."""

    entries: list[dict] = field(default_factory=list)
    max_examples: int = 1000  # full counts are kept; only the first examples keep their detail

    def add(self, dataset: str, line: int | None, reason: str, detail: str) -> None:
        self.entries.append({"dataset": dataset, "line": line, "reason": reason, "detail": detail[:500]})

    @property
    def counts(self) -> dict[str, int]:
        """Skips per `dataset/reason`."""
        return dict(Counter(f"{e['dataset']}/{e['reason']}" for e in self.entries))

    def __len__(self) -> int:
        return len(self.entries)

    def report(self) -> dict:
        """JSON-serialisable summary: total, counts per dataset/reason, and the first examples."""
        return {
            "total": len(self.entries),
            "counts": self.counts,
            "examples": self.entries[: self.max_examples],
        }

    def check(self, seen: int, max_bad_fraction: float, bad: int | None = None) -> None:
        """Fail when more than `max_bad_fraction` of `seen` items were skipped.

        Args:
            seen: items looked at.
            max_bad_fraction: the tolerated share of bad items.
            bad: bad items among them (default: every quarantine entry).

        Raises:
            ValueError: listing the counts per dataset and reason.
        """
        bad = len(self.entries) if bad is None else bad
        if seen and bad / seen > max_bad_fraction:
            raise ValueError(
                f"{bad} of {seen} samples were bad ({bad / seen:.1%} > "
                f"max_bad_fraction {max_bad_fraction:.1%}): {self.counts}. Fix the data or raise max_bad_fraction."
            )


@dataclass
class Dataset:
    """A dataset's valid records, in file order, with its spec and content hash."""

    name: str
    spec: DatasetSpec
    records: list[dict]
    lines: list[int]  # 1-based line number of each record in the annotation file
    sha256: str

    @property
    def is_multimodal(self) -> bool:
        return any("image" in r for r in self.records)

    def image_uri(self, relative: str) -> str:
        return join(self.spec.root, relative) if self.spec.root else relative


def read_dataset(
    name: str, spec: DatasetSpec, quarantine: Quarantine, *, storage_options: dict | None = None
) -> Dataset:
    """Read a dataset's JSONL annotation; malformed lines go to `quarantine` (reason `malformed_json`).

    Raises:
        FileNotFoundError: when the annotation file does not exist (a meta file error, not bad data).
        MetaError: when `length` is given and differs from the number of non-empty lines.
    """
    fs, path = filesystem(spec.annotation, storage_options)
    if not fs.exists(path):
        raise FileNotFoundError(f"dataset {name!r}: annotation {spec.annotation} does not exist")
    with fs.open(path, "rb") as f:
        raw = f.read()
    records, lines = [], []
    n_lines = 0
    for number, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        n_lines += 1
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            quarantine.add(name, number, "malformed_json", str(exc))
            continue
        if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
            quarantine.add(
                name, number, "malformed", 'each line must be an object with a "conversations" list'
            )
            continue
        record.setdefault("id", f"{name}:{number}")
        records.append(record)
        lines.append(number)
    if spec.length is not None and spec.length != n_lines:
        raise MetaError(
            f"dataset {name!r}: meta says length {spec.length} but {spec.annotation} has {n_lines} lines; "
            "fix the key 'length'"
        )
    return Dataset(name, spec, records, lines, hashlib.sha256(raw).hexdigest())
