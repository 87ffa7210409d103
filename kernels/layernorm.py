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

Both kernels walk a strip of rows in tiles of BLOCK_ROWS rows. A backward
program writes one fp32 partial row of dweight and dbias for its strip (a few
programs per SM: about a thousand rows each on an H100), and torch sums the
partial rows. The forward runs either one tile per program or, like the
backward, a persistent grid. With NUM_STAGES > 1 the loop over tiles is
software-pipelined: the next tiles' loads are in flight while one is reduced,
which these latency-bound loops (two row reductions per tile) need. Which
config runs is tuned per shape on the GPU (`kernels/layernorm_configs.py`
holds the candidates, `kernels/tuner.py` times them); under the
interpreter and with FASTMOCO_TUNE=0, a fixed default.

All arithmetic is fp32 (loads are upcast at once, which the Triton
interpreter's wrong bf16 arithmetic also needs); outputs take x's dtype,
rounded to nearest even (by hand under the interpreter: `IS_INTERPRETER`).

Reference: `layernorm_ref` / `add_layernorm_ref` below. `kernel_faster` answers
the ops switch's "auto": kernel or torch at a shape (`kernels/tuner.py`).
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .interpreter import cast_rtne, interpreting
from .layernorm_configs import (TUNER, LayerNormConfig, block_c, candidate_configs, default_config, grid_rows,
                                tune_key)
from .tuner import Tuner, fwd_bwd_launch, kernel_or_torch


@triton.jit
def _strip(rows_per_program, M):
    """The rows [row_start, row_end) of this program's strip."""
    row_start = tl.program_id(0) * rows_per_program
    return row_start, tl.minimum(row_start + rows_per_program, M)


@triton.jit
def _row_tile(start, row_end, mask_c, BLOCK_ROWS: tl.constexpr):
    """The tile of BLOCK_ROWS rows at `start`: int64 row indices, their mask and the (rows, C) mask."""
    rows = start + tl.arange(0, BLOCK_ROWS)
    mask_r = rows < row_end
    mask = mask_r[:, None] & mask_c[None, :]
    return rows.to(tl.int64), mask_r, mask


@triton.jit
def _layernorm_fwd_kernel(
    x_ptr,  # (M, C), row stride stride_x
    branch_ptr,  # (M, C) residual branch (HAS_BRANCH)
    h_ptr,  # (M, C) out: x + branch (HAS_BRANCH)
    y_ptr,  # (M, C) out
    w_ptr, b_ptr,  # (C,)
    mean_ptr, rstd_ptr,  # (M,) fp32 out
    stride_x, stride_branch, stride_h, stride_y,
    M, C, eps, rows_per_program,  # rows_per_program: a multiple of BLOCK_ROWS
    HAS_BRANCH: tl.constexpr, IS_INTERPRETER: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    cols = tl.arange(0, BLOCK_C)
    mask_c = cols < C
    w = tl.load(w_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)

    row_start, row_end = _strip(rows_per_program, M)
    for start in tl.range(row_start, row_end, BLOCK_ROWS, num_stages=NUM_STAGES):
        rows, mask_r, mask = _row_tile(start, row_end, mask_c, BLOCK_ROWS)
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
        y = xc * rstd[:, None] * w[None, :] + b[None, :]
        y = cast_rtne(y, y_ptr.dtype.element_ty, IS_INTERPRETER)
        tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], y, mask=mask)
        tl.store(mean_ptr + rows, mean, mask=mask_r)
        tl.store(rstd_ptr + rows, rstd, mask=mask_r)


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
    BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    mask_c = cols < C
    w = tl.load(w_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_ROWS, BLOCK_C], tl.float32)
    db_acc = tl.zeros([BLOCK_ROWS, BLOCK_C], tl.float32)

    row_start, row_end = _strip(rows_per_program, M)
    for start in tl.range(row_start, row_end, BLOCK_ROWS, num_stages=NUM_STAGES):
        rows, mask_r, mask = _row_tile(start, row_end, mask_c, BLOCK_ROWS)
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


def _rows(t: torch.Tensor, C: int) -> torch.Tensor:
    """(..., C) -> (M, C) with unit column stride (a view when it can be)."""
    t = t.reshape(-1, C)
    return t if t.stride(-1) == 1 else t.contiguous()


