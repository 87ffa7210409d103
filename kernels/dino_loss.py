"""Fused DINO cross-entropy: loss, gradient w.r.t. the student logits and the teacher sum for the
center, streaming over the K prototypes once per pass.

For student logits s (V_s, B, K) (views 0..V_t-1 are the global crops, the rest
local ones), teacher logits t (V_t, B, K), center c (K,):

    p_i = softmax((t_i - c) / tau_t),   lse_j = logsumexp(s_j / tau_s)
    loss = 1 / (T B) sum_b sum_{i < V_t} sum_{j != i} CE(p_i, s_j)
    CE(p_i, s_j) = -sum_k p_ik log_softmax(s_j / tau_s)_k = lse_j - <p_i, s_j> / tau_s   (sum_k p_ik = 1)

with T = V_t V_s - V_t pairs. Gradient (g the upstream gradient):

    dloss / ds_j = g / (T B tau_s) * (n_j softmax(s_j / tau_s) - sum_{i != j} p_i)

where n_j = V_t for a local crop and V_t - 1 for a global one. And the sum
sum_{i, b} t_ib (K,) the teacher's new center is made of (DINO: EMA of the batch
mean over all ranks; the all-reduce and the EMA are the caller's).

What is fused: the forward kernel gives each program BLOCK_K prototypes and
walks the B rows; per row and view it keeps the max and sum-exp of its block
(base 2) and, per teacher view i, A_ij = sum_k exp(x_ik - m_i) s_jk, the
unnormalised <p_i, s_j> of its block; the blocks' partials (O(B K / BLOCK_K)
floats) are merged with log-sum-exp arithmetic in `dino_loss_fwd`. The teacher
block's column sums are the center's sum, complete in the program that owns
those columns (no atomics: deterministic). The backward kernel recomputes the
softmaxes from the saved log-sum-exps. Neither pass materialises the
(V_t x V_s x B x K) terms of the unfused version: extra memory is the gradient
itself and O(B (V_s + V_t) K / BLOCK_K) fp32 partials.

Statistics in fp32; student/teacher in bf16 or fp32; the gradient in the
student's dtype. Reference: `dino_loss_ref` below.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .interpreter import cast_rtne, interpreting

LOG2E = tl.constexpr(1.4426950408889634)  # logits in base 2: exp2 is the fast path
LN2 = 0.6931471805599453                   # base-2 log-sum-exps back to natural logs
_BLOCK_K = 128          # prototypes per program (GPU)
_INTERP_BLOCK_K = 32    # interpreter: several programs and a masked tail at test shapes


@triton.jit
def _student_tile(s_ptr, b, B, K, views, ks, vmask, kmask, inv_tau_s):
    """(V_S_PAD, BLOCK_K) raw student logits of row b (0 where masked) and the same * log2(e) / tau_s
    (-inf where masked)."""
    mask = vmask[:, None] & kmask[None, :]
    offs = (views.to(tl.int64)[:, None] * B + b) * K + ks[None, :]
    s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return s, tl.where(mask, s * (inv_tau_s * LOG2E), float("-inf"))


@triton.jit
def _teacher_row(t_ptr, i, b, B, K, ks, kmask, c, inv_tau_t):
    """(BLOCK_K,) raw teacher logits of view i, row b (0 past K) and (t - c) * log2(e) / tau_t (-inf past K)."""
    t = tl.load(t_ptr + (i * B + b).to(tl.int64) * K + ks, mask=kmask, other=0.0).to(tl.float32)
    return t, tl.where(kmask, (t - c) * (inv_tau_t * LOG2E), float("-inf"))


@triton.jit
def _dino_fwd_kernel(
    s_ptr,  # (V_S, B, K) student logits
    t_ptr,  # (V_T, B, K) teacher logits
    c_ptr,  # (K,) center, fp32
    ms_ptr, zs_ptr,  # (B, NB, V_S) fp32 out: student max and sum of exp2(x - max) of this block
    mt_ptr, zt_ptr,  # (B, NB, V_T) fp32 out: the same for the teacher
    a_ptr,  # (B, NB, V_T, V_S) fp32 out: sum_k exp2(x_ik - m_i) s_jk over this block
    csum_ptr,  # (K,) fp32 out: sum over views and rows of the teacher logits
    B, K, inv_tau_s, inv_tau_t,
    V_S: tl.constexpr,
    V_T: tl.constexpr,
    V_S_PAD: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    blk = tl.program_id(0)
    NB = tl.num_programs(0)
    ks = blk * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = ks < K
    views = tl.arange(0, V_S_PAD)
    vmask = views < V_S
    c = tl.load(c_ptr + ks, mask=kmask, other=0.0).to(tl.float32)
    csum = tl.zeros([BLOCK_K], tl.float32)
    for b in range(B):
        s, xs = _student_tile(s_ptr, b, B, K, views, ks, vmask, kmask, inv_tau_s)
        m_s = tl.where(vmask, tl.max(xs, 1), 0.0)       # padded views: keep the arithmetic finite
        z_s = tl.sum(tl.exp2(xs - m_s[:, None]), 1)
        out = (b * NB + blk) * V_S + views
        tl.store(ms_ptr + out, m_s, mask=vmask)
        tl.store(zs_ptr + out, z_s, mask=vmask)
        for i in tl.static_range(V_T):
            t, xt = _teacher_row(t_ptr, i, b, B, K, ks, kmask, c, inv_tau_t)
            csum += t
            m_t = tl.max(xt, 0)
            e = tl.exp2(xt - m_t)                          # 0 past K
            base = (b * NB + blk) * V_T + i
            tl.store(mt_ptr + base, m_t)
            tl.store(zt_ptr + base, tl.sum(e, 0))
            tl.store(a_ptr + base * V_S + views, tl.sum(e[None, :] * s, 1), mask=vmask)
    tl.store(csum_ptr + ks, csum, mask=kmask)


@triton.jit
def _dino_bwd_kernel(
    s_ptr,  # (V_S, B, K) student logits
    t_ptr,  # (V_T, B, K) teacher logits
    c_ptr,  # (K,) center, fp32
    lse_s_ptr,  # (B, V_S) fp32 log-sum-exp of s / tau_s, base 2
    lse_t_ptr,  # (B, V_T) fp32 log-sum-exp of (t - c) / tau_t, base 2
    gout_ptr,  # () upstream gradient of the loss
    ds_ptr,  # (V_S, B, K) out, the student's dtype
    B, K, inv_tau_s, inv_tau_t, grad_scale,  # grad_scale = 1 / (T B tau_s)
    V_S: tl.constexpr,
    V_T: tl.constexpr,
    V_S_PAD: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IS_INTERPRETER: tl.constexpr,
):
    blk = tl.program_id(0)
    ks = blk * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = ks < K
    views = tl.arange(0, V_S_PAD)
    vmask = views < V_S
    is_global = views < V_T
    n_j = tl.where(is_global, V_T - 1.0, V_T * 1.0)      # teacher views that pair with student view j
    c = tl.load(c_ptr + ks, mask=kmask, other=0.0).to(tl.float32)
    scale = tl.load(gout_ptr).to(tl.float32) * grad_scale
    mask = vmask[:, None] & kmask[None, :]
    for b in range(B):
        _, xs = _student_tile(s_ptr, b, B, K, views, ks, vmask, kmask, inv_tau_s)
        lse_s = tl.load(lse_s_ptr + b * V_S + views, mask=vmask, other=0.0)
        q = tl.exp2(xs - lse_s[:, None])                   # student softmax, 0 where masked
        # the teacher's probabilities laid out by student view: row j < V_T holds p_j, others 0
        t = tl.load(t_ptr + (views.to(tl.int64)[:, None] * B + b) * K + ks[None, :],
                    mask=is_global[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        xt = tl.where(is_global[:, None] & kmask[None, :], (t - c[None, :]) * (inv_tau_t * LOG2E), float("-inf"))
        lse_t = tl.load(lse_t_ptr + b * V_T + views, mask=is_global, other=0.0)
        p = tl.exp2(xt - lse_t[:, None])
        others = tl.sum(p, 0)[None, :] - p                  # sum over teacher views i != j
        ds = (n_j[:, None] * q - others) * scale
        offs = (views.to(tl.int64)[:, None] * B + b) * K + ks[None, :]
        tl.store(ds_ptr + offs, cast_rtne(ds, ds_ptr.dtype.element_ty, IS_INTERPRETER), mask=mask)


# -- launchers -----------------------------------------------------------------------------------------
def _check(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor) -> tuple[int, int, int, int]:
    if student.dim() != 3 or teacher.dim() != 3:
        raise ValueError(f"dino loss: student (V_s, B, K) and teacher (V_t, B, K), got {tuple(student.shape)} "
                         f"and {tuple(teacher.shape)}")
    vs, b, k = student.shape
    vt = teacher.shape[0]
    if teacher.shape[1:] != (b, k) or center.shape != (k,):
        raise ValueError(f"dino loss: teacher {tuple(teacher.shape)} / center {tuple(center.shape)} do not match "
                         f"student {tuple(student.shape)}")
    if vs <= vt - 1 or vt < 1:
        raise ValueError(f"dino loss: {vs} student views for {vt} teacher views (the student's first "
                         f"{vt} views are the teacher's crops; at least one more is needed)")
    return vs, vt, b, k


def _block_k() -> int:
    return _INTERP_BLOCK_K if interpreting() else _BLOCK_K


def dino_loss_fwd(student, teacher, center, tau_s: float, tau_t: float):
    """(loss (), teacher sum (K,), lse_s (B, V_s), lse_t (B, V_t)); lse in base 2, fp32."""
    vs, vt, B, K = _check(student, teacher, center)
    student, teacher = student.contiguous(), teacher.contiguous()
    center = center.float().contiguous()
    block = _block_k()
    nb = triton.cdiv(K, block)
    f32 = dict(device=student.device, dtype=torch.float32)
    m_s, z_s = torch.empty(B, nb, vs, **f32), torch.empty(B, nb, vs, **f32)
    m_t, z_t = torch.empty(B, nb, vt, **f32), torch.empty(B, nb, vt, **f32)
    a = torch.empty(B, nb, vt, vs, **f32)
    csum = torch.empty(K, **f32)
    _dino_fwd_kernel[(nb,)](student, teacher, center, m_s, z_s, m_t, z_t, a, csum, B, K, 1.0 / tau_s,
                            1.0 / tau_t, V_S=vs, V_T=vt, V_S_PAD=triton.next_power_of_2(vs), BLOCK_K=block)
    # merge the blocks: log-sum-exp arithmetic on O(B * blocks * views) floats
    top_s = m_s.amax(1, keepdim=True)
    lse_s = top_s[:, 0] + torch.log2((z_s * torch.exp2(m_s - top_s)).sum(1))            # (B, V_s)
    top_t = m_t.amax(1, keepdim=True)
    w = torch.exp2(m_t - top_t)                                                          # (B, nb, V_t)
    z = (z_t * w).sum(1)                                                                 # (B, V_t)
    lse_t = top_t[:, 0] + torch.log2(z)
    dots = (a * w[..., None]).sum(1) / z[..., None]                                      # <p_i, s_j> (B, V_t, V_s)
    pairs = torch.ones(vt, vs, **f32)
    pairs[torch.arange(vt), torch.arange(vt)] = 0.0                                      # j == i: no term
    terms = (lse_s * LN2)[:, None, :] - dots / tau_s                                     # (B, V_t, V_s)
    n_terms = vt * vs - vt
    loss = (terms * pairs).sum() / (n_terms * B)
    return loss, csum, lse_s, lse_t


def dino_loss_bwd(grad_loss, student, teacher, center, lse_s, lse_t, tau_s: float, tau_t: float):
    vs, vt, B, K = _check(student, teacher, center)
    student, teacher = student.contiguous(), teacher.contiguous()
    block = _block_k()
    ds = torch.empty_like(student)
    n_terms = vt * vs - vt
    _dino_bwd_kernel[(triton.cdiv(K, block),)](
        student, teacher, center.float().contiguous(), lse_s.contiguous(), lse_t.contiguous(),
        grad_loss.contiguous(), ds, B, K, 1.0 / tau_s, 1.0 / tau_t, 1.0 / (n_terms * B * tau_s),
        V_S=vs, V_T=vt, V_S_PAD=triton.next_power_of_2(vs), BLOCK_K=block, IS_INTERPRETER=interpreting())
    return ds


class DinoLossFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, center, tau_s: float, tau_t: float):
        loss, csum, lse_s, lse_t = dino_loss_fwd(student, teacher, center, tau_s, tau_t)
        ctx.save_for_backward(student, teacher, center, lse_s, lse_t)
        ctx.taus = (tau_s, tau_t)
        ctx.mark_non_differentiable(csum)
        return loss, csum

    @staticmethod
    def backward(ctx, grad_loss, _grad_csum):
        student, teacher, center, lse_s, lse_t = ctx.saved_tensors
        ds = dino_loss_bwd(grad_loss, student, teacher, center, lse_s, lse_t, *ctx.taus)
        return ds, None, None, None, None


def dino_loss(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, tau_s: float,
              tau_t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, sum of the teacher logits over views and rows (K,), fp32). The teacher and the center get
    no gradient (DINO's teacher is an EMA, its center a statistic)."""
    # the center is saved for backward: a copy, so the caller may update it in place meanwhile
    return DinoLossFn.apply(student, teacher.detach(), center.detach().float().clone(), tau_s, tau_t)


def dino_loss_ref(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, tau_s: float,
                  tau_t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The unfused loss as DINO's code computes it (every (i, j) pair's (B, K) terms), in fp32."""
    _check(student, teacher, center)
    log_q = F.log_softmax(student.float() / tau_s, dim=-1)                          # (V_s, B, K)
    p = F.softmax((teacher.detach().float() - center.detach().float()) / tau_t, dim=-1)  # (V_t, B, K)
    total, n = 0.0, 0
    for i in range(p.shape[0]):
        for j in range(log_q.shape[0]):
            if j == i:
                continue
            total = total + torch.sum(-p[i] * log_q[j], dim=-1).mean()
            n += 1
    return total / n, teacher.detach().float().sum((0, 1))
