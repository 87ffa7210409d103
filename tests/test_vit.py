import math

import pytest
import timm
import torch

from fastmoco.models.vit import VIT_SIZES, VisionTransformer, sincos_pos_embed_2d



@pytest.mark.parametrize("arch,img_size", [("vit_small", 64), ("vit_base", 48),
                                          pytest.param("vit_huge", 56, marks=pytest.mark.long)])
def test_state_dict_loads_into_timm_and_features_match(arch, img_size):
    torch.manual_seed(0)
    ours = VisionTransformer(arch, img_size=img_size).eval()
    size = VIT_SIZES[arch]
    ref = timm.create_model(size.timm_name, pretrained=False, num_classes=0, img_size=img_size,
                            num_heads=size.num_heads).eval()
    ref.load_state_dict(ours.backbone_state_dict(), strict=True)  # no renaming
    x = torch.randn(3, 3, img_size, img_size)
    with torch.no_grad():
        a, b = ours(x), ref(x)
    assert a.shape == (3, size.embed_dim)
    rel = ((a - b).abs().max() / b.abs().max()).item()
    assert rel < 1e-5, rel


def test_moco_init_and_frozen_patch_projection():
    torch.manual_seed(0)
    m = VisionTransformer("vit_small", img_size=32)
    assert not m.patch_embed.proj.weight.requires_grad and not m.patch_embed.proj.bias.requires_grad
    assert "pos_embed" not in dict(m.named_parameters())  # fixed: a buffer
    qkv = m.blocks[0].attn.qkv.weight
    bound = math.sqrt(6 / (384 + 384))  # q, k, v treated as three (384 x 384) matrices
    assert qkv.abs().max() <= bound and qkv.abs().max() > 0.95 * bound
    fc1 = m.blocks[0].mlp.fc1.weight
    xavier = math.sqrt(6 / (384 + 1536))
    assert fc1.abs().max() <= xavier and fc1.abs().max() > 0.95 * xavier
    assert m.blocks[0].attn.qkv.bias.abs().max() == 0
    assert m.cls_token.std() < 1e-5
    assert m.norm.eps == 1e-6 and m.blocks[3].norm1.eps == 1e-6
    trainable = VisionTransformer("vit_small", img_size=32, frozen_patch_embed=False)
    assert trainable.patch_embed.proj.weight.requires_grad


def test_sincos_position_embedding_values():
    pe = sincos_pos_embed_2d(3, 4, 16)
    assert pe.shape == (1, 13, 16)
    assert (pe[0, 0] == 0).all()
    # patch 0 sits at grid (0, 0): sin terms 0, cos terms 1
    assert torch.allclose(pe[0, 1], torch.tensor([0.0] * 4 + [1.0] * 4 + [0.0] * 4 + [1.0] * 4))
    # patch p: first-axis index p // 3, second-axis index p % 3; omega_0 = 1
    p = 7
    i, j = p // 3, p % 3
    assert pe[0, 1 + p, 0] == pytest.approx(math.sin(i)) and pe[0, 1 + p, 8] == pytest.approx(math.sin(j))
    omega1 = 10000 ** (-1 / 4)
    assert pe[0, 1 + p, 1] == pytest.approx(math.sin(i * omega1), rel=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d(2, 2, 18)


def test_moco_position_embedding_at_other_grids_is_the_sincos_table_of_that_grid():
    """MoCo v3's fixed table is recomputed for the grid, not resampled (the DINO rule does not touch it)."""
    vit = VisionTransformer("vit_test", img_size=32)
    assert torch.equal(vit.pos_embed_for(4, 4), vit.pos_embed)
    assert torch.equal(vit.pos_embed_for(2, 3), sincos_pos_embed_2d(2, 3, vit.embed_dim))


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    a = VisionTransformer("vit_test", img_size=32)
    b = VisionTransformer("vit_test", img_size=32, grad_checkpointing=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32)
    a(x).square().sum().backward()
    b(x).square().sum().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        if pa.requires_grad:
            torch.testing.assert_close(pa.grad, pb.grad, msg=n)


def test_bad_sizes_are_named():
    with pytest.raises(ValueError, match="vit_gigantic"):
        VisionTransformer("vit_gigantic")
    with pytest.raises(ValueError, match="img_size 30"):
        VisionTransformer("vit_test", img_size=30)


@pytest.mark.parametrize("size", [(32, 32), (36, 44)])  # (36, 44): a remainder the conv drops too
def test_patch_embedding_is_the_stride_p_convolution(size):
    """The patch embedding runs as one matmul over patches; it must be the Conv2d it stands for, in
    value and in every gradient (input, weight, bias), for any input layout."""
    from fastmoco.models.vit import PatchEmbed

    torch.manual_seed(0)
    embed = PatchEmbed(32, 8, 24)
    x = torch.randn(3, 3, *size).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = embed(x)
    want = embed.proj(x).flatten(2).transpose(1, 2)
    assert y.shape == want.shape == (3, (size[0] // 8) * (size[1] // 8), 24)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, embed.proj.weight, embed.proj.bias], g)
    ref = torch.autograd.grad(want, [x, embed.proj.weight, embed.proj.bias], g)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
