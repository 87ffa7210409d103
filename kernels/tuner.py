"""Per-shape choices made by timing on the GPU: launch configs, and kernel vs torch.

`triton.autotune` picks meta-parameters of one launch whose grid may depend on
them, but the buffers a launcher allocates cannot (LayerNorm's backward writes
one partial row per program, so the program count sizes a buffer). `Tuner`
tunes whole launches instead: once per key, on the GPU, it times
`launch(config)` for every candidate on the live arguments (every candidate
only writes its outputs, so running it again is harmless) and keeps the
fastest. A candidate that cannot run there (out of registers or shared memory)
is skipped.

`kernel_or_torch` makes the other per-shape choice with the same `Tuner`: the
ops switch's "auto" (`fastmoco/ops.py`) asks an op's module whether its kernel
beats torch's own op at a shape (LayerNorm: F.layer_norm; attention: SDPA), and
the module answers from one timing of forward + backward of both on fresh
tensors of that shape (`fwd_bwd_launch`), or from its fallback table.

The tuning run synchronizes the host, once per key (the first step of a run).
Under the interpreter, on the CPU, during CUDA graph capture, or with
FASTMOCO_TUNE=0, the default config (or the fallback table) is used and
nothing is timed.
"""
import os
from dataclasses import dataclass, field
from typing import Callable, Hashable, Iterable, Sequence

import torch
import triton
from triton.runtime import errors as _errors

from .interpreter import interpreting

# What a candidate that cannot run raises (PTXASError is newer than some Triton releases).
_CANNOT_RUN = tuple(e for e in (getattr(_errors, "OutOfResources", None), getattr(_errors, "PTXASError", None)) if e)


def tuning_enabled(t: torch.Tensor) -> bool:
    return (
        t.is_cuda
        and os.environ.get("FASTMOCO_TUNE", "1") != "0"
        and not interpreting()
        and not torch.cuda.is_current_stream_capturing()
    )


@dataclass
class Tuner:
    """Per-key choice among candidate launch configs; `chosen` maps key -> (config, ms)."""
    name: str
    warmup_ms: int = 5
    rep_ms: int = 20
    chosen: dict[Hashable, tuple[object, float]] = field(default_factory=dict)

    def pick(self, key: Hashable, candidates: Sequence, default, launch: Callable[[object], None],
             probe: torch.Tensor):
        """The config to use for `key`; times `candidates` the first time a key is seen on a GPU."""
        if not tuning_enabled(probe):  # checked first: FASTMOCO_TUNE=0 gives the default even after tuning
            return default
        hit = self.chosen.get(key)
        if hit is not None:
            return hit[0]
        timings = []
        for config in candidates:
            try:
                ms = triton.testing.do_bench(lambda: launch(config), warmup=self.warmup_ms, rep=self.rep_ms)
            except _CANNOT_RUN:
                continue
            timings.append((ms, config))
        if not timings:
            raise RuntimeError(f"{self.name}: no candidate config runs for {key}")
        ms, best = min(timings, key=lambda t: t[0])
        self.chosen[key] = (best, ms)
        return best


KERNEL, TORCH = "kernel", "torch"


def kernel_or_torch(tuner: Tuner, key: Hashable, fallback: bool, probe: torch.Tensor,
                    make_launch: Callable[[], Callable[[str], None]]) -> bool:
    """True when the kernel is the faster of KERNEL and TORCH for `key`: timed once on the GPU
    (`make_launch()` is called only then: it builds the timing tensors), else `fallback`."""
    default = KERNEL if fallback else TORCH
    if not tuning_enabled(probe):
        return fallback
    hit = tuner.chosen.get(key)
    if hit is not None:
        return hit[0] == KERNEL
    return tuner.pick(key, [KERNEL, TORCH], default, make_launch(), probe) == KERNEL


def fwd_bwd_launch(fns: dict[str, Callable], inputs: Sequence[torch.Tensor], grads: Iterable[torch.Tensor],
                   *args) -> Callable[[str], None]:
    """launch(choice): forward of fns[choice](*inputs, *args), then the gradients of its output(s)
    (given `grads`) with respect to every input; what `kernel_or_torch` times."""
    grads = list(grads)

    def launch(choice: str) -> None:
        with torch.enable_grad():
            outs = fns[choice](*inputs, *args)
            outs = outs if isinstance(outs, tuple) else (outs,)
            torch.autograd.grad(outs, list(inputs), grads)

    return launch
