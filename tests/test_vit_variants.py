"""The MoCo v3 paper's other ViTs: ViT-BN (BatchNorm over the global batch before every MLP), the official
conv stem (vit_conv_small / vit_conv_base) and patch 7 (ViT-BN-L/7), against references written here
(the official stem as timm's embed layer, BatchNorm written out), on 1 and 2 gloo processes, through
the Trainer (train, resume) and evaluation (export, official layout, kNN)."""
import json
import sys

import pytest
import timm
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from gloo_checks import run_on_two_ranks
from fastmoco import ops
from fastmoco.models.vit import VIT_SIZES, VisionTransformer

BN_EPS, BN_MOMENTUM = 1e-5, 0.1      # torch's BatchNorm defaults, as the official SyncBN layers


# -- the independent references ------------------------------------------------------------------------
class RefConvStem(nn.Module):
    """The official vits.py ConvStem as its paper describes it: 4 x (3x3 conv stride 2 no bias, BN, ReLU),
    channels embed_dim/8 doubling, then a 1x1 conv with bias; used as timm's `embed_layer`."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, **_):
        super().__init__()
        layers, c_in, c_out = [], in_chans, embed_dim // 8
        for _ in range(4):
            layers += [nn.Conv2d(c_in, c_out, 3, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            c_in, c_out = c_out, c_out * 2
        layers.append(nn.Conv2d(c_in, embed_dim, 1))
        self.proj = nn.Sequential(*layers)
        self.grid_size = (img_size // 16, img_size // 16)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.patch_size = (16, 16)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


def ref_conv_vit(arch, img_size):
    size = VIT_SIZES[arch]
    return timm.models.vision_transformer.VisionTransformer(
        img_size=img_size, patch_size=16, embed_dim=size.embed_dim, depth=size.depth, num_heads=size.num_heads,
        num_classes=0, qkv_bias=True, embed_layer=RefConvStem)


def batch_norm_rows(x, weight, bias):
    """BatchNorm of rows (R, C), biased batch variance, written out."""
    mean = x.mean(0)
    var = ((x - mean) ** 2).mean(0)
    return (x - mean) / torch.sqrt(var + BN_EPS) * weight + bias


def ref_stem(stem: nn.Sequential, x):
    """The conv stem in the functional form: conv, BN over (B, H, W) per channel, ReLU; 1x1 conv."""
    for i in range(0, 12, 3):
        x = F.conv2d(x, stem[i].weight, stride=2, padding=1)
        rows = batch_norm_rows(x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]), stem[i + 1].weight, stem[i + 1].bias)
        x = F.relu(rows.view(x.shape[0], x.shape[2], x.shape[3], -1).permute(0, 3, 1, 2))
    return F.conv2d(x, stem[12].weight, stem[12].bias)


def ref_vit_bn(ours: VisionTransformer, x):
    """ViT-BN by hand on a timm ViT holding our weights: x + attn(LN(x)); x + mlp(BN over all tokens)."""
    size = ours.size
    ref = timm.create_model(size.timm_name, pretrained=False, num_classes=0, img_size=x.shape[-1],
                            patch_size=size.patch_size, embed_dim=size.embed_dim, depth=size.depth,
                            num_heads=size.num_heads)
    ref.load_state_dict({k: v for k, v in ours.backbone_state_dict().items()
                         if "running_" not in k and "num_batches" not in k})
    t = ref._pos_embed(ref.patch_embed(x))
    for blk in ref.blocks:
        t = t + blk.attn(blk.norm1(t))
        normed = batch_norm_rows(t.reshape(-1, t.shape[-1]), blk.norm2.weight, blk.norm2.bias).view(t.shape)
        t = t + blk.mlp(normed)
    return ref.norm(t)[:, 0], ref


def n_params(module):
    return sum(p.numel() for p in module.parameters())


# -- shapes and parameter counts -----------------------------------------------------------------------
def conv_stem_params(c):
    """The official stem's parameters, counted by hand: convs (no bias), BN weight + bias, the 1x1 conv."""
    chans = [3, c // 8, c // 4, c // 2, c]
    convs = sum(chans[i] * chans[i + 1] * 9 for i in range(4))
    return convs + 2 * sum(chans[1:]) + c * c + c


def vit_block_params(c):
    return (3 * c * c + 3 * c) + (c * c + c) + (2 * c * 4 * c + 4 * c + c) + 4 * c   # qkv, proj, mlp, 2 norms


@pytest.mark.parametrize("arch,width", [("vit_conv_small", 384), ("vit_conv_base", 768)])
def test_conv_stem_vit_parameter_counts(arch, width):
    with torch.device("meta"):
        ours = VisionTransformer(arch, frozen_patch_embed=False)
        ref = ref_conv_vit(arch, 224)
    assert VIT_SIZES[arch].depth == 11                                   # one block fewer than ViT-S/B
    by_hand = conv_stem_params(width) + 11 * vit_block_params(width) + width + 2 * width   # + cls, final norm
    assert n_params(ours) == by_hand
    assert n_params(ref) == by_hand + ours.pos_embed.numel()             # timm's pos_embed is a parameter
    assert ours.pos_embed.shape == (1, 197, width)
    assert {"vit_conv_small": 20_541_744, "vit_conv_base": 82_048_608}[arch] == by_hand   # 20.5M, 82.0M


@pytest.mark.parametrize("arch,millions", [("vit_small", 22), ("vit_base", 86), ("vit_large", 304),
                                           ("vit_huge", 632)])
def test_vit_bn_keeps_the_papers_sizes(arch, millions):
    """ViT-BN-S/B/L/H build with BN before every MLP (the norm before attention and the final norm stay LN)
    and the paper's Table 1 sizes (rounded, counted with a classifier): BN has LN's two vectors."""
    with torch.device("meta"):
        vit = VisionTransformer(arch)
        bn = VisionTransformer(arch, mlp_norm="bn")
    assert n_params(bn) == n_params(vit)
    assert abs((n_params(bn) + bn.pos_embed.numel()) / 1e6 - millions) < 1.5
    assert all(type(b.norm2).__name__ == "TokenBatchNorm" and type(b.norm1).__name__ == "LayerNorm"
               for b in bn.blocks)
    assert type(bn.norm).__name__ == "LayerNorm"
    assert "blocks.0.norm2.running_var" in bn.state_dict()


def test_patch7_large_has_1025_tokens_and_runs_at_224():
    with torch.device("meta"):
        l7 = VisionTransformer("vit_large", patch_size=7, mlp_norm="bn")
    assert l7.pos_embed.shape == (1, 1025, 1024) and l7.patch_embed.proj.weight.shape == (1024, 3, 7, 7)
    torch.manual_seed(0)
    small = VisionTransformer("vit_test", img_size=224, patch_size=7, mlp_norm="bn")
    x = torch.randn(2, 3, 224, 224)
    assert small.patch_embed(x).shape == (2, 1024, 72)
    out, _ = ref_vit_bn(small, x)
    torch.testing.assert_close(small(x), out, rtol=1e-4, atol=1e-5)


def test_attention_dispatch_is_consulted_at_1025_tokens(monkeypatch):
    """"auto" on CUDA asks kernels/attention.py's per-shape timing at ViT-L/7's (N=1025, H=16, D=64)
    and runs what it picks (the timing itself replaced here: no GPU)."""
    from fastmoco.kernels import attention as module
    from fastmoco.kernels import tuner

    picked, ran = [], []
    answer = {}

    def pick(self, key, choices, default, launch, probe):
        picked.append(key)
        self.chosen[key] = (answer["choice"],)
        return answer["choice"]

    class FakeCuda:
        def __init__(self, t):
            self.t, self.is_cuda = t, True

        def __getattr__(self, name):
            return getattr(self.t, name)

    monkeypatch.setattr(tuner, "tuning_enabled", lambda t: True)
    monkeypatch.setattr(tuner.Tuner, "pick", pick)
    monkeypatch.setattr(module, "_DISPATCH", tuner.Tuner("test dispatch"))
    for name in ("attention", "attention_sdpa", "attention_ref"):
        monkeypatch.setattr(module, name, lambda *a, _n=name: ran.append(_n))
    with ops.fused(attention="auto"):
        for batch, choice, path in ((2, tuner.TORCH, "attention_sdpa"), (3, tuner.KERNEL, "attention")):
            answer["choice"] = choice
            ran.clear()
            ops.attention(FakeCuda(torch.randn(batch, 1025, 3 * 16 * 64)), 16)
            assert ran == [path]
            assert picked[-1][1:5] == (batch, 1025, 16, 64)
    assert len(picked) == 2


# -- forward parity --------------------------------------------------------------------------------------
def test_conv_stem_equals_the_functional_reference_and_tracks_running_stats():
    torch.manual_seed(0)
    vit = VisionTransformer("vit_conv_test", img_size=48, frozen_patch_embed=False)
    stem = vit.patch_embed.proj
    with torch.no_grad():
        for bn in stem[1::3][:4]:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    x = torch.randn(5, 3, 48, 48)
    torch.testing.assert_close(vit.patch_embed(x), ref_stem(stem, x).flatten(2).transpose(1, 2),
                               rtol=1e-4, atol=1e-5)
    first = F.conv2d(x, stem[0].weight, stride=2, padding=1)              # (5, 9, 24, 24)
    var = first.transpose(0, 1).reshape(9, -1).var(1, unbiased=True)
    torch.testing.assert_close(stem[1].running_var, (1 - BN_MOMENTUM) + BN_MOMENTUM * var)
    assert vit.patch_embed(x).shape == (5, 9, 72)                            # 48 / 16 = 3 x 3 patches
    with pytest.raises(ValueError, match="frozen_patch_embed"):
        VisionTransformer("vit_conv_test", img_size=32)
    with pytest.raises(ValueError, match="patch_size 8"):
        VisionTransformer("vit_conv_test", img_size=32, frozen_patch_embed=False, patch_size=8)
    with pytest.raises(ValueError, match="mlp_norm 'gn'"):
        VisionTransformer("vit_test", img_size=32, mlp_norm="gn")


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_conv_vit_loads_into_timm_with_the_official_stem(mode):
    """Our state dict (official names) loads strictly into timm's ViT with the official stem as its
    embed layer; the features agree in train mode (batch statistics) and eval mode (running ones)."""
    torch.manual_seed(0)
    ours = VisionTransformer("vit_conv_test", img_size=32, frozen_patch_embed=False)
    ours(torch.randn(6, 3, 32, 32))                                        # move the running statistics
    ref = ref_conv_vit("vit_conv_test", 32)
    ref.load_state_dict(ours.backbone_state_dict(), strict=True)
    getattr(ours, mode)()
    getattr(ref, mode)()
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fused", ["off", "on"])
def test_vit_bn_forward_and_gradients_equal_the_written_out_reference(fused):
    torch.manual_seed(0)
    ours = VisionTransformer("vit_test", img_size=32, mlp_norm="bn", frozen_patch_embed=False)
    with torch.no_grad():
        for blk in ours.blocks:
            blk.norm2.weight.uniform_(0.5, 1.5)
            blk.norm2.bias.uniform_(-0.5, 0.5)
    x = torch.randn(3, 3, 32, 32)
    target = torch.randn(3, 72)
    seen = []
    ours.blocks[0].norm2.register_forward_pre_hook(lambda m, a: seen.append((a[0] + a[1]).detach()))
    with ops.fused(attention=fused, layernorm=fused):
        out = ours(x)
    ref_out, ref = ref_vit_bn(ours, x)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    (out * target).sum().backward()
    (ref_out * target).sum().backward()
    theirs = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs[name].grad, rtol=1e-4, atol=1e-5, msg=name)
    # the running statistics: over all 3 * 17 tokens of the first block's BN input (x + attention branch)
    tokens = seen[0].reshape(-1, 72)
    assert tokens.shape[0] == 3 * 17
    torch.testing.assert_close(ours.blocks[0].norm2.running_mean, BN_MOMENTUM * tokens.mean(0))
    torch.testing.assert_close(ours.blocks[0].norm2.running_var,
                               (1 - BN_MOMENTUM) + BN_MOMENTUM * tokens.var(0, unbiased=True))


