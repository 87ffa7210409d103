"""LARS (You et al. 2017) as MoCo v3's official optimizer defines it (moco-v3 moco/optimizer.py), fused over
every parameter of a group in three launches.

For each parameter p with gradient g and fp32 momentum buffer mu:

    if p.ndim > 1:                          (weights; biases and BN parameters are excluded from both)
        d = g + wd * p
        q = where(||p|| > 0, where(||d|| > 0, trust * ||p|| / ||d||, 1), 1)
        d = q * d
    else:
        d = g
    mu = momentum * mu + d
    p  = p - lr * mu

What is fused (`lars_`): the per-tensor norms need a reduction over each whole tensor before any element
can be updated, so a step is three launches whatever the number of parameters:
1. `_lars_norms_kernel`, one program per BLOCK of every adapted (ndim > 1) tensor: partial sums of p^2 and
   d^2 into a (2, B) buffer;
2. `_lars_ratio_kernel`, one program per adapted tensor: its partials summed in a fixed order (no atomics:
   the result does not depend on scheduling), the trust ratio q written to a per-tensor table;
3. `_lars_apply_kernel`, one program per BLOCK of every tensor: d, momentum and parameter update in one
   pass (each element read and written once).
The kernels walk tables of data pointers, sizes and per-program (tensor index, start) pairs, as
`kernels/ema.py` does; the tables are built once per set of data pointers and cached on the device.
Arithmetic and state are fp32; lr, wd, momentum and trust are kernel arguments (host floats: no copy,
no sync). No backward: an optimizer step runs under no_grad.

Under TRITON_INTERPRET=1 the kernels run on CPU tensors (addresses from a table are host addresses, see
`kernels/ema.py`). Reference: `lars_ref_` (the official per-parameter loop).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .interpreter import interpreting

BLOCK = 4096   # elements per program: 16 per thread at 8 warps
NUM_WARPS = 8
RBLOCK = 1024  # partial sums per iteration of the ratio kernel
_PLAN_CACHE_SIZE = 8


@triton.jit
def _lars_norms_kernel(
    ptr_tab,    # (3, T) int64 data addresses: param, grad, momentum buffer (all fp32)
    numel_tab,  # (T,) int64 element counts
    blk_tab,    # (2, B_a) int64: tensor index, start element of program b (adapted tensors only)
    part_ptr,   # (2, B_a) fp32 out: partial sums of p^2 and d^2
    wd,
    T,
    B_a,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(blk_tab + pid)
    start = tl.load(blk_tab + B_a + pid)
    numel = tl.load(numel_tab + t)
    p_ptr = tl.load(ptr_tab + t).to(tl.pointer_type(tl.float32))
    g_ptr = tl.load(ptr_tab + T + t).to(tl.pointer_type(tl.float32))
    offs = start + tl.arange(0, BLOCK)
    mask = offs < numel
    p = tl.load(p_ptr + offs, mask=mask, other=0.0)
    d = tl.load(g_ptr + offs, mask=mask, other=0.0) + wd * p
    tl.store(part_ptr + pid, tl.sum(p * p, axis=0))
    tl.store(part_ptr + B_a + pid, tl.sum(d * d, axis=0))


@triton.jit
def _lars_ratio_kernel(
    part_ptr,   # (2, B_a) fp32 partial sums from _lars_norms_kernel
    red_tab,    # (3, T_a) int64: tensor index, first partial, number of partials of adapted tensor i
    ratio_ptr,  # (T,) fp32 out: trust ratio q of each tensor (1 for the others, set once at plan time)
    trust,
    T_a,
    B_a,
    RBLOCK: tl.constexpr,
):
    i = tl.program_id(0)
    t = tl.load(red_tab + i)
    first = tl.load(red_tab + T_a + i)
    count = tl.load(red_tab + 2 * T_a + i)
    acc_p = tl.zeros((RBLOCK,), dtype=tl.float32)
    acc_d = tl.zeros((RBLOCK,), dtype=tl.float32)
    for j in range(0, count, RBLOCK):
        offs = j + tl.arange(0, RBLOCK)
        mask = offs < count
        acc_p += tl.load(part_ptr + first + offs, mask=mask, other=0.0)
        acc_d += tl.load(part_ptr + B_a + first + offs, mask=mask, other=0.0)
    p_norm = tl.sqrt(tl.sum(acc_p, axis=0))
    d_norm = tl.sqrt(tl.sum(acc_d, axis=0))
    safe = tl.where(d_norm > 0.0, d_norm, 1.0)  # both branches are evaluated: no 0/0 in the unused one
    q = tl.where(p_norm > 0.0, tl.where(d_norm > 0.0, trust * p_norm / safe, 1.0), 1.0)
    tl.store(ratio_ptr + t, q)


@triton.jit
def _lars_apply_kernel(
    ptr_tab,    # (3, T) int64 data addresses: param, grad, momentum buffer (all fp32)
    numel_tab,  # (T,) int64 element counts
    blk_tab,    # (2, B) int64: tensor index, start element of program b (every tensor)
    ratio_ptr,  # (T,) fp32 trust ratio q
    wdmask_ptr, # (T,) fp32: 1 where the tensor takes weight decay (ndim > 1), else 0
    lr,
    wd,
    momentum,
    T,
    B,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(blk_tab + pid)
    start = tl.load(blk_tab + B + pid)
    numel = tl.load(numel_tab + t)
    p_ptr = tl.load(ptr_tab + t).to(tl.pointer_type(tl.float32))
    g_ptr = tl.load(ptr_tab + T + t).to(tl.pointer_type(tl.float32))
    mu_ptr = tl.load(ptr_tab + 2 * T + t).to(tl.pointer_type(tl.float32))
    q = tl.load(ratio_ptr + t)
    wd_t = wd * tl.load(wdmask_ptr + t)
    offs = start + tl.arange(0, BLOCK)
    mask = offs < numel
    p = tl.load(p_ptr + offs, mask=mask)
    d = (tl.load(g_ptr + offs, mask=mask) + wd_t * p) * q  # the official order: add wd, then scale
    mu = momentum * tl.load(mu_ptr + offs, mask=mask) + d
    tl.store(mu_ptr + offs, mu, mask=mask)
    tl.store(p_ptr + offs, p - lr * mu, mask=mask)


class _Plan:
    """Device tables for one set of (param, grad, momentum buffer) tensors."""

    def __init__(self, params, grads, mus):
        device = params[0].device
        T = len(params)
        ptrs = [t.data_ptr() for t in params] + [t.data_ptr() for t in grads] + [t.data_ptr() for t in mus]
        numels = torch.tensor([t.numel() for t in params], dtype=torch.int64)
        adapted = torch.tensor([p.ndim > 1 for p in params])
        blocks = (numels + BLOCK - 1) // BLOCK
        idx, starts = _blocks(torch.arange(T), blocks)
        a_idx = torch.arange(T)[adapted]
        a_idx_blk, a_starts = _blocks(a_idx, blocks[adapted])
        a_first = torch.cumsum(blocks[adapted], 0) - blocks[adapted]
        self.T, self.B, self.T_a, self.B_a = T, idx.numel(), a_idx.numel(), a_idx_blk.numel()
        host = torch.cat([torch.tensor(ptrs, dtype=torch.int64), numels, idx, starts, a_idx_blk, a_starts,
                          a_idx, a_first, blocks[adapted]])
        table = host.to(device)  # one host->device copy per cached plan
        sizes = [3 * T, T, 2 * self.B, 2 * self.B_a, 3 * self.T_a]
        self.ptr_tab, self.numel_tab, self.blk_tab, self.a_blk_tab, self.red_tab = torch.split(table, sizes)
        self.wdmask = adapted.to(device, torch.float32)
        self.ratio = torch.ones(T, dtype=torch.float32, device=device)  # adapted entries rewritten every step
        self.partials = torch.empty(2, max(self.B_a, 1), dtype=torch.float32, device=device)


def _blocks(tensor_idx: torch.Tensor, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tensor index, start element) of every BLOCK-sized program over tensors of `blocks` programs each."""
    idx = torch.repeat_interleave(tensor_idx.to(torch.int64), blocks)
    first = torch.cumsum(blocks, 0) - blocks
    local = torch.arange(idx.numel(), dtype=torch.int64) - torch.repeat_interleave(first, blocks)
    return idx, local * BLOCK


