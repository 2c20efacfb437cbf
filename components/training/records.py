"""Reading the JSONL record files of the MPO and PRM stages, with every bad line counted by reason."""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Callable
from dataclasses import dataclass, field

from vlpipe.model.data.meta import Quarantine
from vlpipe.model.storage import filesystem, is_remote, join


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


def read_records(
    uri: str,
    name: str,
    validate: Callable[[dict], str | None],
    max_bad_fraction: float,
    storage_options: dict | None = None,
) -> RecordFile:
    """Read a JSONL file; lines that are not JSON objects or that `validate` rejects go to the quarantine.

    Args:
        uri: the file (local or s3://).
        name: dataset name used in the quarantine and in errors.
        validate: returns None for a good record, else the reason (e.g. "missing key 'chosen'").
        max_bad_fraction: raise when more than this share of lines is bad.
        storage_options: fsspec options.

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: when the file has no good record, or too many bad ones (the message gives the counts).
    """
    fs, path = filesystem(uri, storage_options)
    if not fs.exists(path):
        raise FileNotFoundError(f"{name}: {uri} does not exist")
    with fs.open(path, "rb") as f:
        raw = f.read()
    text = raw.decode("utf-8", errors="replace")
    out = RecordFile(uri, [], [], sha256=hashlib.sha256(raw).hexdigest())
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        out.total_lines += 1
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            out.quarantine.add(name, number, "malformed_json", str(exc))
            continue
        reason = validate(record) if isinstance(record, dict) else "each line must be a JSON object"
        if reason:
            out.quarantine.add(name, number, "invalid_record", reason)
            continue
        out.records.append(record)
        out.lines.append(number)
    if not out.records:
        raise ValueError(
            f"{name}: {uri} has no usable record ({out.total_lines} lines, {len(out.quarantine)} bad)"
        )
    out.quarantine.check(out.total_lines, max_bad_fraction)
    return out
