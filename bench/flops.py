"""FLOPs of a MoCo v3 training step, counted from layer shapes.

Only matrix products are counted (linear layers, the patch-embedding
convolution, the two attention matmuls); LayerNorm, softmax, GELU, BatchNorm
and adds are left out, as in the usual model-FLOPs convention (PaLM's MFU).
One multiply-accumulate (MAC) is 2 FLOPs. Backward = 2 x forward for a layer
whose weight is trained and whose input needs a gradient; the frozen patch
embedding (MoCo v3's stop-gradient trick) gets no backward at all, since
neither its weight nor its input (the image) needs a gradient.

Hand check, ViT-B/16 at 224 (197 tokens, width 768, MLP 3072, 12 blocks):
    per block  qkv 197*768*2304 + attn 2*197*197*768 + proj 197*768*768 + mlp 2*197*768*3072
    + patch embedding 196*768*768  =  17.56 GMACs per crop.
"""
from __future__ import annotations

from dataclasses import dataclass

from fastmoco.models.vit import VIT_SIZES

MLP_RATIO = 4

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, in TFLOP/s.
# Matched by substring of torch.cuda.get_device_name(), first match wins: the more
# specific names come first. A device matching none gets no MFU (never a guess).
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", None),        # datasheet quotes the pair; left unknown rather than guessed
    ("H100", 989.4),           # SXM5 ("NVIDIA H100 80GB HBM3")
    ("GH200", 989.4),
    ("H200", 989.4),
    ("A100", 312.0),
)


def peak_tflops(device_name: str) -> float | None:
    for key, peak in PEAK_BF16_TFLOPS:
        if key in device_name:
            return peak
    return None


@dataclass(frozen=True)
class EncoderMacs:
    """Forward MACs of one crop through one encoder, split where backward differs."""
    patch_embed: int   # frozen in MoCo v3: forward only
    blocks: int        # transformer blocks (matmuls and attention)
    projector: int     # 3-layer BN-MLP head

    @property
    def total(self) -> int:
        return self.patch_embed + self.blocks + self.projector


def vit_forward_macs(arch: str, img_size: int = 224) -> int:
    """Backbone forward MACs for one image (patch embedding + blocks; no head)."""
    m = vit_encoder_macs(arch, img_size, mlp_dim=0, dim=0)
    return m.patch_embed + m.blocks


def mlp_macs(num_layers: int, in_dim: int, hidden: int, out_dim: int) -> int:
    """MACs of MoCo v3's BN-MLP (bias-free linears) for one sample."""
    dims = [in_dim] + [hidden] * (num_layers - 1) + [out_dim]
    return sum(a * b for a, b in zip(dims[:-1], dims[1:]))


def vit_encoder_macs(arch: str, img_size: int = 224, mlp_dim: int = 4096, dim: int = 256) -> EncoderMacs:
    size = VIT_SIZES[arch]
    c, p = size.embed_dim, size.patch_size
    patches = (img_size // p) ** 2
    n = patches + 1  # + class token
    per_block = (n * c * 3 * c            # qkv projection
                 + 2 * n * n * c          # q @ k^T and p @ v over all heads
                 + n * c * c              # output projection
                 + 2 * n * c * MLP_RATIO * c)  # fc1 + fc2
    projector = mlp_macs(3, c, mlp_dim, dim) if mlp_dim else 0
    return EncoderMacs(patch_embed=patches * 3 * p * p * c, blocks=size.depth * per_block, projector=projector)


def moco_step_flops_per_image(arch: str, img_size: int = 224, mlp_dim: int = 4096, dim: int = 256,
                              frozen_patch_embed: bool = True) -> float:
    """Model FLOPs of one training step per image (two crops):
    base encoder + predictor forward and backward on both crops, momentum encoder forward on both."""
    enc = vit_encoder_macs(arch, img_size, mlp_dim, dim)
    pred = mlp_macs(2, dim, mlp_dim, dim)
    trained = enc.blocks + enc.projector + pred
    patch_fwd_bwd = enc.patch_embed * (1 if frozen_patch_embed else 3)
    base = 3 * trained + patch_fwd_bwd
    momentum = enc.total
    crops = 2
    return 2.0 * crops * (base + momentum)
