"""The optimizers a run can use (config `optim.name`): AdamW (the ViT recipes of MoCo v3 and DINO) and
LARS (MoCo v3's ResNet-50 recipe), both client optimizers that DeepSpeed wraps (no C++ op to build).

    optimizer = build_optimizer(cfg.optim, groups, lr=lrs[0], use_cuda=..., zero_stage=...)

LARS follows the official moco/optimizer.py: a parameter of ndim > 1 takes weight decay and the
per-tensor trust ratio, biases and BatchNorm parameters (ndim 1) neither; SGD momentum on an fp32
buffer. Its step is `fastmoco.ops.lars_`: the fused Triton kernels (three launches per group, whatever
the number of parameters) on CUDA, the official per-parameter loop otherwise.

LARS and ZeRO: the trust ratio needs each parameter's whole norm. ZeRO-1/2 step the client optimizer
once per group on this rank's slice of the group's flat fp32 buffer, where parameter boundaries and ndim
are gone. `LARS.locate_partitions(wrapper)` (the Trainer calls it after deepspeed.initialize) records
where each parameter lies in that slice (its offset in the flat buffer, as fastmoco/momentum.py locates
the EMA's master); a step on a slice is then one LARS step over the parameters' pieces
(`kernels/lars.py` `Pieces`): per-parameter partial sums of squares, one all-reduce of a (2, parameters)
fp32 table over the data-parallel group, the update on the slice (the alignment padding untouched).
ZeRO-3 (a shard of every parameter, the same rule would need its own layout) is refused at build time;
a flat buffer that was not located (DeepSpeed's BF16_Optimizer) is refused at the first step.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from fastmoco import ops
from fastmoco.config import ConfigError
from fastmoco.kernels.lars import Pieces
from fastmoco.momentum import offset_in

OPTIMIZERS = ("adamw", "lars")


class LARS(torch.optim.Optimizer):
    """LARS with MoCo v3's exclusions (no weight decay, no adaptation for ndim <= 1). State per parameter:
    `mu`, the fp32 momentum buffer. Group keys: lr, weight_decay, momentum, trust_coefficient."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        for name, value in (("lr", lr), ("weight_decay", weight_decay), ("momentum", momentum),
                            ("trust_coefficient", trust_coefficient)):
            if value < 0:
                raise ValueError(f"LARS {name} must be >= 0, got {value}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))
        # What each group held when built: a wrapper that swaps in flat partitions it did not let
        # `locate_partitions` see is caught at the first step.
        self._shapes = [[tuple(p.shape) for p in g["params"]] for g in self.param_groups]
        # id(flat fp32 partition) -> (its parameters' pieces as (start, length) in it, Pieces without tensors)
        self._partitions: dict[int, tuple[list[tuple[int, int]], Pieces]] = {}

    def locate_partitions(self, wrapper) -> None:
        """After deepspeed.initialize: under ZeRO-1/2 (`wrapper` holds `single_partition_of_fp32_groups`)
        record where each parameter of each group lies in this rank's fp32 partition; otherwise nothing."""
        if not hasattr(wrapper, "single_partition_of_fp32_groups"):
            return
        for i, (flat16, part32, group) in enumerate(zip(wrapper.bit16_groups_flat,
                                                        wrapper.single_partition_of_fp32_groups,
                                                        wrapper.bit16_groups)):
            pg = wrapper.real_dp_process_group[i]
            size = part32.numel()
            lo = dist.get_rank(group=pg) * size  # this rank's slice [lo, lo + size) of the flat buffer
            spans, owner = [], []
            for n, p in enumerate(group):
                off = offset_in(p.data, flat16, f"parameter {n} {tuple(p.shape)}")
                a, b = max(off, lo), min(off + p.numel(), lo + size)
                if a < b:
                    spans.append((a - lo, b - a))
                    owner.append(n)
            adapted = tuple(p.ndim > 1 for p in group)
            sums = torch.zeros(2, len(group), dtype=torch.float32, device=part32.device)

            def all_reduce(t: torch.Tensor, pg=pg) -> None:
                dist.all_reduce(t, group=pg)

            self._partitions[id(part32)] = (spans, Pieces(tuple(owner), adapted, sums, all_reduce))

    def _check_whole_tensors(self) -> None:
        shapes = [[tuple(p.shape) for p in g["params"]] for g in self.param_groups]
        if shapes != self._shapes:
            got = [s for g in shapes for s in g][:3]
            raise ValueError(f"LARS is stepped on tensors of shapes {got}..., not the {sum(map(len, self._shapes))} "
                             "parameters it was built with: a flat-partition wrapper hides the per-parameter "
                             "norms the trust ratio needs; under ZeRO-1/2 call LARS.locate_partitions(wrapper) "
                             "after deepspeed.initialize; other wrappers (ZeRO-3, DeepSpeed's BF16_Optimizer) "
                             "are not supported: use deepspeed.zero_optimization.stage 0, 1 or 2")
        self._shapes = None  # checked once

    def _mu(self, p: torch.Tensor) -> torch.Tensor:
        state = self.state[p]
        if "mu" not in state:  # first step only
            state["mu"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
        return state["mu"]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        hp = ("lr", "weight_decay", "momentum", "trust_coefficient")
        for g in self.param_groups:
            located = self._partitions.get(id(g["params"][0])) if len(g["params"]) == 1 else None
            if located is not None:  # ZeRO-1/2: this rank's slice of the group's flat buffer
                part, (spans, pieces) = g["params"][0], located
                grad, mu = part.grad, self._mu(part)
                ops.lars_([part[a:a + n] for a, n in spans], [grad[a:a + n] for a, n in spans],
                          [mu[a:a + n] for a, n in spans], pieces=pieces, **{k: g[k] for k in hp})
                continue
            if self._shapes is not None:
                self._check_whole_tensors()
            params = [p for p in g["params"] if p.grad is not None]
            if params:
                ops.lars_(params, [p.grad for p in params], [self._mu(p) for p in params],
                          **{k: g[k] for k in hp})
        return loss


def build_optimizer(optim_cfg, groups: list[dict], *, lr: float, use_cuda: bool,
                    zero_stage: int) -> torch.optim.Optimizer:
    """The run's optimizer over the method's parameter groups (fastmoco/methods.py)."""
    o = optim_cfg
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                                 fused=use_cuda)
    if o.name == "lars":
        if zero_stage > 2:
            raise ConfigError(f"optim.name lars needs deepspeed.zero_optimization.stage 0, 1 or 2, got "
                              f"{zero_stage}: ZeRO-3 shards every parameter, and LARS locates its per-parameter "
                              "norms in ZeRO-1/2's flat partitions only")
        return LARS(groups, lr=lr, weight_decay=o.weight_decay, momentum=o.momentum,
                    trust_coefficient=o.trust_coefficient)
    raise ConfigError(f"optim.name {o.name!r} unknown (known: {', '.join(OPTIMIZERS)})")
