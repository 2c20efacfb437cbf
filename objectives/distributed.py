"""The one collective the objectives need: a sum over data-parallel ranks.

`torch.distributed` is used only when it is available and a default process group is initialised;
otherwise everything runs as a single process (world size 1). Every function here that reduces is a
collective: all ranks must call it the same number of times, in the same order.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """Whether a default `torch.distributed` process group is up.

    Returns:
        True when `torch.distributed` is available and initialised.
    """
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    """Number of ranks in the default process group.

    Returns:
        The world size, or 1 without an initialised process group.
    """
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum a tensor over all ranks.

    Args:
        tensor: the local value; it is not modified and gradients do not flow through the result.

    Returns:
        A detached copy holding the sum over ranks (the local value itself without a process group).
    """
    reduced = tensor.detach().clone()
    if is_distributed():
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced
