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
2. `_lars_sumsq_kernel`, one program per adapted parameter: its partials summed in a fixed order (no
   atomics: the result does not depend on scheduling) into a (2, N) table of sum(p^2), sum(d^2);
3. `_lars_apply_kernel`, one program per BLOCK of every tensor: q from its parameter's sums, then d,
   momentum and parameter update in one pass (each element read and written once).
The kernels walk tables of data pointers, sizes and per-program (tensor index, start) pairs, as
`kernels/ema.py` does; the tables are built once per set of data pointers and cached on the device.

Pieces of parameters (ZeRO-1/2, `Pieces`): DeepSpeed steps the optimizer on each rank's slice of a flat
buffer, so a tensor of the lists may be the part of a parameter inside this rank's slice. `Pieces` names
the parameter each tensor belongs to and whether that parameter is adapted (the whole parameter's ndim);
the (2, N) table then holds this rank's partial sums per parameter, and `Pieces.all_reduce` (one
collective on 2N floats, between launches 2 and 3) makes them the whole parameters' sums. Every rank
joins it, also one whose slice holds no parameter.
Arithmetic and state are fp32; lr, wd, momentum and trust are kernel arguments (host floats: no copy,
no sync). No backward: an optimizer step runs under no_grad.

Under TRITON_INTERPRET=1 the kernels run on CPU tensors (addresses from a table are host addresses, see
`kernels/ema.py`). Reference: `lars_ref_` (the official per-parameter loop).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import triton
import triton.language as tl

from .interpreter import interpreting
from .multi_tensor import block_table, program_block, table_pointer

BLOCK = 4096   # elements per program: 16 per thread at 8 warps
NUM_WARPS = 8
RBLOCK = 1024  # partial sums per iteration of the sums kernel
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
    t, start, numel = program_block(blk_tab, numel_tab, B_a)
    p_ptr = table_pointer(ptr_tab, T, 0, t, tl.float32)
    g_ptr = table_pointer(ptr_tab, T, 1, t, tl.float32)
    offs = start + tl.arange(0, BLOCK)
    mask = offs < numel
    p = tl.load(p_ptr + offs, mask=mask, other=0.0)
    d = tl.load(g_ptr + offs, mask=mask, other=0.0) + wd * p
    tl.store(part_ptr + pid, tl.sum(p * p, axis=0))
    tl.store(part_ptr + B_a + pid, tl.sum(d * d, axis=0))


@triton.jit
def _lars_sumsq_kernel(
    part_ptr,   # (2, B_a) fp32 partial sums from _lars_norms_kernel
    red_tab,    # (3, N_a) int64: parameter index, first partial, number of partials of adapted parameter i
    sq_ptr,     # (2, N) fp32 out: sum(p^2), sum(d^2) of each parameter's local tensor (0 when it has none)
    N,
    N_a,
    B_a,
    RBLOCK: tl.constexpr,
):
    i = tl.program_id(0)
    n = tl.load(red_tab + i)
    first = tl.load(red_tab + N_a + i)
    count = tl.load(red_tab + 2 * N_a + i)
    acc_p = tl.zeros((RBLOCK,), dtype=tl.float32)
    acc_d = tl.zeros((RBLOCK,), dtype=tl.float32)
    for j in range(0, count, RBLOCK):
        offs = j + tl.arange(0, RBLOCK)
        mask = offs < count
        acc_p += tl.load(part_ptr + first + offs, mask=mask, other=0.0)
        acc_d += tl.load(part_ptr + B_a + first + offs, mask=mask, other=0.0)
    tl.store(sq_ptr + n, tl.sum(acc_p, axis=0))
    tl.store(sq_ptr + N + n, tl.sum(acc_d, axis=0))


