"""Fused attention vs `attention_ref`: forward and the gradient w.r.t. qkv.

Three-way (flash-attention's practice): kernel vs the fp32 reference vs the
same-dtype PyTorch result, err_kernel <= 2 * err_torch + atol. Small
non-power-of-two shapes under the Triton interpreter on the CPU; full ViT
shapes in bf16 on the GPU (`pytest -m gpu tests/test_attention.py`).
"""
import contextlib
import math

import pytest
import torch
from kernel_checks import assert_fits_hopper, assert_three_way, compile_for_hopper, poisoned_empty

import triton

from fastmoco.kernels.attention import (
    attention,
    attention_bwd,
    attention_fwd,
    attention_ref,
    bwd_configs,
    fwd_configs,
    head_dim_blocks,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 on the GPU runs tl.dot in TF32 (10-bit mantissa), and so does the same-dtype
# PyTorch run there (see `same_dtype_torch`); a looser floor too.
FP32_ATOL = 1e-3 if DEVICE == "cuda" else 1e-4
EXACT_ATOL = 2e-2 if DEVICE == "cuda" else 1e-4  # two-way checks of fp32 kernel output vs exact fp32
BF16_ATOL = 1e-2

# (B, N, H, D): D = 24 is the CPU tiny ViT (embed 72, 3 heads); 80 is ViT-H/14 (a 128-wide masked block).
CPU_SHAPES = [(1, 17, 3, 24), (3, 50, 3, 24), (2, 50, 2, 64), (1, 37, 2, 80)]
GPU_SHAPES = [
    (1, 197, 12, 64),  # ViT-B/16, batch 1
    (7, 197, 6, 64),  # ViT-S/16, odd batch
    (5, 50, 12, 64),  # ViT-B/32
    (3, 257, 16, 80),  # ViT-H/14
    (2, 257, 16, 64),  # ViT-L/14
    (256, 197, 12, 64),  # the ViT-B bench shape
    (64, 257, 16, 80),  # the ViT-H bench shape
    (1024, 50, 6, 64),  # large batch: B*H programs on grid axis 0
    (640, 37, 6, 64),  # DINO ViT-S/16 local crops (96 px), 10 per image
    (320, 145, 6, 64),  # DINO ViT-S/8 local crops
    (16, 785, 6, 64),  # DINO ViT-S/8 global crops (224 px)
    (4, 1025, 16, 64),  # ViT-BN-L/7 (224 px: 32 x 32 patches + the class token)
]
CASES = (
    [pytest.param(shape, torch.float32, FP32_ATOL, id=f"{shape}-fp32") for shape in CPU_SHAPES]
    + [pytest.param(shape, torch.bfloat16, BF16_ATOL, id=f"{shape}-bf16") for shape in CPU_SHAPES]
    + [pytest.param(shape, torch.bfloat16, BF16_ATOL, id=f"{shape}-bf16-gpu", marks=pytest.mark.gpu)
       for shape in GPU_SHAPES]
)


@contextlib.contextmanager
def same_dtype_torch(dtype):
    """The same-dtype PyTorch run: fp32 matmuls on the GPU in TF32, like the kernel's tl.dot."""
    if DEVICE != "cuda" or dtype != torch.float32:
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def run(fn, qkv, dout, num_heads, poison=False):
    """Forward and backward of fn on a fresh leaf; returns (out, dqkv)."""
    leaf = qkv.detach().clone().requires_grad_()
    with poisoned_empty() if poison else contextlib.nullcontext():
        out = fn(leaf, num_heads)
        out.backward(dout)
    return out.detach(), leaf.grad


def inputs(shape, dtype, scale=1.0, seed=0):
    B, N, H, D = shape
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    qkv = (torch.randn(B, N, 3 * H * D, generator=g, device=DEVICE) * scale).to(dtype)
    dout = torch.randn(B, N, H * D, generator=g, device=DEVICE).to(dtype)
    return qkv, dout


def check(qkv, dout, H, atol, poison=True):
    out, dqkv = run(attention, qkv, dout, H, poison=poison)
    out_ref, dqkv_ref = run(attention_ref, qkv.float(), dout.float(), H)
    with same_dtype_torch(qkv.dtype):
        out_torch, dqkv_torch = run(attention_ref, qkv, dout, H)
    assert out.dtype == qkv.dtype and dqkv.dtype == qkv.dtype
    assert_three_way("out", out, out_ref, out_torch, atol)
    assert_three_way("dqkv", dqkv, dqkv_ref, dqkv_torch, atol)
    # q, k and v parts separately: a wrong part cannot hide behind a larger one.
    for i, part in enumerate("qkv"):
        chunk = lambda t: t.unflatten(-1, (3, -1))[:, :, i]  # noqa: E731
        assert_three_way(f"d{part}", chunk(dqkv), chunk(dqkv_ref), chunk(dqkv_torch), atol)


@pytest.mark.parametrize("shape,dtype,atol", CASES)
def test_attention_matches_reference(shape, dtype, atol):
    qkv, dout = inputs(shape, dtype)
    check(qkv, dout, shape[2], atol)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, FP32_ATOL), (torch.bfloat16, BF16_ATOL)])
