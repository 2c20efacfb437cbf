"""Reading the record files of the MPO and PRM stages, with every bad line counted by reason.

A stage's `path` is either one JSONL file (its images under `image_root`) or an InternVL meta file over many
JSONL files (`{name: {root, annotation, repeat_time, length, max_dynamic_patch, data_augment, allowed_roots}}`,
validated by `vlpipe.model.data.meta.load_meta`, as for SFT): MMPR ships its preference pairs that way, and
VisualPRM400K's annotation files are listed the same way. Every record keeps its dataset name and line.

Each file is read once up front, every line parsed and validated so bad lines are counted before training
starts; then only where each valid record is (offset, length, line: 16 bytes) is kept, and a record is read
and parsed again when it is used (`RecordFile.record`), as the SFT path's annotation index does.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from vlpipe.components.training.config import is_meta_file
from vlpipe.model.data.meta import MetaError, Quarantine, annotation_dir, load_meta
from vlpipe.model.errors import SampleError
from vlpipe.model.files import (
    DEFAULT_LIMITS,
    DatasetRoots,
    JsonlReader,
    NotRegularFileError,
    RangeReader,
    ReadLimits,
    parse_json_line,
)
from vlpipe.model.storage import is_remote, join


def default_image_root(jsonl_uri: str) -> str:
    """`images/` beside the JSONL's directory: `<root>/prm/train.jsonl` → `<root>/images`."""
    parent = posixpath.dirname(posixpath.dirname(jsonl_uri.rstrip("/")))
    if not is_remote(jsonl_uri) and not parent:
        parent = "."
    return join(parent, "images")


@dataclass(eq=False)
class RecordFile:
    """The valid records of a JSONL file, found again by byte offset and parsed when asked for, and the skipped
    lines.

    The file is read once up front (every line parsed and validated, then dropped): per valid record only its
    offset (int64), length without the newline (int32) and 1-based line number (int32) are kept, 16 bytes
    whatever the record holds, so MMPR's millions of pairs cost tens of MB per rank, not GBs of dicts.

    Attributes:
        path: the file.
        name: its dataset name (in sample ids).
        offsets: byte offset of each valid record (int64).
        lengths: its length in bytes without the newline (int32).
        lines: its 1-based line number (int32).
        quarantine: the skipped lines.
        total_lines: non-empty lines in the file.
        sha256: the file's hash.
        storage_options: fsspec options to read records again.
    """

    path: str
    name: str
    offsets: np.ndarray
    lengths: np.ndarray
    lines: np.ndarray
    quarantine: Quarantine = field(default_factory=Quarantine)
    total_lines: int = 0
    sha256: str = ""
    storage_options: dict | None = None
    _reader: RangeReader = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._reader = RangeReader(self.path, self.storage_options)

    def __len__(self) -> int:
        return int(self.offsets.shape[0])

    def line(self, i: int) -> int:
        """The 1-based line number of record `i`."""
        return int(self.lines[i])

    def record(self, i: int) -> dict:
        """Record `i` (validated when the file was read), read from the file and parsed now.

        Raises:
            SampleError: `changed_file` when the bytes there are no longer a JSON object (the file was
                rewritten after it was read).
        """
        sample_id = f"{self.name}:{self.line(i)}"
        length = int(self.lengths[i])
        raw = self._reader.read(int(self.offsets[i]), length)
        try:
            value = parse_json_line(raw, sample_id) if len(raw) == length else None
        except SampleError:
            value = None
        if not isinstance(value, dict):
            raise SampleError(
                sample_id,
                "changed_file",
                f"{self.path} changed after it was read (line {self.line(i)} is no longer the record checked); "
                "do not rewrite input files while a stage runs",
            )
        return value

    def __getitem__(self, i: int) -> dict:
        return self.record(i)

    def __iter__(self) -> Iterator[dict]:
        """Every valid record in file order."""
        return (self.record(i) for i in range(len(self)))

    def close(self) -> None:
        self._reader.close()

    def report(self) -> dict:
        return {
            "file": self.path,
            "lines": self.total_lines,
            "used": len(self),
            **self.quarantine.report(),
        }


