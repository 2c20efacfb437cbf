"""Helpers for tests that start a server process."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx


def wait_until_ready(url: str, process: subprocess.Popen, log_path: Path, timeout_s: float) -> None:
    """Poll `url` until it answers 200; fail with the server's log when the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert process.poll() is None, Path(log_path).read_text()[-3000:]
        assert time.monotonic() < deadline, f"the server did not become ready within {timeout_s:.0f} s"
        time.sleep(0.25)
