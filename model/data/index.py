"""An index of a JSONL annotation's line offsets: records are read and parsed when drawn, not held in memory.

InternVL-scale annotations run to tens of millions of records; holding them parsed costs ~2 KB per record on
every rank. The index holds, per record, its byte offset (int64), length (int32) and 1-based line number
(int32): 16 bytes. It is built in one streaming pass that also hashes the file (so provenance stays exact), is
vectorised with numpy (a 1M-line file indexes in about a second), and is cached under
`$VLPIPE_HOME/cache/index/` keyed by the file's identity (path, size, modification time or ETag), so every
rank after the first, and every rerun, loads it in milliseconds.

Lines longer than `max_line_bytes` are never held whole: they are recorded as `line_too_long` with their size
and left out of the index. Blank lines are skipped (InternVL counts only non-empty lines).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vlpipe.model.files import LineBlock, open_regular, split_lines
from vlpipe.model.storage import filesystem, is_remote, vlpipe_home

log = logging.getLogger(__name__)

INDEX_VERSION = 1
_CHUNK = 4 * 1024 * 1024
# A record is multimodal when it has an "image" or "video" key (a key: the quoted name followed by a colon
# cannot occur inside a JSON string, where quotes are escaped).
_MEDIA_KEY = re.compile(rb'"(?:image|video)"\s*:\s*(?!\s|null)')
_WHITESPACE = np.zeros(256, dtype=bool)
_WHITESPACE[[9, 10, 13, 32]] = True


@dataclass
class AnnotationIndex:
    """Where each non-empty line of an annotation starts, how long it is and its line number.

    Attributes:
        offsets: byte offset of each indexed line (int64).
        lengths: its length in bytes without the newline (int32).
        numbers: its 1-based line number (int32).
        sha256: the whole file's hash.
        lines: non-empty lines in the file (indexed + too long).
        multimodal: whether any line has an image or video key.
        too_long: `(line number, size)` of lines above the cap (not indexed).
    """

    offsets: np.ndarray
    lengths: np.ndarray
    numbers: np.ndarray
    sha256: str
    lines: int
    multimodal: bool
    too_long: list[tuple[int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.offsets.shape[0])

    @property
    def nbytes(self) -> int:
        """Memory held by the per-record arrays."""
        return int(self.offsets.nbytes + self.lengths.nbytes + self.numbers.nbytes)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        info = {
            "version": INDEX_VERSION,
            "sha256": self.sha256,
            "lines": self.lines,
            "multimodal": self.multimodal,
            "too_long": self.too_long,
        }
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(
                f, offsets=self.offsets, lengths=self.lengths, numbers=self.numbers, info=json.dumps(info)
            )
        tmp.replace(path)  # atomic: a concurrent rank never sees half an index

    @classmethod
    def load(cls, path: Path) -> AnnotationIndex | None:
        try:
            with np.load(path, allow_pickle=False) as data:
                info = json.loads(str(data["info"]))
                if info.get("version") != INDEX_VERSION:
                    return None
                return cls(
                    data["offsets"],
                    data["lengths"],
                    data["numbers"],
                    info["sha256"],
                    int(info["lines"]),
                    bool(info["multimodal"]),
                    [tuple(t) for t in info["too_long"]],
                )
        except (OSError, ValueError, KeyError):
            return None


def annotation_index(
    location: str, *, max_line_bytes: int, storage_options: dict | None = None, cache: bool = True
) -> AnnotationIndex:
    """The index of an annotation file, from the cache when the file is unchanged, else built (and cached).

    The cache key covers the file's path, size and modification time (ETag on `s3://`) and the line cap; a
    cache that cannot be written (read-only home) is skipped with a warning, never an error.

    Raises:
        FileNotFoundError, vlpipe.model.files.NotRegularFileError: as `build_index`.
    """
    path = _cache_path(location, max_line_bytes, storage_options) if cache else None
    if path is not None and path.exists():
        index = AnnotationIndex.load(path)
        if index is not None:
            return index
    index = build_index(location, max_line_bytes=max_line_bytes, storage_options=storage_options)
    if path is not None:
        try:
            index.save(path)
        except OSError as exc:
            log.warning("could not cache the index of %s (%s); it is rebuilt next time", location, exc)
    return index


def _cache_path(location: str, cap: int, storage_options: dict | None) -> Path | None:
    if is_remote(location):
        fs, path = filesystem(location, storage_options)
        info = fs.info(path)
        identity = [location, info.get("size"), str(info.get("ETag") or info.get("LastModified") or "")]
    else:
        path = os.path.realpath(location.removeprefix("file://"))
        st = os.stat(path)
        identity = [path, st.st_size, st.st_mtime_ns, st.st_ino]
    key = hashlib.sha256(json.dumps([INDEX_VERSION, cap, *identity], default=str).encode()).hexdigest()[:24]
    return vlpipe_home() / "cache" / "index" / f"{key}.npz"


def build_index(
    location: str, *, max_line_bytes: int, storage_options: dict | None = None
) -> AnnotationIndex:
    """Index `location` in one streaming pass (see the module docstring).

    Raises:
        FileNotFoundError: the file does not exist.
        vlpipe.model.files.NotRegularFileError: it is a FIFO, device or directory.
    """
    builder = _Builder(max_line_bytes)
    digest = hashlib.sha256()
    with open_regular(location, storage_options=storage_options) as f:
        for block in split_lines(f, max_line_bytes, digest, _CHUNK):
            builder.add(block)
    return builder.finish(digest.hexdigest())


class _Builder:
    """The state of `build_index`: the blocks of lines `split_lines` yields, indexed with numpy."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.offsets: list[np.ndarray] = []
        self.lengths: list[np.ndarray] = []
        self.numbers: list[np.ndarray] = []
        self.too_long: list[tuple[int, int]] = []
        self.multimodal = False
        self.lines = 0  # non-empty lines

    def add(self, block: LineBlock) -> None:
        starts, sizes = block.starts, block.sizes
        numbers = np.arange(block.first, block.first + len(starts), dtype=np.int64)
        non_blank = _non_blank(block.data, starts, sizes)
        long_mask = sizes > self.cap
        keep = non_blank & ~long_mask
        self.too_long += [(int(numbers[i]), int(sizes[i])) for i in np.flatnonzero(long_mask)]
        self.lines += int(np.count_nonzero(non_blank | long_mask))
        self.offsets.append((block.base + starts[keep]).astype(np.int64))
        self.lengths.append(sizes[keep].astype(np.int32))
        self.numbers.append(numbers[keep].astype(np.int32))
        data = block.data
        if not self.multimodal and (b'"image"' in data or b'"video"' in data):
            ends = starts + sizes
            self.multimodal = any(keep[np.searchsorted(ends, m.start())] for m in _MEDIA_KEY.finditer(data))

    def finish(self, sha256: str) -> AnnotationIndex:
        return AnnotationIndex(
            _concatenate(self.offsets, np.int64),
            _concatenate(self.lengths, np.int32),
            _concatenate(self.numbers, np.int32),
            sha256,
            self.lines,
            self.multimodal,
            self.too_long,
        )


def _concatenate(parts: list[np.ndarray], dtype) -> np.ndarray:
    """Concatenate and empty `parts` (one array at a time, so the peak is one array's copy, not all three)."""
    result = np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype=dtype)
    parts.clear()
    return result


def _non_blank(data: bytes, starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Per line (at `starts`, `sizes` bytes without the newline): does it hold a non-whitespace byte?

    Only lines that are empty or start with whitespace need a look (JSONL lines start with `{`).
    """
    array = np.frombuffer(data, dtype=np.uint8)
    result = sizes > 0
    if not array.size:  # one line above the cap: only measured (the caller counts it by its size)
        return result
    suspect = np.flatnonzero(result & _WHITESPACE[array[np.minimum(starts, len(array) - 1)]])
    for i in suspect:
        result[i] = bool(data[starts[i] : starts[i] + sizes[i]].strip())
    return result
