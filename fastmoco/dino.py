"""DINO (Caron et al., ICCV 2021) as its official code defines it: self-distillation with a momentum teacher.

    student = backbone (drop path) -> DINOHead      on every crop (2 global + N local)
    teacher = backbone -> DINOHead, an EMA of the student, no gradients, on the 2 global crops
    loss    = mean over (teacher crop i, student crop j != i) of
              CE(softmax((t_i - center) / tau_t), log_softmax(s_j / tau_s))
    center  <- 0.9 center + 0.1 * mean of the teacher's outputs over the global batch (all ranks)

Module names follow the official checkpoints (`student.backbone.*`,
`student.head.mlp.*`, `student.head.last_layer.weight_g/weight_v`, same for
`teacher`, and `center`), so a DINO checkpoint's state dict maps over by name.

DINOHead: 3-layer MLP (hidden 2048, GELU), a 256-d bottleneck, L2
normalisation, then a weight-normalised Linear(256, K) without bias whose
norm (weight_g) is fixed to 1 when `norm_last_layer` (the default). Weight
normalisation is written out here (weight = g * v / |v| per output row) so the
parameter names are the official ones whatever torch's weight_norm API does.

The student runs its crops grouped by resolution (one backbone call per
resolution, DINO's MultiCropWrapper), the heads once on all of them. The
teacher EMA is the multi-tensor EMA of `fastmoco.momentum` over backbone and
head. Order within a step, as the official loop (main_dino.train_one_epoch):
loss (with the center before this step's update), backward, the optimizer step,
then `update_teacher` with the schedule's m of this step (the Trainer calls it
after the step, fastmoco/methods.py `after_step`); a checkpoint or evaluation
after step t holds the teacher after update t.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from fastmoco import ops
from fastmoco.chunked import chunked_backbone
from fastmoco.distributed import get_world_size
from fastmoco.models.vit import VisionTransformer
from fastmoco.momentum import MomentumState


class WeightNormLinear(nn.Module):
    """Linear without bias, weight = weight_g * weight_v / |weight_v| (row norms): torch's classic
    weight_norm(dim=0) with the same parameter names (`weight_g` (out, 1), `weight_v` (out, in))."""

    def __init__(self, in_dim: int, out_dim: int, fixed_norm: bool = True):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not fixed_norm)

    def forward(self, x):
        v = self.weight_v
        w = v * (self.weight_g / v.float().norm(dim=1, keepdim=True).to(v.dtype))
        return F.linear(x, w)


class DINOHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 num_layers: int = 3, norm_last_layer: bool = True):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < num_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fixed_norm=norm_last_layer)
        # the official init: v from nn.Linear's default (kaiming-uniform), g = 1
        nn.init.kaiming_uniform_(self.last_layer.weight_v, a=math.sqrt(5))

    def forward(self, x):  # (B, in_dim) -> (B, out_dim)
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


class Encoder(nn.Module):
    """A backbone and its head; crops grouped by resolution (DINO's MultiCropWrapper)."""

    def __init__(self, backbone: VisionTransformer, head: DINOHead, chunk: int = 0):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.chunk = chunk   # images per backbone call, each crop group in chunks (fastmoco/chunked.py); 0: all

    def forward(self, crops: list[torch.Tensor]) -> torch.Tensor:
        """crops: V tensors (B, 3, S_v, S_v), consecutive ones of equal size run together.
        Returns (V, B, K) logits."""
        groups, start = [], 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-1] == crops[start].shape[-1]:
                end += 1
            groups.append(torch.cat(crops[start:end]))
            start = end
        # with memory.backbone_chunk, `chunk` images per backbone call across the groups (fastmoco/chunked.py)
        feats = chunked_backbone(lambda x: self.backbone(x, head=False), self.backbone, groups, self.chunk)
        out = self.head(torch.cat(feats))                                   # (V * B, K)
        return out.view(len(crops), crops[0].shape[0], -1)


