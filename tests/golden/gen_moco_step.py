"""moco_step_<case>.safetensors: two training steps of the official MoCo v3 (moco/builder.py MoCo_ViT /
MoCo_ResNet) driven by main_moco.py's own train() loop: per-iteration lr and momentum
(adjust_learning_rate, adjust_moco_momentum), the forward that updates the momentum encoder before it
computes the keys, backward and the optimizer step (AdamW or moco/optimizer.py's LARS, as main_worker
builds them, AdamW with eps 1e-4: see ADAMW_EPS), on the CPU in fp32 (autocast and GradScaler turn
themselves off without CUDA).

Cases (fastmoco's CPU configs, so the test can run the Trainer on them): "vit" (vits.py's ViT at
fastmoco's vit_test sizes, stop-grad patch projection, AdamW), "vit_conv" (vits.py's conv stem at
vit_conv_test sizes, AdamW) and "r50" (torchvision's resnet18 with zero_init_residual, LARS).

Inputs, rebuilt by the test: the model's state is seeded (`tensors.fill_state`: per tensor the official
init's mean and spread, by name; the momentum encoder seeded apart from the online one, so the EMA shows)
except the fixed sin-cos position tables (`kept/<name>`); images seeded per step and view.

Tensors: loss, lr, m (per step, float64); grad/<step>/<param> (digest of the gradient the optimizer
stepped on); delta/<step>/<name> (digest of the state after the step minus the initial state: online
weights, momentum encoder, BatchNorm statistics); value/<step>/<name> (integer buffers); kept/<name>;
input_sums. Meta: the case, names/shapes/stats of the seeded state, the loop's epoch and iterations.
"""
from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import torch

from golden import official, tensors

SEED = 7
BATCH = 8            # per view
EPOCHS, WARMUP, EPOCH, ITERS = 4, 1, 1, 2   # the two steps are iterations 2 and 3 of 8: after the warmup
CASES = {
    "vit": dict(config="tiny.json", arch="vit_test", img=32, dim=32, mlp_dim=48, tau=0.2, optimizer="adamw",
                base_lr=0.032, weight_decay=0.1, momentum=0.9, moco_m=0.99, stop_grad_conv1=True),
    "vit_conv": dict(config="vit_conv_tiny.json", arch="vit_conv_test", img=32, dim=32, mlp_dim=48, tau=0.2,
                     optimizer="adamw", base_lr=0.032, weight_decay=0.1, momentum=0.9, moco_m=0.99,
                     stop_grad_conv1=False),
    "r50": dict(config="r50_tiny.json", arch="resnet18", img=32, dim=32, mlp_dim=48, tau=1.0, optimizer="lars",
                base_lr=19.2, weight_decay=1e-6, momentum=0.9, moco_m=0.99, stop_grad_conv1=False),
}
# AdamW's eps: 1e-6 where main_worker leaves torch's 1e-8. Adam's first step is lr * g / (|g| + eps): with 1e-8
# the gradients that are rounding noise (the final norm's bias, cancelled by the projector's BatchNorm; the
# attention's key bias, cancelled by the softmax; a few elements of any tensor that happen to be near 0)
# become +-lr updates of random sign on each side, and the second step starts from different weights.
# The rule is the same; the comparison becomes well conditioned.
ADAMW_EPS = 1e-4
KEPT = ("pos_embed",)   # fixed tables the official code computes: used as they are, stored whole


def is_seeded(name: str, t: torch.Tensor) -> bool:
    return t.is_floating_point() and name.rsplit(".", 1)[-1] not in KEPT


def images(step: int, view: int, img: int) -> torch.Tensor:
    return tensors.seeded((BATCH, 3, img, img), SEED, f"x{view}.{step}")


def seeded_inputs(meta: dict, kept: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list]:
    """The initial state (seeded tensors and the kept ones) and the images of each step, from the meta."""
    state = tensors.fill_state(meta["names"], meta["shapes"], torch.tensor(meta["stats"], dtype=torch.float64), SEED)
    state.update(kept)
    views = [[images(step, v, meta["case"]["img"]) for v in (1, 2)] for step in range(ITERS)]
    return state, views


def inputs_by_name(state: dict, views: list) -> dict[str, torch.Tensor]:
    """The floating-point inputs under one name each (for `tensors.input_sums`)."""
    return {**{f"state/{k}": v for k, v in state.items() if v.is_floating_point()},
            **{f"x{v}.{s}": x for s, pair in enumerate(views) for v, x in enumerate(pair)}}


