"""Run a function on a real 2-process gloo group on 127.0.0.1 (test helper)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(
    rank: int, fn: Callable[..., None], world_size: int, init_method: str, args: tuple[Any, ...]
) -> None:
    # The timeout only bounds a hang: the ranks of a loaded machine may reach this far apart in time.
    timeout = timedelta(seconds=120)
    dist.init_process_group(
        "gloo", init_method=init_method, rank=rank, world_size=world_size, timeout=timeout
    )
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_on_gloo(fn: Callable[..., None], world_size: int, *args: Any) -> None:
    """Call `fn(rank, world_size, *args)` in `world_size` spawned processes sharing a gloo group.

    `fn` must be a module-level function (it is pickled by reference). A failure on any rank raises here.
    """
    # A file rendezvous: a port probed here and bound later by rank 0 could be taken meanwhile.
    with tempfile.TemporaryDirectory() as tmp:
        init_method = f"file://{tmp}/rendezvous"
        mp.spawn(_entry, args=(fn, world_size, init_method, args), nprocs=world_size, join=True)
