"""Fused LayerNorm and residual-add + LayerNorm.

Over the last dim C of x (..., C), seen as M rows:
    y = (x - mean) * rstd * weight + bias,   rstd = 1 / sqrt(var + eps)
and the variant used between a ViT's sub-blocks, in one pass:
    h = x + branch;  y = LayerNorm(h)        (returns h and y)
mean and rstd are fp32 and saved for the backward.

Backward, with xhat = (x - mean) * rstd, g = dy * weight and means over C:
    dx      = rstd * (g - mean(g) - xhat * mean(g * xhat))
    dweight = sum over rows of dy * xhat
    dbias   = sum over rows of dy
For the add variant, both x and branch get dx + dh (dh: h's own gradient).
Each backward program walks a strip of rows and writes one fp32 partial row of
dweight and dbias (8 programs per SM: about a thousand rows on an H100); torch
sums the partial rows.

All arithmetic is fp32 (loads are upcast at once, which the Triton
interpreter's wrong bf16 arithmetic also needs); outputs take x's dtype,
rounded to nearest even (by hand under the interpreter: `IS_INTERPRETER`).

Reference: `layernorm_ref` / `add_layernorm_ref` below.
"""
import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .interpreter import cast_rtne, interpreting


@triton.jit
def _layernorm_fwd_kernel(
    x_ptr,  # (M, C), row stride stride_x
    branch_ptr,  # (M, C) residual branch (HAS_BRANCH)
    h_ptr,  # (M, C) out: x + branch (HAS_BRANCH)
    y_ptr,  # (M, C) out
    w_ptr, b_ptr,  # (C,)
    mean_ptr, rstd_ptr,  # (M,) fp32 out
    stride_x, stride_branch, stride_h, stride_y,
    M, C, eps,
    HAS_BRANCH: tl.constexpr, IS_INTERPRETER: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_C)
    mask_c = cols < C
    mask = (rows < M)[:, None] & mask_c[None, :]
    rows = rows.to(tl.int64)

    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BRANCH:
        branch = tl.load(branch_ptr + rows[:, None] * stride_branch + cols[None, :], mask=mask, other=0.0)
        x += branch.to(tl.float32)
        h = cast_rtne(x, h_ptr.dtype.element_ty, IS_INTERPRETER)
        tl.store(h_ptr + rows[:, None] * stride_h + cols[None, :], h, mask=mask)
        x = h.to(tl.float32)  # normalize h as stored, as the backward will see it
    mean = tl.sum(x, 1) / C
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / C + eps)
    w = tl.load(w_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    y = cast_rtne(y, y_ptr.dtype.element_ty, IS_INTERPRETER)
    tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], y, mask=mask)
    tl.store(mean_ptr + rows, mean, mask=rows < M)
    tl.store(rstd_ptr + rows, rstd, mask=rows < M)


