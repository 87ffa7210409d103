"""One switch per fused op (timm's `use_fused_attn` practice).

Every op the model uses goes through a function here that picks the Triton
kernel or the unfused PyTorch reference:

    mode  "auto" (default): the kernel when the tensor is on CUDA, else the reference
                            (LayerNorm: on CUDA, whichever is faster at that shape; see below)
          "on":  always the kernel (CPU tests run it under TRITON_INTERPRET=1)
          "off": always the reference

Environment overrides, read once at import: FASTMOCO_FUSED=0 turns every op
off; FASTMOCO_FUSED_<OP>=0|1|auto sets one (OP: ATTENTION, LAYERNORM,
CONTRASTIVE, EMA). In code: `set_fused(attention="off")` or the context
manager `fused(attention="on", layernorm="on")`.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton

from fastmoco.kernels.tuner import Tuner, tuning_enabled

OPS = ("attention", "layernorm", "contrastive", "ema")
_MODES = ("auto", "on", "off")
_ENV_VALUES = {"0": "off", "1": "on", "auto": "auto", "off": "off", "on": "on"}


def _modes_from_env() -> dict[str, str]:
    default = "off" if os.environ.get("FASTMOCO_FUSED", "auto") in ("0", "off") else "auto"
    modes = {}
    for op in OPS:
        value = os.environ.get(f"FASTMOCO_FUSED_{op.upper()}", default)
        if value not in _ENV_VALUES:
            raise ValueError(f"FASTMOCO_FUSED_{op.upper()}={value!r}: expected 0, 1 or auto")
        modes[op] = _ENV_VALUES[value]
    return modes


_mode = _modes_from_env()


def set_fused(**modes: str) -> None:
    for op, mode in modes.items():
        if op not in OPS:
            raise ValueError(f"unknown fused op {op!r} (known: {', '.join(OPS)})")
        if mode not in _MODES:
            raise ValueError(f"fused op {op}: mode {mode!r} not in {_MODES}")
        _mode[op] = mode


@contextlib.contextmanager
def fused(**modes: str):
    saved = dict(_mode)
    set_fused(**modes)
    try:
        yield
    finally:
        _mode.update(saved)


# "auto" for LayerNorm on CUDA: the kernels where their forward + backward beat torch's. With
# tuning on (the default, kernels/tuner.py), each (width, rows bucket, dtypes, variant) is decided
# once by timing both on tensors of that shape: one host sync per shape, in the first step. With
# FASTMOCO_TUNE=0, the widths where the kernels measured faster on an H100 (bench/RESULTS.md,
# 2026-11-22, bf16, before launch-config tuning: C=768 1.56x; C=384 0.60x and C=1280 0.71x).
LAYERNORM_AUTO_WIDTHS = frozenset({768})
_LAYERNORM_DISPATCH = Tuner("layernorm dispatch")


def use_fused(op: str, t: torch.Tensor) -> bool:
    """The switch's answer for op on t (for LayerNorm in "auto", the untimed one: the widths above)."""
    mode = _mode[op]
    if mode == "auto" and op == "layernorm":
        return t.is_cuda and t.shape[-1] in LAYERNORM_AUTO_WIDTHS
    return mode == "on" or (mode == "auto" and t.is_cuda)