# -- 2 ranks = 1 process ---------------------------------------------------------------------------------
def _model_and_batch():
    torch.manual_seed(0)
    model = VisionTransformer("vit_conv_test", img_size=32, frozen_patch_embed=False, mlp_norm="bn")
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(6, 3, 32, 32, generator=g), torch.randn(6, 72, generator=g)


def _state(model):
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    return grads, stats


def _two_rank_worker(rank, world):
    model, x, target = _model_and_batch()
    half = slice(rank * 3, (rank + 1) * 3)
    (model(x[half]) * target[half]).sum().backward()
    grads, stats = _state(model)
    dist.all_reduce(grads)                                                  # the loss is a sum over samples
    return {"grads": grads, "stats": stats}


@pytest.mark.slow
def test_two_ranks_equal_one_process_on_the_global_batch(tmp_path):
    """Stem BN and ViT-BN: statistics over the global batch (both ranks' samples), gradients included."""
    two = run_on_two_ranks(_two_rank_worker)
    model, x, target = _model_and_batch()
    (model(x) * target).sum().backward()
    grads, stats = _state(model)
    # fp32 sums in another order (elementwise near-cancellations): each parameter's gradient compared by
    # norm; per-rank statistics would be off by orders of magnitude more
    offset = 0
    for name, p in model.named_parameters():
        a, b = two["grads"][offset:offset + p.numel()], grads[offset:offset + p.numel()]
        assert ((a - b).norm() / b.norm()).item() < 1e-5, name
        offset += p.numel()
    for k, v in stats.items():
        torch.testing.assert_close(two["stats"][k], v, rtol=1e-5, atol=1e-6, msg=k)


