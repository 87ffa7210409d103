"""The methods' per-iteration schedules (fastmoco/methods.py: lr, EMA momentum, DINO's weight decay and
teacher temperature) against the official functions at chosen iterations (tests/golden/schedules.safetensors,
made by tests/golden/gen_schedules.py from main_moco.py and main_dino.py / utils.py)."""
from pathlib import Path

import pytest
import torch

from fastmoco.config import load_config
from fastmoco.methods import get_method
from golden import tensors

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GOLDEN, META = tensors.read("schedules.safetensors")


def schedules(config: str, overrides: dict, s: dict):
    cfg = load_config(CONFIGS / config, [a for k, v in overrides.items() for a in (f"--{k}", str(v))])
    return get_method(cfg).schedules(cfg, steps_per_epoch=s["iters"], global_batch=s["batch"])


def assert_values(name: str, got: torch.Tensor, case: str, iters: torch.Tensor):
    want = GOLDEN[f"{case}/{name}"]
    got = got[iters].double()
    err = (got - want).abs().max().item()
    worst = (got - want).abs().argmax().item()
    assert err <= 1e-12 + 1e-9 * want.abs().max().item(), \
        f"{case} {name}: at iteration {iters[worst].item()} {got[worst].item()!r} here, {want[worst].item()!r} official"


@pytest.mark.parametrize("case", sorted(META["moco"]))
def test_moco_v3_lr_and_momentum(case):
    s = META["moco"][case]
    sched = schedules("r50_100ep.json" if "r50" in case else "vit_b.json",
                      {"optim.base_lr": s["lr"], "schedule.epochs": s["epochs"],
                       "schedule.warmup_epochs": s["warmup_epochs"], "moco.momentum": s["moco_m"],
                       "moco.momentum_cosine": "true"}, s)
    iters = GOLDEN[f"{case}/iters"]
    assert len(sched.lr) == s["epochs"] * s["iters"]
    assert_values("lr", sched.lr, case, iters)
    assert_values("momentum", sched.momentum, case, iters)


@pytest.mark.parametrize("case", sorted(META["dino"]))
def test_dino_lr_weight_decay_momentum_and_teacher_temperature(case):
    s = META["dino"][case]
    sched = schedules("dino_vit_s16.json", {
        "optim.base_lr": s["lr"], "dino.min_lr": s["min_lr"], "schedule.epochs": s["epochs"],
        "schedule.warmup_epochs": s["warmup_epochs"], "optim.weight_decay": s["weight_decay"],
        "dino.weight_decay_end": s["weight_decay_end"], "dino.momentum_teacher": s["momentum_teacher"],
        "dino.warmup_teacher_temp": s["warmup_teacher_temp"], "dino.teacher_temp": s["teacher_temp"],
        "dino.warmup_teacher_temp_epochs": s["warmup_teacher_temp_epochs"]}, s)
    iters = GOLDEN[f"{case}/iters"]
    assert len(sched.lr) == s["epochs"] * s["iters"]
    assert_values("lr", sched.lr, case, iters)
    assert_values("weight_decay", sched.weight_decay, case, iters)
    assert_values("momentum", sched.momentum, case, iters)
    assert_values("teacher_temp", sched.extra["teacher_temp"], case, iters)
