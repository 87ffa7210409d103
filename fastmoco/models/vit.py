"""Vision Transformer as MoCo v3 builds it (fixed 2-D sin-cos positions, MoCo init), or as DINO does.

Parameter names follow timm's `VisionTransformer`, so a backbone state dict
loads into `timm.create_model("vit_base_patch16_224", num_classes=0)` as is
(ViT-S: pass `num_heads=12`, MoCo v3's choice; timm's ViT-S has 6).

Two recipes (`recipe=`):
- "moco": MoCo v3's vits.py: fixed sin-cos position embedding (a buffer),
  xavier-uniform weights (q, k, v as three matrices), frozen random patch
  projection where asked.
- "dino": DINO's vision_transformer.py: learned position embedding and class
  token (truncated normal, std 0.02), truncated-normal Linear weights, drop
  path (stochastic depth, linearly increasing over the blocks up to
  `drop_path`), any head count / patch size (`num_heads`, `patch_size`).
Both run at any resolution that the patch size divides: the sin-cos table is
recomputed for the grid, a learned one resampled bicubically as DINO's
interpolate_pos_encoding does (scale factor (grid + 0.1) / own grid; DINO's multi-crop:
96-px local crops through a model built for 224).

Every block calls attention and LayerNorm through `fastmoco.ops`, which
picks the Triton kernels or the PyTorch reference. The residual stream is
carried as (x, branch) between sub-blocks so that "h = x + branch; y = LN(h)"
is one fused op on the GPU.

The MoCo v3 paper's other backbones:
- ViT-BN (`mlp_norm="bn"`): "BatchNorm instead of LayerNorm in the MLP blocks"
  (the paper's ViT-BN-L 78.6, ViT-BN-H 79.1, ViT-BN-L/7 81.0). The official code
  releases no ViT-BN, so this is our reading of the paper: in every block the
  norm before the MLP (`norm2`) is a BatchNorm over all tokens of the global
  batch ((B, N, C) -> statistics over B*N*world per channel, SyncBN semantics
  as in the official heads; `TokenBatchNorm`); the norm before attention
  (`norm1`) and the final `norm` stay LayerNorm. timm has no equivalent; the
  names are timm's (`blocks.i.norm2.weight/bias`) plus BatchNorm's buffers
  (`running_mean`, `running_var`, `num_batches_tracked`). That block does a
  plain add then BN where the LayerNorm path fuses add + LN. Under activation
  checkpointing the recomputed forward updates the running statistics a second
  time (with the same batch statistics), as with torch's SyncBatchNorm.
- Conv stem (`vit_conv_small`, `vit_conv_base`, the official vits.py's
  ConvStem after Xiao et al. 2021): four 3x3 stride-2 convs (no bias) with
  BatchNorm (global batch, as the official code's SyncBN) and ReLU, channels
  embed_dim/8, /4, /2, 1x, then a 1x1 conv (with bias) to embed_dim: patch 16,
  one block fewer (11). Names are the official ones (`patch_embed.proj.0` ...
  `patch_embed.proj.12`); timm has no equivalent. The stem keeps PyTorch's
  default init and always trains (the official code freezes only a linear
  patch projection), so `frozen_patch_embed` must be off for it.
- Patch 7 (`patch_size=7`, e.g. ViT-BN-L/7): 224 px = 32 x 32 patches, 1025
  tokens; attention at that length is the measured faster of the kernel and
  SDPA (`fastmoco.ops.attention`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fastmoco import ops
from fastmoco.models.heads import GlobalBatchNorm1d, GlobalBatchNorm2d

LN_EPS = 1e-6
RECIPES = ("moco", "dino")
MLP_NORMS = ("ln", "bn")     # the norm before each block's MLP: LayerNorm (ViT) or BatchNorm (ViT-BN)
STEMS = ("patch", "conv")    # one linear patch projection, or MoCo v3's conv stem
CONV_STEM_LAYERS = 4         # 3x3 stride-2 convs: patch 2**4 = 16


@dataclass(frozen=True)
class ViTSize:
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    timm_name: str  # the timm model whose state dict layout matches ("": none, the conv stem)
    stem: str = "patch"


# MoCo v3 (vits.py of the official code): ViT-S uses 12 heads, not timm's 6 (DINO's ViT-S: num_heads=6).
VIT_SIZES = {
    "vit_test": ViTSize(8, 72, 2, 3, "vit_tiny_patch16_224"),  # CPU tests: head dim 24, width 72
    "vit_tiny": ViTSize(16, 192, 12, 3, "vit_tiny_patch16_224"),
    "vit_small": ViTSize(16, 384, 12, 12, "vit_small_patch16_224"),
    "vit_base": ViTSize(16, 768, 12, 12, "vit_base_patch16_224"),
    "vit_large": ViTSize(16, 1024, 24, 16, "vit_large_patch16_224"),
    "vit_huge": ViTSize(14, 1280, 32, 16, "vit_huge_patch14_224"),
    # the official vits.py's conv-stem ViTs: one block fewer than ViT-S / ViT-B
    "vit_conv_test": ViTSize(16, 72, 1, 3, "", "conv"),  # CPU tests
    "vit_conv_small": ViTSize(16, 384, 11, 12, "", "conv"),
    "vit_conv_base": ViTSize(16, 768, 11, 12, "", "conv"),
}


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters and state dict) routed through `ops`.

    norm(x) -> LN(x);  norm(x, branch) -> (h, LN(h)) with h = x + branch, one fused op.
    Always called as a module, so hooks (ZeRO-3's parameter gathering) see it.
    """

    def forward(self, x, branch=None):
        if branch is None:
            return ops.layernorm(x, self.weight, self.bias, self.eps)
        return ops.add_layernorm(x, branch, self.weight, self.bias, self.eps)


