"""Linear probes of a frozen backbone: MoCo v3's protocol, and a fast one on cached features.

Official protocol (moco-v3 `main_lincls.py` for ViTs), `train_linear_official`:
    backbone frozen and in eval mode, its class token -> Linear(C, classes),
    weight ~ N(0, 0.01), bias 0; SGD(momentum 0.9, weight decay 0),
    lr = base_lr x global batch / 256 (base_lr 3, batch 1024), cosine over
    epochs (set per epoch, as the official code), 90 epochs;
    training views RandomResizedCrop(S) + horizontal flip, validation resize to
    S / 0.875 + centre crop S; top-1 / top-5; and the official sanity check that
    every backbone weight is unchanged at the end (bit for bit here).
    Several ranks: each trains on its shard; the classifier's gradients are
    averaged over ranks (DistributedDataParallel's arithmetic, one all-reduce).

Fast probe (NOT the paper's protocol), `train_linear_fast`:
    features extracted once with the evaluation transform (no augmentation),
    standardised with the fitting part's mean and std, a held-out part of train
    (`holdout` fraction, seeded) chooses among several learning rates that are
    trained at once: L classifiers as one batched matmul (L, C, K) on the
    device. Reports the best learning rate's held-out and val accuracy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from fastmoco.distributed import get_world_size

OFFICIAL_BASE_LR = 3.0          # main_lincls.py --lr for ViTs, scaled by batch / 256
OFFICIAL_BATCH = 1024
OFFICIAL_EPOCHS = 90
SGD_MOMENTUM = 0.9
INIT_STD = 0.01
FAST_LRS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)   # per 256 samples
FAST_EPOCHS = 100
FAST_BATCH = 1024
HOLDOUT = 0.1
TOP5 = 5


def topk_correct(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(2,) counts of top-1 and top-5 hits (top-min(5, classes))."""
    pred = logits.topk(min(TOP5, logits.shape[-1]), dim=-1).indices
    hit = pred == target[..., None]
    return torch.stack([hit[..., 0].sum(), hit.any(-1).sum()]).double()


def official_lr(epoch: int, epochs: int, init_lr: float) -> float:
    """main_lincls.py's adjust_learning_rate: half-cosine over epochs, set at each epoch's start."""
    return init_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


@dataclass
class LinearResult:
    top1: float
    top5: float
    lr: float
    extra: dict


def new_classifier(width: int, num_classes: int, device) -> nn.Linear:
    head = nn.Linear(width, num_classes).to(device)
    nn.init.normal_(head.weight, mean=0.0, std=INIT_STD)
    nn.init.zeros_(head.bias)
    return head


