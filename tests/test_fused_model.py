"""The ViT and the MoCo loss with every fused op against the reference path.

CPU: a tiny ViT in fp32, the kernels under the Triton interpreter.
GPU (marker gpu): ViT-B/16 in bf16 against the fp32 reference and the same-dtype reference.
"""
import pytest
import torch

from fastmoco import ops
from fastmoco.models.vit import VisionTransformer
from fastmoco.moco import MoCo

ALL_ON = dict(attention="on", layernorm="on", contrastive="on", ema="on")
ALL_OFF = dict(attention="off", layernorm="off", contrastive="off", ema="off")


def features_and_grads(model, x, modes):
    model.zero_grad(set_to_none=True)
    with ops.fused(**modes):
        f = model(x)
        (f.float() * torch.linspace(-1, 1, f.shape[1], device=f.device)).sum().backward()
    return f.detach().float(), {n: p.grad.detach().float() for n, p in model.named_parameters() if p.grad is not None}


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


def test_tiny_vit_fused_equals_reference_fp32():
    torch.manual_seed(0)
    model = VisionTransformer("vit_test", img_size=32, frozen_patch_embed=False)
    x = torch.randn(3, 3, 32, 32)
    f_ref, g_ref = features_and_grads(model, x, ALL_OFF)
    f, g = features_and_grads(model, x, ALL_ON)
    assert rel_err(f, f_ref) < 1e-5
    assert g.keys() == g_ref.keys() and len(g) > 20
    for n in g:
        assert rel_err(g[n], g_ref[n]) < 1e-4, n


def test_tiny_moco_step_fused_equals_reference_fp32():
    x1, x2 = torch.randn(6, 3, 32, 32), torch.randn(6, 3, 32, 32)
    losses, moms = [], []
    for modes in (ALL_OFF, ALL_ON):
        torch.manual_seed(0)
        model = MoCo("vit_test", img_size=32, dim=32, mlp_dim=48)
        with torch.no_grad():
            for p in model.base_encoder.parameters():
                p.add_(0.01 * torch.randn_like(p))
        with ops.fused(**modes):
            loss = model(x1, x2, torch.tensor(0.9))
            loss.backward()
        losses.append(loss.item())
        moms.append(torch.cat([p.flatten() for p in model.momentum_encoder.parameters()]))
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert rel_err(moms[1], moms[0]) < 1e-6


@pytest.mark.gpu
def test_vit_base_fused_matches_reference_bf16():
    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = VisionTransformer("vit_base", img_size=224, frozen_patch_embed=False).to(dev)
    x = torch.randn(8, 3, 224, 224, device=dev)
    f32, g32 = features_and_grads(model, x, ALL_OFF)                     # fp32 reference
    model_bf = model.to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    fr, gr = features_and_grads(model_bf, xb, ALL_OFF)                   # same-dtype reference
    fk, gk = features_and_grads(model_bf, xb, ALL_ON)                    # kernels
    assert torch.isfinite(fk).all()
    assert rel_err(fk, f32) <= 2 * rel_err(fr, f32) + 1e-2
    for n in g32:
        assert torch.isfinite(gk[n]).all(), n
        assert rel_err(gk[n], g32[n]) <= 2 * rel_err(gr[n], g32[n]) + 2e-2, n


def test_layernorm_auto_dispatch_times_once_and_keeps_the_faster(monkeypatch):
    """"auto" LayerNorm: per shape, the faster of kernel and torch fwd+bwd, timed once (timing
    replaced by given figures here; the timed runs are real, under the interpreter on the CPU)."""
    from fastmoco.kernels import tuner

    ran = []
    figures = {}

    def fake_bench(fn, warmup, rep):
        fn()
        return figures[ran[-1]]

    real_launch = ops._layernorm_timing_launch

    def recording_launch(*args):
        launch = real_launch(*args)

        def run(choice):
            ran.append(choice)
            launch(choice)
        return run

    monkeypatch.setattr(ops, "tuning_enabled", lambda t: True)
    monkeypatch.setattr(tuner, "tuning_enabled", lambda t: True)
    monkeypatch.setattr(tuner.triton.testing, "do_bench", fake_bench)
    monkeypatch.setattr(ops, "_layernorm_timing_launch", recording_launch)
    monkeypatch.setattr(ops, "_LAYERNORM_DISPATCH", tuner.Tuner("test dispatch"))
    x, w = torch.randn(3, 5, 72), torch.randn(72)
    figures.update(kernel=1.0, torch=2.0)
    assert ops._layernorm_kernel_wins(x, w, 1e-6, has_branch=True)
    assert ran == ["kernel", "torch"]
    assert ops._layernorm_kernel_wins(x, w, 1e-6, has_branch=True) and len(ran) == 2  # kept, not re-timed
    figures.update(kernel=3.0)
    assert not ops._layernorm_kernel_wins(x, w, 1e-6, has_branch=False)  # another key: torch faster
    assert not ops._layernorm_kernel_wins(torch.randn(12, 72), w, 1e-6, has_branch=False)  # same rows bucket (16)
    assert len(ran) == 4
    monkeypatch.setattr(ops, "tuning_enabled", lambda t: False)  # FASTMOCO_TUNE=0: the measured widths
    assert not ops._layernorm_kernel_wins(x, w, 1e-6, has_branch=True)
    assert ops._layernorm_kernel_wins(torch.randn(2, 768), torch.randn(768), 1e-6, has_branch=True)


@pytest.mark.gpu
def test_layernorm_auto_dispatch_on_gpu():
    """On the GPU the decision is timed and every ViT width gets one; the chosen path is right."""
    from fastmoco.kernels.layernorm import add_layernorm_ref

    for C in (384, 768, 1280):
        x = torch.randn(8, 197, C, device="cuda", dtype=torch.bfloat16)
        branch = torch.randn_like(x)
        w, b = torch.randn(C, device="cuda"), torch.randn(C, device="cuda")
        with ops.fused(layernorm="auto"):
            h, y = ops.add_layernorm(x, branch, w, b, 1e-6)
        key = next(k for k in ops._LAYERNORM_DISPATCH.chosen if k[1] == C and k[-1] is True)
        assert ops._LAYERNORM_DISPATCH.chosen[key][0] in ("kernel", "torch")
        h_ref, y_ref = add_layernorm_ref(x.float(), branch.float(), w, b, 1e-6)
        torch.testing.assert_close(y.float(), y_ref, atol=5e-2, rtol=0)
        torch.testing.assert_close(h.float(), h_ref, atol=5e-2, rtol=0)
