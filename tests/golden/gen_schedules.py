"""schedules.safetensors: the official per-iteration schedules at chosen iterations.

MoCo v3 (main_moco.py): adjust_learning_rate and adjust_moco_momentum at epoch + i / iters_per_epoch, as
its train loop calls them, with args.lr = lr * batch_size / 256 as its main_worker sets it. DINO
(main_dino.py train_dino): utils.cosine_scheduler for lr (peak lr * batch / 256, warmup, min_lr), weight
decay and teacher momentum, and DINOLoss's per-epoch teacher_temp_schedule. Two settings each: a full
recipe (ImageNet's iterations per epoch) at chosen iterations (both ends, around the warmup's end, the
middle, seeded others) and a tiny one at every iteration.

Tensors: <case>/iters (int64) and <case>/<name> (float64) for name in lr, momentum (and weight_decay,
teacher_temp for DINO). Meta: each case's settings.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from golden import official, tensors

IMAGENET = 1281167
MOCO = {  # name: base lr, global batch, epochs, warmup epochs, m0, iterations per epoch
    "moco_vit_b": dict(lr=1.5e-4, batch=4096, epochs=300, warmup_epochs=40, moco_m=0.99, iters=IMAGENET // 4096),
    "moco_r50_100ep": dict(lr=0.6, batch=4096, epochs=100, warmup_epochs=10, moco_m=0.99, iters=IMAGENET // 4096),
    "moco_tiny": dict(lr=1.5e-4, batch=8, epochs=7, warmup_epochs=2, moco_m=0.99, iters=13),
}
DINO = {
    "dino_vit_s16": dict(lr=5e-4, batch=512, min_lr=1e-6, epochs=100, warmup_epochs=10, weight_decay=0.04,
                         weight_decay_end=0.4, momentum_teacher=0.996, warmup_teacher_temp=0.04, teacher_temp=0.07,
                         warmup_teacher_temp_epochs=30, iters=IMAGENET // 512),
    "dino_tiny": dict(lr=5e-4, batch=16, min_lr=1e-6, epochs=5, warmup_epochs=2, weight_decay=0.04,
                      weight_decay_end=0.4, momentum_teacher=0.996, warmup_teacher_temp=0.04, teacher_temp=0.07,
                      warmup_teacher_temp_epochs=3, iters=7),
}
SEED = 5


def chosen_iterations(epochs: int, warmup_epochs: int, iters: int) -> torch.Tensor:
    total, w = epochs * iters, warmup_epochs * iters
    if total <= 200:
        return torch.arange(total)
    fixed = [0, 1, 2, w - 1, w, w + 1, total // 2, total - 2, total - 1]
    extra = torch.randint(total, (8,), generator=torch.Generator().manual_seed(SEED)).tolist()
    return torch.tensor(sorted(set(fixed + extra)))


def generate(moco_v3: Path, dino: Path, out: Path) -> None:
    import main_dino
    import main_moco
    import utils

    out_t = {}
    for name, s in MOCO.items():
        args = argparse.Namespace(lr=s["lr"], epochs=s["epochs"], warmup_epochs=s["warmup_epochs"],
                                  moco_m=s["moco_m"])
        args.lr = args.lr * s["batch"] / 256          # main_moco.main_worker: "infer learning rate"
        holder = argparse.Namespace(param_groups=[{}])  # adjust_learning_rate sets each group's lr
        iters = chosen_iterations(s["epochs"], s["warmup_epochs"], s["iters"])
        lr, m = [], []
        for t in iters.tolist():
            epoch, i = divmod(t, s["iters"])
            lr.append(main_moco.adjust_learning_rate(holder, epoch + i / s["iters"], args))
            m.append(main_moco.adjust_moco_momentum(epoch + i / s["iters"], args))
        out_t.update({f"{name}/iters": iters, f"{name}/lr": torch.tensor(lr, dtype=torch.float64),
                      f"{name}/momentum": torch.tensor(m, dtype=torch.float64)})
    for name, s in DINO.items():
        n = s["iters"]
        lr = utils.cosine_scheduler(s["lr"] * s["batch"] / 256., s["min_lr"], s["epochs"], n,
                                    warmup_epochs=s["warmup_epochs"])
        wd = utils.cosine_scheduler(s["weight_decay"], s["weight_decay_end"], s["epochs"], n)
        mom = utils.cosine_scheduler(s["momentum_teacher"], 1, s["epochs"], n)
        loss = main_dino.DINOLoss(8, 4, s["warmup_teacher_temp"], s["teacher_temp"], s["warmup_teacher_temp_epochs"],
                                  s["epochs"])
        iters = chosen_iterations(s["epochs"], s["warmup_epochs"], n)
        idx = iters.numpy()
        out_t.update({f"{name}/iters": iters,
                      f"{name}/lr": torch.from_numpy(lr[idx]).double(),
                      f"{name}/weight_decay": torch.from_numpy(wd[idx]).double(),
                      f"{name}/momentum": torch.from_numpy(mom[idx]).double(),
                      f"{name}/teacher_temp": torch.from_numpy(loss.teacher_temp_schedule[idx // n]).double()})
    meta = {"moco": MOCO, "dino": DINO, "official": official.provenance(moco_v3, dino)}
    tensors.write(out / "schedules.safetensors", out_t, meta)