@triton.jit
def _layernorm_bwd_kernel(
    x_ptr,  # (M, C): the normalized input (h for the add variant)
    w_ptr,  # (C,)
    mean_ptr, rstd_ptr,  # (M,) fp32
    dy_ptr,  # (M, C)
    dh_ptr,  # (M, C) gradient of h, added to dx (HAS_DH)
    dx_ptr,  # (M, C) out
    dw_partial_ptr, db_partial_ptr,  # (num_programs, C) fp32 out: one partial row per program
    stride_x, stride_dy, stride_dh, stride_dx,
    M, C, rows_per_program,  # rows_per_program: a multiple of BLOCK_ROWS
    HAS_DH: tl.constexpr, IS_INTERPRETER: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    mask_c = cols < C
    w = tl.load(w_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_ROWS, BLOCK_C], tl.float32)
    db_acc = tl.zeros([BLOCK_ROWS, BLOCK_C], tl.float32)

    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for start in range(row_start, row_end, BLOCK_ROWS):
        rows = start + tl.arange(0, BLOCK_ROWS)
        mask_r = rows < row_end
        mask = mask_r[:, None] & mask_c[None, :]
        rows = rows.to(tl.int64)
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=mask_r, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=mask_r, other=0.0)
        xhat = (x - mean[:, None]) * rstd[:, None]  # padded columns need no mask: dy = w = 0 there
        g = dy * w[None, :]
        mean_g = tl.sum(g, 1) / C
        mean_gx = tl.sum(g * xhat, 1) / C
        dx = (g - mean_g[:, None] - xhat * mean_gx[:, None]) * rstd[:, None]
        if HAS_DH:
            dh = tl.load(dh_ptr + rows[:, None] * stride_dh + cols[None, :], mask=mask, other=0.0)
            dx += dh.to(tl.float32)
        dx = cast_rtne(dx, dx_ptr.dtype.element_ty, IS_INTERPRETER)
        tl.store(dx_ptr + rows[:, None] * stride_dx + cols[None, :], dx, mask=mask)
        dw_acc += dy * xhat
        db_acc += dy

    tl.store(dw_partial_ptr + pid * C + cols, tl.sum(dw_acc, 0), mask=mask_c)
    tl.store(db_partial_ptr + pid * C + cols, tl.sum(db_acc, 0), mask=mask_c)


# A tile of about _TILE elements per program: one row for C > 1024, several rows for narrow widths.
_TILE = 2048
# Backward programs per SM: each writes one partial row of dweight/dbias (fp32), summed by torch.
_BWD_PROGRAMS_PER_SM = 8
_CPU_BWD_PROGRAMS = 4  # the interpreter runs programs one by one: few programs, long strips


