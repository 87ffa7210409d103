"""The self-supervised methods the Trainer runs: each says what it builds, how it is optimised and
scheduled, and what one step passes to its module. The Trainer, checkpoints, resume, logging,
evaluation and bench are shared (config key `method`).

    method = METHODS[cfg.method]
    model = method.build(cfg)                                # an nn.Module whose forward(*views, **kw) is the loss
    groups = method.param_groups(model, cfg)                 # optimizer groups (keys: params, apply_wd, ...)
    sched = method.schedules(cfg, steps_per_epoch=..., global_batch=...)
    kwargs = method.step_kwargs(sched, device)               # step -> forward's keyword arguments
    scale = method.lr_scale(group, epoch)                    # a group's lr factor at an epoch

Views come from the loader as the data config's crop specs make them: MoCo v3
uses the two global crops, DINO adds `data.local_crops` local ones. Each
module has `online_backbone` / `momentum_backbone` (MoCo: base / momentum
encoder; DINO: student / teacher), which evaluation and export read, and
`build_momentum_state(optimizer, rank)` for the fp32 EMA.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fastmoco.config import ConfigError
from fastmoco.schedules import build_schedules


@dataclass
class Schedules:
    """Per-iteration values (float64, host), precomputed: deterministic and trivially resumable."""
    lr: torch.Tensor
    momentum: torch.Tensor                 # the EMA momentum of step t
    weight_decay: torch.Tensor | None = None   # None: the optimizer's constant weight decay
    extra: dict = field(default_factory=dict)

    @property
    def total_steps(self) -> int:
        return len(self.lr)


class MoCoV3:
    name = "moco_v3"
    default_encoder = "online"     # MoCo v3 evaluates the base encoder

    def build(self, cfg):
        from fastmoco.moco import MoCo

        return MoCo.from_config(cfg.model, cfg.moco)

    def param_groups(self, model, cfg) -> list[dict]:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "apply_wd": False}]

    def schedules(self, cfg, *, steps_per_epoch: int, global_batch: int) -> Schedules:
        s = build_schedules(base_lr=cfg.optim.base_lr, global_batch=global_batch, epochs=cfg.schedule.epochs,
                            warmup_epochs=cfg.schedule.warmup_epochs, steps_per_epoch=steps_per_epoch,
                            m0=cfg.moco.momentum, cosine_momentum=cfg.moco.momentum_cosine)
        return Schedules(lr=s.lr, momentum=s.momentum)

    def step_kwargs(self, sched: Schedules, device):
        # m_t read on the device by the EMA: indexing with a Python int is a view, not a sync
        m = sched.momentum.to(device, torch.float32)
        return lambda step: {"m": m[step]}

    def lr_scale(self, group: dict, epoch: int) -> float:
        return 1.0


class DINOMethod:
    name = "dino"
    default_encoder = "momentum"   # DINO evaluates the teacher

    def build(self, cfg):
        from fastmoco.dino import DINO

        if cfg.data.local_crops < 1:
            raise ConfigError("method dino: set data.local_crops (DINO's multi-crop: 8 or 10 local crops)")
        return DINO.from_config(cfg.model, cfg.dino)

    def param_groups(self, model, cfg) -> list[dict]:
        from fastmoco.dino import param_groups

        return param_groups(model)

    def schedules(self, cfg, *, steps_per_epoch: int, global_batch: int) -> Schedules:
        from fastmoco.dino import cosine_schedule, teacher_temp_schedule

        d, e = cfg.dino, cfg.schedule.epochs
        if cfg.schedule.warmup_epochs != int(cfg.schedule.warmup_epochs):
            raise ConfigError(f"method dino: schedule.warmup_epochs must be whole epochs, got "
                              f"{cfg.schedule.warmup_epochs}")
        lr = cosine_schedule(cfg.optim.base_lr * global_batch / 256, d.min_lr, e, steps_per_epoch,
                             warmup_epochs=int(cfg.schedule.warmup_epochs))
        wd = cosine_schedule(cfg.optim.weight_decay, d.weight_decay_end, e, steps_per_epoch)
        momentum = cosine_schedule(d.momentum_teacher, 1.0, e, steps_per_epoch)
        temp = teacher_temp_schedule(d.warmup_teacher_temp, d.teacher_temp, d.warmup_teacher_temp_epochs, e,
                                     steps_per_epoch)
        return Schedules(lr=lr, momentum=momentum, weight_decay=wd, extra={"teacher_temp": temp})

    def step_kwargs(self, sched: Schedules, device):
        # The teacher of step t is the EMA after step t - 1 (DINO updates it after the optimizer step):
        # the module updates first, with the previous step's momentum; 1 at step 0 leaves it as is.
        prev = torch.cat([torch.ones(1, dtype=torch.float64), sched.momentum[:-1]]).to(device, torch.float32)
        temps = sched.extra["teacher_temp"].tolist()
        return lambda step: {"m": prev[step], "teacher_temp": temps[step]}

    def lr_scale(self, group: dict, epoch: int) -> float:
        """DINO's freeze_last_layer: the head's last layer holds still in the first epoch(s)."""
        return 0.0 if group.get("last_layer") and epoch < self.freeze_epochs else 1.0

    def __init__(self, freeze_epochs: int = 1):
        self.freeze_epochs = freeze_epochs


METHODS = {"moco_v3": MoCoV3, "dino": DINOMethod}


def get_method(cfg):
    """The method object `cfg.method` names, configured from cfg."""
    if cfg.method not in METHODS:
        raise ConfigError(f"method {cfg.method!r} unknown (known: {', '.join(METHODS)})")
    if cfg.method == "dino":
        return DINOMethod(cfg.dino.freeze_last_layer)
    return MoCoV3()
