"""Fused MoCo v3 contrastive loss.

Reference: `contrastive_loss_ref` below.
"""
import torch
import torch.nn.functional as F


def contrastive_loss_ref(q: torch.Tensor, k: torch.Tensor, tau: float, offset: int = 0) -> torch.Tensor:
    """CE(normalize(q) @ normalize(k).T / tau, arange(N) + offset) * 2 * tau, computed in fp32.

    q: (N, C) local queries; k: (M, C) keys gathered from all ranks (no gradient).
    """
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.detach().float(), dim=1)
    logits = q @ k.T / tau  # (N, M)
    labels = torch.arange(q.shape[0], device=q.device) + offset
    return F.cross_entropy(logits, labels) * (2 * tau)


def symmetric_contrastive_loss_ref(q1, q2, k1, k2, tau: float, offset: int = 0) -> torch.Tensor:
    """ctr(q1, k2) + ctr(q2, k1): MoCo v3's symmetrized loss."""
    return contrastive_loss_ref(q1, k2, tau, offset) + contrastive_loss_ref(q2, k1, tau, offset)