_plans: dict[tuple, _Plan] = {}


def _plan_for(params, grads, mus) -> _Plan:
    key = tuple(t.data_ptr() for t in params) + tuple(t.data_ptr() for t in grads) + \
        tuple(t.data_ptr() for t in mus) + tuple(tuple(t.shape) for t in params)
    plan = _plans.get(key)
    if plan is None:
        _check_lists(params, grads, mus)
        if len(_plans) >= _PLAN_CACHE_SIZE:
            _plans.pop(next(iter(_plans)))  # oldest first
        plan = _plans[key] = _Plan(params, grads, mus)
    return plan


def _check_lists(params, grads, mus) -> None:
    """Run once per plan: the cache key pins data pointers and shapes."""
    if not len(params) == len(grads) == len(mus):
        raise ValueError(f"params, grads and momentum buffers differ in length: {len(params)}, {len(grads)}, "
                         f"{len(mus)}")
    dev = params[0].device
    if interpreting() and params[0].is_cuda:
        raise RuntimeError("TRITON_INTERPRET=1 runs kernels on CPU tensors only")
    for i, (p, g, mu) in enumerate(zip(params, grads, mus)):
        for what, t in (("param", p), ("grad", g), ("momentum buffer", mu)):
            if t.dtype != torch.float32:
                raise TypeError(f"LARS tensor {i}: {what} must be fp32, got {t.dtype}")
            if t.device != dev:
                raise ValueError(f"LARS tensor {i}: {what} is on {t.device}, tensor 0 on {dev}")
            if not t.is_contiguous():
                raise ValueError(f"LARS tensor {i}: {what} of shape {tuple(t.shape)} is not contiguous")
        if g.shape != p.shape or mu.shape != p.shape:
            raise ValueError(f"LARS tensor {i}: param {tuple(p.shape)}, grad {tuple(g.shape)}, momentum buffer "
                             f"{tuple(mu.shape)} differ in shape")