def _validate(validate: Callable[[dict], str | None], value: object) -> str | None:
    if not isinstance(value, dict):
        return "each line must be a JSON object"
    try:
        return validate(value)
    except (TypeError, AttributeError, KeyError) as exc:
        # A validator written for the right types meeting a wrong one: still this record's fault.
        return f"a key has the wrong type ({type(exc).__name__}: {str(exc)[:120]})"


def _read_lines(
    uri: str,
    name: str,
    validate: Callable[[dict], str | None],
    storage_options: dict | None,
    limits: ReadLimits,
    quarantine: Quarantine,
) -> RecordFile:
    reader = JsonlReader(uri, name, limits, storage_options)
    offsets, lengths, lines = array("q"), array("i"), array("i")
    try:
        for line in reader:
            if line.error is not None:
                quarantine.add(name, line.number, line.error.reason, line.error.detail)
                continue
            reason = _validate(validate, line.value)
            if reason:
                quarantine.add(name, line.number, "invalid_record", reason)
                continue
            # The parsed record is dropped here: `RecordFile.record` reads it again when it is used.
            offsets.append(line.offset)
            lengths.append(line.length)
            lines.append(line.number)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{name}: {uri} does not exist") from exc
    except NotRegularFileError as exc:
        raise ValueError(f"{name}: {exc}; point at a JSONL file") from exc
    return RecordFile(
        uri,
        name,
        np.array(offsets, dtype=np.int64),
        np.array(lengths, dtype=np.int32),
        np.array(lines, dtype=np.int32),
        quarantine,
        reader.lines,
        reader.sha256,
        storage_options,
    )


def read_records(
    uri: str,
    name: str,
    validate: Callable[[dict], str | None],
    max_bad_fraction: float,
    storage_options: dict | None = None,
    limits: ReadLimits = DEFAULT_LIMITS,
) -> RecordFile:
    """Read a JSONL file; lines that are not JSON objects or that `validate` rejects go to the quarantine.

    Args:
        uri: the file (local or s3://).
        name: dataset name used in the quarantine and in errors.
        validate: returns None for a good record, else the reason (e.g. "missing key 'chosen'").
        max_bad_fraction: raise when more than this share of lines is bad.
        storage_options: fsspec options.
        limits: the per-line byte limit (longer lines are quarantined as `line_too_long`, never held whole).

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: when the file has no good record, or too many bad ones (the message names the top reasons
            with an example each).
    """
    out = _read_lines(uri, name, validate, storage_options, limits, Quarantine())
    _check_usable(f"{name}: {uri}", len(out), out.total_lines, out.quarantine, max_bad_fraction)
    return out


def _check_usable(
    label: str, records: int, total_lines: int, quarantine: Quarantine, max_bad_fraction: float
) -> None:
    if not records:
        raise ValueError(
            f"{label} has no usable record ({total_lines} lines, {len(quarantine)} bad: "
            f"{quarantine.summary() or 'the file is empty'})"
        )
    quarantine.check(total_lines, max_bad_fraction)


@dataclass
class RecordSource:
    """One dataset of a record set: its valid records and where their files may be.

    Attributes:
        name: the dataset's name (the meta key, or the stage's name for a single JSONL); quarantine entries
            and sample names use it with the line number.
        file: where the records are (parsed on demand: `file.record(i)`), their line numbers and the skipped
            lines.
        roots: where the records' `image` paths resolve (confined: `DatasetRoots.resolve`).
        repeat_time: times per epoch (fractional: a seeded subset), from the meta file.
        max_dynamic_patch: the dataset's tile budget per sample, when the meta file sets one.
        data_augment: the meta file's `data_augment`.
    """

    name: str
    file: RecordFile
    roots: DatasetRoots
    repeat_time: float = 1.0
    max_dynamic_patch: int | None = None
    data_augment: bool = False


