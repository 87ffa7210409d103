"""Golden figures of DINO's training step, from the official code (facebookresearch/dino).

1. `dino_training_clip.pt`: utils.clip_gradients(model, 3.0) on a module whose parameters have
   gradients of assorted norms (above, below and at the limit, zero, and one parameter without a
   gradient): the gradients before and after, and the norms it returns.
2. `dino_training.pt`: main_dino.train_one_epoch itself, run for two epochs of three iterations on a
   tiny DINOHead student/teacher (vision_transformer.DINOHead behind utils.MultiCropWrapper, the
   backbone an identity: each "crop" is a fixed feature vector), with main_dino.DINOLoss,
   torch.optim.AdamW over utils.get_params_groups, utils.cosine_scheduler schedules, clip_grad 3.0
   and freeze_last_layer 1. Recorded at every iteration: the loss, the gradients as AdamW sees them
   (after clip_gradients and cancel_gradients_last_layer), the norms clip_gradients returned, the
   student's parameters and AdamW's state after optimizer.step() (none for the last layer during
   epoch 0), the teacher after the iteration's EMA update, and the center.

train_one_epoch is written for CUDA and DDP. To run it on the CPU as it is, the generator provides
what it touches around the computation: Tensor.cuda and torch.cuda.synchronize as no-ops, the metric
logger's cross-process sync as a no-op, a one-process gloo group (DINOLoss.update_center all-reduces),
and the student behind a wrapper with `.module` (as DDP). The figures are observed with hooks (a
wrapper around utils.clip_gradients that calls it, optimizer step hooks, the data loader).

    python tests/golden/gen_dino_training.py --moco-v3 PATH --dino PATH --out tests/golden
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn

# The run: small, odd sizes; values as main_dino's arguments.
RUN = dict(in_dim=7, hidden_dim=12, bottleneck_dim=5, out_dim=11, crops=4, batch=4, epochs=2, iters=3,
           base_lr=0.5, min_lr=1e-3, warmup_epochs=1, weight_decay=0.04, weight_decay_end=0.4,
           momentum_teacher=0.9, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=1,
           clip_grad=3.0, freeze_last_layer=1, feature_scale=4.0)
CLIP_SHAPES = {"a": (5, 3), "b": (4,), "c": (2, 3, 2), "d": (1,), "e": (6,), "f": (3, 3), "g": (2,)}
# Target gradient norms: above, below, just above and just below the limit, zero; "g" gets none.
CLIP_NORMS = {"a": 7.5, "b": 0.4, "c": 3.0 * (1 + 1e-5), "d": 12.0, "e": 3.0 * (1 - 1e-5), "f": 0.0}


def _official(dino: Path):
    sys.path.insert(0, str(dino))
    try:
        import main_dino  # noqa: PLC0415 (the official modules, from the checkout)
        import utils
        import vision_transformer
    finally:
        sys.path.remove(str(dino))
    return main_dino, utils, vision_transformer


def clip_golden(utils) -> dict:
    g = torch.Generator().manual_seed(1)
    module = nn.ParameterDict({k: nn.Parameter(torch.randn(s, generator=g)) for k, s in CLIP_SHAPES.items()})
    for k, p in module.items():
        if k in CLIP_NORMS:
            grad = torch.randn(p.shape, generator=g)
            p.grad = grad * (CLIP_NORMS[k] / grad.norm()) if CLIP_NORMS[k] else torch.zeros_like(grad)
    before = {k: p.grad.clone() for k, p in module.items() if p.grad is not None}
    norms = utils.clip_gradients(module, RUN["clip_grad"])
    after = {k: p.grad.clone() for k, p in module.items() if p.grad is not None}
    names = [k for k, p in module.items() if p.grad is not None]
    return {"clip": RUN["clip_grad"], "names": names, "before": before, "after": after,
            "norms": torch.tensor(norms, dtype=torch.float32)}


class _DDPLike(nn.Module):
    """What train_one_epoch reads of a DDP student: `.module` and the forward."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)


@contextlib.contextmanager
def _cpu_process_group():
    """DINOLoss.update_center all-reduces: one gloo process."""
    if dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(d, 'pg')}", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


@contextlib.contextmanager
def _cuda_calls_as_noops(utils):
    saved = (torch.Tensor.cuda, torch.cuda.synchronize, utils.MetricLogger.synchronize_between_processes)
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.cuda.synchronize = lambda *a, **k: None
    utils.MetricLogger.synchronize_between_processes = lambda self: None
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.cuda.synchronize, utils.MetricLogger.synchronize_between_processes = saved