@triton.jit
def _lars_apply_kernel(
    ptr_tab,    # (3, T) int64 data addresses: param, grad, momentum buffer (all fp32)
    numel_tab,  # (T,) int64 element counts
    blk_tab,    # (2, B) int64: tensor index, start element of program b (every tensor)
    owner_tab,  # (T,) int64: the parameter each tensor is (part of)
    sq_ptr,     # (2, N) fp32: sum(p^2), sum(d^2) of each whole parameter
    adapt_ptr,  # (N,) fp32: 1 where the parameter takes weight decay and the trust ratio (ndim > 1), else 0
    lr,
    wd,
    momentum,
    trust,
    T,
    N,
    B,
    BLOCK: tl.constexpr,
):
    t, start, numel = program_block(blk_tab, numel_tab, B)
    p_ptr = table_pointer(ptr_tab, T, 0, t, tl.float32)
    g_ptr = table_pointer(ptr_tab, T, 1, t, tl.float32)
    mu_ptr = table_pointer(ptr_tab, T, 2, t, tl.float32)
    n = tl.load(owner_tab + t)
    adapted = tl.load(adapt_ptr + n)
    p_norm = tl.sqrt(tl.load(sq_ptr + n))
    d_norm = tl.sqrt(tl.load(sq_ptr + N + n))
    safe = tl.where(d_norm > 0.0, d_norm, 1.0)  # both branches are evaluated: no 0/0 in the unused one
    q = tl.where(p_norm > 0.0, tl.where(d_norm > 0.0, trust * p_norm / safe, 1.0), 1.0)
    q = tl.where(adapted > 0.0, q, 1.0)
    wd_t = wd * adapted
    offs = start + tl.arange(0, BLOCK)
    mask = offs < numel
    p = tl.load(p_ptr + offs, mask=mask)
    d = (tl.load(g_ptr + offs, mask=mask) + wd_t * p) * q  # the official order: add wd, then scale
    mu = momentum * tl.load(mu_ptr + offs, mask=mask) + d
    tl.store(mu_ptr + offs, mu, mask=mask)
    tl.store(p_ptr + offs, p - lr * mu, mask=mask)


@dataclass(frozen=True)
class Pieces:
    """The parameters a step's tensors are parts of (ZeRO-1/2: each rank's part of each parameter).

    owner[k]: the parameter tensor k belongs to (at most one tensor per parameter); adapted[n]: parameter
    n takes weight decay and the trust ratio (its ndim > 1); sums: a (2, N) fp32 buffer on the device
    for sum(p^2), sum(d^2) per parameter (None: the step's own); all_reduce: sums that buffer over the
    ranks in place (None: one process)."""
    owner: tuple[int, ...]
    adapted: tuple[bool, ...]
    sums: torch.Tensor | None = None
    all_reduce: Callable[[torch.Tensor], None] | None = None

    @staticmethod
    def whole(params: list[torch.Tensor]) -> "Pieces":
        """Every tensor a whole parameter, in one process."""
        return Pieces(tuple(range(len(params))), tuple(p.ndim > 1 for p in params))