class DINO(nn.Module):
    METHOD = "dino"                         # fastmoco/methods.py
    MOMENTUM_MODULE = "teacher"             # what the EMA state covers (export reads it by this name)
    def __init__(self, arch: str = "vit_small", img_size: int = 224, *, patch_size: int = 16, num_heads: int = 6,
                 out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 norm_last_layer: bool = True, drop_path: float = 0.1, student_temp: float = 0.1,
                 center_momentum: float = 0.9, num_global: int = 2, grad_checkpointing: bool = False,
                 mlp_norm: str = "ln", backbone_chunk: int | str = 0):
        super().__init__()
        if backbone_chunk and mlp_norm != "ln":
            raise ValueError(f"memory.backbone_chunk {backbone_chunk}: model.mlp_norm {mlp_norm!r} puts BatchNorm "
                             "inside the backbone, whose statistics span the whole batch: chunks would change "
                             "them. Set memory.backbone_chunk 0 for this backbone")
        self.student_temp, self.center_momentum, self.num_global = student_temp, center_momentum, num_global

        def encoder(path_rate: float) -> Encoder:
            vit = VisionTransformer(arch, img_size=img_size, frozen_patch_embed=False, recipe="dino",
                                    num_heads=num_heads, patch_size=patch_size, drop_path=path_rate,
                                    grad_checkpointing=grad_checkpointing, mlp_norm=mlp_norm)
            return Encoder(vit, DINOHead(vit.embed_dim, out_dim, hidden_dim, bottleneck_dim,
                                         norm_last_layer=norm_last_layer))

        self.student = encoder(drop_path)
        self.teacher = encoder(0.0)
        # images per backbone call (fastmoco/chunked.py); 0: all; "auto": the Trainer sets it after measuring
        self.backbone_chunk = 0 if backbone_chunk == "auto" else backbone_chunk
        self.teacher.load_state_dict(self.student.state_dict())
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.momentum_state: MomentumState | None = None

    @classmethod
    def from_config(cls, model_cfg, dino_cfg, memory_cfg=None) -> "DINO":
        return cls(model_cfg.arch, img_size=model_cfg.img_size, patch_size=model_cfg.patch_size,
                   num_heads=model_cfg.num_heads, out_dim=dino_cfg.out_dim, hidden_dim=dino_cfg.hidden_dim,
                   bottleneck_dim=dino_cfg.bottleneck_dim, norm_last_layer=dino_cfg.norm_last_layer,
                   drop_path=model_cfg.drop_path, student_temp=dino_cfg.student_temp,
                   center_momentum=dino_cfg.center_momentum, num_global=dino_cfg.global_crops,
                   grad_checkpointing=model_cfg.grad_checkpointing, mlp_norm=model_cfg.mlp_norm,
                   backbone_chunk=memory_cfg.backbone_chunk if memory_cfg is not None else 0)

    @property
    def backbone_chunk(self) -> int:
        return self.student.chunk

    @backbone_chunk.setter
    def backbone_chunk(self, chunk: int) -> None:   # student and teacher alike
        self.student.chunk = self.teacher.chunk = chunk

    # The Trainer's names for the two encoders (MoCo: base_encoder / momentum_encoder).
    @property
    def online_backbone(self) -> VisionTransformer:
        return self.student.backbone

    @property
    def momentum_backbone(self) -> VisionTransformer:
        return self.teacher.backbone

    def build_momentum_state(self, optimizer=None, rank: int = 0) -> MomentumState:
        """The teacher's fp32 EMA state over backbone and head (see fastmoco/momentum.py)."""
        self.momentum_state = MomentumState(list(self.teacher.parameters()), list(self.student.parameters()),
                                            optimizer, rank)
        return self.momentum_state

    @torch.no_grad()
    def update_teacher(self, m: torch.Tensor) -> None:
        """teacher <- m * teacher + (1 - m) * student over backbone and head, in one multi-tensor op.
        `m`: [m, 1 - m], a (2,) fp32 tensor on the device (no host sync)."""
        if self.momentum_state is None:
            self.build_momentum_state()
        self.momentum_state.update(m)

    @torch.no_grad()
    def update_center(self, teacher_sum: torch.Tensor, rows: int) -> None:
        """center <- m center + (1 - m) * (sum of the teacher outputs over all ranks) / (rows * world)."""
        total = teacher_sum.float()   # a fresh sum from the loss: reduced in place
        if get_world_size() > 1:
            dist.all_reduce(total)
        mean = total / (rows * get_world_size())
        self.center.copy_(self.center.float() * self.center_momentum + mean[None] * (1 - self.center_momentum))

    def forward(self, *crops: torch.Tensor, teacher_temp: float = 0.04) -> torch.Tensor:
        """crops: the global crops first, then the local ones, each (B, 3, S, S). `teacher_temp`: a
        host float (the schedule's). Returns the loss. (The teacher is updated after the optimizer
        step: `update_teacher`.)"""
        student = self.student(list(crops))                                         # (V_s, B, K)
        with torch.no_grad():
            teacher = self.teacher(list(crops[: self.num_global]))                   # (V_t, B, K)
        loss, teacher_sum = ops.dino_loss(student, teacher, self.center[0], self.student_temp, teacher_temp)
        self.update_center(teacher_sum, teacher.shape[0] * teacher.shape[1])
        return loss


def param_groups(model: "DINO") -> list[dict]:
    """DINO's groups: weights regularised, biases and 1-d parameters (norms) not; the head's last layer
    in groups of its own (`last_layer`), so the Trainer can mark them `frozen` in the first epoch(s):
    their gradients are dropped before AdamW steps (DINO's cancel_gradients_last_layer), which under
    ZeRO drops exactly the group's flat partition."""
    groups = {(wd, last): [] for wd in (True, False) for last in (False, True)}
    for name, p in model.student.named_parameters():
        if p.requires_grad:
            wd = not (name.endswith(".bias") or p.dim() == 1)
            groups[wd, name.startswith("head.last_layer.")].append(p)
    return [{"params": ps, "apply_wd": wd, "last_layer": last, **({} if wd else {"weight_decay": 0.0})}
            for (wd, last), ps in groups.items() if ps]


def cosine_schedule(base: float, final: float, epochs: int, steps_per_epoch: int, warmup_epochs: int = 0,
                    warmup_start: float = 0.0) -> torch.Tensor:
    """DINO's cosine_scheduler: linear warmup from `warmup_start` to `base`, then half-cosine to `final`;
    one value per iteration (float64)."""
    warm = warmup_epochs * steps_per_epoch
    warmup = torch.linspace(warmup_start, base, warm, dtype=torch.float64) if warm > 0 else \
        torch.zeros(0, dtype=torch.float64)
    t = torch.arange(epochs * steps_per_epoch - warm, dtype=torch.float64)
    cos = final + 0.5 * (base - final) * (1 + torch.cos(math.pi * t / max(len(t), 1)))
    return torch.cat([warmup, cos])


def teacher_temp_schedule(warmup_temp: float, temp: float, warmup_epochs: int, epochs: int,
                          steps_per_epoch: int) -> torch.Tensor:
    """DINO's per-epoch teacher temperature (linear warmup over `warmup_epochs`, then constant),
    one value per iteration."""
    per_epoch = torch.cat([torch.linspace(warmup_temp, temp, warmup_epochs, dtype=torch.float64),
                           torch.full((max(epochs - warmup_epochs, 0),), temp, dtype=torch.float64)])[:epochs]
    return per_epoch.repeat_interleave(steps_per_epoch)
