"""Reading the files a dataset names: confined to the dataset's roots, regular files only, every read bounded.

A dataset file is untrusted input. A record's image (or video) path must resolve, symlinks included, inside
the dataset's root or inside a root the meta file explicitly allows; anything else is refused as
`outside_root` *before* it is opened, so a record can never make a training pod read `/etc/shadow`. Only
regular files are opened (a FIFO would block, `/dev/zero` never ends): a local file is opened with
`O_NONBLOCK` and checked with `fstat` on the open descriptor, so nothing can swap the file in between. Reads
are bounded in bytes, and JSONL files are read line by line with a per-line cap, so an over-long line costs
its bytes on disk, not gigabytes of memory. Invalid UTF-8 is refused (`bad_encoding`), never rewritten.

Every refusal is a `SampleError` whose `reason` a quarantine counts.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from vlpipe.model.errors import SampleError
from vlpipe.model.storage import filesystem, is_remote

MiB = 1024 * 1024
_CHUNK = MiB


class NotRegularFileError(ValueError):
    """A path names a FIFO, device, socket or directory where a regular file is needed."""


class ReadLimits(BaseModel):
    """Upper bounds on what one record may make the reader read."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_file_bytes: int = Field(
        default=64 * MiB, gt=0, description="Largest image file read; larger files are `file_too_large`."
    )
    max_video_bytes: int = Field(
        default=1024 * MiB, gt=0, description="Largest video file read; larger files are `file_too_large`."
    )
    max_line_bytes: int = Field(
        default=8 * MiB, gt=0, description="Longest JSONL line parsed; longer lines are `line_too_long`."
    )


DEFAULT_LIMITS = ReadLimits()


