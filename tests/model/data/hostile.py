"""A hostile dataset: every record tries to escape its root, hang the reader, crash it or make it read forever.

`build_hostile_dataset(tmp)` writes `tmp/ds/{meta.json, data.jsonl, images/...}` and files outside the root
(`tmp/outside/canary.png`) that no record may reach, and returns the expected quarantine reason per JSONL line.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

from PIL import Image

LONG_LINE_BYTES = 50 * 1024 * 1024  # the attack campaign's 50 MB line
# Files outside the dataset root that records point at (directly, by traversal or through symlinks).
SECRETS = ("/etc/passwd", "/etc/hostname", "/etc/shadow", "/dev/zero")


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares `width`×`height` pixels in a few dozen bytes (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def build_hostile_dataset(tmp: Path) -> tuple[Path, dict[int, str], Path]:
    """Write the hostile dataset under `tmp`.

    Returns:
        (meta file, {line number: expected quarantine reason} for every bad line, the outside directory).
    """
    root, outside = tmp / "ds", tmp / "outside"
    images = root / "images"
    images.mkdir(parents=True)
    outside.mkdir()
    Image.new("RGB", (32, 32), "red").save(images / "ok.png")
    Image.new("RGB", (32, 32), "blue").save(outside / "canary.png")
    (images / "link_out.png").symlink_to(outside / "canary.png")
    (images / "passwd.png").symlink_to("/etc/passwd")
    (images / "shadow.png").symlink_to("/etc/shadow")
    (images / "zero.png").symlink_to("/dev/zero")
    os.mkfifo(images / "fifo.png")
    (images / "a_directory.png").mkdir()
    (images / "bomb.png").write_bytes(_png_header(20000, 20000))
    with open(images / "huge.png", "wb") as f:  # sparse: 100 MB on paper, nothing on disk
        f.truncate(100 * 1024 * 1024)
    conv = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."}]
    text = [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}]

    def image(path, **extra) -> bytes:
        return json.dumps({"image": path, "conversations": conv, **extra}).encode()

    lines: list[tuple[bytes, str | None]] = [
        (image("ok.png"), None),
        (json.dumps({"conversations": text}).encode(), None),
        (image("../outside/canary.png"), "outside_root"),
        (image(str(outside / "canary.png")), "outside_root"),
        (image("link_out.png"), "outside_root"),
        (image("../../../../etc/passwd"), "outside_root"),
        (image("/etc/hostname"), "outside_root"),
        (image("passwd.png"), "outside_root"),
        (image("shadow.png"), "outside_root"),
        (image("/dev/zero"), "outside_root"),
        (image("zero.png"), "outside_root"),
        (image("fifo.png"), "not_a_file"),
        (image("a_directory.png"), "not_a_file"),
        (image("bomb.png"), "image_too_large"),
        (image("huge.png"), "file_too_large"),
        (image(5), "malformed"),
        (image([None]), "malformed"),
        (image(""), "malformed"),
        (json.dumps({"conversations": [{"from": ["human"], "value": "hi"}, conv[1]]}).encode(), "malformed"),
        (
            json.dumps({"conversations": [{"from": "human", "value": {"x": 1}}, conv[1]]}).encode(),
            "malformed",
        ),
        (json.dumps({"conversations": "hello"}).encode(), "malformed"),
        (b"[1, 2, 3]", "malformed"),
        (
            b'{"conversations": [{"from": "human", "value": "caf\xe9"}, {"from": "gpt", "value": "x"}]}',
            "bad_encoding",
        ),
        (b'{"conversations": NaN}', "malformed_json"),
        (b"{not json", "malformed_json"),
        (
            b'{"conversations": [{"from": "human", "value": "' + b"x" * LONG_LINE_BYTES + b'"}]}',
            "line_too_long",
        ),
        (image("ok.png", id="again"), None),
    ]
    (root / "data.jsonl").write_bytes(b"\n".join(line for line, _ in lines) + b"\n")
    meta = root / "meta.json"
    meta.write_text(json.dumps({"hostile": {"root": str(images), "annotation": str(root / "data.jsonl")}}))
    expected = {number: reason for number, (_, reason) in enumerate(lines, start=1) if reason}
    return meta, expected, outside