def _launch_params(C: int) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_ROWS, num_warps) for width C."""
    block_c = triton.next_power_of_2(C)
    block_rows = max(1, _TILE // block_c)
    num_warps = 8 if block_c * block_rows >= 4096 or block_c >= 2048 else 4
    return block_c, block_rows, num_warps


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _rows(t: torch.Tensor, C: int) -> torch.Tensor:
    """(..., C) -> (M, C) with unit column stride (a view when it can be)."""
    t = t.reshape(-1, C)
    return t if t.stride(-1) == 1 else t.contiguous()


def layernorm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                  branch: torch.Tensor | None = None):
    """LayerNorm over the last dim; with `branch`, of h = x + branch.

    Returns (h or None, y, mean, rstd): h and y shaped like x; mean, rstd (M,) fp32.
    """
    C = x.shape[-1]
    assert weight.shape == (C,) and bias.shape == (C,), "weight and bias must be (C,)"
    weight, bias = weight.contiguous(), bias.contiguous()
    out_dtype = x.dtype if branch is None else torch.promote_types(x.dtype, branch.dtype)
    x2 = _rows(x, C)
    M = x2.shape[0]
    y = torch.empty((M, C), device=x.device, dtype=out_dtype)
    mean = torch.empty((M,), device=x.device, dtype=torch.float32)
    rstd = torch.empty((M,), device=x.device, dtype=torch.float32)
    if branch is not None:
        assert branch.shape == x.shape, f"branch {tuple(branch.shape)} must match x {tuple(x.shape)}"
        branch2 = _rows(branch, C)
        h = torch.empty((M, C), device=x.device, dtype=out_dtype)
    else:
        branch2 = h = y  # placeholders: never read or written when HAS_BRANCH is False
    if M > 0:
        block_c, block_rows, num_warps = _launch_params(C)
        _layernorm_fwd_kernel[(triton.cdiv(M, block_rows),)](
            x2, branch2, h, y, weight, bias, mean, rstd,
            x2.stride(0), branch2.stride(0), h.stride(0), y.stride(0),
            M, C, eps,
            HAS_BRANCH=branch is not None, IS_INTERPRETER=interpreting(),
            BLOCK_ROWS=block_rows, BLOCK_C=block_c, num_warps=num_warps,
        )
    h_out = h.view(x.shape) if branch is not None else None
    return h_out, y.view(x.shape), mean, rstd


def layernorm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                  rstd: torch.Tensor, dh: torch.Tensor | None = None):
    """Returns (dx shaped like x in x's dtype, dweight (C,) fp32, dbias (C,) fp32); dx includes dh if given."""
    C = x.shape[-1]
    x2, dy2 = _rows(x, C), _rows(dy, C)
    weight = weight.contiguous()
    dh2 = _rows(dh, C) if dh is not None else dy2  # placeholder when HAS_DH is False
    M = x2.shape[0]
    dx = torch.empty((M, C), device=x.device, dtype=x.dtype)
    block_c, block_rows, num_warps = _launch_params(C)
    if x.is_cuda:
        device_index = x.device.index if x.device.index is not None else torch.cuda.current_device()
        max_programs = _BWD_PROGRAMS_PER_SM * _sm_count(device_index)
    else:
        max_programs = _CPU_BWD_PROGRAMS
    rows_per_program = triton.cdiv(triton.cdiv(max(M, 1), max_programs), block_rows) * block_rows
    programs = triton.cdiv(M, rows_per_program)
    dw_partial = torch.empty((programs, C), device=x.device, dtype=torch.float32)
    db_partial = torch.empty((programs, C), device=x.device, dtype=torch.float32)
    if M > 0:
        _layernorm_bwd_kernel[(programs,)](
            x2, weight, mean, rstd, dy2, dh2, dx, dw_partial, db_partial,
            x2.stride(0), dy2.stride(0), dh2.stride(0), dx.stride(0),
            M, C, rows_per_program,
            HAS_DH=dh is not None, IS_INTERPRETER=interpreting(),
            BLOCK_ROWS=block_rows, BLOCK_C=block_c, num_warps=num_warps,
        )
    return dx.view(x.shape), dw_partial.sum(0), db_partial.sum(0)


class LayerNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        _, y, mean, rstd = layernorm_fwd(x, weight, bias, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.bias_dtype = bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dweight, dbias = layernorm_bwd(dy, x, weight, mean, rstd)
        return dx, dweight.to(weight.dtype), dbias.to(ctx.bias_dtype), None


class AddLayerNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, branch, weight, bias, eps):
        h, y, mean, rstd = layernorm_fwd(x, weight, bias, eps, branch=branch)
        ctx.save_for_backward(h, weight, mean, rstd)
        ctx.dtypes = (x.dtype, branch.dtype, bias.dtype)
        ctx.set_materialize_grads(False)  # h or y may be unused: no zero tensors for them
        return h, y

    @staticmethod
    def backward(ctx, dh, dy):
        h, weight, mean, rstd = ctx.saved_tensors
        x_dtype, branch_dtype, bias_dtype = ctx.dtypes
        if dy is None:  # only h was used: the LayerNorm contributes nothing
            dh = dh if dh is not None else torch.zeros_like(h)
            return dh.to(x_dtype), dh.to(branch_dtype), None, None, None
        dsum, dweight, dbias = layernorm_bwd(dy, h, weight, mean, rstd, dh=dh)
        # x and branch share one gradient tensor, as torch's own add does.
        return dsum.to(x_dtype), dsum.to(branch_dtype), dweight.to(weight.dtype), dbias.to(bias_dtype), None


def layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Fused LayerNorm over the last dim of x (..., C); differentiable in x, weight, bias."""
    return LayerNormFn.apply(x, weight, bias, eps)


def add_layernorm(x: torch.Tensor, branch: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused h = x + branch; y = LayerNorm(h). Returns (h, y); gradients from both reach x and branch."""
    return AddLayerNormFn.apply(x, branch, weight, bias, eps)


def layernorm_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """torch's LayerNorm over the last dim; pass fp32 tensors for the reference tests compare against."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def add_layernorm_ref(x: torch.Tensor, branch: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                      eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + branch; y = LayerNorm(h). Returns (h, y)."""
    h = x + branch
    return h, layernorm_ref(h, weight, bias, eps)
