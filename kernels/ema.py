"""Momentum-encoder update (EMA): momentum <- m * momentum + (1 - m) * online.

The coefficients come as a pair `coef` = [m, 1 - m] (fp32, on the device): both rounded once from the
float64 schedule (`ema_coefficients`), as the official loops do (they multiply fp32 weights by the
Python floats m and 1 - m). Forming 1 - m in fp32 from an fp32 m instead loses up to 1e-4 of it over
MoCo v3's ViT-B schedule, and m rounds to exactly 1 in its last 102 of 93,600 iterations (DINO
ViT-S/16's, 100 epochs at batch 1024: the last 217 of 125,100), where 1 - m is still ~1e-11.

What is fused (`ema_multi_`): the EMA of every momentum-encoder parameter in
ONE launch over arbitrary tensor lists (module parameters, ZeRO-3 shard
lists), the read of [m, 1 - m] from a device tensor (no host sync: the update
can sit in a captured CUDA graph), and, in the same pass, the bf16 copy of the updated
weights that the momentum encoder's bf16 forward uses. The kernel walks a
table of data pointers, sizes and per-program (tensor index, start) pairs, the
way apex's multi_tensor_apply chunks its lists; the table is built once per
set of data pointers and cached on the device, so a step does no host->device
copy.

The state is fp32: with m = 0.99999 a bf16 weight could not absorb an update
of size (1 - m) * (online - momentum). The arithmetic is fp32; online weights
may be bf16 or fp32. There is no backward: EMA runs under no_grad.

Under TRITON_INTERPRET=1 the multi-tensor kernel runs as it is: the
interpreter hands CPU tensors to the kernel without copying them and treats a
pointer as a host address, so addresses read from the table and cast with
`.to(tl.pointer_type(...))` are dereferenceable. (With CUDA tensors under the
interpreter they would not be: arguments are copied to the host, table
entries would still be device addresses. The launcher refuses that case.)

The other paths, chosen by the ops switch (`fastmoco.ops.ema_update_`):
`ema_foreach_` (torch multi-tensor ops: the CPU path) and `ema_apex_` (apex's
amp_C, the switch's mode "apex"). Reference: `ema_ref_` (the official
per-parameter loop).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .interpreter import cast_rtne, interpreting
from .multi_tensor import block_table, program_block, table_pointer

BLOCK = 4096  # elements per program: 16 per thread at 8 warps, 4 x 128-bit fp32 loads
NUM_WARPS = 8
_ALIGN_BYTES = 16  # a 128-bit vector access needs a 16-byte aligned address
_PLAN_CACHE_SIZE = 8  # momentum/online/shard sets kept; each entry holds only int64 tables
_APEX_CHUNK = 2048 * 32  # elements per chunk of apex's multi_tensor_apply (its default)


@triton.jit
def _ema_block(mom_ptr, onl_ptr, out_ptr, offs, numel, m, c, IS_FULL: tl.constexpr, HAS_OUT: tl.constexpr,
               IS_INTERPRETER: tl.constexpr):
    """One block: fp32 EMA, optional bf16 copy. The full-block branch carries no
    mask so the accesses vectorise; only a tensor's last block is masked."""
    if IS_FULL:
        w = tl.load(mom_ptr + offs)
        x = tl.load(onl_ptr + offs).to(tl.float32)
    else:
        mask = offs < numel
        w = tl.load(mom_ptr + offs, mask=mask, other=0.0)
        x = tl.load(onl_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = m * w + c * x  # c = 1 - m, rounded from float64; the reference loop's order
    if IS_FULL:
        tl.store(mom_ptr + offs, w)
        if HAS_OUT:
            tl.store(out_ptr + offs, cast_rtne(w, tl.bfloat16, IS_INTERPRETER))
    else:
        tl.store(mom_ptr + offs, w, mask=mask)
        if HAS_OUT:
            tl.store(out_ptr + offs, cast_rtne(w, tl.bfloat16, IS_INTERPRETER), mask=mask)


@triton.jit
def _ema_multi_kernel(
    ptr_tab,  # (3, T) int64 data addresses: momentum (fp32), online, bf16 copy
    numel_tab,  # (T,) int64 element counts
    blk_tab,  # (2, B) int64: tensor index, start element of program b
    coef_ptr,  # (2,) fp32: m, 1 - m
    T,
    B,
    BLOCK: tl.constexpr,
    IS_ONLINE_BF16: tl.constexpr,
    HAS_OUT: tl.constexpr,
    IS_ALIGNED: tl.constexpr,  # every address 16-byte aligned: vector accesses allowed
    IS_INTERPRETER: tl.constexpr,
):
    t, start, numel = program_block(blk_tab, numel_tab, B)
    mom_ptr = table_pointer(ptr_tab, T, 0, t, tl.float32)
    if IS_ONLINE_BF16:
        onl_ptr = table_pointer(ptr_tab, T, 1, t, tl.bfloat16)
    else:
        onl_ptr = table_pointer(ptr_tab, T, 1, t, tl.float32)
    out_ptr = table_pointer(ptr_tab, T, 2, t, tl.bfloat16)
    if IS_ALIGNED:
        # Addresses from a table carry no alignment facts; without these hints
        # every access would be scalar. Starts are multiples of BLOCK.
        mom_ptr = tl.multiple_of(mom_ptr, 16)
        onl_ptr = tl.multiple_of(onl_ptr, 16)
        out_ptr = tl.multiple_of(out_ptr, 16)
        start = tl.multiple_of(start, BLOCK)
    offs = start + tl.arange(0, BLOCK)
    m = tl.load(coef_ptr)
    c = tl.load(coef_ptr + 1)
    if start + BLOCK <= numel:
        _ema_block(mom_ptr, onl_ptr, out_ptr, offs, numel, m, c, True, HAS_OUT, IS_INTERPRETER)
    else:
        _ema_block(mom_ptr, onl_ptr, out_ptr, offs, numel, m, c, False, HAS_OUT, IS_INTERPRETER)


def ema_coefficients(m) -> torch.Tensor:
    """[m, 1 - m] in fp32, each rounded once from float64: a Python float gives (2,), a float64
    schedule (T,) gives the (T, 2) table whose row t a step passes (a view: no copy, no sync)."""
    m = torch.as_tensor(m, dtype=torch.float64)
    return torch.stack([m, 1.0 - m], dim=-1).to(torch.float32)


def _as_coef(m, device: torch.device) -> torch.Tensor:
    """The (2,) fp32 [m, 1 - m] on `device`, from what a caller passes:
    - the pair itself (a (2,) tensor, e.g. a row of `ema_coefficients`'s table): as is;
    - a Python float: both formed in float64 (an allocation and a copy per call);
    - a one-element tensor m: 1 - m formed in m's dtype on the device (no sync). For a float64 m both
      round once; for an fp32 m >= 0.5, 1 - m is exact (Sterbenz), so the pair is that fp32 m's own,
      but that m carries the rounding of the schedule: pass the pair from float64 where you have it."""
    if not isinstance(m, torch.Tensor):
        return ema_coefficients(float(m)).to(device)
    if m.device != device:
        raise ValueError(f"EMA coefficients on {m.device}, the tensors on {device}")
    if m.numel() == 1:
        m = m.reshape(())
        return torch.stack([m, 1 - m]).to(torch.float32)
    if m.shape != (2,):
        raise ValueError(f"EMA coefficients must be [m, 1 - m] of shape (2,) or one m, got shape {tuple(m.shape)}")
    return m.to(torch.float32)


def _check_launchable(t: torch.Tensor) -> None:
    if interpreting() and t.is_cuda:
        raise RuntimeError("TRITON_INTERPRET=1 runs kernels on CPU tensors only")


class _MultiPlan:
    """Device tables for one set of (momentum, online, bf16 copy) tensors."""

    def __init__(self, momentum, online, bf16_out, device):
        T = len(momentum)
        outs = bf16_out if bf16_out is not None else momentum
        ptrs = [t.data_ptr() for t in momentum] + [t.data_ptr() for t in online] + [t.data_ptr() for t in outs]
        numels = torch.tensor([t.numel() for t in momentum], dtype=torch.int64)
        blocks = (numels + BLOCK - 1) // BLOCK  # programs per tensor (>= 1 for non-empty tensors)
        tensor_idx, starts = block_table(torch.arange(T), blocks, BLOCK)
        self.T = T
        self.B = tensor_idx.numel()
        self.is_aligned = all(p % _ALIGN_BYTES == 0 for p in ptrs)
        host = torch.cat([torch.tensor(ptrs, dtype=torch.int64), numels, tensor_idx, starts])
        # One host->device copy, paid once per cached plan (warm up before CUDA-graph capture).
        table = host.to(device)
        self.ptr_tab = table[: 3 * T]
        self.numel_tab = table[3 * T: 4 * T]
        self.blk_tab = table[4 * T:]


_plans: dict[tuple, _MultiPlan] = {}


def _plan_for(momentum, online, bf16_out) -> _MultiPlan:
    outs = bf16_out if bf16_out is not None else ()
    key = (momentum[0].device, online[0].dtype, bf16_out is not None,
           tuple(t.data_ptr() for t in momentum), tuple(t.data_ptr() for t in online),
           tuple(t.data_ptr() for t in outs), tuple(t.numel() for t in momentum))
    plan = _plans.get(key)
    if plan is None:
        _check_lists(momentum, online, bf16_out)
        if len(_plans) >= _PLAN_CACHE_SIZE:
            _plans.pop(next(iter(_plans)))  # oldest first
        plan = _plans[key] = _MultiPlan(momentum, online, bf16_out, momentum[0].device)
    return plan


def _check_lists(momentum, online, bf16_out) -> None:
    """Run once per plan: the cache key pins data pointers and sizes."""
    if len(online) != len(momentum) or (bf16_out is not None and len(bf16_out) != len(momentum)):
        raise ValueError("momentum, online (and bf16_out) lists must have the same length")
    dev, odt = momentum[0].device, online[0].dtype
    if odt not in (torch.float32, torch.bfloat16):
        raise TypeError(f"online weights must be fp32 or bf16, got {odt}")
    outs = bf16_out if bf16_out is not None else momentum
    for i, (w, x, o) in enumerate(zip(momentum, online, outs)):
        if w.dtype != torch.float32:
            raise TypeError(f"momentum[{i}] must be fp32 (EMA state), got {w.dtype}")
        if x.dtype != odt:
            raise TypeError(f"online[{i}] is {x.dtype}; all online tensors must share one dtype ({odt})")
        if bf16_out is not None and o.dtype != torch.bfloat16:
            raise TypeError(f"bf16_out[{i}] must be bf16, got {o.dtype}")
        if x.numel() != w.numel() or o.numel() != w.numel():
            raise ValueError(f"tensor {i}: numel mismatch ({w.numel()}, {x.numel()}, {o.numel()})")
        if not (w.is_contiguous() and x.is_contiguous() and o.is_contiguous()):
            raise ValueError(f"tensor {i} is not contiguous")
        if w.device != dev or x.device != dev or o.device != dev:
            raise ValueError(f"tensor {i} is not on {dev}")


@torch.no_grad()
def ema_multi_(momentum_list: list[torch.Tensor], online_list: list[torch.Tensor], m,
               bf16_out_list: list[torch.Tensor] | None = None) -> None:
    """ONE launch over arbitrary tensor lists (apex multi_tensor_apply style).

    momentum_list fp32 (updated in place); online_list all bf16 or all fp32,
    same numels; bf16_out_list, if given, bf16 tensors that receive the updated
    momentum. `m`: the pair [m, 1 - m] (see `_as_coef`). Pointer tables are cached keyed on the data pointers: after the
    first call with a given set of tensors a call does no host->device copy.
    """
    keep = [i for i, t in enumerate(momentum_list) if t.numel() > 0]
    if not keep:
        return
    if len(keep) != len(momentum_list):
        momentum_list = [momentum_list[i] for i in keep]
        online_list = [online_list[i] for i in keep]
        bf16_out_list = None if bf16_out_list is None else [bf16_out_list[i] for i in keep]
    _check_launchable(momentum_list[0])
    plan = _plan_for(momentum_list, online_list, bf16_out_list)
    coef = _as_coef(m, momentum_list[0].device)
    _ema_multi_kernel[(plan.B,)](
        plan.ptr_tab, plan.numel_tab, plan.blk_tab, coef, plan.T, plan.B,
        BLOCK=BLOCK, IS_ONLINE_BF16=online_list[0].dtype == torch.bfloat16,
        HAS_OUT=bf16_out_list is not None, IS_ALIGNED=plan.is_aligned, IS_INTERPRETER=interpreting(),
        num_warps=NUM_WARPS)


def _apex_axpby():
    try:
        import amp_C  # noqa: PLC0415 (optional dependency)
    except ImportError:
        return None
    return amp_C.multi_tensor_axpby


@torch.no_grad()
def ema_apex_(momentum: list[torch.Tensor], online: list[torch.Tensor], m, bf16_out=None) -> None:
    """apex amp_C.multi_tensor_axpby: momentum = (1 - m) * online + m * momentum.

    WARNING: host sync. axpby takes its coefficients as host floats, so the pair is read with
    .tolist(); the bf16 copy is a second pass. (The ops switch's mode "apex": a bench's alternative.)
    """
    axpby = _apex_axpby()
    if axpby is None:
        raise RuntimeError("the EMA's apex path (FASTMOCO_FUSED_EMA=apex) needs apex's amp_C, which is not installed")
    mf, cf = _as_coef(m, momentum[0].device).tolist()  # host sync (see docstring)
    noop = torch.zeros(1, dtype=torch.int32, device=momentum[0].device)
    axpby(_APEX_CHUNK, noop, [list(online), list(momentum), list(momentum)], cf, mf, -1)
    if bf16_out is not None:
        torch._foreach_copy_(bf16_out, momentum)


def ema_ref_(momentum: list[torch.Tensor], online: list[torch.Tensor], m) -> None:
    """Per-parameter loop, as the official MoCo v3 and DINO code do it: w * m + x * (1 - m), the two
    coefficients rounded from float64 (see `_as_coef` for what `m` may be)."""
    if not momentum:
        return
    coef = _as_coef(m, momentum[0].device)
    for pk, pq in zip(momentum, online):
        pk.mul_(coef[0]).add_(pq.to(pk.dtype) * coef[1])


@torch.no_grad()
def ema_foreach_(momentum: list[torch.Tensor], online: list[torch.Tensor], m, bf16_out=None) -> None:
    """Multi-tensor EMA in torch ops, then (optionally) bf16_out <- momentum; `m` the pair [m, 1 - m]
    on the params' device (see `_as_coef`; no host sync)."""
    if not momentum:
        return
    coef = _as_coef(m, momentum[0].device)
    if online[0].dtype != momentum[0].dtype:
        online = [p.to(momentum[0].dtype) for p in online]
    torch._foreach_mul_(momentum, coef[0])
    torch._foreach_add_(momentum, torch._foreach_mul(online, coef[1]))
    if bf16_out is not None:
        torch._foreach_copy_(list(bf16_out), list(momentum))
