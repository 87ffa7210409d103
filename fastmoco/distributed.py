"""The few collectives MoCo v3 needs, working on one process and on gloo/NCCL alike."""
from __future__ import annotations

import atexit
import functools
import os
import sys
from typing import Callable, NoReturn

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


def end_process(code: int = 0) -> NoReturn:
    """End this process the way `exit` would, less the interpreter's finalization.

    A gloo worker thread lets go of a collective's tensors after the rank that waited on it has moved
    on. A tensor whose PyObject torch keeps alive (an nn.Parameter, one with attributes: DeepSpeed's)
    then needs the GIL, and a thread that asks for it while Python finalizes is made to exit inside a
    noexcept destructor: the process aborts ("terminate called without an active exception") after a
    complete, saved run. Seen on two CPU ranks under load; tests/test_distributed.py makes it happen
    on purpose. What exit runs before finalizing runs here: the atexit functions (DataLoader workers,
    logging, writers), then the buffered output is flushed."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):   # closed, or a pipe gone
            pass
    os._exit(code)


def process_entry(main: Callable[[list[str] | None], None]) -> Callable[[list[str] | None], None]:
    """For `main(argv=None)`: called with an argv list it is a function (tests); called without one
    it is the process (a console script, `python -m`), which ends through `end_process` with the exit
    status `exit` would give: 0, SystemExit's code, or 1 with its message on stderr."""
    @functools.wraps(main)
    def entry(argv: list[str] | None = None) -> None:
        if argv is not None:
            return main(argv)
        try:
            main(sys.argv[1:])
            code = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        end_process(code)
    return entry
