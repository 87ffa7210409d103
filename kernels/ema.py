"""Momentum-encoder update (EMA): momentum <- m * momentum + (1 - m) * online.

References: `ema_ref_` (the official per-parameter loop) and `ema_foreach_`
(multi-tensor, the CPU path).
"""
import torch


def ema_ref_(momentum: list[torch.Tensor], online: list[torch.Tensor], m) -> None:
    """Per-parameter loop, as the official MoCo v3 code does it. `m`: float or 0-dim tensor."""
    for pk, pq in zip(momentum, online):
        pk.mul_(m).add_(pq.to(pk.dtype) * (1 - m))


@torch.no_grad()
def ema_foreach_(momentum: list[torch.Tensor], online: list[torch.Tensor], m: torch.Tensor) -> None:
    """Multi-tensor EMA; `m` a 0-dim tensor on the params' device (no host sync)."""
    if online and online[0].dtype != momentum[0].dtype:
        online = [p.to(momentum[0].dtype) for p in online]
    torch._foreach_mul_(momentum, m)
    torch._foreach_add_(momentum, torch._foreach_mul(online, 1 - m))
