"""The few collectives MoCo v3 needs, working on one process and on gloo/NCCL alike."""
from __future__ import annotations

import torch
import torch.distributed as dist

# What a launcher (or `train.fill_single_process_env`) sets for one rank; a child that is a run of
# its own is started without them.
RENDEZVOUS_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


@torch.no_grad()
def concat_all_gather(t: torch.Tensor) -> torch.Tensor:
    """(N, ...) per rank -> (N * world, ...) in rank order. No gradient (MoCo's keys)."""
    world = get_world_size()
    if world == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t):
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad):
        # d(sum_r y)/dx_r: every rank's loss depends on every rank's input through the sum
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def all_reduce_sum_autograd(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks; the gradient of each rank's input is the sum of all ranks' output gradients."""
    if get_world_size() == 1:
        return t
    return _AllReduceSum.apply(t)
