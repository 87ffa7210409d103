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