# -- MoCo with a batch-statistics backbone -----------------------------------------------------------------
def test_moco_runs_a_bn_backbone_once_per_view():
    """As the official code's one call per view: the backbone's BN statistics are each view's own."""
    from fastmoco.moco import MoCo
    torch.manual_seed(0)
    moco = MoCo("vit_test", img_size=32, dim=16, mlp_dim=24, mlp_norm="bn")
    assert moco.per_view_backbone and not MoCo("vit_test", img_size=32, dim=16, mlp_dim=24).per_view_backbone
    calls = []
    moco.base_encoder.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    moco(x1, x2)
    assert calls == [4, 4]


# -- the Trainer and evaluation ------------------------------------------------------------------------------
def _train(config, out_dir, *overrides):
    from test_train import COMMON, ROOT, run
    return run([sys.executable, str(ROOT / "fastmoco" / "train.py"), "--config", str(ROOT / "configs" / config),
                "--logging.out_dir", str(out_dir), *COMMON, *overrides])


def _losses(out_dir):
    recs = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


@pytest.mark.slow
@pytest.mark.parametrize("config", ["vit_bn_tiny.json", "vit_conv_tiny.json"])
def test_tiny_config_trains_resumes_exactly_and_exports(tmp_path, config):
    """12 steps (over the epoch end at 8) equal 6 steps and a resume to 12, bit for bit (the BN running
    statistics are in the checkpoint); the export loads back into the same backbone, the official layout
    as well (conv-stem archs included)."""
    from fastmoco.evaluation.weights import build_backbone, export, load_official, load_weights
    full, cut = tmp_path / "full", tmp_path / "cut"
    _train(config, full, "--schedule.max_steps", "12")
    _train(config, cut, "--schedule.max_steps", "6")
    assert "resumed from" in _train(config, cut, "--schedule.max_steps", "12", "--resume", "auto").stdout
    a, b = _losses(full), _losses(cut)
    assert sorted(a) == list(range(1, 13)) and a == b and len(set(a.values())) == 12

    sd, info = load_weights(full)
    assert (info.arch, info.mlp_norm) == (("vit_test", "bn") if "bn" in config else ("vit_conv_test", "ln"))
    online = build_backbone(info, sd, "online")
    assert online.blocks[0].norm2.num_batches_tracked > 0 if "bn" in config else \
        online.patch_embed.proj[1].num_batches_tracked > 0                  # trained statistics came along
    out, off = export(full, tmp_path / "backbone.safetensors")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = online(x)
        torch.testing.assert_close(build_backbone(*reversed(load_weights(out)))(x), ref, rtol=0, atol=0)
        off_sd, off_info = load_official(off)
        assert (off_info.arch, off_info.mlp_norm) == (info.arch, info.mlp_norm)
        torch.testing.assert_close(build_backbone(off_info, off_sd)(x), ref, rtol=0, atol=0)


