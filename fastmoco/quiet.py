"""Quiet by default: a run prints fastmoco's lines; `--verbose` (or FASTMOCO_VERBOSE=1) adds the libraries'.

What is held back, each a line a user cannot act on:
- DeepSpeed's warnings and notices while it is imported and starts ("Setting accelerator to CPU. If
  you have GPU or other accelerator, we were unable to detect it." on every CPU rank, torch's "No CUDA
  runtime is found" through its op builders): `logging.disable(WARNING)` around those calls only, so
  an ERROR still shows and anything logged later shows as usual;
- the torch profiler's (kineto's) "USDT ... profiler_start/stop" lines and, without CUDA, its
  "gpuGetDeviceCount failed with code 35" (the bench's breakdown profiles steps): KINETO_LOG_LEVEL;
- torch.distributed's FutureWarnings, which DeepSpeed's calls raise on every rank and step.

The choice travels in the environment, so launched ranks and loader workers follow their command.
The launchers are processes of their own: `deepspeed --quiet` silences DeepSpeed's launcher.
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings

ENV = "FASTMOCO_VERBOSE"


def verbose() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


def add_flag(parser) -> None:
    parser.add_argument("--verbose", action="store_true",
                        help="also print the libraries' own notices (DeepSpeed, the torch profiler); "
                             f"the same as {ENV}=1")


def configure(verbose_flag: bool = False) -> None:
    """Called once at the start of every command, after its arguments are parsed."""
    if verbose_flag:
        os.environ[ENV] = "1"
    if verbose():
        return
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")   # read when the profiler first starts
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")


@contextlib.contextmanager
def library_logs():
    """Around a library call that logs what a user cannot act on: warnings and below are held back."""
    if verbose():
        yield
        return
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def import_deepspeed():
    """`import deepspeed` without its start-up notices (its first import picks the accelerator and says so)."""
    with library_logs():
        import deepspeed
    return deepspeed
