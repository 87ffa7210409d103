"""Fused multi-head attention (FlashAttention-2 style) for ViTs.

Non-causal softmax(Q K^T / sqrt(D)) V read straight from the qkv projection's
output, (B, N, 3*H*D) laid out as (B, N, 3, H, D), through its strides, and
written as (B, N, H*D), the layout the output projection reads: no permute or
contiguous copy on either side, no N x N matrix in memory.

Forward (one program per (batch*head, block of BLOCK_M queries)): an online
softmax in fp32 over blocks of BLOCK_N keys, in base 2 (scores scaled by
log2(e)/sqrt(D) so that exp2 can be used); it saves the per-row log-sum-exp
L = m + log2(l) (base 2, fp32) for the backward.

Backward, with P = exp2(S - L) recomputed from the saved L, dO the output's
gradient and scale = 1/sqrt(D):
    delta = rowsum(dO * O)            (fp32, a small preprocess kernel)
    dV    = P^T dO
    dP    = dO V^T
    dS    = P * (dP - delta)
    dQ    = scale * dS K
    dK    = scale * dS^T Q
One backward program owns a block of BLOCK_OWN rows: it computes dK, dV for
that block of keys by iterating over all queries, then dQ for the same block
of queries by iterating over all keys (atomics-free; S and dP are recomputed in
the second pass). dQ, dK, dV are written straight into one (B, N, 3*H*D) buffer.

Head dims that are not a power of two (ViT-H/14: D = 80) run either padded to
the next power of two (BLOCK_D = 128, masked) or split into two power-of-two
blocks, BLOCK_D + TAIL_D (64 + 16), each score and output a sum or pair of
dots over the two blocks: 80 columns of tensor-core work instead of 128. The
autotuner times both on the GPU and keeps the faster.

Numerics: matmul operands in the input dtype (bf16 on the GPU), fp32
accumulation, fp32 softmax statistics; fp32 inputs on the GPU get tl.dot's
default TF32 precision. Under the Triton interpreter (TRITON_INTERPRET=1),
whose bf16 arithmetic is wrong and whose bf16 cast truncates, every tile is
upcast to fp32 right after loading and stores are rounded by hand (the
`IS_INTERPRETER` flag).

Reference: `attention_ref` below (unfused matmul -> fp32 softmax -> matmul).
`attention_sdpa` is torch's fused attention (SDPA) from the same qkv, the
"torch" side of the ops switch's "auto": `kernel_faster` answers, per shape,
which of the two runs (timed once on the GPU, `kernels/tuner.py`).
"""
import functools
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .interpreter import cast_rtne, interpreting
from .tuner import Tuner, fwd_bwd_launch, kernel_or_torch


@triton.jit
def _load_tile(view, rows, mask_rows, cols, mask_cols, IS_INTERPRETER: tl.constexpr):
    """(len(rows), len(cols)) tile of a (base, row stride, column stride) view; fp32 under the interpreter."""
    base, stride_n, stride_c = view
    t = tl.load(base + rows[:, None] * stride_n + (cols * stride_c)[None, :],
                mask=mask_rows[:, None] & mask_cols[None, :], other=0.0)
    if IS_INTERPRETER:
        t = t.to(tl.float32)
    return t


@triton.jit
def _store_tile(view, value, rows, mask_rows, cols, mask_cols, IS_INTERPRETER: tl.constexpr):
    base, stride_n, stride_c = view
    tl.store(base + rows[:, None] * stride_n + (cols * stride_c)[None, :],
             cast_rtne(value, base.dtype.element_ty, IS_INTERPRETER), mask=mask_rows[:, None] & mask_cols[None, :])


# A head's D features travel as a pair (main, tail): main the (rows, BLOCK_D) tile of its first
# BLOCK_D features, tail the (rows, TAIL_D) tile of the rest when the head dim is split (D = 80:
# 64 + 16; a constexpr 0 stands in when TAIL_D = 0). Each helper below does one operation on both
# halves, so the kernels read as one algorithm; Triton inlines them and TAIL_D is constexpr.