def training_golden(main_dino, utils, vits) -> dict:
    r = SimpleNamespace(**RUN)
    torch.manual_seed(0)

    def head():
        return vits.DINOHead(r.in_dim, r.out_dim, use_bn=False, norm_last_layer=True, nlayers=3,
                             hidden_dim=r.hidden_dim, bottleneck_dim=r.bottleneck_dim)

    student = utils.MultiCropWrapper(nn.Identity(), head())
    teacher = utils.MultiCropWrapper(nn.Identity(), head())
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    initial = {k: v.clone() for k, v in student.state_dict().items()}
    ddp_student = _DDPLike(student)
    dino_loss = main_dino.DINOLoss(r.out_dim, r.crops, r.warmup_teacher_temp, r.teacher_temp,
                                   r.warmup_teacher_temp_epochs, r.epochs)
    optimizer = torch.optim.AdamW(utils.get_params_groups(student))
    peak = r.base_lr * r.batch / 256.0  # main_dino: args.lr * batch_size_per_gpu * world_size / 256
    lr_schedule = utils.cosine_scheduler(peak, r.min_lr, r.epochs, r.iters, warmup_epochs=r.warmup_epochs)
    wd_schedule = utils.cosine_scheduler(r.weight_decay, r.weight_decay_end, r.epochs, r.iters)
    momentum_schedule = utils.cosine_scheduler(r.momentum_teacher, 1, r.epochs, r.iters)

    g = torch.Generator().manual_seed(2)
    total = r.epochs * r.iters
    inputs = torch.randn(total, r.crops, r.batch, r.in_dim, generator=g) * r.feature_scale
    names = [n for n, _ in student.named_parameters()]
    steps: list[dict] = []

    def teacher_state():
        return {n: p.detach().clone() for n, p in teacher.named_parameters()}

    def loader(epoch):
        class Loader:
            def __len__(self):
                return r.iters

            def __iter__(self):
                for i in range(r.iters):
                    if i:  # the previous iteration's EMA is done when the next batch is asked for
                        steps[-1]["teacher"] = teacher_state()
                        steps[-1]["center"] = dino_loss.center.clone()
                    steps.append({})
                    yield list(inputs[epoch * r.iters + i]), torch.zeros(r.batch)
                steps[-1]["teacher"] = teacher_state()
                steps[-1]["center"] = dino_loss.center.clone()
        return Loader()

    clip_gradients = utils.clip_gradients

    def observed_clip(model, clip):
        norms = clip_gradients(model, clip)
        steps[-1]["clip_norms"] = torch.tensor(norms, dtype=torch.float32)
        return norms

    def before_step(opt, args, kwargs):
        params = dict(student.named_parameters())
        steps[-1]["grads"] = {n: params[n].grad.clone() for n in names if params[n].grad is not None}
        steps[-1]["lr"] = torch.tensor([grp["lr"] for grp in opt.param_groups], dtype=torch.float64)
        steps[-1]["weight_decay"] = torch.tensor([grp["weight_decay"] for grp in opt.param_groups],
                                                 dtype=torch.float64)

    def after_step(opt, args, kwargs):
        params = dict(student.named_parameters())
        steps[-1]["student"] = {n: params[n].detach().clone() for n in names}
        steps[-1]["adamw"] = {n: {k: torch.as_tensor(v).clone() for k, v in opt.state[params[n]].items()}
                              for n in names if opt.state[params[n]]}

    def observed_loss(module, args, output):
        steps[-1]["loss"] = output.detach().clone()

    optimizer.register_step_pre_hook(before_step)
    optimizer.register_step_post_hook(after_step)
    dino_loss.register_forward_hook(observed_loss)
    args = SimpleNamespace(epochs=r.epochs, clip_grad=r.clip_grad, freeze_last_layer=r.freeze_last_layer)
    utils.clip_gradients = observed_clip
    try:
        with _cpu_process_group(), _cuda_calls_as_noops(utils), contextlib.redirect_stdout(io.StringIO()):
            for epoch in range(r.epochs):
                main_dino.train_one_epoch(ddp_student, teacher, teacher, dino_loss, loader(epoch), optimizer,
                                          lr_schedule, wd_schedule, momentum_schedule, epoch, None, args)
    finally:
        utils.clip_gradients = clip_gradients
    return {"run": RUN, "names": names, "initial": initial, "inputs": inputs,
            "schedules": {"lr": torch.as_tensor(lr_schedule), "weight_decay": torch.as_tensor(wd_schedule),
                          "momentum": torch.as_tensor(momentum_schedule),
                          "teacher_temp": torch.as_tensor(dino_loss.teacher_temp_schedule)},
            "steps": steps}


def generate(moco_v3: Path, dino: Path, out: Path) -> None:
    main_dino, utils, vits = _official(dino)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(clip_golden(utils), out / "dino_training_clip.pt")
    torch.save(training_golden(main_dino, utils, vits), out / "dino_training.pt")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--moco-v3", type=Path, required=True, help="checkout of facebookresearch/moco-v3")
    p.add_argument("--dino", type=Path, required=True, help="checkout of facebookresearch/dino")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    a = p.parse_args(argv)
    generate(a.moco_v3, a.dino, a.out)


if __name__ == "__main__":
    main()
