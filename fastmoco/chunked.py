"""The backbone in chunks: a recipe's batch on the memory of a chunk (`memory.backbone_chunk`).

MoCo's contrastive loss couples the samples only after the backbone. So the backbone runs over the
batch `chunk` images at a time without autograd, keeping only its outputs (a class token per image);
the heads, their BatchNorm over the whole batch and the loss run on the whole batch as without chunks;
then, in the backward, each chunk's backbone runs again with autograd and takes its slice of the
gradient of the outputs. Every parameter's gradient is the whole batch's, summed chunk by chunk.
Activations held: one chunk's, not the batch's. Cost: one more backbone forward.

DeepSpeed's ZeRO reduces a parameter's gradient when autograd accumulates it. The chunks accumulate
one gradient per chunk, so each chunk but the last sets `ds_grad_is_ready = False` on the parameters
(DeepSpeed's switch for tiled computations: the gradient stays in `.grad`, reduced once with the
last chunk's). Random state (drop path) is replayed: each chunk runs again from the RNG state its
first run started from, as torch.utils.checkpoint does.

`memory.backbone_chunk auto` (`auto_chunk`): on a GPU, the largest chunk that fits, found once at start
from two small probes of the backbone's forward and backward (memory grows linearly in the images of a
chunk), within 90% of the device memory not yet in use, less the gradients and optimizer moments the
first step will allocate. Every rank takes the smallest rank's chunk. Off the GPU: the whole micro batch.
"""
from __future__ import annotations

import math
from typing import Callable

import torch


def spans(n: int, size: int) -> list[tuple[int, int]]:
    """[start, end) of each chunk of `size` rows (the last may be shorter)."""
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def _rng_state(device: torch.device):
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class _ChunkedBackbone(torch.autograd.Function):
    """fn over the groups' chunks; one Function for all the groups of a step, so that the backward's
    very last chunk is the only one whose gradients ZeRO reduces."""

    @staticmethod
    def forward(ctx, fn, params, size, anchor, *xs):   # runs without autograd
        ctx.fn, ctx.params, ctx.size = fn, params, size
        ctx.save_for_backward(*xs)
        ctx.rng, outs = [], []
        for x in xs:
            parts = []
            for a, b in spans(x.shape[0], size):
                ctx.rng.append(_rng_state(x.device))
                parts.append(fn(x[a:b]))
            outs.append(torch.cat(parts))
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        xs = ctx.saved_tensors
        work = [(x, g, a, b) for x, g in zip(xs, grads) for a, b in spans(x.shape[0], ctx.size)]
        device = xs[0].device
        after = _rng_state(device)
        try:
            for i, ((x, g, a, b), state) in enumerate(zip(work, ctx.rng)):
                for p in ctx.params:   # ZeRO reduces each gradient once: with the last chunk's
                    p.ds_grad_is_ready = i == len(work) - 1
                _set_rng_state(state, device)
                with torch.enable_grad():
                    out = ctx.fn(x[a:b])
                torch.autograd.backward(out, torch.zeros_like(out) if g is None else g[a:b])
        finally:
            for p in ctx.params:
                p.ds_grad_is_ready = True
            _set_rng_state(after, device)
        return (None,) * (4 + len(xs))


def chunked_backbone(fn: Callable[[torch.Tensor], torch.Tensor], module: torch.nn.Module,
                     xs: list[torch.Tensor], size: int) -> list[torch.Tensor]:
    """[fn(x) for x in xs] (`module`'s forward; xs: groups of inputs, e.g. DINO's crops by resolution)
    computed `size` rows at a time; with autograd on and trainable parameters, the backward
    recomputes each chunk (module docstring). `size` 0, or no larger than any group: unchunked."""
    if size <= 0 or all(size >= x.shape[0] for x in xs):
        return [fn(x) for x in xs]
    if any(x.requires_grad for x in xs):
        raise ValueError("chunked_backbone: the inputs must not need a gradient (images do not)")
    params = [p for p in module.parameters() if p.requires_grad]
    if not (torch.is_grad_enabled() and params):
        return [torch.cat([fn(x[a:b]) for a, b in spans(x.shape[0], size)]) for x in xs]
    anchor = torch.empty(0, requires_grad=True)   # makes the outputs part of the graph (xs need no gradient)
    return list(_ChunkedBackbone.apply(fn, params, size, anchor, *xs))


