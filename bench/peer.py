"""The peer: MoCo v3 built as the official code builds it (facebookresearch/moco-v3, moco/builder.py
MoCo_ViT, vits.py), written once here from that code's structure. The bench's peer rows
(`bench/model_step.py`) train it; the tests' independent references (tests/test_moco.py) use its
parts, so the bench and the tests can never hold two different "official" builds.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


def official_mlp(num_layers: int, input_dim: int, mlp_dim: int, output_dim: int, last_bn: bool = True):
    """MoCo._build_mlp of the official code, verbatim in structure."""
    mlp = []
    for layer in range(num_layers):
        dim1 = input_dim if layer == 0 else mlp_dim
        dim2 = output_dim if layer == num_layers - 1 else mlp_dim
        mlp.append(nn.Linear(dim1, dim2, bias=False))
        if layer < num_layers - 1:
            mlp.append(nn.BatchNorm1d(dim2))
            mlp.append(nn.ReLU(inplace=True))
        elif last_bn:
            mlp.append(nn.BatchNorm1d(dim2, affine=False))
    return nn.Sequential(*mlp)


def timm_vit(arch: str, img_size: int) -> nn.Module:
    """timm's ViT at MoCo v3's sizes (ViT-S with 12 heads), stop-gradient patch embedding."""
    import timm

    from fastmoco.models.vit import VIT_SIZES

    size = VIT_SIZES[arch]
    enc = timm.create_model(size.timm_name, pretrained=False, num_classes=0, img_size=img_size,
                            patch_size=size.patch_size, embed_dim=size.embed_dim, depth=size.depth,
                            num_heads=size.num_heads)
    # vits.py of the official code: fixed sin-cos positions and a frozen patch projection.
    enc.pos_embed.requires_grad = False
    enc.patch_embed.proj.weight.requires_grad = False
    enc.patch_embed.proj.bias.requires_grad = False
    return enc


class PeerMoCo(nn.Module):
    """moco/builder.py's MoCo_ViT on a single GPU (concat_all_gather is the identity)."""

    def __init__(self, arch: str, img_size: int, dim: int, mlp_dim: int, T: float):
        super().__init__()
        self.T = T
        self.base_encoder = timm_vit(arch, img_size)
        hidden_dim = self.base_encoder.embed_dim
        self.base_encoder.head = official_mlp(3, hidden_dim, mlp_dim, dim)
        self.predictor = official_mlp(2, dim, mlp_dim, dim)
        self.momentum_encoder = copy.deepcopy(self.base_encoder)
        for param_m in self.momentum_encoder.parameters():
            param_m.requires_grad = False

    @torch.no_grad()
    def _update_momentum_encoder(self, m: float) -> None:
        for param_b, param_m in zip(self.base_encoder.parameters(), self.momentum_encoder.parameters()):
            param_m.data = param_m.data * m + param_b.data * (1.0 - m)

    def contrastive_loss(self, q, k):
        q = nn.functional.normalize(q, dim=1)
        k = nn.functional.normalize(k, dim=1)
        logits = torch.einsum("nc,mc->nm", [q, k]) / self.T
        N = logits.shape[0]
        labels = torch.arange(N, dtype=torch.long, device=logits.device)  # official: .cuda() of a host tensor
        return nn.CrossEntropyLoss()(logits, labels) * (2 * self.T)

    def forward(self, x1, x2, m: float):
        q1 = self.predictor(self.base_encoder(x1))
        q2 = self.predictor(self.base_encoder(x2))
        with torch.no_grad():
            self._update_momentum_encoder(m)
            k1 = self.momentum_encoder(x1)
            k2 = self.momentum_encoder(x2)
        return self.contrastive_loss(q1, k2) + self.contrastive_loss(q2, k1)
