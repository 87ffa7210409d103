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
import triton
from kernel_checks import assert_fits_hopper, assert_three_way, compile_for_hopper, poisoned_empty

from fastmoco.kernels import layernorm_configs as ln_configs
from fastmoco.kernels import tuner as tuner_module
from fastmoco.kernels.layernorm import (
    add_layernorm,
    add_layernorm_ref,
    layernorm,
    layernorm_bwd,
    layernorm_fwd,
    layernorm_ref,
)
from fastmoco.kernels.layernorm_configs import LayerNormConfig, candidate_configs

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


@pytest.fixture(autouse=True)
def default_configs(monkeypatch):
    """Parity tests run the default launch config (tuning every GPU shape would take minutes);
    `test_every_candidate_config` covers what the tuner may pick, `test_tuned_*` the tuner."""
    monkeypatch.setenv("FASTMOCO_TUNE", "0")


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


# Every config the tuner may choose must be right: small strips on the CPU (several programs,
# partial last strips), the bench widths in bf16 on the GPU.
CONFIG_CASES = (
    [pytest.param((3, 50, 200), torch.float32, FP32_ATOL, id="200-fp32"),
     pytest.param((2, 37, 72), torch.float32, FP32_ATOL, id="72-fp32")]
    + [pytest.param(s, torch.bfloat16, BF16_ATOL, id=f"{s[-1]}-bf16-gpu", marks=pytest.mark.gpu)
       for s in [(16, 197, 768), (8, 257, 1280), (16, 197, 384)]]
)


def _direct(config_fwd, config_bwd, x, branch, weight, bias, dh, dy):
    """layernorm_fwd/bwd with explicit configs, outputs poisoned: (h, y, dsum, dweight, dbias)."""
    with poisoned_empty():
        h, y, mean, rstd = layernorm_fwd(x, weight, bias, EPS, branch=branch, config=config_fwd)
        dsum, dweight, dbias = layernorm_bwd(dy, h, weight, mean, rstd, dh=dh, config=config_bwd)
    return h, y, dsum, dweight, dbias


@pytest.mark.parametrize("shape,dtype,atol", CONFIG_CASES)
def test_every_candidate_config(shape, dtype, atol):
    x, branch, weight, bias, dh, dy = inputs(shape, dtype, torch.float32, seed=4)
    C = shape[-1]
    fwd_configs, bwd_configs = candidate_configs(C, backward=False), candidate_configs(C, backward=True)
    assert len(set(fwd_configs)) == len(fwd_configs) > 1 and len(set(bwd_configs)) == len(bwd_configs) > 1
    assert any(c.num_stages > 1 for c in bwd_configs) and any(c.programs_per_sm == 0 for c in fwd_configs)
    (ref_h, ref_y), ref_grads = run(add_layernorm_ref, [t.float() for t in (x, branch, weight, bias)],
                                    [dh.float(), dy.float()])
    (same_h, same_y), same_grads = run(add_layernorm_ref, [x, branch, weight.to(dtype), bias.to(dtype)], [dh, dy])
    ref = {"h": ref_h, "y": ref_y, "dx": ref_grads[0], "dweight": ref_grads[2], "dbias": ref_grads[3]}
    same = {"h": same_h, "y": same_y, "dx": same_grads[0], "dweight": same_grads[2], "dbias": same_grads[3]}
    # Pair each forward config with a backward one (cycling), so both lists are covered in full.
    for i in range(max(len(fwd_configs), len(bwd_configs))):
        cfg_f, cfg_b = fwd_configs[i % len(fwd_configs)], bwd_configs[i % len(bwd_configs)]
        got = dict(zip(["h", "y", "dx", "dweight", "dbias"], _direct(cfg_f, cfg_b, x, branch, weight, bias, dh, dy)))
        for name, value in got.items():
            assert_three_way(f"{name} ({cfg_f} / {cfg_b})", value, ref[name], same[name], atol)


def test_backward_refuses_a_tile_per_program_grid():
    x, _, weight, bias, _, dy = inputs((2, 9, 72), torch.float32, torch.float32)
    _, _, mean, rstd = layernorm_fwd(x, weight, bias, EPS)
    with pytest.raises(AssertionError, match="persistent grid"):
        layernorm_bwd(dy, x, weight, mean, rstd, config=LayerNormConfig(block_rows=1, num_warps=4))