def _snapshot(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def check_unchanged(before: dict, module: nn.Module) -> None:
    """The official sanity check, bit for bit: a frozen backbone's every weight and buffer as before."""
    for k, v in module.state_dict().items():
        if not torch.equal(before[k], v):
            raise RuntimeError(f"linear probe changed the frozen backbone's {k}")


def train_linear_official(backbone: nn.Module, train_loader, val_loader, *, num_classes: int,
                          epochs: int = OFFICIAL_EPOCHS, base_lr: float = OFFICIAL_BASE_LR,
                          bf16: bool = False, relabel_val=lambda y: y, log=print) -> LinearResult:
    """MoCo v3's linear classification (module docstring). Loaders yield (view, view, labels)
    (the training pipeline with only crop + flip: see cli.py). Returns the final val accuracy."""
    device = train_loader.device
    for p in backbone.parameters():
        p.requires_grad_(False)
    backbone.eval()
    before = _snapshot(backbone)
    head = new_classifier(backbone.embed_dim, num_classes, device)
    world = get_world_size()
    init_lr = base_lr * train_loader.batch_size * world / 256
    opt = torch.optim.SGD(head.parameters(), lr=init_lr, momentum=SGD_MOMENTUM, weight_decay=0.0)
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda")
    for epoch in range(epochs):
        for group in opt.param_groups:
            group["lr"] = official_lr(epoch, epochs, init_lr)
        train_loader.set_epoch(epoch)
        loss_sum = torch.zeros((), device=device)
        seen = torch.zeros((), dtype=torch.int64, device=device)   # images trained on this epoch
        for x, *_, y in train_loader:  # the first view (more with local crops)
            with torch.no_grad(), torch.autocast(**autocast):
                feats = backbone(x, head=False)
            loss = F.cross_entropy(head(feats.float()), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1:  # DistributedDataParallel's arithmetic on the two tensors of the classifier
                for p in head.parameters():
                    dist.all_reduce(p.grad)
                    p.grad /= world
            opt.step()
            loss_sum += loss.detach()
            seen += y.numel()
        log(f"linear epoch {epoch + 1}/{epochs}: lr {opt.param_groups[0]['lr']:.4g}, "
            f"mean loss {loss_sum.item() / max(len(train_loader), 1):.4f}")
    top1, top5 = evaluate_classifier(backbone, head, val_loader, bf16=bf16, relabel=relabel_val)
    check_unchanged(before, backbone)
    if world > 1:
        dist.all_reduce(seen)
    return LinearResult(top1, top5, init_lr, {"epochs": epochs, "train_images_per_epoch": int(seen)})


@torch.no_grad()
def evaluate_classifier(backbone: nn.Module, head: nn.Module, loader, *, bf16: bool = False,
                        relabel=lambda y: y) -> tuple[float, float]:
    """Top-1 / top-5 % of backbone + head over the loader's split (all ranks summed)."""
    device = loader.device
    counts = torch.zeros(3, dtype=torch.float64, device=device)   # top-1, top-5, samples
    loader.set_epoch(0)
    for x, *_, y in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda"):
            feats = backbone(x, head=False)
        y = relabel(y.to(device))
        counts[:2] += topk_correct(head(feats.float()), y)
        counts[2] += y.numel()
    if get_world_size() > 1:
        dist.all_reduce(counts)
    return (counts[0] / counts[2] * 100).item(), (counts[1] / counts[2] * 100).item()


def holdout_split(n: int, fraction: float, seed: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit indices, held-out indices) of n samples, a seeded random split."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout fraction must lie in (0, 1), got {fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(device)
    k = max(1, int(round(n * fraction)))
    if k >= n:
        raise ValueError(f"{n} training samples leave none to fit after holding out {k}")
    return perm[k:], perm[:k]


def train_linear_fast(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor,
                      val_labels: torch.Tensor, *, num_classes: int, lrs=FAST_LRS, epochs: int = FAST_EPOCHS,
                      batch_size: int = FAST_BATCH, holdout: float = HOLDOUT, seed: int = 0) -> LinearResult:
    """Fast probe on cached features (module docstring). Features (n, C), any device; every rank
    passes the same features (it is cheap: each rank computes the same thing)."""
    device = train_feats.device
    fit, held = holdout_split(train_feats.shape[0], holdout, seed, device)
    x_fit = train_feats[fit].float()
    mean, std = x_fit.mean(0), x_fit.std(0).clamp_min(1e-6)

    def norm(x):
        return (x.float() - mean) / std

    x_fit, y_fit = norm(x_fit), train_labels[fit].to(device)
    y_held = train_labels[held].to(device)
    lr_scale = batch_size / 256
    lr = torch.tensor([v * lr_scale for v in lrs], device=device)                     # (L,)
    g = torch.Generator(device="cpu").manual_seed(seed)
    L, C = len(lrs), x_fit.shape[1]
    w = (torch.randn(L, C, num_classes, generator=g) * INIT_STD).to(device).requires_grad_()
    b = torch.zeros(L, 1, num_classes, device=device, requires_grad=True)
    bufs = [torch.zeros_like(w), torch.zeros_like(b)]
    steps_per_epoch = -(-x_fit.shape[0] // batch_size)
    total = epochs * steps_per_epoch
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(x_fit.shape[0], generator=g).to(device)
        for start in range(0, order.numel(), batch_size):
            idx = order[start:start + batch_size]
            logits = torch.baddbmm(b, x_fit[idx].expand(L, -1, -1), w)                  # (L, B, K)
            # sum over classifiers: each one's gradient is its own mean cross-entropy's
            loss = F.cross_entropy(logits.reshape(-1, num_classes), y_fit[idx].repeat(L), reduction="sum") \
                / idx.numel()
            gw, gb = torch.autograd.grad(loss, [w, b])
            scale = lr * 0.5 * (1.0 + math.cos(math.pi * step / total))                  # cosine per step
            with torch.no_grad():
                for p, grad, buf in ((w, gw, bufs[0]), (b, gb, bufs[1])):
                    buf.mul_(SGD_MOMENTUM).add_(grad)
                    p.sub_(scale.view(-1, 1, 1) * buf)
            step += 1

    @torch.no_grad()
    def accuracy(x, y):
        logits = torch.baddbmm(b, norm(x).expand(L, -1, -1), w)                          # (L, n, K)
        pred = logits.topk(min(TOP5, num_classes), dim=-1).indices
        hit = pred == y.to(device)[None, :, None]
        return hit[..., 0].double().mean(1) * 100, hit.any(-1).double().mean(1) * 100   # (L,), (L,)

    with torch.no_grad():
        held1, _ = accuracy(train_feats[held], y_held)
        best = int(held1.argmax())
        val1, val5 = accuracy(val_feats, val_labels)
    return LinearResult(val1[best].item(), val5[best].item(), lrs[best],
                        {"heldout_top1": held1.tolist(), "lrs": list(lrs), "best_lr_per_256": lrs[best],
                         "epochs": epochs})
