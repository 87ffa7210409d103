"""Fused LayerNorm and residual-add + LayerNorm vs `layernorm_ref` / `add_layernorm_ref`.

Three-way: kernel vs the fp32 reference vs the same-dtype PyTorch result,
err_kernel <= 2 * err_torch + atol, for the outputs and every gradient (x,
branch, weight, bias). Small non-power-of-two widths under the Triton
interpreter on the CPU; full ViT shapes in bf16 on the GPU
(`pytest -m gpu tests/test_layernorm.py`).
"""
import contextlib

import pytest
import torch
from kernel_checks import assert_three_way, poisoned_empty

from fastmoco.kernels.layernorm import add_layernorm, add_layernorm_ref, layernorm, layernorm_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6
FP32_ATOL = 1e-4
BF16_ATOL = 1e-2

# Activation shapes (..., C); C = 72 is the CPU tiny ViT, 200 and 1000 odd widths.
CPU_SHAPES = [(2, 17, 72), (3, 50, 200), (37, 1000), (1, 5, 384)]
GPU_SHAPES = [
    (512, 197, 768),  # ViT-B bench shape
    (128, 257, 1280),  # ViT-H bench shape
    (512, 197, 384),  # ViT-S bench shape
    (7, 257, 1024),  # ViT-L, odd batch
    (1, 197, 192),  # ViT-Ti, batch 1
    (3, 50, 768),
]
# weight/bias either fp32 (master weights) or the activation dtype.
CASES = (
    [pytest.param(s, torch.float32, torch.float32, FP32_ATOL, id=f"{s}-fp32") for s in CPU_SHAPES]
    + [pytest.param(s, torch.bfloat16, torch.float32, BF16_ATOL, id=f"{s}-bf16-w32") for s in CPU_SHAPES]
    + [pytest.param(s, torch.bfloat16, torch.bfloat16, BF16_ATOL, id=f"{s}-bf16-w16") for s in CPU_SHAPES[:2]]
    + [pytest.param(s, torch.bfloat16, w, BF16_ATOL, id=f"{s}-bf16-{w}-gpu", marks=pytest.mark.gpu)
       for s in GPU_SHAPES for w in (torch.float32, torch.bfloat16)]
)


def inputs(shape, dtype, w_dtype, seed=0):
    """x, branch, weight, bias, and the upstream gradients dh, dy; fresh, seeded, nonzero."""
    C = shape[-1]
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g, device=DEVICE)  # noqa: E731
    x = (rand(*shape) * 2 + 0.5).to(dtype)  # a mean and a scale for the norm to remove
    branch = rand(*shape).to(dtype)
    weight = (1 + 0.5 * rand(C)).to(w_dtype)
    bias = (0.5 * rand(C)).to(w_dtype)
    dh, dy = rand(*shape).to(dtype), rand(*shape).to(dtype)
    return x, branch, weight, bias, dh, dy


def run(fn, tensors, grads, poison=False):
    """fn(*leaves, EPS) on fresh leaves; backward of every output that has a gradient.

    Returns (outputs, gradients of the leaves)."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    with poisoned_empty() if poison else contextlib.nullcontext():
        outs = fn(*leaves, EPS)
        outs = outs if isinstance(outs, tuple) else (outs,)
        used = [(o, g) for o, g in zip(outs, grads) if g is not None]
        torch.autograd.backward([o for o, _ in used], [g for _, g in used])
    return [o.detach() for o in outs], [leaf.grad for leaf in leaves]


def check(fn, ref_fn, tensors, grads, names, atol):
    """Kernel vs fp32 reference vs same-dtype torch (weights cast to the activation dtype)."""
    act_dtype = tensors[0].dtype
    outs, dgrads = run(fn, tensors, grads, poison=True)
    ref_outs, ref_grads = run(ref_fn, [t.float() for t in tensors], [None if g is None else g.float() for g in grads])
    same_outs, same_grads = run(ref_fn, [t.to(act_dtype) for t in tensors], grads)
    for name, got, ref, same in zip(names[:len(outs)], outs, ref_outs, same_outs):
        assert got.dtype == act_dtype
        assert_three_way(name, got, ref, same, atol)
    for name, got, ref, same, t in zip(names[len(outs):], dgrads, ref_grads, same_grads, tensors):
        assert got.dtype == t.dtype, f"d{name}: dtype {got.dtype}, input {t.dtype}"
        assert_three_way(f"d{name}", got, ref, same, atol)


@pytest.mark.parametrize("shape,dtype,w_dtype,atol", CASES)
def test_layernorm_matches_reference(shape, dtype, w_dtype, atol):
    x, _, weight, bias, _, dy = inputs(shape, dtype, w_dtype)
    check(layernorm, layernorm_ref, [x, weight, bias], [dy], ["y", "x", "weight", "bias"], atol)


@pytest.mark.parametrize("shape,dtype,w_dtype,atol", CASES)
def test_add_layernorm_matches_reference(shape, dtype, w_dtype, atol):
    x, branch, weight, bias, dh, dy = inputs(shape, dtype, w_dtype, seed=1)
    check(add_layernorm, add_layernorm_ref, [x, branch, weight, bias], [dh, dy],
          ["h", "y", "x", "branch", "weight", "bias"], atol)


@pytest.mark.parametrize("used", ["y", "h"])
def test_add_layernorm_one_output_used(used):
    """Only y (no gradient for h), or only h (no gradient through the norm) reaches the loss."""
    x, branch, weight, bias, dh, dy = inputs((3, 17, 72), torch.float32, torch.float32, seed=2)
    grads = [None, dy] if used == "y" else [dh, None]
    outs, dgrads = run(add_layernorm, [x, branch, weight, bias], grads, poison=True)
    _, ref_grads = run(add_layernorm_ref, [x, branch, weight, bias], grads)
    for got, ref in zip(dgrads, ref_grads):
        if ref is None:  # weight and bias get no gradient when only h is used
            assert got is None or (got == 0).all()
        else:
            torch.testing.assert_close(got, ref, atol=FP32_ATOL, rtol=0)


def test_layernorm_non_contiguous_input():
    """x as a transposed view: flattened to rows correctly, gradient in x's shape."""
    g = torch.Generator(device=DEVICE).manual_seed(3)
    base = torch.randn(17, 3, 72, generator=g, device=DEVICE)
    weight, bias = torch.randn(72, generator=g, device=DEVICE), torch.randn(72, generator=g, device=DEVICE)
    dy = torch.randn(3, 17, 72, generator=g, device=DEVICE)
    outs, grads = run(lambda x, w, b, eps: layernorm(x.transpose(0, 1), w, b, eps), [base, weight, bias], [dy])
    ref_outs, ref_grads = run(lambda x, w, b, eps: layernorm_ref(x.transpose(0, 1), w, b, eps),
                              [base, weight, bias], [dy])
    torch.testing.assert_close(outs[0], ref_outs[0], atol=FP32_ATOL, rtol=0)
    for got, ref in zip(grads, ref_grads):
        torch.testing.assert_close(got, ref, atol=FP32_ATOL, rtol=0)