class _Plan:
    """Device tables for one set of (param, grad, momentum buffer) tensors and the parameters they belong to."""

    def __init__(self, params, grads, mus, owner: tuple[int, ...], adapted: tuple[bool, ...]):
        device = params[0].device
        T, N = len(params), len(adapted)
        ptrs = [t.data_ptr() for t in params] + [t.data_ptr() for t in grads] + [t.data_ptr() for t in mus]
        numels = torch.tensor([t.numel() for t in params], dtype=torch.int64)
        owner_t = torch.tensor(owner, dtype=torch.int64)
        adapted_n = torch.tensor(adapted, dtype=torch.bool)
        adapted_t = adapted_n[owner_t]  # per tensor
        blocks = (numels + BLOCK - 1) // BLOCK
        idx, starts = block_table(torch.arange(T), blocks, BLOCK)
        a_idx_blk, a_starts = block_table(torch.arange(T)[adapted_t], blocks[adapted_t], BLOCK)
        # per adapted parameter: its first partial and number of partials (0: no tensor of it here)
        first = torch.zeros(N, dtype=torch.int64)
        count = torch.zeros(N, dtype=torch.int64)
        first[owner_t[adapted_t]] = torch.cumsum(blocks[adapted_t], 0) - blocks[adapted_t]
        count[owner_t[adapted_t]] = blocks[adapted_t]
        n_a = torch.arange(N)[adapted_n]
        self.T, self.N, self.B, self.N_a, self.B_a = T, N, idx.numel(), n_a.numel(), a_idx_blk.numel()
        host = torch.cat([torch.tensor(ptrs, dtype=torch.int64), numels, idx, starts, a_idx_blk, a_starts,
                          n_a, first[n_a], count[n_a], owner_t])
        table = host.to(device)  # one host->device copy per cached plan
        sizes = [3 * T, T, 2 * self.B, 2 * self.B_a, 3 * self.N_a, T]
        self.ptr_tab, self.numel_tab, self.blk_tab, self.a_blk_tab, self.red_tab, self.owner_tab = \
            torch.split(table, sizes)
        self.adapted = adapted_n.to(device, torch.float32)
        self.sums = torch.zeros(2, N, dtype=torch.float32, device=device)  # when the caller has none
        self.partials = torch.empty(2, max(self.B_a, 1), dtype=torch.float32, device=device)


_plans: dict[tuple, _Plan] = {}


def _plan_for(params, grads, mus, pieces: Pieces) -> _Plan:
    key = tuple(t.data_ptr() for t in params) + tuple(t.data_ptr() for t in grads) + \
        tuple(t.data_ptr() for t in mus) + tuple(tuple(t.shape) for t in params) + pieces.owner + pieces.adapted
    plan = _plans.get(key)
    if plan is None:
        _check_lists(params, grads, mus, pieces)
        if len(_plans) >= _PLAN_CACHE_SIZE:
            _plans.pop(next(iter(_plans)))  # oldest first
        plan = _plans[key] = _Plan(params, grads, mus, pieces.owner, pieces.adapted)
    return plan


def _check_lists(params, grads, mus, pieces: Pieces) -> None:
    """Run once per plan: the cache key pins data pointers, shapes and owners."""
    if not len(params) == len(grads) == len(mus) == len(pieces.owner):
        raise ValueError(f"params, grads, momentum buffers and owners differ in length: {len(params)}, "
                         f"{len(grads)}, {len(mus)}, {len(pieces.owner)}")
    if len(set(pieces.owner)) != len(pieces.owner) or not all(0 <= n < len(pieces.adapted) for n in pieces.owner):
        raise ValueError(f"owners {pieces.owner}: each tensor must be part of a different one of the "
                         f"{len(pieces.adapted)} parameters")
    if pieces.sums is not None and (pieces.sums.shape != (2, len(pieces.adapted))
                                    or pieces.sums.dtype != torch.float32):
        raise ValueError(f"sums buffer {tuple(pieces.sums.shape)} {pieces.sums.dtype}: expected (2, "
                         f"{len(pieces.adapted)}) fp32")
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


def _nonempty(params, grads, mus, pieces: Pieces):
    """The tensors with elements (a kernel program needs one), and their owners."""
    keep = [k for k, p in enumerate(params) if p.numel() > 0]
    if len(keep) == len(params):
        return params, grads, mus, pieces
    params, grads, mus = ([ts[k] for k in keep] for ts in (params, grads, mus))
    return params, grads, mus, Pieces(tuple(pieces.owner[k] for k in keep), pieces.adapted, pieces.sums,
                                      pieces.all_reduce)