@torch.no_grad()
def lars_(params: list[torch.Tensor], grads: list[torch.Tensor], mus: list[torch.Tensor], *, lr: float,
          weight_decay: float, momentum: float, trust_coefficient: float) -> None:
    """One LARS step over every tensor of the lists, in place (params and mus), in three launches.
    All fp32 and contiguous; a tensor of ndim > 1 takes weight decay and the trust ratio."""
    keep = [i for i, p in enumerate(params) if p.numel() > 0]
    if not keep:
        return
    if len(keep) != len(params):
        params, grads, mus = ([ts[i] for i in keep] for ts in (params, grads, mus))
    plan = _plan_for(params, grads, mus)
    if plan.B_a:
        _lars_norms_kernel[(plan.B_a,)](plan.ptr_tab, plan.numel_tab, plan.a_blk_tab, plan.partials,
                                        float(weight_decay), plan.T, plan.B_a, BLOCK=BLOCK, num_warps=NUM_WARPS)
        _lars_ratio_kernel[(plan.T_a,)](plan.partials, plan.red_tab, plan.ratio, float(trust_coefficient),
                                        plan.T_a, plan.B_a, RBLOCK=RBLOCK, num_warps=4)
    _lars_apply_kernel[(plan.B,)](plan.ptr_tab, plan.numel_tab, plan.blk_tab, plan.ratio, plan.wdmask,
                                  float(lr), float(weight_decay), float(momentum), plan.T, plan.B, BLOCK=BLOCK,
                                  num_warps=NUM_WARPS)


@torch.no_grad()
def lars_ref_(params: list[torch.Tensor], grads: list[torch.Tensor], mus: list[torch.Tensor], *, lr: float,
              weight_decay: float, momentum: float, trust_coefficient: float) -> None:
    """The official MoCo v3 LARS step, one parameter at a time (moco/optimizer.py's loop)."""
    for p, dp, mu in zip(params, grads, mus):
        if p.ndim > 1:  # not a bias nor a normalization weight
            dp = dp.add(p, alpha=weight_decay)
            param_norm = torch.norm(p)
            update_norm = torch.norm(dp)
            one = torch.ones_like(param_norm)
            q = torch.where(param_norm > 0.0,
                            torch.where(update_norm > 0, trust_coefficient * param_norm / update_norm, one), one)
            dp = dp.mul(q)
        mu.mul_(momentum).add_(dp)
        p.add_(mu, alpha=-lr)