def layernorm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                  branch: torch.Tensor | None = None, config: LayerNormConfig | None = None):
    """LayerNorm over the last dim; with `branch`, of h = x + branch.

    Returns (h or None, y, mean, rstd): h and y shaped like x; mean, rstd (M,) fp32.
    `config` None: the tuned (GPU) or default config.
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

    def launch(cfg: LayerNormConfig) -> None:
        programs, rows_per_program = grid_rows(M, cfg, x.device)
        _layernorm_fwd_kernel[(programs,)](
            x2, branch2, h, y, weight, bias, mean, rstd,
            x2.stride(0), branch2.stride(0), h.stride(0), y.stride(0),
            M, C, eps, rows_per_program,
            HAS_BRANCH=branch is not None, IS_INTERPRETER=interpreting(),
            BLOCK_ROWS=cfg.block_rows, BLOCK_C=block_c(C), NUM_STAGES=cfg.num_stages,
            num_warps=cfg.num_warps,
        )

    if M > 0:
        if config is None:
            key = tune_key("fwd", x2, branch is not None, branch2, weight, bias, y)
            config = TUNER.pick(key, candidate_configs(C, backward=False), default_config(C, False), launch, x2)
        launch(config)
    h_out = h.view(x.shape) if branch is not None else None
    return h_out, y.view(x.shape), mean, rstd


def layernorm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                  rstd: torch.Tensor, dh: torch.Tensor | None = None, config: LayerNormConfig | None = None):
    """Returns (dx shaped like x in x's dtype, dweight (C,) fp32, dbias (C,) fp32); dx includes dh if given.

    `config` None: the tuned (GPU) or default config; its programs_per_sm must be > 0.
    """
    C = x.shape[-1]
    x2, dy2 = _rows(x, C), _rows(dy, C)
    weight = weight.contiguous()
    dh2 = _rows(dh, C) if dh is not None else dy2  # placeholder when HAS_DH is False
    M = x2.shape[0]
    dx = torch.empty((M, C), device=x.device, dtype=x.dtype)

    def launch(cfg: LayerNormConfig) -> tuple[torch.Tensor, torch.Tensor]:
        assert cfg.programs_per_sm > 0, "the backward needs a persistent grid (programs_per_sm > 0)"
        programs, rows_per_program = grid_rows(M, cfg, x.device)
        dw_partial = torch.empty((programs, C), device=x.device, dtype=torch.float32)
        db_partial = torch.empty((programs, C), device=x.device, dtype=torch.float32)
        if M > 0:
            _layernorm_bwd_kernel[(programs,)](
                x2, weight, mean, rstd, dy2, dh2, dx, dw_partial, db_partial,
                x2.stride(0), dy2.stride(0), dh2.stride(0), dx.stride(0),
                M, C, rows_per_program,
                HAS_DH=dh is not None, IS_INTERPRETER=interpreting(),
                BLOCK_ROWS=cfg.block_rows, BLOCK_C=block_c(C), NUM_STAGES=cfg.num_stages,
                num_warps=cfg.num_warps,
            )
        return dw_partial.sum(0), db_partial.sum(0)

    if config is None:
        key = tune_key("bwd", x2, dh is not None, dy2, weight)
        config = TUNER.pick(key, candidate_configs(C, backward=True), default_config(C, True), launch, x2)
    dweight, dbias = launch(config)
    return dx.view(x.shape), dweight, dbias


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


# "auto" on CUDA: kernel or torch per (width, rows bucket, dtypes, variant), timed once
# (`kernel_or_torch`). Untimed (FASTMOCO_TUNE=0): the widths where the kernels measured faster
# forward + backward on an H100 (bench/RESULTS.md, 2026-11-22, bf16, before launch-config
# tuning: C=768 1.56x; C=384 0.60x and C=1280 0.71x).
AUTO_WIDTHS = frozenset({768})
_DISPATCH = Tuner("layernorm dispatch")


def kernel_faster(x: torch.Tensor, weight_dtype: torch.dtype | None = None, has_branch: bool = False) -> bool:
    """Whether the kernel beats torch on CUDA rows shaped like x (..., C), with a weight of
    `weight_dtype` (default x's) and, with has_branch, the residual-add variant."""
    C = x.shape[-1]
    weight_dtype = x.dtype if weight_dtype is None else weight_dtype
    key = (x.device.index, C, triton.next_power_of_2(max(x.numel() // C, 1)), x.dtype, weight_dtype, has_branch)

    def make_launch():  # fresh tensors shaped like x (as rows), made only when timing
        g = torch.Generator(device=x.device).manual_seed(0)
        rand = lambda *shape, dtype: torch.randn(*shape, generator=g, device=x.device).to(dtype)  # noqa: E731
        rows = (x.numel() // C, C)
        acts = [rand(*rows, dtype=x.dtype).requires_grad_() for _ in range(2 if has_branch else 1)]
        params = [rand(C, dtype=weight_dtype).requires_grad_() for _ in range(2)]
        grads = [rand(*rows, dtype=x.dtype) for _ in acts]  # for (h, y) or y
        fns = {"kernel": add_layernorm if has_branch else layernorm,
               "torch": add_layernorm_ref if has_branch else layernorm_ref}
        return fwd_bwd_launch(fns, acts + params, grads, 1e-6)

    return kernel_or_torch(_DISPATCH, key, C in AUTO_WIDTHS, x, make_launch)
