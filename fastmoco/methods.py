"""The self-supervised methods the Trainer runs: each says what it builds, how it is optimised and
scheduled, and what one step passes to its module. The Trainer, checkpoints, resume, logging,
evaluation and bench are shared (config key `method`).

    method = METHODS[cfg.method]
    model = method.build(cfg)                                # an nn.Module whose forward(*views, **kw) is the loss
    groups = method.param_groups(model, cfg)                 # optimizer groups (keys: params, apply_wd, ...)
    sched = method.schedules(cfg, steps_per_epoch=..., global_batch=...)
    kwargs = method.step_kwargs(sched, device)               # step -> forward's keyword arguments
    after = method.after_step(sched, device)                 # (module, step) -> None after the optimizer
                                                             # step, or None (DINO: the teacher's EMA)
    frozen = method.frozen(group, epoch)                     # the group's gradients dropped at that epoch
    groups = method.backbone_calls(cfg, micro)               # (images, resolution) of each backbone call
    method.clip_per_parameter                                # > 0: each parameter's gradient clipped alone

Views come from the loader as the data config's crop specs make them: MoCo v3
uses the two global crops, DINO adds `data.local_crops` local ones. Each
module has `online_backbone` / `momentum_backbone` (MoCo: base / momentum
encoder; DINO: student / teacher), which evaluation and export read, and
`build_momentum_state(optimizer, rank)` for the fp32 EMA. The EMA's coefficients are a row of
[m, 1 - m] of each iteration, both rounded from the float64 schedule (kernels/ema.py
`ema_coefficients`), on the device: a step indexes it without a host sync.
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


def _ema_table(sched: Schedules, device) -> torch.Tensor:
    """(T, 2) fp32 [m_t, 1 - m_t] on the device; row t is a view (no copy, no sync)."""
    from fastmoco.kernels.ema import ema_coefficients

    return ema_coefficients(sched.momentum).to(device)


class MoCoV3:
    name = "moco_v3"
    default_encoder = "online"     # MoCo v3 evaluates the base encoder
    clip_per_parameter = 0.0       # clipping, if any, is DeepSpeed's global norm (deepspeed.gradient_clipping)

    def build(self, cfg):
        from fastmoco.moco import MoCo

        return MoCo.from_config(cfg.model, cfg.moco, cfg.memory)

    def param_groups(self, model, cfg) -> list[dict]:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "apply_wd": False}]

    def schedules(self, cfg, *, steps_per_epoch: int, global_batch: int) -> Schedules:
        s = build_schedules(base_lr=cfg.optim.base_lr, global_batch=global_batch, epochs=cfg.schedule.epochs,
                            warmup_epochs=cfg.schedule.warmup_epochs, steps_per_epoch=steps_per_epoch,
                            m0=cfg.moco.momentum, cosine_momentum=cfg.moco.momentum_cosine)
        return Schedules(lr=s.lr, momentum=s.momentum)

    def step_kwargs(self, sched: Schedules, device):
        # MoCo v3 updates the momentum encoder with m_t at the start of step t's forward (the official
        # order); the EMA reads [m_t, 1 - m_t] on the device
        coef = _ema_table(sched, device)
        return lambda step: {"m": coef[step]}

    def after_step(self, sched: Schedules, device):
        return None

    def backbone_calls(self, cfg, micro: int) -> list[tuple[int, int]]:
        return [(2 * micro, cfg.data.image_size)]   # both views in one call

    def frozen(self, group: dict, epoch: int) -> bool:
        return False


class DINOMethod:
    name = "dino"
    default_encoder = "momentum"   # DINO evaluates the teacher

    def __init__(self, freeze_epochs: int = 1, clip_per_parameter: float = 3.0):
        self.freeze_epochs = freeze_epochs
        self.clip_per_parameter = clip_per_parameter

    def build(self, cfg):
        from fastmoco.dino import DINO

        if cfg.data.local_crops < 1:
            raise ConfigError("method dino: set data.local_crops (DINO's multi-crop: 8 or 10 local crops)")
        return DINO.from_config(cfg.model, cfg.dino, cfg.memory)

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
        temps = sched.extra["teacher_temp"].tolist()
        return lambda step: {"teacher_temp": temps[step]}

    def after_step(self, sched: Schedules, device):
        """DINO's order (main_dino.train_one_epoch): the teacher's EMA with m_t of the student after
        step t's optimizer step, in the same step, so a checkpoint or evaluation after step t holds
        the teacher after update t."""
        coef = _ema_table(sched, device)
        return lambda module, step: module.update_teacher(coef[step])

    def backbone_calls(self, cfg, micro: int) -> list[tuple[int, int]]:
        return [(cfg.dino.global_crops * micro, cfg.data.image_size), (cfg.data.local_crops * micro,
                                                                         cfg.data.local_size)]

    def frozen(self, group: dict, epoch: int) -> bool:
        """DINO's freeze_last_layer: the head's last layer gets no gradient in the first epoch(s)
        (cancel_gradients_last_layer; AdamW skips it: no moments, no step count)."""
        return bool(group.get("last_layer")) and epoch < self.freeze_epochs


METHODS = {"moco_v3": MoCoV3, "dino": DINOMethod}


def get_method(cfg):
    """The method object `cfg.method` names, configured from cfg."""
    if cfg.method not in METHODS:
        raise ConfigError(f"method {cfg.method!r} unknown (known: {', '.join(METHODS)})")
    if cfg.method == "dino":
        clip, global_clip = cfg.dino.clip_grad, cfg.deepspeed.get("gradient_clipping", 0.0)
        if not isinstance(clip, (int, float)) or clip < 0:
            raise ConfigError(f"dino.clip_grad must be >= 0 (0: off), got {clip!r}")
        if clip > 0 and global_clip:
            raise ConfigError(f"method dino clips each parameter's gradient on its own (dino.clip_grad {clip}, "
                              f"DINO's clip_gradients); deepspeed.gradient_clipping {global_clip} would also clip "
                              "their global norm: set one of them to 0")
        return DINOMethod(cfg.dino.freeze_last_layer, float(clip))
    return MoCoV3()
