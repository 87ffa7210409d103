"""Attention maps (fastmoco/evaluation/attention.py): the reference path against the fused block, a model
whose attention is set by hand, DINO's threshold, shapes for every ViT fastmoco trains, fastmoco-attention
on every checkpoint format. CPU (fp32, kernels under the Triton interpreter); GPU (marker gpu): bf16."""
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastmoco import ops
from fastmoco.evaluation.attention import ALPHA, AttentionError, class_attention, keep_mass, main, overlay, render
from fastmoco.evaluation.figures import png_bytes
from fastmoco.kernels.attention import attention_ref_with_probs
from fastmoco.models.vit import Block, VisionTransformer

GOLDEN = Path(__file__).with_name("golden")


# -- the path the maps come from ---------------------------------------------------------------------------
@pytest.mark.parametrize("device,dtype,dim,heads,tokens,batch,atol", [
    ("cpu", torch.float32, 72, 3, 50, 3, 2e-5),
    pytest.param("cuda", torch.bfloat16, 384, 6, 197, 5, 3e-2, marks=pytest.mark.gpu),
    pytest.param("cuda", torch.bfloat16, 768, 12, 197, 2, 3e-2, marks=pytest.mark.gpu),
])
def test_reference_path_gives_the_fused_block_output(device, dtype, dim, heads, tokens, batch, atol):
    """A block run with `probs` (the reference attention, which forms the probabilities) gives the
    output of the same block on the fused kernel, and its probabilities are the ones that made it."""
    torch.manual_seed(0)
    blk = Block(dim, heads).to(device).eval()
    x = torch.randn(batch, tokens, dim, device=device)
    branch = torch.randn(batch, tokens, dim, device=device) * 0.5
    with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32), \
            ops.fused(attention="on", layernorm="on"):
        fused = blk(x, branch)
        probs = []
        ref = blk(x, branch, probs)
        h = blk.norm1(x, branch)[1]
        qkv = blk.attn.qkv(h)
    for a, b in zip(ref, fused):
        torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=0)
    (p,) = probs
    assert p.dtype == torch.float32 and p.shape == (batch, heads, tokens, tokens)
    torch.testing.assert_close(p.sum(-1), torch.ones(batch, heads, tokens, device=device), atol=1e-5, rtol=0)
    d = dim // heads
    v = qkv.float().view(batch, tokens, 3, heads, d)[:, :, 2].transpose(1, 2)            # (B, H, N, D)
    from_probs = (p @ v).transpose(1, 2).reshape(batch, tokens, dim)
    torch.testing.assert_close(from_probs, attention_ref_with_probs(qkv.float(), heads)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["on", "off"], ids=["kernels", "reference"])
