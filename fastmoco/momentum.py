"""The momentum encoder's fp32 EMA state, in every precision and ZeRO stage.

    master <- m * master + (1 - m) * online;  copy <- bf16(master)   (one fused op on the GPU)

- fp32 module (CPU, tests): the momentum encoder's own parameters are the master.
- bf16 module (DeepSpeed bf16 casts the whole module): a separate fp32 master,
  kept outside the module so no cast reaches it; the kernel writes the bf16
  copy that the momentum encoder's forward reads in the same pass.
- ZeRO-3: every tensor above is the rank's own shard (`param.ds_tensor`); both
  encoders have the same shapes, so their shards cover the same element ranges
  and the EMA needs no communication.
"""
from __future__ import annotations

import torch

from fastmoco import ops


def local_data(p: torch.Tensor) -> torch.Tensor:
    """The data this rank holds of parameter p: its ZeRO-3 shard, else the whole tensor."""
    return p.ds_tensor.data if hasattr(p, "ds_tensor") else p.data


def shard_of(full: torch.Tensor, p: torch.Tensor, rank: int) -> torch.Tensor:
    """Rank's slice of `full` laid out as p's ZeRO-3 shard (flat, ceil(numel/world), zero padded)."""
    part = p.ds_tensor.numel()
    flat = full.reshape(-1)
    start = min(rank * part, flat.numel())
    end = min(start + part, flat.numel())
    out = torch.zeros(part, dtype=torch.float32, device=p.ds_tensor.device)
    out[: end - start] = flat[start:end]
    return out


class MomentumState:
    def __init__(self, momentum_params: list[torch.Tensor], online_params: list[torch.Tensor],
                 fp32_values: list[torch.Tensor] | None = None, rank: int = 0):
        """`fp32_values`: the momentum weights in fp32 taken before the module was cast
        (None when the module stays fp32: its parameters are then the master)."""
        if len(momentum_params) != len(online_params):
            raise ValueError("momentum and online encoders differ in parameter count")
        self.online = [local_data(p) for p in online_params]
        local = [local_data(p) for p in momentum_params]
        if all(t.dtype == torch.float32 for t in local):
            self.master, self.copy = local, None
        else:
            if fp32_values is None:
                raise ValueError("the momentum encoder is not fp32: pass its fp32 values taken before the cast")
            sharded = hasattr(momentum_params[0], "ds_tensor")
            self.master = [shard_of(v, p, rank) if sharded else v.detach().float().clone().to(t.device)
                           for v, p, t in zip(fp32_values, momentum_params, local)]
            self.copy = local
            torch._foreach_copy_(self.copy, self.master)

    @torch.no_grad()
    def update(self, m: torch.Tensor) -> None:
        """`m`: 0-dim fp32 tensor on the device (no host sync)."""
        ops.ema_update_(self.master, self.online, m, self.copy)

    def state_dict(self) -> dict:
        return {"master": [t.detach().cpu() for t in self.master]}

    def load_state_dict(self, sd: dict) -> None:
        saved = sd["master"]
        if len(saved) != len(self.master):
            raise ValueError(f"momentum state has {len(saved)} tensors, the model {len(self.master)}")
        for dst, src in zip(self.master, saved):
            if dst.shape != src.shape:
                raise ValueError(f"momentum state tensor of shape {tuple(src.shape)} where the model has "
                                 f"{tuple(dst.shape)} (different model or ZeRO world size?)")
            dst.copy_(src)
        if self.copy is not None:
            torch._foreach_copy_(self.copy, self.master)