def _layernorm_timing_launch(x: torch.Tensor, weight: torch.Tensor, eps: float, has_branch: bool):
    """launch(choice) runs forward + backward of the kernel ("kernel") or torch ("torch") on fresh
    tensors shaped like x (as rows) and weight: what the dispatch decision times."""
    from fastmoco.kernels import layernorm as kernels

    C = x.shape[-1]
    g = torch.Generator(device=x.device).manual_seed(0)
    rand = lambda *shape, dtype: torch.randn(*shape, generator=g, device=x.device).to(dtype)  # noqa: E731
    rows = (x.numel() // C, C)
    acts = [rand(*rows, dtype=x.dtype).requires_grad_() for _ in range(2 if has_branch else 1)]
    params = [rand(C, dtype=weight.dtype).requires_grad_() for _ in range(2)]
    grads = [rand(*rows, dtype=x.dtype) for _ in range(2 if has_branch else 1)]  # for (h, y) or y
    fns = {"kernel": kernels.add_layernorm if has_branch else kernels.layernorm,
           "torch": kernels.add_layernorm_ref if has_branch else kernels.layernorm_ref}

    def launch(choice: str) -> None:
        with torch.enable_grad():
            outs = fns[choice](*acts, *params, eps)
            torch.autograd.grad(outs if has_branch else (outs,), acts + params, grads)

    return launch


def _layernorm_kernel_wins(x: torch.Tensor, weight: torch.Tensor, eps: float, has_branch: bool) -> bool:
    default = "kernel" if x.shape[-1] in LAYERNORM_AUTO_WIDTHS else "torch"
    if not tuning_enabled(x):
        return default == "kernel"
    C = x.shape[-1]
    key = (x.device.index, C, triton.next_power_of_2(max(x.numel() // C, 1)), x.dtype, weight.dtype, has_branch)
    hit = _LAYERNORM_DISPATCH.chosen.get(key)
    if hit is None:  # first time for this shape: time both (the tensors are made only then)
        launch = _layernorm_timing_launch(x, weight, eps, has_branch)
        return _LAYERNORM_DISPATCH.pick(key, ["kernel", "torch"], default, launch, x) == "kernel"
    return hit[0] == "kernel"


def _use_layernorm_kernel(x: torch.Tensor, weight: torch.Tensor, eps: float, has_branch: bool) -> bool:
    mode = _mode["layernorm"]
    if mode != "auto" or not x.is_cuda:
        return mode == "on"
    return _layernorm_kernel_wins(x, weight, eps, has_branch)


def attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, N, 3*H*D) qkv projection output -> (B, N, H*D) attention output."""
    if use_fused("attention", qkv):
        from fastmoco.kernels.attention import attention as fn
    else:
        from fastmoco.kernels.attention import attention_ref as fn
    return fn(qkv, num_heads)


def layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    if _use_layernorm_kernel(x, weight, eps, has_branch=False):
        from fastmoco.kernels.layernorm import layernorm as fn
    else:
        from fastmoco.kernels.layernorm import layernorm_ref as fn
    return fn(x, weight, bias, eps)


def add_layernorm(x: torch.Tensor, branch: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + branch; returns (h, LayerNorm(h))."""
    if _use_layernorm_kernel(x, weight, eps, has_branch=True):
        from fastmoco.kernels.layernorm import add_layernorm as fn
    else:
        from fastmoco.kernels.layernorm import add_layernorm_ref as fn
    return fn(x, branch, weight, bias, eps)


def symmetric_contrastive_loss(q1, q2, k1, k2, tau: float, offset: int) -> torch.Tensor:
    """ctr(q1, k2) + ctr(q2, k1) with keys k gathered from every rank; labels arange(N) + offset."""
    if use_fused("contrastive", q1):
        from fastmoco.kernels.contrastive import symmetric_contrastive_loss as fn
    else:
        from fastmoco.kernels.contrastive import symmetric_contrastive_loss_ref as fn
    return fn(q1, q2, k1, k2, tau, offset)


def ema_update_(momentum: list[torch.Tensor], online: list[torch.Tensor], m: torch.Tensor,
                bf16_out: list[torch.Tensor] | None = None) -> None:
    """momentum <- m * momentum + (1 - m) * online over every tensor of the lists, then (optionally)
    bf16_out <- momentum. `m` a 0-dim device tensor (no host sync); momentum fp32, online fp32/bf16."""
    from fastmoco.kernels.ema import ema_update_ as fn
    fn(momentum, online, m, bf16_out, use_kernel=use_fused("ema", momentum[0]))