@triton.jit
def _load_head(view, feat, rows, mask_rows,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, TAIL_D: tl.constexpr, IS_INTERPRETER: tl.constexpr):
    """(main, tail) of features feat .. feat + HEAD_DIM of `rows`."""
    offs_d = tl.arange(0, BLOCK_D)
    main = _load_tile(view, rows, mask_rows, feat + offs_d, offs_d < HEAD_DIM, IS_INTERPRETER)
    tail = tl.constexpr(0)
    if TAIL_D > 0:
        offs_t = BLOCK_D + tl.arange(0, TAIL_D)
        tail = _load_tile(view, rows, mask_rows, feat + offs_t, offs_t < HEAD_DIM, IS_INTERPRETER)
    return main, tail


@triton.jit
def _load_heads(view_a, feat_a, view_b, feat_b, rows, mask_rows,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, TAIL_D: tl.constexpr, IS_INTERPRETER: tl.constexpr):
    """(a, a_tail, b, b_tail): two heads of the same rows, as `_load_head` twice but both main tiles
    first (split configs compiled for sm_90 take up to 8 more registers with a, a_tail, b, b_tail)."""
    offs_d = tl.arange(0, BLOCK_D)
    a = _load_tile(view_a, rows, mask_rows, feat_a + offs_d, offs_d < HEAD_DIM, IS_INTERPRETER)
    b = _load_tile(view_b, rows, mask_rows, feat_b + offs_d, offs_d < HEAD_DIM, IS_INTERPRETER)
    a_tail = tl.constexpr(0)
    b_tail = tl.constexpr(0)
    if TAIL_D > 0:
        offs_t = BLOCK_D + tl.arange(0, TAIL_D)
        a_tail = _load_tile(view_a, rows, mask_rows, feat_a + offs_t, offs_t < HEAD_DIM, IS_INTERPRETER)
        b_tail = _load_tile(view_b, rows, mask_rows, feat_b + offs_t, offs_t < HEAD_DIM, IS_INTERPRETER)
    return a, a_tail, b, b_tail


@triton.jit
def _store_head(view, feat, main, tail, rows, mask_rows,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, TAIL_D: tl.constexpr, IS_INTERPRETER: tl.constexpr):
    """Stores (main, tail) as features feat .. feat + HEAD_DIM of `rows`."""
    offs_d = tl.arange(0, BLOCK_D)
    _store_tile(view, main, rows, mask_rows, feat + offs_d, offs_d < HEAD_DIM, IS_INTERPRETER)
    if TAIL_D > 0:
        offs_t = BLOCK_D + tl.arange(0, TAIL_D)
        _store_tile(view, tail, rows, mask_rows, feat + offs_t, offs_t < HEAD_DIM, IS_INTERPRETER)


@triton.jit
def _zeros_head(ROWS: tl.constexpr, BLOCK_D: tl.constexpr, TAIL_D: tl.constexpr):
    """An fp32 (main, tail) of zeros: an accumulator."""
    tail = tl.constexpr(0)
    if TAIL_D > 0:
        tail = tl.zeros([ROWS, TAIL_D], tl.float32)
    return tl.zeros([ROWS, BLOCK_D], tl.float32), tail


@triton.jit
def _mul_head(x, x_tail, factor, TAIL_D: tl.constexpr):
    """(x * factor, x_tail * factor)."""
    if TAIL_D > 0:
        x_tail = x_tail * factor
    return x * factor, x_tail


@triton.jit
def _div_head(x, x_tail, divisor, TAIL_D: tl.constexpr):
    """(x / divisor, x_tail / divisor)."""
    if TAIL_D > 0:
        x_tail = x_tail / divisor
    return x / divisor, x_tail


@triton.jit
def _dot_head(a, a_tail, b, b_tail, TAIL_D: tl.constexpr):
    """a b^T over the whole head dim (the dots of both halves summed): (rows of a, rows of b) fp32."""
    s = tl.dot(a, tl.trans(b))
    if TAIL_D > 0:
        s += tl.dot(a_tail, tl.trans(b_tail))
    return s


