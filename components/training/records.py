"""Reading the JSONL record files of the MPO and PRM stages, with every bad line counted by reason."""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from dataclasses import dataclass, field

from vlpipe.model.data.meta import Quarantine
from vlpipe.model.files import DEFAULT_LIMITS, JsonlReader, NotRegularFileError, ReadLimits
from vlpipe.model.storage import is_remote, join


def default_image_root(jsonl_uri: str) -> str:
    """`images/` beside the JSONL's directory: `<root>/prm/train.jsonl` → `<root>/images`."""
    parent = posixpath.dirname(posixpath.dirname(jsonl_uri.rstrip("/")))
    if not is_remote(jsonl_uri) and not parent:
        parent = "."
    return join(parent, "images")


@dataclass
class RecordFile:
    """The valid records of a JSONL file (with their 1-based line numbers) and the skipped ones."""

    path: str
    records: list[dict]
    lines: list[int]
    quarantine: Quarantine = field(default_factory=Quarantine)
    total_lines: int = 0
    sha256: str = ""

    def report(self) -> dict:
        return {
            "file": self.path,
            "lines": self.total_lines,
            "used": len(self.records),
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
        ValueError: when the file has no good record, or too many bad ones (the message gives the counts).
    """
    reader = JsonlReader(uri, name, limits, storage_options)
    out = RecordFile(uri, [], [])
    try:
        for line in reader:
            if line.error is not None:
                out.quarantine.add(name, line.number, line.error.reason, line.error.detail)
                continue
            reason = _validate(validate, line.value)
            if reason:
                out.quarantine.add(name, line.number, "invalid_record", reason)
                continue
            out.records.append(line.value)
            out.lines.append(line.number)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{name}: {uri} does not exist") from exc
    except NotRegularFileError as exc:
        raise ValueError(f"{name}: {exc}; point at a JSONL file") from exc
    out.total_lines, out.sha256 = reader.lines, reader.sha256
    if not out.records:
        raise ValueError(
            f"{name}: {uri} has no usable record ({out.total_lines} lines, {len(out.quarantine)} bad: "
            f"{out.quarantine.summary() or 'the file is empty'})"
        )
    out.quarantine.check(out.total_lines, max_bad_fraction)
    return out
