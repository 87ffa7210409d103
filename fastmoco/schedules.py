"""Per-iteration schedules, precomputed (DINO's practice): deterministic and trivially resumable.

lr_t: linear warmup from 0 to base_lr * global_batch / 256, then half-cosine to 0;
m_t  = 1 - (1 - m0) * (1 + cos(pi * t / T)) / 2. Weight decay is constant: the optimizer's own.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def warmup_cosine(peak: float, total_steps: int, warmup_steps: int) -> torch.Tensor:
    t = torch.arange(total_steps, dtype=torch.float64)
    warm = peak * t / max(warmup_steps, 1)
    frac = (t - warmup_steps) / max(total_steps - warmup_steps, 1)
    cos = peak * 0.5 * (1.0 + torch.cos(math.pi * frac))
    return torch.where(t < warmup_steps, warm, cos)


def momentum_cosine(m0: float, total_steps: int) -> torch.Tensor:
    t = torch.arange(total_steps, dtype=torch.float64)
    return 1.0 - (1.0 - m0) * 0.5 * (1.0 + torch.cos(math.pi * t / total_steps))


@dataclass
class Schedules:
    lr: torch.Tensor        # (T,) float64, host
    momentum: torch.Tensor  # (T,) float64, host

    @property
    def total_steps(self) -> int:
        return len(self.lr)


def build_schedules(*, base_lr: float, global_batch: int, epochs: int, warmup_epochs: float,
                    steps_per_epoch: int, m0: float, cosine_momentum: bool = True) -> Schedules:
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch} "
                         "(is the dataset smaller than one global batch?)")
    total = epochs * steps_per_epoch
    peak = base_lr * global_batch / 256
    lr = warmup_cosine(peak, total, round(warmup_epochs * steps_per_epoch))
    mom = momentum_cosine(m0, total) if cosine_momentum else torch.full((total,), m0, dtype=torch.float64)
    return Schedules(lr=lr, momentum=mom)
