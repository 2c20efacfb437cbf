"""Run a function on a real 2-process gloo group on 127.0.0.1 (test helper)."""

from __future__ import annotations

import socket
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(
    rank: int, fn: Callable[..., None], world_size: int, init_method: str, args: tuple[Any, ...]
) -> None:
    dist.init_process_group(
        "gloo", init_method=init_method, rank=rank, world_size=world_size, timeout=timedelta(seconds=30)
    )
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_on_gloo(fn: Callable[..., None], world_size: int, *args: Any) -> None:
    """Call `fn(rank, world_size, *args)` in `world_size` spawned processes sharing a gloo group.

    `fn` must be a module-level function (it is pickled by reference). A failure on any rank raises here.
    """
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    mp.spawn(_entry, args=(fn, world_size, init_method, args), nprocs=world_size, join=True)
