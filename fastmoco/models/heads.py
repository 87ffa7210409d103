"""MoCo v3's BN-MLP projector and predictor, with BatchNorm over the global batch."""
from __future__ import annotations

import torch
import torch.nn as nn

from fastmoco.distributed import all_reduce_sum_autograd, get_world_size


class _GlobalBatchNorm:
    """BatchNorm whose training statistics span the global batch of all ranks (SyncBatchNorm
    semantics, as the official code gets from convert_sync_batchnorm), on any backend, gloo
    included: per channel over every dimension but 1. Statistics in fp32; equal batch per rank assumed."""

    def forward(self, x):  # (B, C) or (B, C, H, W)
        world = get_world_size()
        stats_dtype = x.dtype if self.running_mean is None else self.running_mean.dtype
        if (not self.training or world == 1) and x.dtype == stats_dtype:
            return super().forward(x)
        if not self.training:  # bf16 module, fp32 buffers (DeepSpeed keeps them): normalise in fp32
            w, b = (self.weight.float(), self.bias.float()) if self.affine else (None, None)
            return torch.nn.functional.batch_norm(x.float(), self.running_mean, self.running_var, w, b,
                                                  eps=self.eps).to(x.dtype)
        xf = x.float()
        c = xf.shape[1]
        dims = [0, *range(2, xf.ndim)]
        shape = (1, c) + (1,) * (xf.ndim - 2)  # per-channel values broadcast over x
        n = xf.numel() // c * world
        stats = all_reduce_sum_autograd(torch.cat([xf.sum(dims), (xf * xf).sum(dims)]))  # (2C,)
        mean = stats[:c] / n
        var = (stats[c:] / n - mean * mean).clamp_min(0)
        with torch.no_grad():
            if self.track_running_stats:
                self.num_batches_tracked.add_(1)
                mom = self.momentum
                self.running_mean.lerp_(mean.detach(), mom)
                self.running_var.lerp_(var.detach() * (n / (n - 1)), mom)
        y = (xf - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.float().view(shape) + self.bias.float().view(shape)
        return y.to(x.dtype)


class GlobalBatchNorm1d(_GlobalBatchNorm, nn.BatchNorm1d):
    """(B, C): the MLP heads' BatchNorm over the global batch."""


class GlobalBatchNorm2d(_GlobalBatchNorm, nn.BatchNorm2d):
    """(B, C, H, W): a convolutional trunk's BatchNorm over the global batch (ResNet, conv stems)."""


def build_mlp(num_layers: int, in_dim: int, hidden_dim: int, out_dim: int, last_bn: bool = True) -> nn.Sequential:
    """Linear (no bias) -> BN -> ReLU, repeated; the last layer's BN has no affine.

    Indices match the official code's nn.Sequential, so state dicts line up.
    """
    layers: list[nn.Module] = []
    for i in range(num_layers):
        d_in = in_dim if i == 0 else hidden_dim
        d_out = out_dim if i == num_layers - 1 else hidden_dim
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < num_layers - 1:
            layers += [GlobalBatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(GlobalBatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)


def projector(in_dim: int, hidden_dim: int = 4096, out_dim: int = 256) -> nn.Sequential:
    return build_mlp(3, in_dim, hidden_dim, out_dim)


def predictor(dim: int = 256, hidden_dim: int = 4096) -> nn.Sequential:
    # MoCo v3 ViT: 2 layers, and (unlike the ResNet variant) a last BN without affine.
    return build_mlp(2, dim, hidden_dim, dim)
