"""The optimizers a run can use (config `optim.name`): AdamW (the ViT recipes of MoCo v3 and DINO) and
LARS (MoCo v3's ResNet-50 recipe), both client optimizers that DeepSpeed wraps (no C++ op to build).

    optimizer = build_optimizer(cfg.optim, groups, lr=lrs[0], use_cuda=..., zero_stage=...)

LARS follows the official moco/optimizer.py: a parameter of ndim > 1 takes weight decay and the
per-tensor trust ratio, biases and BatchNorm parameters (ndim 1) neither; SGD momentum on an fp32
buffer. Its step is `fastmoco.ops.lars_`: the fused Triton kernels (three launches per group, whatever
the number of parameters) on CUDA, the official per-parameter loop otherwise.

LARS and ZeRO: the trust ratio needs each parameter's whole norm. Under ZeRO-1/2/3 (and DeepSpeed's flat
BF16_Optimizer) the client optimizer is stepped on flat fp32 partitions, where parameter boundaries and
ndim are gone; rather than adapting wrong, LARS refuses them: ZeRO-0 only (fp32, or bf16 with DeepSpeed's
per-parameter fp32 master). R50's 25M parameters need no optimizer sharding.
"""
from __future__ import annotations

import torch

from fastmoco import ops
from fastmoco.config import ConfigError

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
        # What each group held when built: a wrapper that swaps in flat partitions is caught at the first step.
        self._shapes = [[tuple(p.shape) for p in g["params"]] for g in self.param_groups]

    def _check_whole_tensors(self) -> None:
        shapes = [[tuple(p.shape) for p in g["params"]] for g in self.param_groups]
        if shapes != self._shapes:
            got = [s for g in shapes for s in g][:3]
            raise ValueError(f"LARS is stepped on tensors of shapes {got}..., not the {sum(map(len, self._shapes))} "
                             "parameters it was built with: a flat-partition wrapper (ZeRO stage 1-3, or "
                             "DeepSpeed's BF16_Optimizer) hides the per-parameter norms the trust ratio needs; "
                             "use deepspeed.zero_optimization.stage 0")
        self._shapes = None  # checked once

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._shapes is not None:
            self._check_whole_tensors()
        for g in self.param_groups:
            params = [p for p in g["params"] if p.grad is not None]
            if not params:
                continue
            mus = []
            for p in params:
                state = self.state[p]
                if "mu" not in state:  # first step only
                    state["mu"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
                mus.append(state["mu"])
            ops.lars_(params, [p.grad for p in params], mus, lr=g["lr"], weight_decay=g["weight_decay"],
                      momentum=g["momentum"], trust_coefficient=g["trust_coefficient"])
        return loss


def build_optimizer(optim_cfg, groups: list[dict], *, lr: float, use_cuda: bool,
                    zero_stage: int) -> torch.optim.Optimizer:
    """The run's optimizer over the method's parameter groups (fastmoco/methods.py)."""
    o = optim_cfg
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                                 fused=use_cuda)
    if o.name == "lars":
        if zero_stage:
            raise ConfigError(f"optim.name lars needs deepspeed.zero_optimization.stage 0, got {zero_stage}: "
                              "ZeRO steps the optimizer on flat partitions, where LARS's per-parameter trust "
                              "ratio cannot be computed")
        return LARS(groups, lr=lr, weight_decay=o.weight_decay, momentum=o.momentum,
                    trust_coefficient=o.trust_coefficient)
    raise ConfigError(f"optim.name {o.name!r} unknown (known: {', '.join(OPTIMIZERS)})")