def test_tuner_keeps_the_fastest_runnable_config(monkeypatch):
    """The tuner's choice, with the GPU timing replaced: fastest wins, a config that cannot
    run is skipped, and the choice is kept per key (each candidate timed once)."""
    times = {"a": 3.0, "b": 1.0, "c": 2.0}
    timed = []

    def fake_bench(fn, warmup, rep):
        fn()
        return times[timed[-1]]

    def launch(config):
        if config == "b":
            raise tuner_module.triton.runtime.errors.OutOfResources(1, 0, "shared memory")
        timed.append(config)

    monkeypatch.setattr(tuner_module, "tuning_enabled", lambda t: True)
    monkeypatch.setattr(tuner_module.triton.testing, "do_bench", fake_bench)
    tuner = tuner_module.Tuner("test")
    probe = torch.zeros(1)
    assert tuner.pick("k", ["a", "b", "c"], "a", launch, probe) == "c"
    assert tuner.pick("k", ["a", "b", "c"], "a", launch, probe) == "c"
    assert timed == ["a", "c"] and tuner.chosen["k"] == ("c", 2.0)
    with pytest.raises(RuntimeError, match="no candidate config runs"):
        tuner.pick("k2", ["b"], "a", launch, probe)


def test_tuner_uses_the_default_without_a_gpu_or_when_off(monkeypatch):
    tuner = tuner_module.Tuner("test")
    never = lambda config: pytest.fail("nothing may be timed")  # noqa: E731
    monkeypatch.delenv("FASTMOCO_TUNE", raising=False)
    assert tuner.pick("k", ["a"], "default", never, torch.zeros(1)) == "default"  # CPU tensor
    assert tuner.chosen == {}
    tuner.chosen["k"] = ("a", 1.0)  # tuned before: FASTMOCO_TUNE=0 still gives the default
    monkeypatch.setattr(tuner_module, "tuning_enabled", lambda t: False)
    assert tuner.pick("k", ["a"], "default", never, torch.zeros(1)) == "default"


@pytest.mark.gpu
def test_tuned_layernorm_matches_reference(monkeypatch):
    """With tuning on (what training runs): the ViT-B bench shape, both variants."""
    monkeypatch.setenv("FASTMOCO_TUNE", "1")
    ln_configs.TUNER.chosen.clear()
    x, branch, weight, bias, dh, dy = inputs((512, 197, 768), torch.bfloat16, torch.float32, seed=5)
    check(add_layernorm, add_layernorm_ref, [x, branch, weight, bias], [dh, dy],
          ["h", "y", "x", "branch", "weight", "bias"], BF16_ATOL)
    check(layernorm, layernorm_ref, [x, weight, bias], [dy], ["y", "x", "weight", "bias"], BF16_ATOL)
    chosen = ln_configs.tuned_configs()
    assert {k[0] for k in chosen} == {"fwd", "bwd"} and len(chosen) == 4, chosen
    for key, (config, ms) in chosen.items():
        assert config in candidate_configs(768, backward=key[0] == "bwd") and ms > 0


def _hopper_spec(config: LayerNormConfig, C: int, backward: bool) -> dict:
    """The add variant (the superset path) as a bf16 launch with fp32 weights compiles it."""
    if backward:
        ptrs = {"x_ptr": "*bf16", "w_ptr": "*fp32", "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "dy_ptr": "*bf16",
                "dh_ptr": "*bf16", "dx_ptr": "*bf16", "dw_partial_ptr": "*fp32", "db_partial_ptr": "*fp32"}
        strides = ["stride_x", "stride_dy", "stride_dh", "stride_dx"]
        scalars = {"M": "i32", "C": "i32", "rows_per_program": "i32"}
        flags = {"HAS_DH": True}
    else:
        ptrs = {"x_ptr": "*bf16", "branch_ptr": "*bf16", "h_ptr": "*bf16", "y_ptr": "*bf16", "w_ptr": "*fp32",
                "b_ptr": "*fp32", "mean_ptr": "*fp32", "rstd_ptr": "*fp32"}
        strides = ["stride_x", "stride_branch", "stride_h", "stride_y"]
        scalars = {"M": "i32", "C": "i32", "eps": "fp32", "rows_per_program": "i32"}
        flags = {"HAS_BRANCH": True}
    return {
        "module": "fastmoco.kernels.layernorm",
        "kernel": "_layernorm_bwd_kernel" if backward else "_layernorm_fwd_kernel",
        "args": {**ptrs, **{s: "i32" for s in strides}, **scalars},
        "constexprs": {**flags, "IS_INTERPRETER": False, "BLOCK_ROWS": config.block_rows,
                       "BLOCK_C": triton.next_power_of_2(C), "NUM_STAGES": config.num_stages},
        "divisible_by_16": [*ptrs, *strides, "C"],
        "num_warps": config.num_warps, "num_stages": config.num_stages,
    }


def test_candidate_configs_compile_for_hopper():
    """Every config the tuner may pick at the ViT widths compiles for sm_90 (the pipelined row
    loops included, which the interpreter runs as plain loops) without spilling registers."""
    cases = [(c, C, bwd) for C in (384, 768, 1280) for bwd in (False, True) for c in candidate_configs(C, bwd)]
    results = compile_for_hopper([_hopper_spec(c, C, bwd) for c, C, bwd in cases])
    for (config, C, bwd), result in zip(cases, results):
        assert_fits_hopper(f"{'bwd' if bwd else 'fwd'} C={C} {config}", result)