# -- memory.backbone_chunk "auto" ---------------------------------------------------------------------------
PROBE = (4, 8)       # images of the two probes: small enough to fit wherever one image's backbone does
HEADROOM = 0.9       # of the memory still usable: the allocator's fragmentation, the heads, the no-grad passes


def cuda_peak(run: Callable[[], None]) -> int:
    """Peak bytes `run` allocates on the current CUDA device beyond what was allocated before it."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def probe_step(fn: Callable[[torch.Tensor], torch.Tensor], n: int, resolution: int, device,
               dtype) -> Callable[[], None]:
    """One chunk's work in the backward: the backbone's forward with autograd and its backward, here to
    the images (parameter gradients, allocated once whatever the chunk, are counted apart)."""
    def run():
        x = torch.randn(n, 3, resolution, resolution, device=device, dtype=dtype, requires_grad=True)
        with torch.enable_grad():
            out = fn(x)
            torch.autograd.grad(out, x, torch.ones_like(out))
    return run


def fit_chunk(measure: Callable[[int], int], images: int, budget: float) -> tuple[int, float, float]:
    """The largest chunk of at most `images` whose measured bytes fit `budget`, from `measure(n)` (peak
    bytes of one chunk of n images) at PROBE's two sizes: memory is base + n * per_image. Returns (chunk,
    per_image, base); chunk 0 when all `images` fit at once; a multiple of 8 from 16 on (whole tiles for
    the kernels). Raises ValueError when not even one image fits."""
    n1, n2 = min(PROBE[0], images), min(PROBE[1], images)
    m1 = measure(n1)
    if n2 == n1:   # a micro batch of a few images: one probe says it all
        per, base = m1 / n1, 0.0
    else:
        m2 = measure(n2)
        per = max(m2 - m1, 0) / (n2 - n1)
        base = m1 - n1 * per
    fits = math.inf if per <= 0 else (budget - base) / per
    if fits < 1:
        raise ValueError(f"memory.backbone_chunk auto: the backbone's forward and backward of one image needs "
                         f"{_gb(base + per)} and {_gb(max(budget, 0))} is left: the model does not fit this "
                         "device (try model.grad_checkpointing true, or more processes with ZeRO-3)")
    if fits >= images:
        return 0, per, base
    chunk = int(fits)
    return (chunk // 8 * 8 if chunk >= 16 else chunk), per, base


def _gb(nbytes: float) -> str:
    return f"{nbytes / 2 ** 30:.2f} GiB"


def auto_chunk(fn: Callable[[torch.Tensor], torch.Tensor], groups: list[tuple[int, int]], *, device,
               dtype, reserve: int) -> tuple[int, str]:
    """`memory.backbone_chunk auto` (module docstring): (chunk, the line that says what was found).
    groups: (images, resolution) of each backbone call of a step; the probes run at the largest
    resolution, so a chunk that fits there fits the others. `reserve`: bytes the first step will still
    allocate (gradients, optimizer moments)."""
    images = max(n for n, _ in groups)
    resolution = max(r for _, r in groups)
    if device.type != "cuda":
        return 0, (f"memory.backbone_chunk auto: the whole micro batch ({images} images per backbone call): "
                   "device memory is probed on a GPU only")
    free, total = torch.cuda.mem_get_info(device)
    usable = free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    budget = HEADROOM * usable - reserve
    with torch.random.fork_rng(devices=[device]):   # the probes' draws (images, drop path) leave the run's alone
        probe_step(fn, min(PROBE[0], images), resolution, device, dtype)()   # one-time allocations (workspaces)
        chunk, per, base = fit_chunk(lambda n: cuda_peak(probe_step(fn, n, resolution, device, dtype)), images,
                                     budget)
    torch.cuda.empty_cache()
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        agreed = torch.tensor([chunk if chunk else images + 1], device=device)   # 0 (all fit) ranks last
        torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN)
        chunk = 0 if agreed.item() > images else int(agreed.item())
    found = "the whole micro batch fits" if chunk == 0 else f"{chunk} of {images} images per backbone call"
    return chunk, (f"memory.backbone_chunk auto: {found} ({per / 2 ** 20:.1f} MiB per image at {resolution} px, "
                   f"{_gb(base)} fixed; {_gb(budget)} usable of {_gb(total)})")
