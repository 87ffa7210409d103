"""lars.safetensors: three steps of moco-v3's LARS (moco/optimizer.py) on three parameter groups.

Group 0 (weight decay on): 1-d, 2-d and 4-d tensors, sizes that are not powers of two and a tensor of
zeros (trust ratio 1: zero norm). Group 1 (no weight decay, another lr / momentum / trust coefficient): a
2-d tensor with a zero gradient in step 0 and a 1-d tensor without a gradient in step 1 (skipped: its
momentum buffer does not move). Group 2: a tensor whose gradient in step 0 is -weight_decay * p (a zero
update: ratio 1).

Tensors: param/<i>/init, grad/<step>/<i> (absent: grad None), param/<i>/<step>, mu/<i>/<step> after each step.
"""
from __future__ import annotations

from pathlib import Path

import torch

from golden import official, tensors

GROUPS = [dict(lr=0.7, weight_decay=0.05, momentum=0.9, trust_coefficient=0.02),
          dict(lr=0.3, weight_decay=0.0, momentum=0.8, trust_coefficient=0.001),
          # weight decay a power of 2: -wd * p + wd * p is exactly 0 in fp32 (with 0.05 a rounding residue
          # of 1e-9 is left, and the official ratio trust * |p| / 1e-9 turns it into a full step)
          dict(lr=0.4, weight_decay=0.5, momentum=0.9, trust_coefficient=0.01)]
# (shape, group, role): role "zero" all-zero weights, "still" gradient -wd * p, "zero_grad_0" zero gradient
# in step 0, "no_grad_1" no gradient in step 1
PARAMS = [((37,), 0, ""), ((3, 5), 0, ""), ((7, 3, 3, 3), 0, ""), ((33, 17), 0, ""), ((1,), 0, ""),
          ((2, 3), 0, "zero"), ((2, 2), 2, "still"), ((3,), 2, ""), ((64,), 1, ""), ((5, 11), 1, "zero_grad_0"),
          ((4,), 1, "no_grad_1"), ((6, 4, 1, 1), 1, "")]
STEPS = 3
SEED = 11


def inputs() -> tuple[list[torch.Tensor], list[list[torch.Tensor | None]]]:
    params, grads = [], []
    for i, (shape, group, role) in enumerate(PARAMS):
        params.append(torch.zeros(shape) if role == "zero" else tensors.seeded(shape, SEED, f"param{i}"))
    for step in range(STEPS):
        row = []
        for i, (shape, group, role) in enumerate(PARAMS):
            if role == "still":
                g = -GROUPS[group]["weight_decay"] * params[i]
            elif (role, step) == ("zero_grad_0", 0):
                g = torch.zeros(shape)
            elif (role, step) == ("no_grad_1", 1):
                g = None
            else:
                g = tensors.seeded(shape, SEED, f"grad{step}.{i}", scale=0.1)
            row.append(g)
        grads.append(row)
    return params, grads


def generate(moco_v3: Path, dino: Path, out: Path) -> None:
    from moco.optimizer import LARS

    params, grads = inputs()
    out_t = {f"param/{i}/init": p.clone() for i, p in enumerate(params)}
    for step, row in enumerate(grads):
        out_t.update({f"grad/{step}/{i}": g.clone() for i, g in enumerate(row) if g is not None})
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = LARS([{"params": [p for p, (_, g, _) in zip(ps, PARAMS) if g == k], **hp} for k, hp in enumerate(GROUPS)])
    for step, row in enumerate(grads):
        for p, g in zip(ps, row):
            p.grad = None if g is None else g.clone()
        opt.step()
        for i, p in enumerate(ps):
            out_t[f"param/{i}/{step}"] = p.detach().clone()
            out_t[f"mu/{i}/{step}"] = opt.state[p]["mu"].clone()
    meta = {"groups": GROUPS, "params": [{"shape": list(s), "group": g, "role": r} for s, g, r in PARAMS],
            "steps": STEPS, "official": official.provenance(moco_v3, dino)}
    tensors.write(out / "lars.safetensors", out_t, meta)
