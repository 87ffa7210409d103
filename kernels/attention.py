"""Fused multi-head attention (FlashAttention-2 style) for ViTs.

Reference: `attention_ref` below (unfused matmul -> softmax -> matmul).
"""
import torch


def attention_ref(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Unfused attention straight from the qkv projection's output.

    qkv: (B, N, 3 * H * D), laid out as (B, N, 3, H, D) like timm's Attention.
    Returns (B, N, H * D), the layout the output projection reads.
    Computes in the input dtype with an fp32 softmax.
    """
    B, N, C3 = qkv.shape
    D = C3 // (3 * num_heads)
    q, k, v = qkv.view(B, N, 3, num_heads, D).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, D) each
    scores = (q * D ** -0.5) @ k.transpose(-2, -1)  # (B, H, N, N)
    p = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
    return (p @ v).transpose(1, 2).reshape(B, N, num_heads * D)