@dataclass
class RecordSet:
    """The records a stage reads: one source per JSONL file, in meta-file order, and one quarantine."""

    path: str
    sources: list[RecordSource]
    quarantine: Quarantine
    sha256: str

    @property
    def total_lines(self) -> int:
        return sum(s.file.total_lines for s in self.sources)

    @property
    def records(self) -> int:
        return sum(len(s.file) for s in self.sources)

    def report(self) -> dict:
        return {
            "file": self.path,
            "datasets": {s.name: {"lines": s.file.total_lines, "used": len(s.file)} for s in self.sources},
            "lines": self.total_lines,
            "used": self.records,
            **self.quarantine.report(),
        }


def read_record_set(
    uri: str,
    name: str,
    validate: Callable[[dict], str | None],
    max_bad_fraction: float,
    *,
    image_root: str | None = None,
    storage_options: dict | None = None,
    limits: ReadLimits = DEFAULT_LIMITS,
) -> RecordSet:
    """Read a stage's records from one JSONL file or from every JSONL file an InternVL meta file lists.

    A meta file is validated like SFT's (`load_meta`: unknown keys, wrong types and bad values name the dataset
    and key); each dataset's images resolve inside its `root` (null or empty: the annotation's directory) or its
    `allowed_roots`. A single JSONL's images resolve inside `image_root` (default `images/` beside the JSONL's
    directory). Bad lines go to one quarantine under their dataset's name and line.

    Args:
        uri: a JSONL file, or a meta file (`*.json`).
        name: the dataset name of a single JSONL file.
        validate: returns None for a good record, else the reason.
        max_bad_fraction: raise when more than this share of all lines is bad.
        image_root: the image root of a single JSONL file (a meta file gives each dataset its own root).
        storage_options: fsspec options.
        limits: the per-line byte limit.

    Raises:
        FileNotFoundError: when the file, or an annotation a meta file names, does not exist.
        MetaError: a wrong meta file, or a dataset whose `length` differs from its annotation's line count.
        ValueError: when no record is usable or too many lines are bad (top reasons with an example each), or
            when `image_root` is given with a meta file.
    """
    quarantine = Quarantine()
    if not is_meta_file(uri):
        file = _read_lines(uri, name, validate, storage_options, limits, quarantine)
        _check_usable(f"{name}: {uri}", len(file), file.total_lines, quarantine, max_bad_fraction)
        roots = DatasetRoots(image_root or default_image_root(uri))
        # No meta file: augmentation is the stage's setting alone (the loader ANDs it with data_augment).
        return RecordSet(uri, [RecordSource(name, file, roots, data_augment=True)], quarantine, file.sha256)
    if image_root is not None:
        raise ValueError(
            f"{uri} is a meta file: each dataset's images are under its own 'root'; remove image_root"
        )
    meta = load_meta(uri, storage_options=storage_options)
    sources = []
    for dataset, spec in meta.datasets.items():
        file = _read_lines(spec.annotation, dataset, validate, storage_options, limits, quarantine)
        if spec.length is not None and spec.length != file.total_lines:
            raise MetaError(
                f"dataset {dataset!r}: meta says length {spec.length} but {spec.annotation} has "
                f"{file.total_lines} lines; fix the key 'length'"
            )
        roots = DatasetRoots(spec.root or annotation_dir(spec.annotation), spec.allowed_roots)
        sources.append(
            RecordSource(dataset, file, roots, spec.repeat_time, spec.max_dynamic_patch, spec.data_augment)
        )
    hashes = {"meta": meta.sha256, "annotations": {s.name: s.file.sha256 for s in sources}}
    sha256 = hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()
    records = sum(len(s.file) for s in sources)
    _check_usable(
        f"meta file {uri}", records, sum(s.file.total_lines for s in sources), quarantine, max_bad_fraction
    )
    return RecordSet(uri, sources, quarantine, sha256)