class TokenBatchNorm(GlobalBatchNorm1d):
    """ViT-BN's norm before the MLP: BatchNorm of (B, N, C) tokens over all B*N tokens of every rank.
    Called like `LayerNorm`: norm(x) -> BN(x); norm(x, branch) -> (h, BN(h)) with h = x + branch."""

    def forward(self, x, branch=None):
        if branch is not None:
            x = x + branch
            return x, self.forward(x)
        return super().forward(x.reshape(-1, x.shape[-1])).view(x.shape)


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, embed_dim: int):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):  # (B, 3, H, W) -> (B, P, C)
        # The stride-p convolution as one matmul over the patches (the conv's own weights, so the
        # names and checkpoints are timm's): cuDNN ran this conv at ~1/25 of the matmul rate on an
        # H200 (8 ms of a 215 ms ViT-B/16 step, bench/RESULTS.md 2026-12-04). Like the conv, a
        # remainder of fewer than p pixels at the bottom or right is dropped.
        B, C, H, W = x.shape
        p = self.patch_size
        gh, gw = H // p, W // p
        patches = x[:, :, :gh * p, :gw * p].reshape(B, C, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5)
        weight = self.proj.weight.reshape(self.proj.out_channels, C * p * p)
        return F.linear(patches.reshape(B, gh * gw, C * p * p), weight, self.proj.bias)


class ConvStem(PatchEmbed):
    """MoCo v3's conv stem (see the module docstring): `proj` is the official nn.Sequential, so its
    indices (conv 0, 3, 6, 9; BN 1, 4, 7, 10; the 1x1 conv 12) are the official names."""

    def __init__(self, img_size: int, patch_size: int, embed_dim: int):
        nn.Module.__init__(self)
        if patch_size != 2 ** CONV_STEM_LAYERS:
            raise ValueError(f"the conv stem has patch size {2 ** CONV_STEM_LAYERS}, got patch_size {patch_size}")
        if embed_dim % 8:
            raise ValueError(f"the conv stem needs embed_dim divisible by 8, got {embed_dim}")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        layers: list[nn.Module] = []
        c_in, c_out = 3, embed_dim // 8
        for _ in range(CONV_STEM_LAYERS):
            layers += [nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1, bias=False),
                       GlobalBatchNorm2d(c_out), nn.ReLU(inplace=True)]
            c_in, c_out = c_out, c_out * 2
        layers.append(nn.Conv2d(c_in, embed_dim, kernel_size=1))
        self.proj = nn.Sequential(*layers)

    def forward(self, x):  # (B, 3, H, W) -> (B, P, C)
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, probs: list | None = None):  # (B, N, C)
        """`probs` (a list): run the reference path and append its probabilities (B, H, N, N) fp32."""
        qkv = self.qkv(x)
        if probs is None:
            return self.proj(ops.attention(qkv, self.num_heads))
        out, p = ops.attention_with_probs(qkv, self.num_heads)
        probs.append(p)
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: each sample's residual branch dropped with probability p, kept ones / (1 - p)."""
    if p == 0.0 or not training:
        return x
    keep = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device, dtype=x.dtype).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


