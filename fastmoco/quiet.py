"""Our lines only: the libraries' start-up chatter stays out of a run's output unless asked for.

    python fastmoco/train.py --config ... --verbose      # or FASTMOCO_VERBOSE=1: everything, as the libraries print it

Silenced (each seen on a plain run): DeepSpeed's accelerator detection ("Setting accelerator to
CPU ...") and its INFO lines, torch's cpp_extension warning "No CUDA runtime is found", and the
"... built successfully" print of DeepSpeed's op builder. Errors still pass: log records of level
ERROR and above, every exception, and the held-back output of a call that raises (printed before
the exception travels on).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import sys

VERBOSE_ENV = "FASTMOCO_VERBOSE"
_LIBRARY_LOGGERS = {"DeepSpeed": logging.WARNING, "torch.utils.cpp_extension": logging.ERROR}


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "0") == "1"


def set_verbose(on: bool) -> None:
    """`--verbose`: for this process and the ranks and workers it starts."""
    if on:
        os.environ[VERBOSE_ENV] = "1"


@contextlib.contextmanager
def held_back():
    """Library output inside the block (stdout prints and log records below ERROR) is dropped,
    unless verbose; if the block raises, what it printed comes out first."""
    if verbose():
        yield
        return
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            yield
    except BaseException:
        sys.stdout.write(out.getvalue())
        raise
    finally:
        logging.disable(previous)
        for name, level in _LIBRARY_LOGGERS.items():
            logging.getLogger(name).setLevel(level)


def import_deepspeed():
    """`import deepspeed` without its start-up lines (unless verbose)."""
    with held_back():
        import deepspeed
    return deepspeed