class _Writer:
    """main_moco.train's SummaryWriter: keeps the losses it is given."""

    def __init__(self):
        self.losses = []

    def add_scalar(self, tag, value, step):
        self.losses.append(value)


def _build(c: dict):
    import moco.builder
    import torchvision.models as torchvision_models
    import vits

    official.prepare_vits(vits)
    if c["arch"].startswith("vit"):   # main_moco.main_worker's two constructions
        return moco.builder.MoCo_ViT(partial(vits.__dict__[c["arch"]], stop_grad_conv1=c["stop_grad_conv1"]),
                                     c["dim"], c["mlp_dim"], c["tau"])
    return moco.builder.MoCo_ResNet(partial(torchvision_models.__dict__[c["arch"]], zero_init_residual=True),
                                    c["dim"], c["mlp_dim"], c["tau"])


def _case(name: str, c: dict, prov: dict, out: Path) -> None:
    import main_moco
    import moco.optimizer

    torch.manual_seed(SEED)
    model = _build(c)
    init = model.state_dict()
    names = sorted(k for k, v in init.items() if is_seeded(k, v))
    kept = {k: v.clone() for k, v in init.items() if not is_seeded(k, v)}
    meta = {"case": c, "names": names, "shapes": [list(init[k].shape) for k in names],
            "stats": tensors.init_stats(init, names).tolist(), "seed": SEED, "batch": BATCH, "epochs": EPOCHS,
            "warmup_epochs": WARMUP, "epoch": EPOCH, "iters": ITERS, "adamw_eps": ADAMW_EPS, "official": prov}
    state, views = seeded_inputs(meta, kept)
    model.load_state_dict(state)
    start = {k: v.clone() for k, v in model.state_dict().items()}

    args = argparse.Namespace(lr=c["base_lr"], weight_decay=c["weight_decay"], momentum=c["momentum"],
                              epochs=EPOCHS, warmup_epochs=WARMUP, moco_m=c["moco_m"], moco_m_cos=True, gpu=None,
                              rank=0, print_freq=10 ** 9)
    args.lr = args.lr * BATCH / 256     # main_worker: "infer learning rate before changing batch size"
    if c["optimizer"] == "lars":        # main_worker's optimizers
        optimizer = moco.optimizer.LARS(model.parameters(), args.lr, weight_decay=args.weight_decay,
                                        momentum=args.momentum)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), args.lr, weight_decay=args.weight_decay, eps=ADAMW_EPS)

    out_t = {f"kept/{k}": v for k, v in kept.items()}
    ms, lrs = [], []
    real_step, real_forward = optimizer.step, model.forward

    def forward(x1, x2, m):   # records the momentum main_moco.train passes
        ms.append(m)
        return real_forward(x1, x2, m)

    def step(*a, **kw):       # records the gradients stepped on, then the state after the step
        i = len(lrs)
        lrs.append(optimizer.param_groups[0]["lr"])
        out_t.update({f"grad/{i}/{n}": tensors.digest(p.grad) for n, p in model.named_parameters()
                      if p.grad is not None})
        result = real_step(*a, **kw)
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                out_t[f"delta/{i}/{k}"] = tensors.digest(v - start[k])
            else:
                out_t[f"value/{i}/{k}"] = v.clone().reshape(-1)
        return result

    model.forward, optimizer.step = forward, step
    writer = _Writer()
    loader = [(pair, torch.zeros(BATCH, dtype=torch.long)) for pair in views]
    with official.cuda_is_cpu():
        main_moco.train(loader, model, optimizer, torch.cuda.amp.GradScaler(), writer, EPOCH, args)
    if len(lrs) != ITERS or len(writer.losses) != ITERS:
        raise AssertionError(f"{name}: main_moco.train took {len(lrs)} steps, expected {ITERS}")
    out_t.update({"loss": torch.tensor(writer.losses, dtype=torch.float64),
                  "lr": torch.tensor(lrs, dtype=torch.float64), "m": torch.tensor(ms, dtype=torch.float64),
                  "input_sums": tensors.input_sums(inputs_by_name(state, views))})
    tensors.write(out / f"moco_step_{name}.safetensors", out_t, meta)


def generate(moco_v3: Path, dino: Path, out: Path) -> None:
    prov = official.provenance(moco_v3, dino)
    for name, c in CASES.items():
        _case(name, c, prov, out)