def test_last_block_attention_equals_the_official_dino(mode):
    """fastmoco's ViT holding the weights of an official DINO ViT gives the attention that the official
    `get_last_selfattention` gave (tests/golden/attention.safetensors, tests/golden/gen_attention.py)."""
    from safetensors.torch import load_file

    golden = load_file(str(GOLDEN / "attention.safetensors"))
    model = VisionTransformer("vit_test", img_size=32, frozen_patch_embed=False, recipe="dino", num_heads=3,
                              patch_size=8)
    weights = {k[len("weights/"):]: v.float() for k, v in golden.items() if k.startswith("weights/")}
    model.load_state_dict(weights, strict=True)
    with ops.fused(attention=mode, layernorm=mode), torch.no_grad():
        probs = model.eval()(golden["input"], last_attention=True)
        maps = class_attention(model, golden["input"])
    torch.testing.assert_close(probs, golden["attention"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(maps, golden["attention"][:, :, 0, 1:].reshape(maps.shape), atol=1e-5, rtol=1e-4)


def set_attention_model(targets, patch=8, img_size=32, arch="vit_test", recipe="dino"):
    """A ViT whose last block's class token attends (almost only) to patch targets[h] = (row, col) in
    head h: the other blocks and the patch projection are zeroed, so the last block sees the position
    embedding alone; patch t's is a direction u_h that head h's keys read and its query is constant."""
    torch.manual_seed(1)
    model = VisionTransformer(arch, img_size=img_size, frozen_patch_embed=False, recipe=recipe, patch_size=patch)
    C, H = model.embed_dim, model.size.num_heads
    D = C // H
    grid = img_size // patch
    with torch.no_grad():
        for p in model.patch_embed.parameters():
            p.zero_()
        for blk in model.blocks[:-1]:
            for lin in (blk.attn.proj, blk.mlp.fc2):
                lin.weight.zero_()
                lin.bias.zero_()
        model.pos_embed.normal_(std=0.02)
        qkv = model.blocks[-1].attn.qkv
        qkv.weight.zero_()
        qkv.bias.zero_()
        for h, (r, c) in enumerate(targets):
            u = torch.zeros(C)
            u[2 * h], u[2 * h + 1] = 1.0, -1.0                          # zero mean: LayerNorm keeps it
            model.pos_embed[0, 1 + r * grid + c] = 5.0 * u
            qkv.bias[h * D:(h + 1) * D] = 1.0                          # q: the same for every token
            qkv.weight[C + h * D:C + (h + 1) * D] = u                  # k: <LN(token), u> in each dim
    return model.eval()


@pytest.mark.parametrize("mode", ["on", "off"])
def test_attention_set_by_hand_is_found_at_its_patch_and_overlaid_there(mode):
    targets = [(0, 3), (2, 1), (3, 0)]   # (0, 3) and (3, 0): a transposed grid would swap heads 0 and 2
    model = set_attention_model(targets)
    x = torch.randn(2, 3, 32, 32)
    with ops.fused(attention=mode, layernorm=mode):
        maps = class_attention(model, x)
    assert maps.shape == (2, 3, 4, 4)
    for h, (r, c) in enumerate(targets):
        assert maps[:, h, r, c].min() > 0.99, (h, maps[0, h])
    grey = np.full((32, 32, 3), 128, np.uint8)
    for h, (r, c) in enumerate(targets):
        out = overlay(grey, maps[0, h]).astype(np.float64).sum(-1)
        hot = out > out.min() + 0.5 * (out.max() - out.min())
        expect = np.zeros((32, 32), bool)
        expect[r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] = True
        assert (hot == expect).all(), h
        # the hot patch shows the colour map's top, weighted ALPHA over the picture
        from matplotlib import colormaps
        top = (1 - ALPHA) * 128 + ALPHA * 255 * np.array(colormaps["inferno"](1.0)[:3])
        np.testing.assert_allclose(overlay(grey, maps[0, h])[r * 8, c * 8], top, atol=1)


# -- DINO's threshold ---------------------------------------------------------------------------------------
def test_threshold_keeps_the_smallest_set_holding_the_fraction():
    m = torch.tensor([[1.0, 5.0], [1.0, 3.0]])                             # exact in binary: no rounding
    assert keep_mass(m, 0.6).tolist() == [[False, True], [False, True]]     # 8 of 10: 5 alone is short
    assert keep_mass(m, 0.5).tolist() == [[False, True], [False, False]]    # 5 of 10 holds a half
    assert keep_mass(m, 1.0).all()
    torch.manual_seed(0)
    maps = torch.rand(5, 3, 7, 7) ** 4                    # peaked, not normalised: the fraction is of each map
    for t in (0.1, 0.6, 0.9):
        keep = keep_mass(maps, t)
        for m, k in zip(maps.flatten(0, 1).flatten(1), keep.flatten(0, 1).flatten(1)):
            total, kept = m.sum(), m[k]
            assert kept.sum() >= t * total - 1e-6                           # holds the fraction
            assert kept.sum() - kept.min() < t * total                      # and none of it can go
            assert kept.min() >= m[~k].max() if (~k).any() else True       # the largest patches
    with pytest.raises(AttentionError, match="threshold must be in"):
        keep_mass(maps, 0.0)


def test_threshold_dims_what_it_drops():
    image = np.full((16, 16, 3), 200, np.uint8)
    attn = torch.tensor([[0.7, 0.1], [0.1, 0.1]])
    out = overlay(image, attn, keep_mass(attn, 0.6))
    assert (out[8:, :] == 50).all() and (out[:8, 8:] == 50).all()           # DIM x 200
    assert (out[:8, :8] != 50).all()


# -- every ViT fastmoco trains ------------------------------------------------------------------------------
VITS = {  # (arch, recipe, patch, heads, img_size, mlp_norm)
    "moco_p8": ("vit_test", "moco", 8, 0, 32, "ln"),
    "dino_p16": ("vit_test", "dino", 16, 0, 48, "ln"),
    "dino_p14": ("vit_test", "dino", 14, 4, 42, "ln"),
    "moco_p7_bn": ("vit_test", "moco", 7, 0, 35, "bn"),
    "conv_stem": ("vit_conv_test", "moco", 0, 0, 32, "ln"),
}


@pytest.mark.parametrize("name", sorted(VITS))
def test_maps_of_every_vit_have_the_grid_and_render(name):
    arch, recipe, patch, heads, size, mlp_norm = VITS[name]
    torch.manual_seed(0)
    model = VisionTransformer(arch, img_size=size, frozen_patch_embed=False, recipe=recipe, patch_size=patch,
                              num_heads=heads, mlp_norm=mlp_norm)
    model.train()
    p, h = model.size.patch_size, model.size.num_heads
    maps = class_attention(model, torch.randn(3, 3, size, size))
    assert model.training                                    # its mode put back
    assert maps.shape == (3, h, size // p, size // p)
    s = maps.sum((-2, -1))
    assert (s > 0).all() and (s < 1).all()                   # less the class token's attention to itself
    fig = render(np.zeros((size, size, 3), np.uint8) + 90, maps[0], threshold=0.6, title=name)
    picture = np.asarray(Image.open(io.BytesIO(png_bytes(fig))).convert("RGB"))
    assert picture.std() > 10
    with pytest.raises(AttentionError, match=f"not a multiple of the model's patch size {p}"):
        class_attention(model, torch.randn(1, 3, size + 1, size + 1))


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(VITS))
def test_bf16_maps_on_the_gpu_equal_the_cpu(name):
    arch, recipe, patch, heads, size, mlp_norm = VITS[name]
    torch.manual_seed(0)
    model = VisionTransformer(arch, img_size=size, frozen_patch_embed=False, recipe=recipe, patch_size=patch,
                              num_heads=heads, mlp_norm=mlp_norm)
    x = torch.randn(4, 3, size, size)
    cpu = class_attention(model, x)
    gpu = class_attention(model.cuda(), x.cuda(), bf16=True)
    assert gpu.dtype == torch.float32
    torch.testing.assert_close(gpu.cpu(), cpu, atol=2e-2 * cpu.max().item(), rtol=0)


# -- fastmoco-attention on the checkpoint formats -----------------------------------------------------------
def _cli(capsys, *args) -> tuple[int, str, str]:
    """fastmoco-attention ARGS in this process: (exit status, stdout, stderr)."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _check_pngs(out_dir, names):
    for name in names:
        picture = np.asarray(Image.open(out_dir / f"{name}.png").convert("RGB"))
        assert picture.std() > 10, name
    assert sorted(p.stem for p in out_dir.glob("*.png")) == sorted(names)
    assert not list(out_dir.glob(".*"))            # no staging file left


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from fastmoco.pipelines.demo_data import make_demo_data
    return make_demo_data(tmp_path_factory.mktemp("att") / "imgs", 3, seed=3)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """An official MoCo v3 ViT-S checkpoint (random weights, 32 px)."""
    from test_evaluation import official_checkpoint

    path = tmp_path_factory.mktemp("official") / "c.pth.tar"
    official_checkpoint(path, "vit_small", 32)
    return path


def test_cli_on_an_official_and_an_exported_checkpoint(images, official, tmp_path, capsys):
    from fastmoco.evaluation.weights import export

    files = sorted(images.glob("*/*.jpg"))
    code, out, err = _cli(capsys, "--checkpoint", official, "--images", images, "--out",
                          tmp_path / "a", "--threshold", "0.6", "--image-size", 48)
    assert code == 0, err[-3000:]
    _check_pngs(tmp_path / "a", [f.stem for f in files])
    assert out.count(" -> ") == len(files)
    assert f"(vit_small/16, online encoder, 48 px): {len(files)} image(s), PNGs in {tmp_path / 'a'}" in out
    export(official, tmp_path / "b.safetensors", official="")
    code, out, err = _cli(capsys, "--checkpoint", tmp_path / "b.safetensors", "--images", files[0], "--out",
                          tmp_path / "b")
    assert code == 0, err[-3000:]
    _check_pngs(tmp_path / "b", [files[0].stem])


@pytest.mark.parametrize("case", ["missing_image", "bad_threshold", "size_not_multiple"])
def test_cli_names_bad_input(images, official, tmp_path, capsys, case):
    args = ["--checkpoint", official, "--images", images, "--out", tmp_path / "a"]
    if case == "missing_image":
        args[3] = tmp_path / "nope.jpg"
        expect = f"image {str(tmp_path / 'nope.jpg')!r} does not exist"
    elif case == "bad_threshold":
        args += ["--threshold", "1.5"]
        expect = "--threshold must be in (0, 1], got 1.5"
    else:
        args += ["--image-size", "40"]
        expect = "--image-size 40 is not a multiple of the model's patch size 16"
    code, _, err = _cli(capsys, *args)
    assert code == 2 and expect in err, err[-2000:]