class Block(nn.Module):
    """Pre-norm transformer block. Takes and returns the residual stream as
    (x, branch): the stream is x + branch, with branch None for a plain x."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 mlp_norm: str = "ln"):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads)
        self.norm2 = LayerNorm(dim, eps=LN_EPS) if mlp_norm == "ln" else TokenBatchNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def forward(self, x, branch=None, probs: list | None = None):
        """`probs`: see `Attention.forward` (the attention maps of this block)."""
        if branch is None:
            h = self.norm1(x)
        else:
            x, h = self.norm1(x, branch)
        x, h = self.norm2(x, drop_path(self.attn(h, probs), self.drop_path, self.training))
        return x, drop_path(self.mlp(h), self.drop_path, self.training)


# DINO adds 0.1 to the target grid before forming the interpolation's scale factor ("to avoid floating
# point error", facebookresearch/dino issue 8): the scale, not only the size, is what it resamples with.
DINO_SCALE_OFFSET = 0.1


def sincos_pos_embed_2d(grid_h: int, grid_w: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """MoCo v3's fixed position embedding, (1, 1 + grid_h * grid_w, dim); the class token's is zero.

    Per patch (i along the first grid axis, j along the second):
    [sin(i w), cos(i w), sin(j w), cos(j w)] with w = temperature^(-k / (dim/4)).
    """
    if dim % 4:
        raise ValueError(f"embed_dim {dim} must be divisible by 4 for the 2-D sin-cos embedding")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    ii, jj = torch.meshgrid(torch.arange(grid_w, dtype=torch.float64),
                            torch.arange(grid_h, dtype=torch.float64), indexing="ij")
    a = ii.flatten()[:, None] * omega[None]  # (P, dim/4)
    b = jj.flatten()[:, None] * omega[None]
    pe = torch.cat([a.sin(), a.cos(), b.sin(), b.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), pe]).float()[None]


class VisionTransformer(nn.Module):
    """ViT backbone returning the final-norm class token, (B, embed_dim).

    `head` is Identity here; MoCo replaces it by the projector, as the official code does.
    """

    def __init__(self, arch: str = "vit_small", img_size: int = 224, frozen_patch_embed: bool = True,
                 grad_checkpointing: bool = False, *, recipe: str = "moco", num_heads: int = 0,
                 patch_size: int = 0, drop_path: float = 0.0, mlp_norm: str = "ln"):
        super().__init__()
        if arch not in VIT_SIZES:
            raise ValueError(f"model.arch {arch!r} unknown (known: {', '.join(VIT_SIZES)})")
        if recipe not in RECIPES:
            raise ValueError(f"ViT recipe {recipe!r} unknown (known: {', '.join(RECIPES)})")
        if mlp_norm not in MLP_NORMS:
            raise ValueError(f"model.mlp_norm {mlp_norm!r} unknown (known: {', '.join(MLP_NORMS)})")
        size = VIT_SIZES[arch]
        size = ViTSize(patch_size or size.patch_size, size.embed_dim, size.depth, num_heads or size.num_heads,
                       size.timm_name, size.stem)
        if size.embed_dim % size.num_heads:
            raise ValueError(f"num_heads {size.num_heads} does not divide embed_dim {size.embed_dim} of {arch}")
        if size.stem == "conv" and frozen_patch_embed:
            raise ValueError(f"model.frozen_patch_embed freezes a linear patch projection; {arch} has a conv stem, "
                             "which trains (as the official code): set model.frozen_patch_embed false")
        self.arch, self.size, self.recipe, self.mlp_norm = arch, size, recipe, mlp_norm
        self.embed_dim = size.embed_dim
        self.grad_checkpointing = grad_checkpointing
        stem = ConvStem if size.stem == "conv" else PatchEmbed
        self.patch_embed = stem(img_size, size.patch_size, size.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, size.embed_dim))
        table = sincos_pos_embed_2d(*self.patch_embed.grid_size, size.embed_dim)
        if recipe == "moco":  # fixed, never trained: a buffer (still named pos_embed, as timm's)
            self.register_buffer("pos_embed", table)
        else:
            self.pos_embed = nn.Parameter(torch.zeros_like(table))
        rates = [drop_path * i / max(size.depth - 1, 1) for i in range(size.depth)]  # DINO: linspace(0, p)
        self.blocks = nn.ModuleList(Block(size.embed_dim, size.num_heads, drop_path=r, mlp_norm=mlp_norm)
                                    for r in rates)
        self.norm = LayerNorm(size.embed_dim, eps=LN_EPS)
        self.head = nn.Identity()
        self._init_moco() if recipe == "moco" else self._init_dino()
        if frozen_patch_embed:
            self.patch_embed.proj.weight.requires_grad_(False)
            self.patch_embed.proj.bias.requires_grad_(False)

    @torch.no_grad()
    def _init_dino(self):
        """DINO's init: truncated normal (std 0.02) for Linear weights, the position embedding and the
        class token; zero biases; LayerNorm 1/0; the patch projection keeps PyTorch's default."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    @torch.no_grad()
    def _init_moco(self):
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                if name.endswith("qkv"):
                    # q, k and v as three separate (dim x dim) matrices for xavier-uniform
                    bound = math.sqrt(6.0 / (m.weight.shape[0] // 3 + m.weight.shape[1]))
                    nn.init.uniform_(m.weight, -bound, bound)
                else:
                    nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.cls_token, std=1e-6)
        if isinstance(self.patch_embed, ConvStem):  # the official code leaves the stem at PyTorch's init
            return
        proj = self.patch_embed.proj
        fan_in = proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1]
        bound = math.sqrt(6.0 / (fan_in + self.embed_dim))
        nn.init.uniform_(proj.weight, -bound, bound)
        nn.init.zeros_(proj.bias)

    def pos_embed_for(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """(1, 1 + grid_h * grid_w, C) position embedding for a grid: the model's own at its size; else
        the sin-cos table of that grid (moco), or the learned one resampled bicubically (dino)."""
        if (grid_h, grid_w) == self.patch_embed.grid_size:
            return self.pos_embed
        if self.recipe == "moco":
            return sincos_pos_embed_2d(grid_h, grid_w, self.embed_dim).to(self.pos_embed)
        gh, gw = self.patch_embed.grid_size
        patches = self.pos_embed[:, 1:].reshape(1, gh, gw, -1).permute(0, 3, 1, 2)        # (1, C, gh, gw)
        # DINO's interpolate_pos_encoding: a scale factor of (target + 0.1) / source, not a target size.
        # The output has floor(source * scale) = target rows and columns, but the source coordinate of
        # output pixel i is (i + 0.5) / scale - 0.5, with this scale (size= would use source / target):
        # a different table (3.6-28% relative at 96 px from 224).
        scale = ((grid_h + DINO_SCALE_OFFSET) / gh, (grid_w + DINO_SCALE_OFFSET) / gw)
        patches = F.interpolate(patches.float(), scale_factor=scale, mode="bicubic", align_corners=False)
        if patches.shape[-2:] != (grid_h, grid_w):
            raise RuntimeError(f"position embedding resampled to {tuple(patches.shape[-2:])}, expected "
                               f"{(grid_h, grid_w)} (grid {gh}x{gw}, scale {scale})")
        patches = patches.to(self.pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
        return torch.cat([self.pos_embed[:, :1], patches], dim=1)

    def forward_features(self, x, last_attention: bool = False):  # (B, 3, H, W) -> (B, C)
        p = self.size.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"input of {x.shape[-2]}x{x.shape[-1]} pixels is not a multiple of patch size {p}")
        pos = self.pos_embed_for(x.shape[-2] // p, x.shape[-1] // p)
        x = self.patch_embed(x) + pos[:, 1:].to(x.dtype)
        cls = (self.cls_token + pos[:, :1]).to(x.dtype).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)  # (B, 1 + P, C)
        branch = None
        for i, blk in enumerate(self.blocks):
            if last_attention and i == len(self.blocks) - 1:
                probs = []
                blk(x, branch, probs)
                return probs[0]
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x, branch = checkpoint(blk, x, branch, use_reentrant=False)
            else:
                x, branch = blk(x, branch)
        _, x = self.norm(x, branch)
        return x[:, 0]

    def forward(self, x, head: bool = True, last_attention: bool = False):
        """(B, 3, H, W) -> the projected class token (`head`), or the final-norm class token (B, C);
        `last_attention`: instead the last block's attention probabilities (B, heads, N, N) fp32 from the
        reference attention path (token 0 the class token, then the patches row by row)."""
        # Called as a module (not forward_features directly) so that hooks on this module,
        # such as ZeRO-3's parameter gathering, see the call.
        x = self.forward_features(x, last_attention)
        if last_attention:
            return x
        return self.head(x) if head else x

    def backbone_state_dict(self) -> dict:
        """State dict in timm's names, without the MoCo head."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("head.")}