def test_attention_large_scores(dtype, atol):
    """Peaked softmax (scores of tens): the online max and the saved log-sum-exp must hold."""
    shape = (2, 50, 2, 24)
    qkv, dout = inputs(shape, dtype, scale=4.0, seed=1)
    check(qkv, dout, shape[2], atol * 4)


def test_attention_strided_qkv_view():
    """qkv as a non-contiguous view (row stride > 3*H*D): read through its strides, no copy."""
    B, N, H, D = 3, 17, 3, 24
    g = torch.Generator(device=DEVICE).manual_seed(2)
    base = torch.randn(B, N, 3 * H * D + 40, generator=g, device=DEVICE, requires_grad=True)
    dout = torch.randn(B, N, H * D, generator=g, device=DEVICE)
    qkv = base[:, :, 8:8 + 3 * H * D]
    assert not qkv.is_contiguous()
    out = attention(qkv, H)
    out.backward(dout)
    out_ref, dqkv_ref = run(attention_ref, qkv.contiguous(), dout, H)
    torch.testing.assert_close(out, out_ref, atol=EXACT_ATOL, rtol=0)
    torch.testing.assert_close(base.grad[:, :, 8:8 + 3 * H * D], dqkv_ref, atol=EXACT_ATOL, rtol=0)
    assert (base.grad[:, :, :8] == 0).all() and (base.grad[:, :, 8 + 3 * H * D:] == 0).all()


def test_attention_saved_log_sum_exp():
    """The forward's saved statistic is log2 of sum(exp(scores)), per (batch*head, query), in fp32."""
    B, N, H, D = 2, 50, 3, 24
    qkv, _ = inputs((B, N, H, D), torch.float32, seed=3)
    with poisoned_empty():
        out, lse = attention_fwd(qkv, H)
    q, k, _ = qkv.view(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, D)
    scores = q @ k.transpose(-2, -1) / math.sqrt(D)
    expected = torch.logsumexp(scores, dim=-1).reshape(B * H, N) / math.log(2)
    assert lse.dtype == torch.float32 and lse.shape == (B * H, N)
    torch.testing.assert_close(lse, expected, atol=EXACT_ATOL, rtol=0)


def test_attention_launchers_match_autograd():
    """attention_fwd / attention_bwd (what the benches may call) give what the autograd op gives."""
    shape = (1, 17, 3, 24)
    qkv, dout = inputs(shape, torch.float32, seed=4)
    out, dqkv = run(attention, qkv, dout, shape[2])
    out2, lse = attention_fwd(qkv, shape[2])
    dqkv2 = attention_bwd(dout, qkv, out2, lse, shape[2])
    assert torch.equal(out, out2) and torch.equal(dqkv, dqkv2)
    assert dqkv2.shape == qkv.shape and dqkv2.is_contiguous()


def test_attention_expanded_output_gradient():
    """out.sum().backward() hands the kernel a stride-0 gradient: read through its strides."""
    shape = (2, 17, 3, 24)
    qkv, _ = inputs(shape, torch.float32, seed=5)
    leaf = qkv.clone().requires_grad_()
    attention(leaf, shape[2]).sum().backward()
    ones = torch.ones(shape[0], shape[1], shape[2] * shape[3], device=DEVICE)
    _, dqkv_ref = run(attention_ref, qkv, ones, shape[2])
    torch.testing.assert_close(leaf.grad, dqkv_ref, atol=EXACT_ATOL, rtol=0)


def test_head_dim_blocks():
    assert head_dim_blocks(80, split=False) == {"BLOCK_D": 128, "TAIL_D": 0}
    assert head_dim_blocks(80, split=True) == {"BLOCK_D": 64, "TAIL_D": 16}
    assert head_dim_blocks(72, split=True) == {"BLOCK_D": 64, "TAIL_D": 16}  # 8 padded to tl.dot's 16
    assert head_dim_blocks(96, split=True) == {"BLOCK_D": 64, "TAIL_D": 32}
    assert head_dim_blocks(8, split=False) == {"BLOCK_D": 16, "TAIL_D": 0}
    with pytest.raises(AssertionError, match="cannot be split"):
        head_dim_blocks(64, split=True)
    # What the GPU autotuner chooses from: padded and split for 80, padded alone for 64.
    if DEVICE == "cuda":
        assert {c.kwargs["TAIL_D"] for c in fwd_configs(80)} == {0, 16} == {c.kwargs["TAIL_D"] for c in bwd_configs(80)}
        assert {c.kwargs["TAIL_D"] for c in fwd_configs(64)} == {0}


