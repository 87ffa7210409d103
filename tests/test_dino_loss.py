"""Fused DINO cross-entropy vs the unfused reference (loss, gradient w.r.t. the student, teacher sum).

CPU: Triton interpreter at small, non-power-of-two shapes (views 3-12, K not a multiple of the block).
GPU (marker gpu): DINO's size, K = 65536, 2 global + 10 local crops, with a memory check.
"""
import pytest
import torch

from fastmoco.kernels.dino_loss import dino_loss, dino_loss_ref
from kernel_checks import assert_fits_hopper, assert_three_way, compile_for_hopper, poisoned_empty

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TAU_S, TAU_T = 0.1, 0.04
DTYPES = [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)]   # (dtype, atol relative to the output's scale)


def _inputs(vs, vt, B, K, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    student = (torch.randn(vs, B, K, generator=g) * 2).to(DEV, dtype).requires_grad_()
    teacher = (torch.randn(vt, B, K, generator=g) * 2).to(DEV, dtype)
    center = (torch.randn(K, generator=g) * 0.3).to(DEV)
    return student, teacher, center


def _check_against_reference(vs, vt, B, K, dtype, rel_atol):
    student, teacher, center = _inputs(vs, vt, B, K, dtype)
    gout = torch.tensor(1.7, device=DEV)
    with poisoned_empty():
        loss, csum = dino_loss(student, teacher, center, TAU_S, TAU_T)
        (grad,) = torch.autograd.grad(loss, student, gout)
    s32 = student.detach().float().requires_grad_()
    ref, ref_csum = dino_loss_ref(s32, teacher.float(), center, TAU_S, TAU_T)
    (ref_grad,) = torch.autograd.grad(ref, s32, gout)
    sd = student.detach().clone().requires_grad_()   # the same dtype through PyTorch
    same, same_csum = dino_loss_ref(sd, teacher, center, TAU_S, TAU_T)
    (same_grad,) = torch.autograd.grad(same, sd, gout)
    assert grad.dtype == dtype
    assert_three_way("loss", loss.reshape(1), ref.reshape(1), same.reshape(1), rel_atol * ref.abs().item())
    assert_three_way("grad", grad, ref_grad, same_grad, rel_atol * ref_grad.abs().max().item())
    assert_three_way("teacher sum", csum, ref_csum, same_csum, 1e-5 * ref_csum.abs().max().item())


@pytest.mark.parametrize("dtype,rel_atol", DTYPES)
@pytest.mark.parametrize("vs,vt,B,K", [(3, 2, 1, 33), (5, 2, 3, 77), (12, 2, 2, 130), (4, 1, 2, 50)])
def test_fused_dino_loss_matches_reference(vs, vt, B, K, dtype, rel_atol):
    _check_against_reference(vs, vt, B, K, dtype, rel_atol)


def test_pairs_exclude_the_same_crop_and_count_locals_twice():
    """Against a per-term sum written out here: the student's global crop i never meets teacher crop i."""
    student, teacher, center = _inputs(4, 2, 2, 40, torch.float32, seed=3)
    loss, _ = dino_loss(student, teacher, center, TAU_S, TAU_T)
    p = torch.softmax((teacher - center) / TAU_T, -1)
    logq = torch.log_softmax(student.detach() / TAU_S, -1)
    terms = [-(p[i] * logq[j]).sum(-1).mean() for i in range(2) for j in range(4) if i != j]
    assert len(terms) == 6
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)


def test_bad_shapes_are_named():
    s, t, c = torch.zeros(3, 2, 8), torch.zeros(2, 3, 8), torch.zeros(8)
    with pytest.raises(ValueError, match=r"teacher \(2, 3, 8\)"):
        dino_loss(s, t, c, TAU_S, TAU_T)
    with pytest.raises(ValueError, match="1 student views for 2 teacher views"):
        dino_loss(torch.zeros(1, 2, 8), torch.zeros(2, 2, 8), c, TAU_S, TAU_T)


def test_kernels_compile_for_hopper_without_spills():
    common = {"V_S": 12, "V_T": 2, "V_S_PAD": 16, "BLOCK_K": 128}
    fwd = {"module": "fastmoco.kernels.dino_loss", "kernel": "_dino_fwd_kernel",
           "args": {"s_ptr": "*bf16", "t_ptr": "*bf16", "c_ptr": "*fp32", "ms_ptr": "*fp32", "zs_ptr": "*fp32",
                    "mt_ptr": "*fp32", "zt_ptr": "*fp32", "a_ptr": "*fp32", "csum_ptr": "*fp32", "B": "i32",
                    "K": "i32", "inv_tau_s": "fp32", "inv_tau_t": "fp32"},
           "constexprs": common, "divisible_by_16": ["s_ptr", "t_ptr", "c_ptr", "K"], "num_warps": 4,
           "num_stages": 3}
    bwd = {"module": "fastmoco.kernels.dino_loss", "kernel": "_dino_bwd_kernel",
           "args": {"s_ptr": "*bf16", "t_ptr": "*bf16", "c_ptr": "*fp32", "lse_s_ptr": "*fp32", "lse_t_ptr": "*fp32",
                    "gout_ptr": "*fp32", "ds_ptr": "*bf16", "B": "i32", "K": "i32", "inv_tau_s": "fp32",
                    "inv_tau_t": "fp32", "grad_scale": "fp32"},
           "constexprs": {**common, "IS_INTERPRETER": False}, "divisible_by_16": ["s_ptr", "t_ptr", "ds_ptr", "K"],
           "num_warps": 4, "num_stages": 3}
    for label, result in zip(("fwd", "bwd"), compile_for_hopper([fwd, bwd])):
        assert_fits_hopper(f"dino {label}", result)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,rel_atol", DTYPES)
def test_fused_dino_loss_at_dino_size_on_the_gpu(dtype, rel_atol):
    _check_against_reference(12, 2, 64, 65536, dtype, rel_atol)


@pytest.mark.gpu
def test_fused_dino_loss_never_builds_the_pair_terms():
    student, teacher, center = _inputs(12, 2, 64, 65536, torch.bfloat16)
    student_bytes = student.numel() * student.element_size()

    def extra_peak(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss, _ = fn(student, teacher, center, TAU_S, TAU_T)
        torch.autograd.grad(loss, student)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    fused, unfused = extra_peak(dino_loss), extra_peak(dino_loss_ref)
    assert fused <= 1.2 * student_bytes + (16 << 20), (fused, student_bytes)   # the gradient, small partials
    assert fused * 4 < unfused, (fused, unfused)