@torch.no_grad()
def lars_(params: list[torch.Tensor], grads: list[torch.Tensor], mus: list[torch.Tensor], *, lr: float,
          weight_decay: float, momentum: float, trust_coefficient: float, pieces: Pieces | None = None) -> None:
    """One LARS step over every tensor of the lists, in place (params and mus), in three launches (and
    `pieces.all_reduce` between the second and the third). All fp32 and contiguous. Without `pieces` each
    tensor is a whole parameter and one of ndim > 1 takes weight decay and the trust ratio."""
    if pieces is None:
        if not params:
            return
        pieces = Pieces.whole(params)
    params, grads, mus, pieces = _nonempty(params, grads, mus, pieces)
    if not params:  # this rank holds no part of any parameter: it still joins the sum
        if pieces.all_reduce is not None:
            pieces.all_reduce(pieces.sums.zero_())
        return
    plan = _plan_for(params, grads, mus, pieces)
    sums = plan.sums if pieces.sums is None else pieces.sums
    if plan.N_a:
        if plan.B_a:
            _lars_norms_kernel[(plan.B_a,)](plan.ptr_tab, plan.numel_tab, plan.a_blk_tab, plan.partials,
                                            float(weight_decay), plan.T, plan.B_a, BLOCK=BLOCK,
                                            num_warps=NUM_WARPS)
        _lars_sumsq_kernel[(plan.N_a,)](plan.partials, plan.red_tab, sums, plan.N, plan.N_a, plan.B_a,
                                        RBLOCK=RBLOCK, num_warps=4)
        if pieces.all_reduce is not None:
            pieces.all_reduce(sums)
    _lars_apply_kernel[(plan.B,)](plan.ptr_tab, plan.numel_tab, plan.blk_tab, plan.owner_tab, sums,
                                  plan.adapted, float(lr), float(weight_decay), float(momentum),
                                  float(trust_coefficient), plan.T, plan.N, plan.B, BLOCK=BLOCK,
                                  num_warps=NUM_WARPS)


@torch.no_grad()
def lars_ref_(params: list[torch.Tensor], grads: list[torch.Tensor], mus: list[torch.Tensor], *, lr: float,
              weight_decay: float, momentum: float, trust_coefficient: float, pieces: Pieces | None = None) -> None:
    """The official MoCo v3 LARS step, one parameter at a time (moco/optimizer.py's loop). With `pieces`,
    the norms are those of the whole parameters: each tensor's sums of squares, summed per parameter and
    over ranks (`pieces.all_reduce`), then the same update."""
    if pieces is None:
        for p, dp, mu in zip(params, grads, mus):
            if p.ndim > 1:  # not a bias nor a normalization weight
                dp = dp.add(p, alpha=weight_decay)
                param_norm = torch.norm(p)
                update_norm = torch.norm(dp)
                one = torch.ones_like(param_norm)
                q = torch.where(param_norm > 0.0,
                                torch.where(update_norm > 0, trust_coefficient * param_norm / update_norm, one),
                                one)
                dp = dp.mul(q)
            mu.mul_(momentum).add_(dp)
            p.add_(mu, alpha=-lr)
        return
    if pieces.sums is None:
        sums = torch.zeros(2, len(pieces.adapted), dtype=torch.float32, device=params[0].device)
    else:
        sums = pieces.sums.zero_()  # a rank holding no part of any parameter still joins the sum
    updates = []
    for p, dp, n in zip(params, grads, pieces.owner):
        if pieces.adapted[n]:
            dp = dp.add(p, alpha=weight_decay)
            sums[0, n] = p.square().sum()
            sums[1, n] = dp.square().sum()
        updates.append(dp)
    if pieces.all_reduce is not None:
        pieces.all_reduce(sums)
    param_norm, update_norm = sums.sqrt()
    one = torch.ones_like(param_norm)
    q = torch.where(param_norm > 0.0,
                    torch.where(update_norm > 0, trust_coefficient * param_norm / update_norm, one), one)
    for p, dp, mu, n in zip(params, updates, mus, pieces.owner):
        if pieces.adapted[n]:
            dp = dp.mul(q[n])
        mu.mul_(momentum).add_(dp)
        p.add_(mu, alpha=-lr)