@dataclass(frozen=True)
class DatasetRoots:
    """Where a dataset's records may point: its root, plus roots the meta file allows explicitly.

    Args:
        root: the directory (local path or `s3://...` prefix) record paths are relative to.
        allowed: further roots an absolute path (or a symlink) may resolve into.
    """

    root: str
    allowed: tuple[str, ...] = ()

    def resolve(self, name: object, source: str) -> str:
        """The location of file `name` of a record, checked to lie inside the roots.

        Args:
            name: the path as written in the record (relative to the root, or absolute inside an allowed root).
            source: the record's name, used in errors.

        Returns:
            a local path (symlinks resolved) or a URL.

        Raises:
            SampleError: `malformed` when `name` is not a non-empty string, `outside_root` when it resolves
                outside every root (nothing is opened).
        """
        if not isinstance(name, str) or not name.strip() or "\x00" in name:
            raise SampleError(
                source, "malformed", f"a file path must be a non-empty string, got {_show(name)}"
            )
        roots = (self.root, *self.allowed)
        if is_remote(self.root) or is_remote(name):
            candidate = _remote_join(self.root, name)
            for root in roots:
                if is_remote(root) and _inside_remote(candidate, root):
                    return candidate
        else:
            candidate = os.path.realpath(os.path.join(self.root.removeprefix("file://"), name))
            for root in roots:
                if not is_remote(root) and _inside_local(
                    candidate, os.path.realpath(root.removeprefix("file://"))
                ):
                    return candidate
        raise SampleError(
            source,
            "outside_root",
            f"path {_show(name)} resolves outside the dataset root {self.root!r}; keep files under the root "
            "or list their directory in the dataset's allowed_roots",
        )


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _inside_local(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:
        return False


def _remote_join(root: str, name: str) -> str:
    if is_remote(name):
        protocol, rest = name.split("://", 1)
        return f"{protocol}://{posixpath.normpath(rest)}"
    protocol, rest = root.split("://", 1) if is_remote(root) else ("", root)
    joined = posixpath.normpath(posixpath.join(rest, name))
    return f"{protocol}://{joined}" if protocol else joined


def _inside_remote(url: str, root: str) -> bool:
    protocol, rest = root.split("://", 1)
    prefix = f"{protocol}://{posixpath.normpath(rest)}"
    return url == prefix or url.startswith(prefix.rstrip("/") + "/")


def read_bounded(
    location: str,
    *,
    max_bytes: int,
    source: str,
    missing_reason: str = "missing_image",
    storage_options: dict | None = None,
) -> bytes:
    """Read a whole regular file of at most `max_bytes` bytes.

    Args:
        location: a path or URL, already checked with `DatasetRoots.resolve` when it came from data.
        max_bytes: the most bytes read; a larger file is refused without reading it.
        source: the record's name, used in errors.
        missing_reason: the reason code when the file does not exist.
        storage_options: fsspec options for remote files.

    Raises:
        SampleError: `missing_reason`, `not_a_file` (FIFO, device, directory) or `file_too_large`.
    """
    if is_remote(location):
        return _read_remote(location, max_bytes, source, missing_reason, storage_options)
    path = location.removeprefix("file://")
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat below refuses it on the open descriptor.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError as exc:
        raise SampleError(
            source, missing_reason, f"{path} not found; check the dataset root and path"
        ) from exc
    except IsADirectoryError as exc:
        raise SampleError(source, "not_a_file", f"{path} is a directory, not a file") from exc
    except OSError as exc:
        raise SampleError(source, "unreadable_file", f"cannot open {path} ({exc.strerror})") from exc
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise SampleError(source, "not_a_file", f"{path} is not a regular file (FIFO, device or directory)")
    with os.fdopen(fd, "rb", buffering=0) as f:
        _check_size(info.st_size, max_bytes, path, source)
        data = f.read(max_bytes + 1)
    _check_size(len(data), max_bytes, path, source)
    return data


def check_size(f, max_bytes: int, location: str, source: str) -> None:
    """Refuse an open file (from `open_regular`) larger than `max_bytes` before reading it.

    Raises:
        SampleError: `file_too_large`.
    """
    size = os.fstat(f.fileno()).st_size if hasattr(f, "fileno") and not is_remote(location) else f.size
    _check_size(int(size or 0), max_bytes, location, source)


def _check_size(size: int, max_bytes: int, path: str, source: str) -> None:
    if size > max_bytes:
        raise SampleError(
            source,
            "file_too_large",
            f"{path} has more than {max_bytes} bytes (the read limit); shrink the file or raise max_file_bytes",
        )


def _read_remote(
    url: str, max_bytes: int, source: str, missing_reason: str, storage_options: dict | None
) -> bytes:
    fs, path = filesystem(url, storage_options)
    try:
        info = fs.info(path)
    except FileNotFoundError as exc:
        raise SampleError(
            source, missing_reason, f"{url} not found; check the dataset root and path"
        ) from exc
    if info.get("type") != "file":
        raise SampleError(source, "not_a_file", f"{url} is not a file")
    _check_size(int(info.get("size") or 0), max_bytes, url, source)
    with fs.open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    _check_size(len(data), max_bytes, url, source)
    return data


def open_regular(location: str, *, storage_options: dict | None = None):
    """Open a file for streaming, refusing anything but a regular file (a FIFO would block a reader forever).

    Raises:
        FileNotFoundError: when it does not exist.
        NotRegularFileError: when it is not a regular file.
    """
    if is_remote(location):
        fs, path = filesystem(location, storage_options)
        if not fs.exists(path):
            raise FileNotFoundError(f"{location} does not exist")
        if not fs.isfile(path):
            raise NotRegularFileError(f"{location} is not a file")
        return fs.open(path, "rb")
    path = location.removeprefix("file://")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotRegularFileError(f"{location} is not a regular file (FIFO, device or directory)")
    return os.fdopen(fd, "rb")


@dataclass
class JsonlLine:
    """One non-empty line of a JSONL file: its 1-based number, where it is (byte offset and length without the
    newline) and either the parsed value or why not."""

    number: int
    value: object = None
    error: SampleError | None = None
    offset: int = 0
    length: int = 0


@dataclass
class JsonlReader:
    """Streams a JSONL file line by line with bounded memory, hashing the bytes in the same pass.

    Over-long lines are skipped without being held in memory (`line_too_long`), invalid UTF-8 is refused
    (`bad_encoding`), unparsable lines are `malformed_json`. After iteration `sha256` is the file's hash and
    `lines` the number of non-empty lines.
    """

    location: str
    name: str
    limits: ReadLimits = DEFAULT_LIMITS
    storage_options: dict | None = None
    sha256: str = ""
    lines: int = 0

    def __iter__(self) -> Iterator[JsonlLine]:
        digest = hashlib.sha256()
        self.lines = 0
        cap = self.limits.max_line_bytes
        with open_regular(self.location, storage_options=self.storage_options) as f:
            for block in split_lines(f, cap, digest, _CHUNK):
                newline = int(block.terminated)
                for k, (start, size) in enumerate(
                    zip(block.starts.tolist(), block.sizes.tolist(), strict=True)
                ):
                    number, offset = block.first + k, block.base + start
                    if size > cap:
                        self.lines += 1
                        # The reported size counts the newline (the line's bytes in the file).
                        detail = line_too_long_detail(size + newline, cap)
                        yield JsonlLine(
                            number, error=self._error(number, "line_too_long", detail), offset=offset
                        )
                        continue
                    # Parsed with its newline, as the line was always read (a JSON error's column stays the same).
                    raw = block.data[start : start + size + newline]
                    if raw.strip():
                        self.lines += 1
                        yield self._parse(number, raw, offset, size)
        self.sha256 = digest.hexdigest()

    def _error(self, number: int, reason: str, detail: str) -> SampleError:
        return SampleError(f"{self.name}:{number}", reason, detail)

    def _parse(self, number: int, raw: bytes, offset: int, length: int) -> JsonlLine:
        try:
            value = parse_json_line(raw, f"{self.name}:{number}")
        except SampleError as exc:
            return JsonlLine(number, error=exc, offset=offset, length=length)
        return JsonlLine(number, value=value, offset=offset, length=length)


@dataclass(frozen=True)
class LineBlock:
    """Consecutive lines of a file, as `split_lines` yields them.

    Line k (number `first + k`) starts at file offset `base + starts[k]` and has `sizes[k]` bytes without its
    newline. When `sizes[k]` is within the cap its bytes are `data[starts[k] : starts[k] + sizes[k]]`, followed
    by its newline when `terminated`; a line above the cap is only measured (its bytes are not in `data`).

    Attributes:
        data: the bytes the lines are in.
        base: the file offset of `data[0]`.
        starts: each line's start in `data` (int64).
        sizes: each line's length in bytes without the newline (int64).
        first: the 1-based number of the first line.
        terminated: whether the lines end with a newline (only a file's last line may not).
    """

    data: bytes
    base: int
    starts: np.ndarray
    sizes: np.ndarray
    first: int
    terminated: bool


def split_lines(f, cap: int, digest, chunk_size: int = _CHUNK) -> Iterator[LineBlock]:
    """Split binary stream `f` into lines (blank ones included), hashing every byte into `digest`.

    `f` is read `chunk_size` bytes at a time. The lines wholly inside a chunk come as one block (split with
    numpy); a line that spans chunks is carried to its end and comes alone. At most `cap` bytes of a carried
    line are held: once it is longer, the rest is only counted and hashed.

    Args:
        f: a file opened for reading bytes.
        cap: the longest line, in bytes without its newline, whose bytes are kept.
        digest: a hashlib object updated with the whole stream.
        chunk_size: bytes per read.

    Yields:
        `LineBlock`s, in file order, covering every line.
    """
    number = 0  # lines completed so far
    chunk_offset = 0  # file offset of the next chunk
    carry, carry_start, carry_len = bytearray(), 0, 0  # the incomplete line (emptied once above the cap)
    while chunk := f.read(chunk_size):
        digest.update(chunk)
        first_nl = chunk.find(b"\n")
        head = chunk if first_nl < 0 else chunk[:first_nl]
        carry_len += len(head)
        if carry_len <= cap:
            carry += head
        else:
            carry.clear()
        if first_nl >= 0:
            number += 1
            yield _carried(carry, carry_start, carry_len, number, cap, terminated=True)
            cut = chunk.rfind(b"\n")
            if cut > first_nl:
                body = chunk[first_nl + 1 : cut + 1]
                ends = np.flatnonzero(np.frombuffer(body, dtype=np.uint8) == 10)
                starts = np.concatenate(([0], ends[:-1] + 1))
                yield LineBlock(body, chunk_offset + first_nl + 1, starts, ends - starts, number + 1, True)
                number += len(ends)
            tail = chunk[cut + 1 :]
            carry_start, carry_len = chunk_offset + cut + 1, len(tail)
            carry = bytearray(tail) if carry_len <= cap else bytearray()
        chunk_offset += len(chunk)
    if carry_len:
        yield _carried(carry, carry_start, carry_len, number + 1, cap, terminated=False)


def _carried(
    carry: bytearray, start: int, size: int, number: int, cap: int, *, terminated: bool
) -> LineBlock:
    """The block of one line carried across chunks."""
    data = b"" if size > cap else bytes(carry) + (b"\n" if terminated else b"")
    one = np.array([0], dtype=np.int64)
    return LineBlock(data, start, one, np.array([size], dtype=np.int64), number, terminated)


class RangeReader:
    """Reads byte ranges of one regular file through a handle opened on first use.

    Safe to share between threads (one lock) and across `fork` (a process that did not open the handle opens
    its own: a shared descriptor would share its file position); pickling drops the handle.

    Args:
        location: a local path or URL.
        storage_options: fsspec options for remote files.
    """

    def __init__(self, location: str, storage_options: dict | None = None) -> None:
        self.location = location
        self.storage_options = storage_options
        self._handle = None
        self._pid = -1
        self._lock = threading.Lock()

    def read(self, offset: int, length: int) -> bytes:
        """`length` bytes from `offset` (fewer at the end of the file).

        Raises:
            FileNotFoundError, NotRegularFileError: as `open_regular`.
        """
        with self._lock:
            if self._handle is None or self._pid != os.getpid():
                self._handle = open_regular(self.location, storage_options=self.storage_options)
                self._pid = os.getpid()
            self._handle.seek(offset)
            return self._handle.read(length)

    def close(self) -> None:
        with self._lock:
            if self._handle is not None and self._pid == os.getpid():
                self._handle.close()
            self._handle, self._pid = None, -1

    def __getstate__(self) -> dict:
        return {"location": self.location, "storage_options": self.storage_options}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["location"], state["storage_options"])


def line_too_long_detail(size: int, cap: int) -> str:
    """The quarantine detail of a JSONL line above the per-line cap."""
    return f"line has {size} bytes, above max_line_bytes {cap}; split the record or raise max_line_bytes"


def parse_json_line(raw: bytes, sample_id: str) -> object:
    """One JSONL line → its value.

    Raises:
        SampleError: `bad_encoding` (invalid UTF-8, never replaced) or `malformed_json` (including NaN/Infinity).
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SampleError(
            sample_id, "bad_encoding", f"invalid UTF-8 at byte {exc.start}; re-encode the file as UTF-8"
        ) from exc
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise SampleError(
            sample_id, "malformed_json", f"not valid JSON ({exc.msg} at column {exc.colno})"
        ) from exc
    except (ValueError, RecursionError) as exc:
        raise SampleError(sample_id, "malformed_json", f"not valid JSON ({str(exc)[:100]})") from exc


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")