def _explicit_configs(D):
    """(fwd, bwd) config pairs that cover every candidate: on the GPU the autotuners' lists
    (cycled against each other); on the CPU the interpreter's tile, padded and split."""
    fwd, bwd = fwd_configs(D), bwd_configs(D)
    if DEVICE != "cuda":
        splits = (False, True) if D & (D - 1) else (False,)
        with_blocks = lambda c, split: triton.Config(  # noqa: E731
            {**c.kwargs, **head_dim_blocks(D, split)}, num_warps=c.num_warps, num_stages=c.num_stages)
        fwd = [with_blocks(fwd[0], split) for split in splits]
        bwd = [with_blocks(bwd[0], split) for split in splits]
    return [(fwd[i % len(fwd)], bwd[i % len(bwd)]) for i in range(max(len(fwd), len(bwd)))]


EXPLICIT_CASES = (
    [pytest.param((2, 50, 2, 80), torch.float32, FP32_ATOL, id="d80-fp32"),
     pytest.param((1, 37, 2, 80), torch.bfloat16, BF16_ATOL, id="d80-bf16"),
     pytest.param((2, 17, 3, 24), torch.float32, FP32_ATOL, id="d24-fp32")]
    + [pytest.param(s, torch.bfloat16, BF16_ATOL, id=f"d{s[3]}-bf16-gpu", marks=pytest.mark.gpu)
       for s in [(8, 257, 16, 80), (8, 197, 12, 64)]]
)


@pytest.mark.parametrize("shape,dtype,atol", EXPLICIT_CASES)
def test_every_candidate_config(shape, dtype, atol):
    """Each config the autotuners may pick (head dim padded or split) is right, forward and backward."""
    H = shape[2]
    qkv, dout = inputs(shape, dtype, seed=6)
    out_ref, dqkv_ref = run(attention_ref, qkv.float(), dout.float(), H)
    with same_dtype_torch(dtype):
        out_torch, dqkv_torch = run(attention_ref, qkv, dout, H)
    pairs = _explicit_configs(shape[3])
    assert len(pairs) > 1
    for cfg_f, cfg_b in pairs:
        with poisoned_empty():
            out, lse = attention_fwd(qkv, H, config=cfg_f)
            dqkv = attention_bwd(dout, qkv, out, lse, H, config=cfg_b)
        assert_three_way(f"out ({cfg_f})", out, out_ref, out_torch, atol)
        for i, part in enumerate("qkv"):
            chunk = lambda t: t.unflatten(-1, (3, -1))[:, :, i]  # noqa: E731
            assert_three_way(f"d{part} ({cfg_b})", chunk(dqkv), chunk(dqkv_ref), chunk(dqkv_torch), atol)


def _hopper_spec(config: triton.Config, D: int, backward: bool) -> dict:
    """The kernel as a launch at the ViT shape compiles it: strides 1 and multiples of 16 specialized."""
    H = 16 if D == 80 else 12
    if backward:
        ptrs = {"qkv_ptr": "*bf16", "do_ptr": "*bf16", "dqkv_ptr": "*bf16", "lse_ptr": "*fp32", "delta_ptr": "*fp32"}
        strides = ["stride_qkv_b", "stride_qkv_n", "stride_do_b", "stride_do_n", "stride_dqkv_b", "stride_dqkv_n"]
        unit = {"stride_qkv_c": 1, "stride_do_c": 1, "stride_dqkv_c": 1}
        scalars = {"N": "i32", "H": "i32", "qk_scale": "fp32", "sm_scale": "fp32"}
    else:
        ptrs = {"qkv_ptr": "*bf16", "o_ptr": "*bf16", "lse_ptr": "*fp32"}
        strides = ["stride_qkv_b", "stride_qkv_n", "stride_o_b", "stride_o_n"]
        unit = {"stride_qkv_c": 1, "stride_o_c": 1}
        scalars = {"N": "i32", "H": "i32", "qk_scale": "fp32"}
    return {
        "module": "fastmoco.kernels.attention",
        "kernel": "_attention_bwd_kernel" if backward else "_attention_fwd_kernel",
        "args": {**ptrs, **{s: "i32" for s in strides}, **scalars},
        "constexprs": {**unit, **config.kwargs, "HEAD_DIM": D, "IS_INTERPRETER": False},
        "divisible_by_16": [*ptrs, *strides, *(["H"] if H % 16 == 0 else [])],
        "num_warps": config.num_warps, "num_stages": config.num_stages,
    }


def test_candidate_configs_compile_for_hopper(monkeypatch):
    """Every config the GPU autotuners may pick, at head dims 64 and 80 (padded and split),
    compiles for sm_90 without spilling registers and within the shared memory a program gets."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the GPU's candidate lists, not the interpreter's one config
    cases = [(c, D, bwd) for D in (64, 80) for bwd in (False, True) for c in (bwd_configs(D) if bwd else fwd_configs(D))]
    assert any(c.kwargs["TAIL_D"] for c, D, _ in cases if D == 80)
    results = compile_for_hopper([_hopper_spec(c, D, bwd) for c, D, bwd in cases])
    for (config, D, bwd), result in zip(cases, results):
        assert_fits_hopper(f"{'bwd' if bwd else 'fwd'} D={D} {config}", result)
