"""MoCo v3 module against an independent implementation (timm backbone, plain
BatchNorm1d heads, the official loss), on one process and on 2 gloo processes."""

import pytest
import timm
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from gloo_checks import moco_loss_and_grads, run_on_two_ranks
from bench.peer import official_mlp
from fastmoco import ops
from fastmoco.models.vit import VIT_SIZES
from fastmoco.moco import MoCo

ARCH, IMG, DIM, MLP, TAU = "vit_test", 32, 32, 48, 0.2


def make_model(seed=0):
    torch.manual_seed(seed)
    return MoCo(ARCH, img_size=IMG, dim=DIM, mlp_dim=MLP, tau=TAU)


def make_batch(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, IMG, IMG, generator=g), torch.randn(n, 3, IMG, IMG, generator=g)


class IndependentMoCo(nn.Module):
    """The official code's structure, written from the paper: separate forward per view."""

    def __init__(self, ours: MoCo):
        super().__init__()
        size = VIT_SIZES[ARCH]
        self.base = timm.create_model(size.timm_name, num_classes=0, img_size=IMG, patch_size=size.patch_size,
                                      embed_dim=size.embed_dim, depth=size.depth, num_heads=size.num_heads)
        self.base.load_state_dict(ours.base_encoder.backbone_state_dict())
        self.proj = official_mlp(3, size.embed_dim, MLP, DIM)
        self.proj.load_state_dict(ours.base_encoder.head.state_dict())
        self.pred = official_mlp(2, DIM, MLP, DIM)
        self.pred.load_state_dict(ours.predictor.state_dict())

    def forward(self, x1, x2, k1, k2):
        q1 = self.pred(self.proj(self.base(x1)))
        q2 = self.pred(self.proj(self.base(x2)))
        return self.ctr(q1, k2) + self.ctr(q2, k1)

    @staticmethod
    def ctr(q, k, offset=0, tau=TAU):
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
        logits = torch.einsum("nc,mc->nm", q, k) / tau
        return F.cross_entropy(logits, torch.arange(q.shape[0]) + offset) * 2 * tau


def assert_grad_close(a, b, name=""):
    """Max error relative to the largest gradient entry (entries near 0 carry cancellation noise).
    The final norm's bias feeds a Linear -> BN, which cancels it: its true gradient is 0, hence the floor."""
    err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-3)).item()
    assert err < 1e-4, (name, err)


def momentum_keys(model, x1, x2):
    with torch.no_grad():
        enc = model.momentum_encoder
        return enc(x1), enc(x2)


def test_loss_and_gradients_match_independent_implementation():
    model = make_model()
    # make the momentum encoder differ from the online one, so k and q come from different weights
    with torch.no_grad():
        for p in model.momentum_encoder.parameters():
            p.add_(0.01 * torch.randn_like(p))
    x1, x2 = make_batch(8)
    k1, k2 = momentum_keys(model, x1, x2)
    ind = IndependentMoCo(model)
    loss_ind = ind(x1, x2, k1, k2)
    loss_ind.backward()
    loss = model(x1, x2)
    loss.backward()
    assert loss.item() == pytest.approx(loss_ind.item(), rel=1e-5)
    ours = dict(model.base_encoder.named_parameters())
    theirs = dict(ind.base.named_parameters())
    checked = 0
    for name, p in theirs.items():
        if name in ours and ours[name].requires_grad:  # timm trains pos_embed and the patch projection
            assert_grad_close(ours[name].grad, p.grad, name)
            checked += 1
    assert checked > 20
    for a, b in zip(model.predictor.parameters(), ind.pred.parameters()):
        assert_grad_close(a.grad, b.grad, "predictor")
    assert all(p.grad is None for p in model.momentum_encoder.parameters())


def test_rank_offset_labels_pick_the_local_block():
    q = torch.randn(4, 8)
    k = torch.cat([torch.randn(4, 8), q.clone(), torch.randn(4, 8)])  # positives sit at rows 4..7
    low = ops.symmetric_contrastive_loss(q, q, k, k, 0.05, offset=4)
    wrong = ops.symmetric_contrastive_loss(q, q, k, k, 0.05, offset=0)
    assert low.item() < 0.05 and wrong.item() > 1.0
    assert low.item() == pytest.approx(2 * IndependentMoCo.ctr(q, k, offset=4, tau=0.05).item(), rel=1e-6)


def test_momentum_update_is_the_ema():
    model = make_model()
    with torch.no_grad():
        for p in model.base_encoder.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in model.momentum_encoder.parameters()]
    online = [p.clone() for p in model.base_encoder.parameters()]
    model.update_momentum_encoder(torch.tensor(0.9))
    for b, o, a in zip(before, online, model.momentum_encoder.parameters()):
        torch.testing.assert_close(a, 0.9 * b + 0.1 * o)
    assert a.dtype == torch.float32


def test_optimizer_leaves_momentum_encoder_and_patch_projection_alone():
    model = make_model()
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("momentum_encoder.") for n in names)
    assert "base_encoder.patch_embed.proj.weight" not in names
    assert not any("predictor" in n for n, _ in model.momentum_encoder.named_parameters())
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    x1, x2 = make_batch(8)
    for _ in range(2):
        opt.zero_grad()
        model(x1, x2).backward()  # no m: the momentum encoder must stay as it is
        opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert not torch.equal(model.base_encoder.blocks[0].attn.qkv.weight,
                           model.momentum_encoder.blocks[0].attn.qkv.weight)


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch():
    model = make_model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.1)
    x1, x2 = make_batch(16)
    m = torch.tensor(0.99)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = model(x1, x2, m)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def _rank_worker(rank, world):
    out = moco_loss_and_grads(make_model(), *make_batch(8), rank, world)
    dist.all_reduce(out)
    return out / world  # what data-parallel averaging gives


def test_two_gloo_ranks_equal_one_process_on_the_global_batch():
    """Checks key gathering, the rank-offset labels and global-batch BN together."""
    one = moco_loss_and_grads(make_model(), *make_batch(8))
    out = run_on_two_ranks(_rank_worker)
    assert out[0].item() == pytest.approx(one[0].item(), rel=1e-5)
    assert_grad_close(out[1:], one[1:], "all gradients")