def test_official_conv_checkpoint_loads(tmp_path):
    """An official-layout checkpoint of a conv-stem arch ({"state_dict": {"module.*"}, "arch"}) loads, its
    arch from the shapes; a checkpoint whose arch key contradicts its weights is refused, naming both."""
    from fastmoco.evaluation.weights import WeightsError, _arch_from_backbone, build_backbone, load_official
    from fastmoco.moco import MoCo
    torch.manual_seed(0)
    moco = MoCo("vit_conv_test", img_size=32, dim=16, mlp_dim=24, frozen_patch_embed=False)
    state = {"module." + k: v for k, v in moco.state_dict().items()}
    torch.save({"epoch": 100, "arch": "vit_conv_test", "state_dict": state}, tmp_path / "ok.pth.tar")
    sd, info = load_official(tmp_path / "ok.pth.tar")
    assert (info.arch, info.img_size, info.patch_size, info.epoch) == ("vit_conv_test", 32, 16, 100)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(build_backbone(info, sd)(x), moco.base_encoder.eval()(x, head=False))
    torch.save({"arch": "vit_small", "state_dict": state}, tmp_path / "bad.pth.tar")
    with pytest.raises(WeightsError, match="'vit_small'.*vit_conv_test"):
        load_official(tmp_path / "bad.pth.tar")
    with torch.device("meta"):
        full = VisionTransformer("vit_conv_small", frozen_patch_embed=False).state_dict()
        bn_large = VisionTransformer("vit_large", patch_size=7, mlp_norm="bn").state_dict()
    assert _arch_from_backbone(full, "", "x") == ("vit_conv_small", 224, 16, "ln")
    assert _arch_from_backbone(bn_large, "", "x") == ("vit_large", 224, 7, "bn")


@pytest.mark.slow
def test_knn_of_a_vit_bn_run(tmp_path):
    """The kNN command on a ViT-BN checkpoint (eval mode: the BN running statistics)."""
    from fastmoco.pipelines.demo_data import make_demo_data
    from test_train import run
    train = make_demo_data(tmp_path / "data" / "train", 12, seed=0)
    val = make_demo_data(tmp_path / "data" / "val", 7, seed=5)
    _train("vit_bn_tiny.json", tmp_path / "run", "--schedule.max_steps", "2", "--checkpoint.every_steps", "2")
    run([sys.executable, "-m", "fastmoco.evaluation.cli", "knn", "--checkpoint", str(tmp_path / "run"), "--train",
         str(train), "--val", str(val), "--backend", "torchvision", "--num-threads", "1", "--batch-size", "8",
         "--k", "1", "3", "--json", str(tmp_path / "knn.json")])
    r = json.loads((tmp_path / "knn.json").read_text())
    assert r["arch"] == "vit_test" and r["val_samples"] == 7 and set(r["knn"]) == {"1", "3"}
