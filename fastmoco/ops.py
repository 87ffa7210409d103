"""One switch per fused op (timm's `use_fused_attn` practice).

Every op the model uses goes through a function here that picks the Triton
kernel or the unfused PyTorch reference:

    mode  "auto" (default): on CUDA the kernel where the op's module says it is the faster
                            (attention: against SDPA; LayerNorm: against torch's; each timed
                            once per shape, `kernels/tuner.py`), else the reference
          "on":  always the kernel (CPU tests run it under TRITON_INTERPRET=1)
          "off": always the reference
          "apex" (op ema only): apex's amp_C on CUDA (a host sync per step; the reference on
                 the CPU), an alternative for benches

`use_fused(op, t, ...)` is the one decision: every op below asks it, so what
it answers is what runs. Nothing here imports Triton: the kernel modules are
imported when an op runs, so the model imports (and runs its references)
wherever the kernels' own modules can be imported.

Environment overrides, read once at import: FASTMOCO_FUSED=0 turns every op
off; FASTMOCO_FUSED_<OP>=0|1|auto sets one (OP: ATTENTION, LAYERNORM,
CONTRASTIVE, EMA, DINO_LOSS, LARS; FASTMOCO_FUSED_EMA=apex too). In code:
`set_fused(attention="off")` or the context manager `fused(attention="on", layernorm="on")`.
"""
from __future__ import annotations

import contextlib
import importlib
import os

import torch

OPS = ("attention", "layernorm", "contrastive", "ema", "dino_loss", "lars")
_MODES = ("auto", "on", "off")
_OP_MODES = {"ema": ("apex",)}  # modes only one op has
_ENV_VALUES = {"0": "off", "1": "on", "auto": "auto", "off": "off", "on": "on"}


def _modes_of(op: str) -> tuple[str, ...]:
    return _MODES + _OP_MODES.get(op, ())


def _modes_from_env() -> dict[str, str]:
    if "FASTMOCO_EMA_APEX" in os.environ:
        raise ValueError("FASTMOCO_EMA_APEX is gone: the EMA's apex path is FASTMOCO_FUSED_EMA=apex")
    default = "off" if os.environ.get("FASTMOCO_FUSED", "auto") in ("0", "off") else "auto"
    modes = {}
    for op in OPS:
        value = os.environ.get(f"FASTMOCO_FUSED_{op.upper()}", default)
        mode = _ENV_VALUES.get(value, value if value in _OP_MODES.get(op, ()) else None)
        if mode is None:
            raise ValueError(f"FASTMOCO_FUSED_{op.upper()}={value!r}: expected 0, 1, auto"
                             + "".join(f" or {m}" for m in _OP_MODES.get(op, ())))
        modes[op] = mode
    return modes


_mode = _modes_from_env()


def set_fused(**modes: str) -> None:
    for op, mode in modes.items():
        if op not in OPS:
            raise ValueError(f"unknown fused op {op!r} (known: {', '.join(OPS)})")
        if mode not in _modes_of(op):
            raise ValueError(f"fused op {op}: mode {mode!r} not in {_modes_of(op)}")
        _mode[op] = mode


@contextlib.contextmanager
def fused(**modes: str):
    saved = dict(_mode)
    set_fused(**modes)
    try:
        yield
    finally:
        _mode.update(saved)


def use_fused(op: str, t: torch.Tensor, **shape) -> bool:
    """Whether `op` runs its Triton kernel on t. `shape`: what else the op's "auto" choice depends
    on, as the op passes it (attention: num_heads; layernorm: weight_dtype, has_branch)."""
    mode = _mode[op]
    if mode != "auto" or not t.is_cuda:
        return mode == "on"  # "apex" is not our kernel: ema_update_ asks for it itself
    if op in ("attention", "layernorm"):  # per shape: the op's module times kernel vs torch
        return importlib.import_module(f"fastmoco.kernels.{op}").kernel_faster(t, **shape)
    return True


def attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, N, 3*H*D) qkv projection output -> (B, N, H*D) attention output. "auto" on CUDA runs
    the kernel or torch's SDPA, whichever is faster at this shape; "off" the reference."""
    from fastmoco.kernels import attention as module

    if use_fused("attention", qkv, num_heads=num_heads):
        return module.attention(qkv, num_heads)
    if _mode["attention"] == "auto" and qkv.is_cuda:
        return module.attention_sdpa(qkv, num_heads)
    return module.attention_ref(qkv, num_heads)


def attention_with_probs(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention`'s output and its probabilities (B, H, N, N) fp32, always on the reference path
    whatever the switch says: neither the kernel nor SDPA forms the probabilities. For attention maps."""
    from fastmoco.kernels import attention as module

    return module.attention_ref_with_probs(qkv, num_heads)


def layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    from fastmoco.kernels import layernorm as module

    fn = module.layernorm if use_fused("layernorm", x, weight_dtype=weight.dtype) else module.layernorm_ref
    return fn(x, weight, bias, eps)


def add_layernorm(x: torch.Tensor, branch: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + branch; returns (h, LayerNorm(h))."""
    from fastmoco.kernels import layernorm as module

    use = use_fused("layernorm", x, weight_dtype=weight.dtype, has_branch=True)
    return (module.add_layernorm if use else module.add_layernorm_ref)(x, branch, weight, bias, eps)


def symmetric_contrastive_loss(q1, q2, k1, k2, tau: float, offset: int) -> torch.Tensor:
    """ctr(q1, k2) + ctr(q2, k1) with keys k gathered from every rank; labels arange(N) + offset."""
    from fastmoco.kernels import contrastive as module

    use = use_fused("contrastive", q1)
    fn = module.symmetric_contrastive_loss if use else module.symmetric_contrastive_loss_ref
    return fn(q1, q2, k1, k2, tau, offset)


def dino_loss(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, tau_s: float,
              tau_t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DINO's cross-entropy over every (teacher crop i, student crop j != i) pair, and the sum of the
    teacher logits over crops and rows (K,) for the center. student (V_s, B, K), teacher (V_t, B, K)."""
    from fastmoco.kernels import dino_loss as module

    fn = module.dino_loss if use_fused("dino_loss", student) else module.dino_loss_ref
    return fn(student, teacher, center, tau_s, tau_t)


def ema_update_(momentum: list[torch.Tensor], online: list[torch.Tensor], m: torch.Tensor,
                bf16_out: list[torch.Tensor] | None = None) -> None:
    """momentum <- m * momentum + (1 - m) * online over every tensor of the lists, then (optionally)
    bf16_out <- momentum. `m`: the (2,) fp32 device tensor [m, 1 - m], both rounded from float64
    (`fastmoco.kernels.ema.ema_coefficients`; no host sync); momentum fp32, online fp32/bf16.
    The kernel path is one launch (`ema_multi_`); mode "apex" takes apex's on CUDA."""
    if not momentum:
        return
    from fastmoco.kernels import ema as module

    if _mode["ema"] == "apex" and momentum[0].is_cuda:
        fn = module.ema_apex_
    elif use_fused("ema", momentum[0]):
        fn = module.ema_multi_
    else:
        fn = module.ema_foreach_
    fn(momentum, online, m, bf16_out)


def lars_(params: list[torch.Tensor], grads: list[torch.Tensor], mus: list[torch.Tensor], *, lr: float,
          weight_decay: float, momentum: float, trust_coefficient: float, pieces=None) -> None:
    """One LARS step (MoCo v3's official rule, kernels/lars.py) over the lists, in place: the kernel's
    three launches on CUDA (or under the interpreter when "on"), else the per-parameter reference.
    `pieces` (kernels/lars.py `Pieces`): the tensors are parts of parameters (ZeRO-1/2 partitions)."""
    if not params and pieces is None:
        return
    from fastmoco.kernels import lars as module

    fn = module.lars_ if use_fused("lars", params[0] if params else pieces.sums) else module.lars_ref_
    fn(params, grads, mus, lr=lr, weight_decay=weight_decay, momentum=momentum,
       trust_coefficient=trust_coefficient, pieces=pieces)
