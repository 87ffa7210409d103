"""Stopping a run cleanly: SIGTERM / SIGINT, a launcher that exits, and a wait for data that never ends.

SLURM and Kubernetes send SIGTERM before they kill a job; Ctrl-C sends
SIGINT. `Preemption.install()` turns both into a stop request; the training
loop asks `stop_agreed(step)` at step boundaries and, once every rank agrees,
saves a complete checkpoint and exits 0. Agreement is a MAX all-reduce of the
flag (SYNC POINT) made only every `every` steps (the trainer passes
`logging.check_finite_every`, where the loss check already waits for the
device), so a stop takes effect within that many steps, plus the save. One
process needs no collective and stops at the next step. A second SIGINT stops
at once (KeyboardInterrupt), without a checkpoint.

Launchers. torchrun (python -m torch.distributed.run) forwards SIGTERM to its
ranks (and kills them 30 s later); deepspeed's launch.py does too, but the
`deepspeed` command above it does not: it exits and leaves launch.py and the
ranks running. So a rank watches its launchers: `watch_launchers()` finds the
chain of launcher processes above it (`launcher_chain`: the parent and each
ancestor up to the first that is not a launcher) and a daemon thread waits for
any of them to exit (a pidfd per process: no polling, nothing in the training
step); an exit is a stop request like SIGTERM. `exit_with_parent()` makes the
kernel send SIGTERM when the direct parent dies (SIGKILLed launchers too). srun
forwards SIGTERM to the tasks it started.

Waiting for data. A stop request is acted on at a step boundary, which does not
come while a rank waits for a batch that never comes (a hung filesystem). The
loop takes its batches through `batches(loader)`: a stop request that finds the
rank waiting for more than `data_grace` seconds raises `DataWaitInterrupted`
(a SIGALRM timer, armed only while a request and a wait coincide), and the run
stops without saving (the other ranks wait inside a collective for this one).
"""
from __future__ import annotations

import os
import select
import signal
import threading
import time

import torch
import torch.distributed as dist

from fastmoco.pipelines.base import set_parent_death_signal

DATA_WAIT_GRACE_S = 10.0   # a batch normally comes within a second; a stopped run saves nothing past this

# How launcher processes show in /proc/<pid>/cmdline: the module after `python -m`, or the script's name.
LAUNCHER_MODULES = {"deepspeed.launcher.runner": "deepspeed", "deepspeed.launcher.launch": "deepspeed's launch.py",
                    "torch.distributed.run": "torchrun", "torch.distributed.launch": "torch.distributed.launch"}
LAUNCHER_SCRIPTS = {"deepspeed": "deepspeed", "ds": "deepspeed", "torchrun": "torchrun"}


class DataWaitInterrupted(RuntimeError):
    """A stop was requested while this rank waited for a batch that did not come."""


class Preemption:
    def __init__(self, every: int = 1, data_grace: float = DATA_WAIT_GRACE_S):
        self.every = max(1, int(every))
        self.data_grace = data_grace
        self.received: str | None = None   # what asked this rank to stop first (a signal's name, ...)
        self._previous: dict = {}
        self._waiting_since: float | None = None   # monotonic time the loop started waiting for a batch
        self._armed = False

    def install(self) -> Preemption:
        for sig, handler in ((signal.SIGTERM, self._handle), (signal.SIGINT, self._handle),
                             (signal.SIGALRM, self._alarm)):
            self._previous[sig] = signal.signal(sig, handler)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def request(self, reason: str) -> None:
        """Stop at the next agreed step boundary (from a signal handler or the launcher watch thread)."""
        self.received = self.received or reason
        if self._waiting_since is not None:
            self._arm()

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now
        self.request(signal.Signals(signum).name)

    def _arm(self) -> None:
        waited = time.monotonic() - (self._waiting_since or time.monotonic())
        signal.setitimer(signal.ITIMER_REAL, max(0.01, self.data_grace - waited))
        self._armed = True

    def _alarm(self, signum, frame) -> None:
        since = self._waiting_since
        if since is not None and self.received is not None:
            raise DataWaitInterrupted(f"{self.received} while waiting {time.monotonic() - since:.0f} s for the "
                                      "next batch")

    def batches(self, loader):
        """The loader's batches (the rest of its epoch). While waiting for one, a stop request that
        sees no batch within `data_grace` seconds raises DataWaitInterrupted."""
        it = iter(loader)
        while True:
            self._waiting_since = time.monotonic()
            if self.received is not None:
                self._arm()
            try:
                batch = next(it)
            except StopIteration:
                return
            finally:
                self._waiting_since = None
                if self._armed:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                    self._armed = False
            yield batch

    def stop_agreed(self, step: int) -> bool:
        """True on every rank once any rank has received a stop request; collective every `every`
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

    def watch_launchers(self) -> list[tuple[int, str]]:
        """Request a stop when any launcher above this process exits; returns the (pid, name) watched."""
        chain = launcher_chain()
        if chain:
            threading.Thread(target=_watch, args=(chain, self), name="fastmoco-launcher-watch", daemon=True).start()
        return chain


def _argv(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of `pid` from /proc, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()   # after the command name, which may hold spaces
        return fields[0], int(fields[1])
    except (OSError, IndexError, ValueError):
        return None


def launcher_name(argv: list[str]) -> str | None:
    """The launcher that command line `argv` runs (deepspeed, its launch.py, torchrun), or None."""
    for i, arg in enumerate(argv[:-1]):
        if arg == "-m" and argv[i + 1] in LAUNCHER_MODULES:
            return LAUNCHER_MODULES[argv[i + 1]]
    for arg in argv[:2]:   # the script itself, or `python <script>`
        name = os.path.basename(arg)
        if name in LAUNCHER_SCRIPTS:
            return LAUNCHER_SCRIPTS[name]
    return None


def launcher_chain(pid: int | None = None) -> list[tuple[int, str]]:
    """(pid, name) of the launchers above process `pid` (default: this one), nearest first: its parent
    and each further ancestor while it is a launcher (deepspeed -> launch.py -> rank)."""
    chain = []
    parent = os.getppid() if pid is None else (_stat(pid) or ("", 0))[1]
    while parent > 1:
        name = launcher_name(_argv(parent))
        if name is None:
            break
        chain.append((parent, name))
        parent = (_stat(parent) or ("", 0))[1]
    return chain


def _watch(chain: list[tuple[int, str]], preempt: Preemption) -> None:
    """Daemon thread: wait until one of `chain` exits, then request a stop."""
    try:
        fds = {os.pidfd_open(pid): (pid, name) for pid, name in chain}
    except (AttributeError, OSError):   # no pidfd (Linux < 5.3): look once a second
        while all((_stat(pid) or ("Z", 0))[0] not in "ZX" for pid, _ in chain):
            time.sleep(1.0)
        gone = next((p, n) for p, n in chain if (_stat(p) or ("Z", 0))[0] in "ZX")
    else:
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)   # readable once the process has exited
        gone = fds[poller.poll()[0][0]]
    preempt.request(f"the exit of its launcher {gone[1]} (PID {gone[0]})")


def exit_with_parent() -> bool:
    """SIGTERM to this process when its parent dies (Linux prctl); False where unavailable."""
    if not set_parent_death_signal(signal.SIGTERM):
        return False
    if os.getppid() == 1:  # the parent died before prctl: no signal will come
        os.kill(os.getpid(), signal.SIGTERM)
    return True