@triton.jit
def _acc_dot_head(acc, acc_tail, p, b, b_tail, TAIL_D: tl.constexpr):
    """(acc + p b, acc_tail + p b_tail): fp32 p (rows, K), cast to b's dtype, times a (K, head dim) pair."""
    acc += tl.dot(p.to(b.dtype), b)
    if TAIL_D > 0:
        acc_tail += tl.dot(p.to(b_tail.dtype), b_tail)
    return acc, acc_tail


@triton.jit
def _attention_fwd_kernel(
    qkv_ptr,  # (B, N, 3, H, D) through strides (b, n, last dim)
    o_ptr,  # (B, N, H, D) through strides (b, n, last dim)
    lse_ptr,  # (B * H, N) fp32, contiguous: base-2 log-sum-exp of the scaled scores
    stride_qkv_b, stride_qkv_n, stride_qkv_c,
    stride_o_b, stride_o_n, stride_o_c,
    N, H, qk_scale,  # qk_scale = log2(e) / sqrt(D)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, TAIL_D: tl.constexpr,  # head dim in a BLOCK_D block (+ a TAIL_D block if > 0)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_INTERPRETER: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    mask_m = offs_m < N
    # batch b's (N, features) as (base, row stride, feature stride) views
    qkv = (qkv_ptr + b * stride_qkv_b, stride_qkv_n, stride_qkv_c)
    o = (o_ptr + b * stride_o_b, stride_o_n, stride_o_c)
    # q, k, v of head h inside a token's 3*H*D features
    q_feat, k_feat, v_feat = h * HEAD_DIM, (H + h) * HEAD_DIM, (2 * H + h) * HEAD_DIM

    q, q_t = _load_head(qkv, q_feat, offs_m, mask_m, HEAD_DIM, BLOCK_D, TAIL_D, IS_INTERPRETER)
    acc, acc_t = _zeros_head(BLOCK_M, BLOCK_D, TAIL_D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of the scaled scores
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(s - m_i)
    for start_n in range(0, N, BLOCK_N):
        cur_n = start_n + offs_n
        mask_n = cur_n < N
        k, k_t, v, v_t = _load_heads(qkv, k_feat, qkv, v_feat, cur_n, mask_n, HEAD_DIM, BLOCK_D, TAIL_D, IS_INTERPRETER)
        s = _dot_head(q, q_t, k, k_t, TAIL_D)  # (BLOCK_M, BLOCK_N) fp32
        # Every key block holds at least one real key, so m_new stays finite.
        s = tl.where(mask_n[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc, acc_t = _mul_head(acc, acc_t, alpha[:, None], TAIL_D)
        acc, acc_t = _acc_dot_head(acc, acc_t, p, v, v_t, TAIL_D)
        m_i = m_new

    acc, acc_t = _div_head(acc, acc_t, l_i[:, None], TAIL_D)
    _store_head(o, h * HEAD_DIM, acc, acc_t, offs_m, mask_m, HEAD_DIM, BLOCK_D, TAIL_D, IS_INTERPRETER)
    tl.store(lse_ptr + pid_bh * N + offs_m, m_i + tl.log2(l_i), mask=mask_m)


@triton.jit
def _attention_bwd_preprocess_kernel(
    o_ptr,  # (B, N, H, D) through strides
    do_ptr,  # (B, N, H, D) through strides
    delta_ptr,  # (B * H, N) fp32: rowsum(dO * O)
    stride_o_b, stride_o_n, stride_o_c,
    stride_do_b, stride_do_n, stride_do_c,
    N, H,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N
    mask = mask_m[:, None] & (offs_d < HEAD_DIM)[None, :]
    cols = h * HEAD_DIM + offs_d
    o = tl.load(o_ptr + b * stride_o_b + offs_m[:, None] * stride_o_n + (cols * stride_o_c)[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + b * stride_do_b + offs_m[:, None] * stride_do_n + (cols * stride_do_c)[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(delta_ptr + pid_bh * N + offs_m, tl.sum(o * do, 1), mask=mask_m)


@triton.jit
def _attention_bwd_kernel(
    qkv_ptr,  # (B, N, 3, H, D) through strides
    do_ptr,  # (B, N, H, D) through strides
    dqkv_ptr,  # (B, N, 3, H, D) through strides: dQ, dK, dV all land here
    lse_ptr,  # (B * H, N) fp32, from the forward
    delta_ptr,  # (B * H, N) fp32, from the preprocess kernel
    stride_qkv_b, stride_qkv_n, stride_qkv_c,
    stride_do_b, stride_do_n, stride_do_c,
    stride_dqkv_b, stride_dqkv_n, stride_dqkv_c,
    N, H, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, TAIL_D: tl.constexpr,  # head dim in a BLOCK_D block (+ a TAIL_D block if > 0)
    BLOCK_OWN: tl.constexpr,  # rows this program owns: keys for dK/dV, then queries for dQ
    BLOCK_STEP: tl.constexpr,  # rows per step of the inner loops
    IS_INTERPRETER: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_own = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    # batch b's (N, features) as (base, row stride, feature stride) views
    qkv = (qkv_ptr + b * stride_qkv_b, stride_qkv_n, stride_qkv_c)
    do_view = (do_ptr + b * stride_do_b, stride_do_n, stride_do_c)
    dqkv = (dqkv_ptr + b * stride_dqkv_b, stride_dqkv_n, stride_dqkv_c)
    lse_row = lse_ptr + pid_bh * N
    delta_row = delta_ptr + pid_bh * N

    offs_own = pid_own * BLOCK_OWN + tl.arange(0, BLOCK_OWN)
    offs_step = tl.arange(0, BLOCK_STEP)
    mask_own = offs_own < N
    # q, k, v of head h inside a token's 3*H*D features; dO of head h inside its H*D
    q_feat, k_feat, v_feat = h * HEAD_DIM, (H + h) * HEAD_DIM, (2 * H + h) * HEAD_DIM
    do_feat = h * HEAD_DIM

    # Pass 1: dK, dV for the keys of this block, over all queries.
    k, k_t, v, v_t = _load_heads(qkv, k_feat, qkv, v_feat, offs_own, mask_own,
                                 HEAD_DIM, BLOCK_D, TAIL_D, IS_INTERPRETER)
    dk, dk_t = _zeros_head(BLOCK_OWN, BLOCK_D, TAIL_D)
    dv, dv_t = _zeros_head(BLOCK_OWN, BLOCK_D, TAIL_D)
    for start_m in range(0, N, BLOCK_STEP):
        cur_m = start_m + offs_step
        mask_m = cur_m < N
        q_s, q_st, do_s, do_st = _load_heads(qkv, q_feat, do_view, do_feat, cur_m, mask_m,
                                             HEAD_DIM, BLOCK_D, TAIL_D, IS_INTERPRETER)  # (BLOCK_STEP, head dim)
        lse = tl.load(lse_row + cur_m, mask=mask_m, other=0.0)
        delta = tl.load(delta_row + cur_m, mask=mask_m, other=0.0)
        s_t = _dot_head(k, k_t, q_s, q_st, TAIL_D)  # (BLOCK_OWN, BLOCK_STEP) = S^T
        # Padded queries need no mask: q = dO = lse = delta = 0 there, so P^T = 1 meets dO = 0 and dS^T = 0.
        p_t = tl.exp2(s_t * qk_scale - lse[None, :])
        dv, dv_t = _acc_dot_head(dv, dv_t, p_t, do_s, do_st, TAIL_D)
        dp_t = _dot_head(v, v_t, do_s, do_st, TAIL_D)
        ds_t = p_t * (dp_t - delta[None, :])
        dk, dk_t = _acc_dot_head(dk, dk_t, ds_t, q_s, q_st, TAIL_D)
    dk, dk_t = _mul_head(dk, dk_t, sm_scale, TAIL_D)
    _store_head(dqkv, k_feat, dk, dk_t, offs_own, mask_own, HEAD_DIM, BLOCK_D, TAIL_D, IS_INTERPRETER)
    _store_head(dqkv, v_feat, dv, dv_t, offs_own, mask_own, HEAD_DIM, BLOCK_D, TAIL_D, IS_INTERPRETER)

    # Pass 2: dQ for the queries of this block, over all keys.
    q, q_t, do, do_t = _load_heads(qkv, q_feat, do_view, do_feat, offs_own, mask_own,
                                   HEAD_DIM, BLOCK_D, TAIL_D, IS_INTERPRETER)
    dq, dq_t = _zeros_head(BLOCK_OWN, BLOCK_D, TAIL_D)
    lse = tl.load(lse_row + offs_own, mask=mask_own, other=0.0)
    delta = tl.load(delta_row + offs_own, mask=mask_own, other=0.0)
    for start_n in range(0, N, BLOCK_STEP):
        cur_n = start_n + offs_step
        mask_n = cur_n < N
        k_s, k_st, v_s, v_st = _load_heads(qkv, k_feat, qkv, v_feat, cur_n, mask_n,
                                           HEAD_DIM, BLOCK_D, TAIL_D, IS_INTERPRETER)  # (BLOCK_STEP, head dim)
        s = _dot_head(q, q_t, k_s, k_st, TAIL_D)  # (BLOCK_OWN, BLOCK_STEP)
        p = tl.exp2(s * qk_scale - lse[:, None])
        p = tl.where(mask_n[None, :], p, 0.0)  # padded keys: k = 0 gives exp2(-lse), inf for extreme lse
        dp = _dot_head(do, do_t, v_s, v_st, TAIL_D)
        ds = p * (dp - delta[:, None])
        dq, dq_t = _acc_dot_head(dq, dq_t, ds, k_s, k_st, TAIL_D)
    dq, dq_t = _mul_head(dq, dq_t, sm_scale, TAIL_D)
    _store_head(dqkv, q_feat, dq, dq_t, offs_own, mask_own, HEAD_DIM, BLOCK_D, TAIL_D, IS_INTERPRETER)


# Hopper-oriented candidates for ViT sequences (N <= 257: one to five key blocks), chosen
# from ptxas register reports for sm_90 (triton 3.8): configs that do not spill at D = 64,
# and ones that do not (or barely) spill at D = 80, whose 128-wide padded tiles make the
# backward (K, V, dK, dV held per program) register-bound: hence the small BLOCK_STEP ones.
# A head dim that is not a power of two is tried both padded to the next power of two and
# split into two power-of-two blocks (80 = 64 + 16: 37.5% fewer tensor-core FLOPs than 128).
# Under the interpreter a single config: its autotuner cannot benchmark.
_FWD_CONFIGS = [  # (BLOCK_M, BLOCK_N, num_warps, num_stages)
    (128, 64, 8, 3), (128, 32, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3),
    (64, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3),
]
_BWD_CONFIGS = [  # (BLOCK_OWN, BLOCK_STEP, num_warps, num_stages)
    (128, 32, 8, 3), (64, 64, 8, 2), (64, 32, 8, 3), (64, 16, 8, 3), (64, 128, 8, 2),
    (32, 32, 4, 3), (32, 64, 4, 2),
]
_INTERPRETER_FWD = (32, 32, 4, 1)
_INTERPRETER_BWD = (32, 16, 4, 1)


def head_dim_blocks(D: int, split: bool) -> dict[str, int]:
    """BLOCK_D (and TAIL_D, 0 for none) covering head dim D: padded to one power of two
    (at least 16, tl.dot's minimum), or split into the largest power of two <= D and a tail."""
    if not split:
        return {"BLOCK_D": max(16, triton.next_power_of_2(D)), "TAIL_D": 0}
    main = 1 << (D.bit_length() - 1)
    assert main >= 16 and D > main, f"head dim {D} cannot be split into two blocks"
    return {"BLOCK_D": main, "TAIL_D": max(16, triton.next_power_of_2(D - main))}


def _splits(D: int) -> tuple[bool, ...]:
    return (False, True) if D > 16 and D != triton.next_power_of_2(D) else (False,)


def _configs(D: int, tiles, interpreter_tile, names: tuple[str, str]) -> list[triton.Config]:
    if interpreting():  # one config; a splittable head dim runs split (padded: pass a config)
        tiles, splits = [interpreter_tile], _splits(D)[-1:]
    else:
        splits = _splits(D)
    return [triton.Config({names[0]: a, names[1]: b, **head_dim_blocks(D, split)}, num_warps=w, num_stages=st)
            for split in splits for a, b, w, st in tiles]


def fwd_configs(D: int) -> list[triton.Config]:
    """The forward's candidate configs for head dim D (what its autotuner chooses from)."""
    return _configs(D, _FWD_CONFIGS, _INTERPRETER_FWD, ("BLOCK_M", "BLOCK_N"))


def bwd_configs(D: int) -> list[triton.Config]:
    """The backward's candidate configs for head dim D."""
    return _configs(D, _BWD_CONFIGS, _INTERPRETER_BWD, ("BLOCK_OWN", "BLOCK_STEP"))


@functools.cache
def _fwd_kernel(D: int):
    """The forward kernel wrapped in its autotuner, built on first use (nothing at import)."""
    return triton.autotune(fwd_configs(D), key=["N", "HEAD_DIM"])(_attention_fwd_kernel)


@functools.cache
def _bwd_kernel(D: int):
    """The backward kernel wrapped in its autotuner (it only stores: safe to re-run while tuning)."""
    return triton.autotune(bwd_configs(D), key=["N", "HEAD_DIM"])(_attention_bwd_kernel)


def _launch(autotuned, kernel, grid, config: triton.Config | None, *args, **kwargs) -> None:
    """The autotuned kernel, or `kernel` with an explicit config (tests, benches)."""
    if config is None:
        autotuned[grid](*args, **kwargs)
    else:
        kernel[grid](*args, **kwargs, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def _split_heads(qkv: torch.Tensor, num_heads: int) -> tuple[int, int, int]:
    assert qkv.dim() == 3, f"qkv must be (B, N, 3*H*D), got {tuple(qkv.shape)}"
    B, N, C3 = qkv.shape
    assert C3 % (3 * num_heads) == 0, f"last dim {C3} is not 3 * {num_heads} heads * D"
    return B, N, C3 // (3 * num_heads)


def attention_fwd(qkv: torch.Tensor, num_heads: int,
                  config: triton.Config | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv (B, N, 3*H*D), any strides -> (out (B, N, H*D) in qkv's dtype, lse (B*H, N) fp32 base 2).

    `config`: one of `fwd_configs(D)` instead of the autotuned choice."""
    B, N, D = _split_heads(qkv, num_heads)
    H = num_heads
    out = torch.empty((B, N, H * D), device=qkv.device, dtype=qkv.dtype)
    lse = torch.empty((B * H, N), device=qkv.device, dtype=torch.float32)
    grid = lambda meta: (B * H, triton.cdiv(N, meta["BLOCK_M"]))  # noqa: E731  (B*H on axis 0: no 65535 cap)
    _launch(
        _fwd_kernel(D), _attention_fwd_kernel, grid, config,
        qkv, out, lse,
        *qkv.stride(), *out.stride(),
        N, H, math.log2(math.e) / math.sqrt(D),
        HEAD_DIM=D, IS_INTERPRETER=interpreting(),
    )
    return out, lse


def attention_bwd(dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                  num_heads: int, config: triton.Config | None = None) -> torch.Tensor:
    """Gradient of `attention` w.r.t. qkv: one (B, N, 3*H*D) tensor in qkv's dtype.

    `config`: one of `bwd_configs(D)` instead of the autotuned choice."""
    B, N, D = _split_heads(qkv, num_heads)
    H = num_heads
    delta = torch.empty((B * H, N), device=qkv.device, dtype=torch.float32)
    preprocess_block_m = 64
    _attention_bwd_preprocess_kernel[(B * H, triton.cdiv(N, preprocess_block_m))](
        out, dout, delta, *out.stride(), *dout.stride(), N, H,
        HEAD_DIM=D, BLOCK_D=head_dim_blocks(D, split=False)["BLOCK_D"], BLOCK_M=preprocess_block_m,
    )
    dqkv = torch.empty((B, N, 3 * H * D), device=qkv.device, dtype=qkv.dtype)
    grid = lambda meta: (B * H, triton.cdiv(N, meta["BLOCK_OWN"]))  # noqa: E731
    _launch(
        _bwd_kernel(D), _attention_bwd_kernel, grid, config,
        qkv, dout, dqkv, lse, delta,
        *qkv.stride(), *dout.stride(), *dqkv.stride(),
        N, H, math.log2(math.e) / math.sqrt(D), 1.0 / math.sqrt(D),
        HEAD_DIM=D, IS_INTERPRETER=interpreting(),
    )
    return dqkv


class AttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
        out, lse = attention_fwd(qkv, num_heads)
        ctx.save_for_backward(qkv, out, lse)
        ctx.num_heads = num_heads
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        qkv, out, lse = ctx.saved_tensors
        return attention_bwd(dout, qkv, out, lse, ctx.num_heads), None


def attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Fused attention: qkv (B, N, 3*H*D) laid out (B, N, 3, H, D) -> (B, N, H*D); differentiable in qkv."""
    return AttentionFn.apply(qkv, num_heads)


def attention_ref(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Unfused attention straight from the qkv projection's output.

    qkv: (B, N, 3 * H * D), laid out as (B, N, 3, H, D) like timm's Attention.
    Returns (B, N, H * D), the layout the output projection reads.
    Computes in the input dtype with an fp32 softmax; pass fp32 qkv for the
    reference that tests and benches compare against.
    """
    return attention_ref_with_probs(qkv, num_heads)[0]


def attention_ref_with_probs(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention_ref`'s output and its softmax probabilities, (B, H, N, N) fp32: the attention maps
    (the kernel never forms them)."""
    B, N, C3 = qkv.shape
    D = C3 // (3 * num_heads)
    q, k, v = qkv.view(B, N, 3, num_heads, D).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, D) each
    scores = (q * D ** -0.5) @ k.transpose(-2, -1)  # (B, H, N, N)
    probs = scores.softmax(dim=-1, dtype=torch.float32)
    out = (probs.to(q.dtype) @ v).transpose(1, 2).reshape(B, N, num_heads * D)
    return out, probs


def attention_sdpa(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """torch's fused attention as timm calls it: qkv (B, N, 3*H*D) -> (B, N, H*D), with the layout
    copies around F.scaled_dot_product_attention that the model would pay."""
    B, N, C3 = qkv.shape
    D = C3 // (3 * num_heads)
    q, k, v = qkv.reshape(B, N, 3, num_heads, D).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, D) each
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, num_heads * D)


# "auto" on CUDA: kernel or SDPA per (B, N, H, D, dtype), timed once (`kernel_or_torch`).
# Untimed (FASTMOCO_TUNE=0): the head dims where the kernel measured faster forward + backward
# than SDPA flash on an H100 with the bench's timer (bench/RESULTS.md, 2026-11-22, bf16: D=64
# 1.40x, D=80 1.18x; issue 12 questions the D=64 figure: the bench now reports do_bench too).
AUTO_HEAD_DIMS = frozenset({64, 80})
_DISPATCH = Tuner("attention dispatch")


def kernel_faster(qkv: torch.Tensor, num_heads: int) -> bool:
    """Whether the kernel beats `attention_sdpa` forward + backward on CUDA qkv of this shape."""
    B, N, D = _split_heads(qkv, num_heads)
    key = (qkv.device.index, B, N, num_heads, D, qkv.dtype)

    def make_launch():  # fresh tensors of qkv's shape, made only when timing
        g = torch.Generator(device=qkv.device).manual_seed(0)
        x = torch.randn(qkv.shape, generator=g, device=qkv.device).to(qkv.dtype).requires_grad_()
        grad = torch.randn((B, N, num_heads * D), generator=g, device=qkv.device).to(qkv.dtype)
        return fwd_bwd_launch({"kernel": attention, "torch": attention_sdpa}, [x], [grad], num_heads)

    return kernel_or_torch(_DISPATCH, key, D in AUTO_HEAD_DIMS, qkv, make_launch)
