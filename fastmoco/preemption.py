"""Stopping a run cleanly: SIGTERM / SIGINT, and a launcher that dies.

SLURM and Kubernetes send SIGTERM before they kill a job; Ctrl-C sends
SIGINT. `Preemption.install()` turns both into a flag; the training loop asks
`stop_agreed(step)` at step boundaries and, once every rank agrees, saves a
complete checkpoint and exits 0. Agreement is a MAX all-reduce of the flag
(SYNC POINT) made only every `every` steps (the trainer passes
`logging.check_finite_every`, where the loss check already waits for the
device), so a signal takes effect within that many steps, plus the save. One
process needs no collective and stops at the next step. A second SIGINT stops
at once (KeyboardInterrupt), without a checkpoint.

`exit_with_parent()` asks Linux to send this process SIGTERM when its parent
(the torchrun or deepspeed launcher process that started it) dies, so ranks
never train on as orphans; SIGTERM then takes the path above.
"""
from __future__ import annotations

import ctypes
import os
import signal

import torch
import torch.distributed as dist

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class Preemption:
    def __init__(self, every: int = 1):
        self.every = max(1, int(every))
        self.received: str | None = None   # name of the first signal this rank received
        self._previous: dict = {}

    def install(self) -> Preemption:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now
        self.received = self.received or signal.Signals(signum).name

    def stop_agreed(self, step: int) -> bool:
        """True on every rank once any rank has received a signal; collective every `every`
        steps (every rank calls it after every step)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.received is not None
        if step % self.every:
            return False
        flag = torch.tensor([self.received is not None], dtype=torch.int32)
        if dist.get_backend() == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # SYNC POINT: every `every` steps
        return bool(flag.item())


def exit_with_parent() -> bool:
    """SIGTERM to this process when its parent dies (Linux prctl); False where unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() == 1:  # the parent died before prctl: no signal will come
        os.kill(os.getpid(), signal.SIGTERM)
    return True
