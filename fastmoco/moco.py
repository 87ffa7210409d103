"""MoCo v3 for ViTs and ResNets (Chen, Xie, He, ICCV 2021), as the official code defines it.

    online   = backbone -> projector (3-layer BN-MLP) -> predictor (2-layer BN-MLP)
    momentum = backbone -> projector, an EMA of the online encoder, no gradients
    loss     = ctr(q1, k2) + ctr(q2, k1),
    ctr(q, k) = CE(normalize(q) @ normalize(gather(k)).T / tau, arange(N) + N * rank) * 2 * tau

Module names follow the official checkpoint (base_encoder, momentum_encoder,
predictor; each encoder's projector is its `head`, named `fc` in a ResNet). ResNets
(`model.arch` resnet50, `MoCo_ResNet`): 2-layer projector and a predictor without a
last BN; the trunk's BatchNorm runs over each view's global batch.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from fastmoco import ops
from fastmoco.chunked import chunked_backbone
from fastmoco.distributed import concat_all_gather, get_rank
from fastmoco.models.heads import build_mlp, predictor, projector
from fastmoco.models.resnet import RESNET_ARCHS, ResNet
from fastmoco.models.vit import VisionTransformer
from fastmoco.momentum import MomentumState


class MoCo(nn.Module):
    METHOD = "moco_v3"                      # fastmoco/methods.py
    MOMENTUM_MODULE = "momentum_encoder"    # what the EMA state covers (export reads it by this name)

    def __init__(self, arch: str = "vit_small", img_size: int = 224, dim: int = 256, mlp_dim: int = 4096,
                 tau: float = 0.2, frozen_patch_embed: bool = True, grad_checkpointing: bool = False, *,
                 patch_size: int = 0, num_heads: int = 0, mlp_norm: str = "ln", backbone_chunk: int | str = 0):
        super().__init__()
        self.tau = tau
        # images per backbone call (fastmoco/chunked.py); 0: all; "auto": the Trainer sets it after measuring
        self.backbone_chunk = 0 if backbone_chunk == "auto" else backbone_chunk
        if arch in RESNET_ARCHS:  # MoCo_ResNet: the trunk's BN over the global batch, projector at `fc`
            self.base_encoder = ResNet(arch)
        else:
            self.base_encoder = VisionTransformer(arch, img_size=img_size, frozen_patch_embed=frozen_patch_embed,
                                                  grad_checkpointing=grad_checkpointing, patch_size=patch_size,
                                                  num_heads=num_heads, mlp_norm=mlp_norm)
        # A backbone with batch statistics (ViT-BN, the conv stem) sees each view as its own batch, as the
        # official code's one call per view; without them both views run as one batch (the same result).
        self.per_view_backbone = any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                     for m in self.base_encoder.modules())
        if backbone_chunk and self.per_view_backbone:
            raise ValueError(f"memory.backbone_chunk {backbone_chunk}: model.arch {arch} (mlp_norm {mlp_norm!r}) has "
                             "BatchNorm inside the backbone, whose statistics span the whole batch: chunks would "
                             "change them. Set memory.backbone_chunk 0 for this backbone")
        if arch in RESNET_ARCHS:  # official MoCo_ResNet: 2-layer projector, predictor without a last BN
            self.base_encoder.fc = build_mlp(2, self.base_encoder.embed_dim, mlp_dim, dim)
            self.predictor = build_mlp(2, dim, mlp_dim, dim, last_bn=False)
        else:
            self.base_encoder.head = projector(self.base_encoder.embed_dim, mlp_dim, dim)
            self.predictor = predictor(dim, mlp_dim)
        self.momentum_encoder = copy.deepcopy(self.base_encoder)
        for p in self.momentum_encoder.parameters():
            p.requires_grad_(False)
        self.momentum_state: MomentumState | None = None

    @classmethod
    def from_config(cls, model_cfg, moco_cfg, memory_cfg=None) -> "MoCo":
        return cls(model_cfg.arch, img_size=model_cfg.img_size, dim=moco_cfg.dim, mlp_dim=moco_cfg.mlp_dim,
                   tau=moco_cfg.tau, frozen_patch_embed=model_cfg.frozen_patch_embed,
                   grad_checkpointing=model_cfg.grad_checkpointing, patch_size=model_cfg.patch_size,
                   num_heads=model_cfg.num_heads, mlp_norm=model_cfg.mlp_norm,
                   backbone_chunk=memory_cfg.backbone_chunk if memory_cfg is not None else 0)

    # The Trainer's, evaluation's and export's names for the two backbones (fastmoco/methods.py).
    @property
    def online_backbone(self) -> nn.Module:
        return self.base_encoder

    @property
    def momentum_backbone(self) -> nn.Module:
        return self.momentum_encoder

    def build_momentum_state(self, optimizer=None, rank: int = 0) -> MomentumState:
        """(Re)build the EMA state over the parameters' current storage. A wrapper that casts the
        module (DeepSpeed bf16) or re-points parameters (ZeRO) calls this afterwards, with its
        optimizer: under bf16 the EMA blends that optimizer's fp32 master weights."""
        self.momentum_state = MomentumState(list(self.momentum_encoder.parameters()),
                                            list(self.base_encoder.parameters()), optimizer, rank)
        return self.momentum_state

    @torch.no_grad()
    def update_momentum_encoder(self, m: torch.Tensor) -> None:
        """momentum <- m * momentum + (1 - m) * online over all parameters, in one multi-tensor op.
        `m`: [m, 1 - m], a (2,) fp32 tensor on the parameters' device (no host sync)."""
        if self.momentum_state is None:
            self.build_momentum_state()
        self.momentum_state.update(m)

    def _backbone(self, encoder: nn.Module, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        if self.per_view_backbone:
            return torch.cat([encoder(x1, head=False), encoder(x2, head=False)])
        # (2N, C); with memory.backbone_chunk, that many images per call (the momentum encoder's under
        # no_grad simply in turn; the online one's recomputed per chunk in the backward)
        return chunked_backbone(lambda x: encoder(x, head=False), encoder, [torch.cat([x1, x2])],
                                self.backbone_chunk)[0]

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, m: torch.Tensor | None = None) -> torch.Tensor:
        """x1, x2: (N, 3, H, W) the two views of the same N images. Returns the scalar loss.
        With `m` given, the momentum encoder is updated first (the official order)."""
        n = x1.shape[0]
        feats = self._backbone(self.base_encoder, x1, x2)
        head = self.base_encoder.head
        q1 = self.predictor(head(feats[:n]))  # BN statistics per view, as the official code
        q2 = self.predictor(head(feats[n:]))
        with torch.no_grad():
            if m is not None:
                self.update_momentum_encoder(m)
            feats_k = self._backbone(self.momentum_encoder, x1, x2)
            k1 = concat_all_gather(self.momentum_encoder.head(feats_k[:n]))
            k2 = concat_all_gather(self.momentum_encoder.head(feats_k[n:]))
        return ops.symmetric_contrastive_loss(q1, q2, k1, k2, self.tau, n * get_rank())
