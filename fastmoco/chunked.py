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
"""
from __future__ import annotations

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
