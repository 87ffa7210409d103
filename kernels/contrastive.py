"""Fused MoCo v3 contrastive loss.

    loss = CE(q_hat @ k_hat.T / tau, arange(N) + offset) * 2 * tau
    q_hat = q / max(|q|, eps),  k_hat = k / max(|k|, eps)

for local queries q (N, C) and keys k (M, C) gathered from every rank (k gets
no gradient), and MoCo v3's symmetrised loss ctr(q1, k2) + ctr(q2, k1) with
both terms ("pairs") in the same launches (grid axis 2).

What is fused: the key norms are one small prologue kernel (rk = 1 / |k|, M
floats); the query norms are taken in the main kernels from the q tile they
load anyway. Logits are never normalised operands: s = (q @ k.T) * rq * rk /
tau with q, k as given (bf16 tensor-core dot, fp32 accumulation), so a bf16
input loses nothing to a rounded q_hat. Per block of query rows the kernel
streams key blocks with an online max / sum-exp in fp32 (base-2), picks the
positive logit out of its tile, and never writes the N x M logits. When N is
small and M large (N = 1024, M = 65536) the keys are split across programs
(grid axis 1); a one-program combine kernel merges the partial (max, sum,
positive) per row into the log-sum-exp and reduces the mean.

Backward (g = dloss, P = softmax(s), Y = one-hot labels), recomputed from the
saved per-row lse and rk:
    dq_hat = g * (2 / N) * (P - Y) @ k_hat            ( = ((P - Y) * rk) @ k )
    dq     = rq * (dq_hat - q_hat * <q_hat, dq_hat>)  (normalisation backward)
With split keys, each split writes an fp32 partial dq_hat and a reduce kernel
sums them and applies the normalisation backward; else the bwd kernel does.

Extra memory: O(N + M) floats, plus S x N x C fp32 partials when the backward
splits keys. The gradient for |q| < eps (F.normalize's clamp) is not handled.

Reference: `contrastive_loss_ref` below (fp32 PyTorch).
"""
from __future__ import annotations

import functools
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .interpreter import interpreting

_EPS = 1e-12  # F.normalize's eps
# Keys per split are a multiple of this, so every BLOCK_N of the configs divides them.
_SPLIT_ALIGN = 128
# A split streams at least this many keys: fewer and the partials cost more than they save.
_MIN_KEYS_PER_SPLIT = 512
_EST_BLOCK_M = 64  # row-block size assumed when choosing the number of splits
LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): logits in base 2, so that exp2 (the fast path) applies
LN2 = tl.constexpr(0.6931471805599453)  # ln(2): a base-2 log-sum-exp back to natural log
# Interpreter tile sizes: small enough to exercise masks and several key tiles at test shapes.
_INTERP_BLOCK_M, _INTERP_BLOCK_N = 64, 128
_ROWS_PER_PROLOGUE = 32  # rows per program in the norm and reduce kernels


@triton.jit
def _of_pair(pair, a_ptr, b_ptr):
    """The pointer of `pair` (0: the a tensor, 1: the b tensor); a program handles one pair."""
    if pair == 0:
        ptr = a_ptr
    else:
        ptr = b_ptr
    return ptr


