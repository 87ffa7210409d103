"""One switch per fused op (timm's `use_fused_attn` practice).

Every op the model uses goes through a function here that picks the Triton
kernel or the unfused PyTorch reference:

    mode  "auto" (default): the kernel when the tensor is on CUDA, else the reference
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


# "auto" runs the LayerNorm kernels only at widths where their forward + backward beat torch's
# on an H100 (bench/RESULTS.md, 2026-11-22, bf16: C=768 1.56x; C=384 0.60x and C=1280 0.71x,
# the backward being the slow part). Other widths (ViT-L's 1024 is unmeasured) take torch's.
LAYERNORM_AUTO_WIDTHS = frozenset({768})


def use_fused(op: str, t: torch.Tensor) -> bool:
    mode = _mode[op]
    if mode == "auto" and op == "layernorm":
        return t.is_cuda and t.shape[-1] in LAYERNORM_AUTO_WIDTHS
    return mode == "on" or (mode == "auto" and t.is_cuda)


def attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, N, 3*H*D) qkv projection output -> (B, N, H*D) attention output."""
    if use_fused("attention", qkv):
        from fastmoco.kernels.attention import attention as fn
    else:
        from fastmoco.kernels.attention import attention_ref as fn
    return fn(qkv, num_heads)


def layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    if use_fused("layernorm", x):
        from fastmoco.kernels.layernorm import layernorm as fn
    else:
        from fastmoco.kernels.layernorm import layernorm_ref as fn
    return fn(x, weight, bias, eps)


def add_layernorm(x: torch.Tensor, branch: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + branch; returns (h, LayerNorm(h))."""
    if use_fused("layernorm", x):
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