@triton.jit
def _contrastive_rnorm_kernel(
    ka_ptr,  # (M, C) keys of pair 0
    kb_ptr,  # (M, C) keys of pair 1
    rk_ptr,  # (P, M) fp32 out: 1 / max(|k|, eps)
    M, C, stride_k, eps,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    pair = tl.program_id(1)
    k_ptr = _of_pair(pair, ka_ptr, kb_ptr)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    rmask = rows < M
    x = tl.load(k_ptr + rows.to(tl.int64)[:, None] * stride_k + cols[None, :],
                mask=rmask[:, None] & (cols[None, :] < C), other=0.0).to(tl.float32)
    r = 1.0 / tl.maximum(tl.sqrt_rn(tl.sum(x * x, 1)), eps)
    tl.store(rk_ptr + pair * M + rows, r, mask=rmask)


@triton.jit
def _load_q_tile(qa_ptr, qb_ptr, pair, rows, cols, N, C, stride_q, eps, IS_INTERPRETER: tl.constexpr):
    """The raw q tile of `pair` (dot operand) and its rows' 1 / max(|q|, eps) in fp32."""
    q_ptr = _of_pair(pair, qa_ptr, qb_ptr)
    q = tl.load(q_ptr + rows.to(tl.int64)[:, None] * stride_q + cols[None, :],
                mask=(rows < N)[:, None] & (cols < C)[None, :], other=0.0)
    if IS_INTERPRETER:
        q = q.to(tl.float32)
    qf = q.to(tl.float32)
    rq = 1.0 / tl.maximum(tl.sqrt_rn(tl.sum(qf * qf, 1)), eps)
    return q, qf, rq


@triton.jit
def _split_keys(split, keys_per_split, M):
    """The keys [begin, end) that the programs of `split` (grid axis 1) stream."""
    k_begin = split * keys_per_split
    return k_begin, tl.minimum(k_begin + keys_per_split, M)


@triton.jit
def _logits_tile(q, k_ptr, rk_ptr, row_scale, keys, cols, M, C, stride_k,
                 IS_FP32: tl.constexpr, IS_INTERPRETER: tl.constexpr):
    """(BLOCK_M, BLOCK_N) logits * log2(e) against one key tile (-inf past M) and that raw tile."""
    kmask = keys < M
    k = tl.load(k_ptr + keys.to(tl.int64)[:, None] * stride_k + cols[None, :],
                mask=kmask[:, None] & (cols < C)[None, :], other=0.0)
    if IS_INTERPRETER:
        k = k.to(tl.float32)
    rk = tl.load(rk_ptr + keys, mask=kmask, other=0.0)
    if IS_FP32:
        s = tl.dot(q, tl.trans(k), input_precision="tf32x3")  # ~fp32 accuracy on tensor cores
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * row_scale[:, None] * rk[None, :]
    s = tl.where(kmask[None, :], s, float("-inf"))
    return s, k, rk


@triton.jit
def _contrastive_fwd_kernel(
    qa_ptr, qb_ptr,  # (N, C) queries of pair 0 / pair 1
    ka_ptr, kb_ptr,  # (M, C) keys of pair 0 / pair 1
    rk_ptr,  # (P, M) fp32 key inverse norms
    part_ptr,  # (3, P, S, N) fp32 out: running max, sum of exp2(s - max), positive logit (base 2)
    N, M, C, stride_q, stride_k, offset, keys_per_split, inv_tau, eps,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    IS_FP32: tl.constexpr,  # fp32 operands: dot in tf32x3
    IS_INTERPRETER: tl.constexpr,  # interpreter: bf16 arithmetic is wrong there, compute in fp32
):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    pair = tl.program_id(2)
    S = tl.num_programs(1)
    P = tl.num_programs(2)
    k_ptr = _of_pair(pair, ka_ptr, kb_ptr)
    rk_ptr += pair * M
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    q, qf, rq = _load_q_tile(qa_ptr, qb_ptr, pair, rows, cols, N, C, stride_q, eps, IS_INTERPRETER)
    row_scale = rq * (inv_tau * LOG2E)  # logits in base 2: exp2 is the fast path
    labels = rows + offset

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    pos = tl.zeros([BLOCK_M], tl.float32)
    k_begin, k_end = _split_keys(split, keys_per_split, M)
    for start in range(k_begin, k_end, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        s, k, rk = _logits_tile(q, k_ptr, rk_ptr, row_scale, keys, cols, M, C, stride_k, IS_FP32, IS_INTERPRETER)
        pos += tl.sum(tl.where(keys[None, :] == labels[:, None], s, 0.0), 1)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
        m_i = m_new

    rmask = rows < N
    out = part_ptr + (pair * S + split) * N + rows
    tl.store(out, m_i, mask=rmask)
    tl.store(out + P * S * N, l_i, mask=rmask)
    tl.store(out + 2 * P * S * N, pos, mask=rmask)


@triton.jit
def _contrastive_combine_kernel(
    part_ptr,  # (3, P, S, N) fp32 from the forward kernel
    lse_ptr,  # (P, N) fp32 out: log-sum-exp per row, base 2
    loss_ptr,  # () fp32 out
    N, S, P, loss_scale,  # loss_scale = 2 * tau / N
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    # One program: the work is O(P * S * N) floats and the sum stays in a fixed order.
    sp = tl.arange(0, BLOCK_S)
    acc = tl.zeros([BLOCK_R], tl.float32)
    for pair in range(P):
        for r0 in range(0, N, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            rmask = rows < N
            mask = (sp < S)[:, None] & rmask[None, :]
            idx = (pair * S + sp)[:, None] * N + rows[None, :]
            mx = tl.load(part_ptr + idx, mask=mask, other=float("-inf"))
            mx = tl.where(rmask[None, :], mx, 0.0)  # rows past N: keep the arithmetic finite
            l = tl.load(part_ptr + P * S * N + idx, mask=mask, other=0.0)
            pos = tl.sum(tl.load(part_ptr + 2 * P * S * N + idx, mask=mask, other=0.0), 0)
            m_tot = tl.max(mx, 0)
            l_tot = tl.sum(l * tl.exp2(mx - m_tot[None, :]), 0)
            l_tot = tl.where(rmask, l_tot, 1.0)
            lse = m_tot + tl.log2(l_tot)
            tl.store(lse_ptr + pair * N + rows, lse, mask=rmask)
            acc += tl.where(rmask, lse - pos, 0.0)
    tl.store(loss_ptr, tl.sum(acc, 0) * (LN2 * loss_scale))


@triton.jit
def _contrastive_bwd_kernel(
    qa_ptr, qb_ptr,  # (N, C) queries of pair 0 / pair 1
    ka_ptr, kb_ptr,  # (M, C) keys of pair 0 / pair 1
    rk_ptr,  # (P, M) fp32 key inverse norms
    lse_ptr,  # (P, N) fp32 log-sum-exp, base 2
    gout_ptr,  # () upstream gradient of the loss
    dq_ptr,  # IS_SPLIT: (P, S, N, C) fp32 partial dq_hat; else (P, N, C) dq in q's dtype
    N, M, C, stride_q, stride_k, offset, keys_per_split, inv_tau, eps, grad_scale,  # grad_scale = 2 / N
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    IS_FP32: tl.constexpr,
    IS_INTERPRETER: tl.constexpr,
    IS_SPLIT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    pair = tl.program_id(2)
    S = tl.num_programs(1)
    k_ptr = _of_pair(pair, ka_ptr, kb_ptr)
    rk_ptr += pair * M
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    rmask = rows < N
    q, qf, rq = _load_q_tile(qa_ptr, qb_ptr, pair, rows, cols, N, C, stride_q, eps, IS_INTERPRETER)
    row_scale = rq * (inv_tau * LOG2E)
    labels = rows + offset
    lse = tl.load(lse_ptr + pair * N + rows, mask=rmask, other=0.0)

    acc = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)  # sum_j (P - Y)_ij rk_j k_j
    k_begin, k_end = _split_keys(split, keys_per_split, M)
    for start in range(k_begin, k_end, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        s, k, rk = _logits_tile(q, k_ptr, rk_ptr, row_scale, keys, cols, M, C, stride_k, IS_FP32, IS_INTERPRETER)
        p = tl.exp2(s - lse[:, None])  # softmax; 0 past M
        p = tl.where(keys[None, :] == labels[:, None], p - 1.0, p)
        w = p * rk[None, :]
        if IS_FP32:
            acc += tl.dot(w, k, input_precision="tf32x3")
        else:
            acc = tl.dot(w.to(k.dtype), k, acc)
    dq_hat = acc * (tl.load(gout_ptr).to(tl.float32) * grad_scale)

    cmask = cols < C
    mask = rmask[:, None] & cmask[None, :]
    if IS_SPLIT:
        out = dq_ptr + ((pair * S + split) * N + rows).to(tl.int64)[:, None] * C + cols[None, :]
        tl.store(out, dq_hat, mask=mask)
    else:
        q_hat = qf * rq[:, None]
        dq = rq[:, None] * (dq_hat - q_hat * tl.sum(q_hat * dq_hat, 1)[:, None])
        out = dq_ptr + (pair * N + rows).to(tl.int64)[:, None] * C + cols[None, :]
        tl.store(out, dq.to(dq_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _contrastive_bwd_reduce_kernel(
    qa_ptr, qb_ptr,  # (N, C) queries of pair 0 / pair 1
    part_ptr,  # (P, S, N, C) fp32 partial dq_hat
    dq_ptr,  # (P, N, C) out, q's dtype
    N, C, S, stride_q, eps,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    pair = tl.program_id(1)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    mask = (rows < N)[:, None] & (cols < C)[None, :]
    q, qf, rq = _load_q_tile(qa_ptr, qb_ptr, pair, rows, cols, N, C, stride_q, eps, True)
    dq_hat = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    for split in range(S):
        src = part_ptr + ((pair * S + split) * N + rows).to(tl.int64)[:, None] * C + cols[None, :]
        dq_hat += tl.load(src, mask=mask, other=0.0)
    q_hat = qf * rq[:, None]
    dq = rq[:, None] * (dq_hat - q_hat * tl.sum(q_hat * dq_hat, 1)[:, None])
    out = dq_ptr + (pair * N + rows).to(tl.int64)[:, None] * C + cols[None, :]
    tl.store(out, dq.to(dq_ptr.dtype.element_ty), mask=mask)


def _configs(rows):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in rows]


@functools.cache
def _tuned(kind: str):
    """Autotuned kernels, built on first use (nothing touches the GPU at import).

    Every config below fits C = 256 bf16 in an H100's shared memory (checked by
    compiling for sm_90); with fp32 only the 32- and 64 x 32-row tiles fit, the
    autotuner skips the rest as out of resources. The kernels write
    their outputs without accumulating, so a benchmark rerun is harmless.
    """
    if kind == "fwd":
        rows = [(32, 32, 4, 2), (64, 32, 4, 2), (64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 8, 3),
                (128, 64, 8, 2), (128, 32, 8, 3), (64, 128, 8, 2)]
        return triton.autotune(_configs(rows), key=["N", "M", "C", "keys_per_split"])(_contrastive_fwd_kernel)
    rows = [(32, 32, 4, 2), (64, 32, 4, 2), (64, 64, 4, 2), (64, 64, 8, 2), (64, 32, 8, 3), (64, 128, 8, 2), (128, 64, 8, 2)]
    return triton.autotune(_configs(rows), key=["N", "M", "C", "keys_per_split"])(_contrastive_bwd_kernel)


def _launch(kind: str, grid_rows: int, S: int, P: int, args: tuple, **flags) -> None:
    """Launch the fwd/bwd kernel on a (row blocks, splits, pairs) grid."""
    if interpreting():
        kernel = _contrastive_fwd_kernel if kind == "fwd" else _contrastive_bwd_kernel
        kernel[(triton.cdiv(grid_rows, _INTERP_BLOCK_M), S, P)](
            *args, BLOCK_M=_INTERP_BLOCK_M, BLOCK_N=_INTERP_BLOCK_N, IS_INTERPRETER=True, **flags)
        return
    _tuned(kind)[lambda meta: (triton.cdiv(grid_rows, meta["BLOCK_M"]), S, P)](*args, IS_INTERPRETER=False, **flags)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_key_splits(N: int, M: int, P: int, device: torch.device, num_splits: int | None = None) -> tuple[int, int]:
    """(splits, keys per split). Split the keys when the row blocks alone do not
    fill the GPU; `num_splits` forces a count."""
    if num_splits is None:
        num_splits = 1
        if device.type == "cuda":
            sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
            programs = triton.cdiv(N, _EST_BLOCK_M) * P
            if programs < sms:
                num_splits = min(triton.cdiv(2 * sms, programs), max(1, M // _MIN_KEYS_PER_SPLIT))
    keys_per_split = triton.cdiv(triton.cdiv(M, max(1, num_splits)), _SPLIT_ALIGN) * _SPLIT_ALIGN
    return triton.cdiv(M, keys_per_split), keys_per_split  # no empty split


def _prepare(qa, qb, ka, kb, offset):
    P = 1 if qb is None else 2
    qb = qa if qb is None else qb
    kb = ka if kb is None else kb
    dtype = qa.dtype
    qa, qb, ka, kb = [t.detach().to(dtype) for t in (qa, qb, ka, kb)]
    qa, qb, ka, kb = [t if t.stride(-1) == 1 else t.contiguous() for t in (qa, qb, ka, kb)]
    N, C = qa.shape
    M = ka.shape[0]
    if qb.shape != (N, C) or kb.shape != ka.shape or ka.shape[1] != C:
        raise ValueError(f"shapes: q {tuple(qa.shape)}/{tuple(qb.shape)}, k {tuple(ka.shape)}/{tuple(kb.shape)}")
    if qa.stride(0) != qb.stride(0) or ka.stride(0) != kb.stride(0):
        qa, qb, ka, kb = [t.contiguous() for t in (qa, qb, ka, kb)]
    if not 0 <= offset <= M - N:
        raise ValueError(f"labels arange(N) + offset must index keys: N={N}, M={M}, offset={offset}")
    return qa, qb, ka, kb, P, N, M, C


def contrastive_fwd(qa, qb, ka, kb, tau: float, offset: int = 0, num_splits: int | None = None):
    """Loss of pair 0 (qa vs ka) plus, if qb is given, pair 1 (qb vs kb).

    Returns (loss () fp32, lse (P, N) fp32 base-2, rk (P, M) fp32).
    """
    qa, qb, ka, kb, P, N, M, C = _prepare(qa, qb, ka, kb, offset)
    dev = qa.device
    BLOCK_C = triton.next_power_of_2(C)
    rk = torch.empty((P, M), dtype=torch.float32, device=dev)
    _contrastive_rnorm_kernel[(triton.cdiv(M, _ROWS_PER_PROLOGUE), P)](
        ka, kb, rk, M, C, ka.stride(0), _EPS, BLOCK_R=_ROWS_PER_PROLOGUE, BLOCK_C=BLOCK_C)
    S, keys_per_split = num_key_splits(N, M, P, dev, num_splits)
    part = torch.empty((3, P, S, N), dtype=torch.float32, device=dev)
    _launch("fwd", N, S, P, (qa, qb, ka, kb, rk, part, N, M, C, qa.stride(0), ka.stride(0), offset,
                             keys_per_split, 1.0 / tau, _EPS),
            BLOCK_C=BLOCK_C, IS_FP32=qa.dtype == torch.float32)
    lse = torch.empty((P, N), dtype=torch.float32, device=dev)
    loss = torch.empty((), dtype=torch.float32, device=dev)
    BLOCK_S = triton.next_power_of_2(S)
    _contrastive_combine_kernel[(1,)](part, lse, loss, N, S, P, 2.0 * tau / N,
                                      BLOCK_R=max(16, min(1024, 4096 // BLOCK_S)), BLOCK_S=BLOCK_S)
    return loss, lse, rk


def contrastive_bwd(grad_loss, qa, qb, ka, kb, lse, rk, tau: float, offset: int = 0,
                    num_splits: int | None = None, dq: torch.Tensor | None = None) -> torch.Tensor:
    """dq (P, N, C) in q's dtype; `dq` may be passed preallocated (tests poison it)."""
    qa, qb, ka, kb, P, N, M, C = _prepare(qa, qb, ka, kb, offset)
    dev = qa.device
    BLOCK_C = triton.next_power_of_2(C)
    if dq is None:
        dq = torch.empty((P, N, C), dtype=qa.dtype, device=dev)
    g = grad_loss.detach().reshape(()).to(torch.float32)
    S, keys_per_split = num_key_splits(N, M, P, dev, num_splits)
    is_split = S > 1
    target = torch.empty((P, S, N, C), dtype=torch.float32, device=dev) if is_split else dq
    _launch("bwd", N, S, P, (qa, qb, ka, kb, rk, lse, g, target, N, M, C, qa.stride(0), ka.stride(0), offset,
                             keys_per_split, 1.0 / tau, _EPS, 2.0 / N),
            BLOCK_C=BLOCK_C, IS_FP32=qa.dtype == torch.float32, IS_SPLIT=is_split)
    if is_split:
        _contrastive_bwd_reduce_kernel[(triton.cdiv(N, _ROWS_PER_PROLOGUE), P)](
            qa, qb, target, dq, N, C, S, qa.stride(0), _EPS, BLOCK_R=_ROWS_PER_PROLOGUE, BLOCK_C=BLOCK_C)
    return dq


class ContrastiveLossFn(torch.autograd.Function):
    """Pair 0 = (qa, ka), pair 1 = (qb, kb) when qb is given; gradient to the queries only."""

    @staticmethod
    def forward(ctx, qa, qb, ka, kb, tau: float, offset: int = 0, num_splits: int | None = None):
        loss, lse, rk = contrastive_fwd(qa, qb, ka, kb, tau, offset, num_splits)
        ctx.save_for_backward(qa, qb, ka, kb, lse, rk)
        ctx.args = (tau, offset, num_splits)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        qa, qb, ka, kb, lse, rk = ctx.saved_tensors
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            return (None,) * 7
        dq = contrastive_bwd(grad_loss, qa, qb, ka, kb, lse, rk, *ctx.args)
        dqa = dq[0].to(qa.dtype)
        dqb = None if qb is None else dq[1].to(qb.dtype)
        return dqa, dqb, None, None, None, None, None


def contrastive_loss(q: torch.Tensor, k: torch.Tensor, tau: float, offset: int = 0) -> torch.Tensor:
    """Fused `contrastive_loss_ref`: 0-dim fp32; gradient to q only."""
    return ContrastiveLossFn.apply(q, None, k, None, tau, offset, None)


def symmetric_contrastive_loss(q1, q2, k1, k2, tau: float, offset: int = 0) -> torch.Tensor:
    """Fused ctr(q1, k2) + ctr(q2, k1): both terms in the same launches."""
    return ContrastiveLossFn.apply(q1, q2, k2, k1, tau, offset, None)


def contrastive_loss_ref(q: torch.Tensor, k: torch.Tensor, tau: float, offset: int = 0) -> torch.Tensor:
    """CE(normalize(q) @ normalize(k).T / tau, arange(N) + offset) * 2 * tau, computed in fp32.

    q: (N, C) local queries; k: (M, C) keys gathered from all ranks (no gradient).
    """
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.detach().float(), dim=1)
    logits = q @ k.T / tau  # (N, M)
    labels = torch.arange(q.shape[0], device=q.device) + offset
    return F.cross_entropy(logits, labels) * (2 * tau)


def symmetric_contrastive_loss_ref(q1, q2, k1, k2, tau: float, offset: int = 0) -> torch.Tensor:
    """ctr(q1, k2) + ctr(q2, k1): MoCo v3's symmetrized loss."""
    return contrastive_loss_ref(q1, k2, tau, offset) + contrastive_loss_ref(q2, k1, tau, offset)
