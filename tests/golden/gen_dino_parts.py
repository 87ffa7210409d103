"""DINO's parts from the official code (facebookresearch/dino):

- dino_loss.safetensors: main_dino.DINOLoss on seeded student (5 crops) and teacher (2 crops) outputs with a
  non-zero center, at an epoch inside the teacher-temperature warmup and one after it: the loss, its gradient
  w.r.t. the student outputs (the teacher's is None: the official loss detaches it), the center after the
  loss's update. Tensors: <case>/loss, <case>/student_grad, <case>/center; input_sums.
- dino_head.safetensors: vision_transformer.DINOHead (3 layers, GELU, L2-normalised bottleneck,
  weight-normalised last layer) with norm_last_layer true and false (then weight_g is trained and set to
  seeded values here): its state dict at the official init, the output for a stored input, and the
  gradients of sum(output * probe) w.r.t. the input and every parameter. Tensors: <case>/state/<name>,
  <case>/x, <case>/probe, <case>/out, <case>/grad/x, <case>/grad/<name>.
- pos_embed.safetensors: vision_transformer.VisionTransformer.interpolate_pos_encoding for patch 16 and 8
  of a model built for 224 px, for a random table and a smooth one (`pos_tables`), at 96, 96 x 160 and 224 px
  (whole at 96 px, digests else);
  and the class-token features of that ViT (2 blocks, width 72, 3 heads: fastmoco's vit_test sizes; seeded
  weights, random table) for seeded images at those sizes. Tensors: p<P>/<table>/<H>x<W>,
  p<P>/features/<H>x<W>; input_sums.
"""
from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn

from golden import official, tensors

SEED = 23
# DINOLoss: K outputs (not a power of 2), B images, 2 global + 3 local crops; the temperature warms up over
# 3 of 6 epochs; cases at epoch 1 (0.055) and 4 (0.07)
LOSS = dict(out_dim=257, batch=5, ncrops=5, warmup_teacher_temp=0.04, teacher_temp=0.07,
            warmup_teacher_temp_epochs=3, nepochs=6, student_temp=0.1, center_momentum=0.9)
LOSS_EPOCHS = {"warmup": 1, "after": 4}
HEAD = dict(in_dim=24, out_dim=50, hidden_dim=40, bottleneck_dim=12, batch=7)
VIT = dict(img_size=224, embed_dim=72, depth=2, num_heads=3)
PATCHES = (16, 8)
SIZES = ((96, 96), (96, 160), (224, 224))
FEATURE_BATCH = 2


def loss_inputs() -> dict[str, torch.Tensor]:
    k, b, v = LOSS["out_dim"], LOSS["batch"], LOSS["ncrops"]
    return {"student": tensors.seeded((v * b, k), SEED, "student", scale=0.5),   # crops stacked along the batch
            "teacher": tensors.seeded((2 * b, k), SEED, "teacher", scale=0.5),
            "center": tensors.seeded((1, k), SEED, "center", scale=0.1)}


def pos_tables(patch: int) -> dict[str, torch.Tensor]:
    """(1, 1 + g*g, C) tables for a g x g grid: "random" N(0, 0.02^2) as DINO initialises it; "smooth" a sum
    of two low-frequency waves per channel over the grid (what a trained table looks like more than noise)."""
    g, c = VIT["img_size"] // patch, VIT["embed_dim"]
    random = tensors.seeded((1, 1 + g * g, c), SEED, f"pos_random{patch}", scale=0.02)
    freq = tensors.seeded((4, c), SEED, f"pos_freq{patch}").abs() * 1.5      # cycles over the grid, per axis
    phase = tensors.seeded((2, c), SEED, f"pos_phase{patch}") * math.pi
    u = torch.arange(g, dtype=torch.float32)[:, None, None] / g              # rows
    v = torch.arange(g, dtype=torch.float32)[None, :, None] / g              # columns
    grid = 0.02 * (torch.sin(2 * math.pi * (freq[0] * u + freq[1] * v) + phase[0])
                   + torch.sin(2 * math.pi * (freq[2] * u - freq[3] * v) + phase[1]))   # (g, g, C)
    cls = tensors.seeded((1, 1, c), SEED, f"pos_cls{patch}", scale=0.02)
    return {"random": random, "smooth": torch.cat([cls, grid.reshape(1, g * g, c)], dim=1)}


def pos_embed_inputs(states: dict[str, dict]) -> dict[str, torch.Tensor]:
    """Every input of the pos_embed cases: the tables, the features' weights (per patch size, seeded with the
    official init's per-tensor statistics: `states[str(patch)]` has the state dict's names, shapes and
    stats) and the images."""
    out = {}
    for patch in PATCHES:
        out.update({f"p{patch}/{table}": t for table, t in pos_tables(patch).items()})
        st = states[str(patch)]
        filled = tensors.fill_state(st["names"], st["shapes"], torch.tensor(st["stats"], dtype=torch.float64), SEED)
        out.update({f"p{patch}/state/{n}": t for n, t in filled.items()})
    for h, w in SIZES:
        out[f"images{h}x{w}"] = tensors.seeded((FEATURE_BATCH, 3, h, w), SEED, f"images{h}x{w}")
    return out


def _loss(out: Path, prov: dict) -> None:
    import main_dino

    x = loss_inputs()
    out_t = {"input_sums": tensors.input_sums(x)}
    meta = {"loss": LOSS, "epochs": LOSS_EPOCHS, "teacher_temp": {}, "official": prov}
    for case, epoch in LOSS_EPOCHS.items():
        fn = main_dino.DINOLoss(LOSS["out_dim"], LOSS["ncrops"], LOSS["warmup_teacher_temp"], LOSS["teacher_temp"],
                                LOSS["warmup_teacher_temp_epochs"], LOSS["nepochs"], LOSS["student_temp"],
                                LOSS["center_momentum"])
        fn.center = x["center"].clone()
        student = x["student"].clone().requires_grad_()
        teacher = x["teacher"].clone().requires_grad_()
        loss = fn(student, teacher, epoch)
        loss.backward()
        if teacher.grad is not None:
            raise AssertionError("the official DINOLoss passed a gradient to the teacher: the test assumes none")
        out_t.update({f"{case}/loss": loss.detach().reshape(1), f"{case}/student_grad": student.grad,
                      f"{case}/center": fn.center.clone()})
        meta["teacher_temp"][case] = float(fn.teacher_temp_schedule[epoch])
    tensors.write(out / "dino_loss.safetensors", out_t, meta)


def _head(out: Path, prov: dict) -> None:
    from vision_transformer import DINOHead

    out_t, h = {}, HEAD
    for case, norm_last_layer in (("norm_last_layer", True), ("free_last_layer", False)):
        torch.manual_seed(SEED)
        head = DINOHead(h["in_dim"], h["out_dim"], use_bn=False, norm_last_layer=norm_last_layer, nlayers=3,
                        hidden_dim=h["hidden_dim"], bottleneck_dim=h["bottleneck_dim"])
        if not norm_last_layer:  # a trained weight_g: not all ones
            head.last_layer.weight_g.data = tensors.seeded(head.last_layer.weight_g.shape, SEED, "g").abs() + 0.5
        x = tensors.seeded((h["batch"], h["in_dim"]), SEED, f"x_{case}").requires_grad_()
        probe = tensors.seeded((h["batch"], h["out_dim"]), SEED, f"probe_{case}")
        y = head(x)
        (y * probe).sum().backward()
        out_t.update({f"{case}/state/{k}": v.clone() for k, v in head.state_dict().items()})
        out_t.update({f"{case}/x": x.detach(), f"{case}/probe": probe, f"{case}/out": y.detach(),
                      f"{case}/grad/x": x.grad})
        out_t.update({f"{case}/grad/{k}": p.grad for k, p in head.named_parameters() if p.grad is not None})
    tensors.write(out / "dino_head.safetensors", out_t, {"head": HEAD, "official": prov})


def _pos_embed(out: Path, prov: dict) -> None:
    import vision_transformer as vits

    models, states = {}, {}
    for patch in PATCHES:
        torch.manual_seed(SEED)
        models[patch] = vits.VisionTransformer(
            img_size=[VIT["img_size"]], patch_size=patch, embed_dim=VIT["embed_dim"], depth=VIT["depth"],
            num_heads=VIT["num_heads"], mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6)).eval()
        sd = models[patch].state_dict()
        names = sorted(sd)
        states[str(patch)] = {"names": names, "shapes": [list(sd[n].shape) for n in names],
                              "stats": tensors.init_stats(sd, names).tolist()}
    inputs = pos_embed_inputs(states)
    out_t = {"input_sums": tensors.input_sums(inputs)}
    for patch, model in models.items():
        for table in ("random", "smooth"):
            model.pos_embed.data = inputs[f"p{patch}/{table}"].clone()
            for h, w in SIZES:
                tokens = torch.zeros(1, 1 + (h // patch) * (w // patch), VIT["embed_dim"])
                with torch.no_grad():
                    pos = model.interpolate_pos_encoding(tokens, h, w)
                whole = (h, w) == (96, 96)   # the local crops' size; the others as digests (file size)
                out_t[f"p{patch}/{table}/{h}x{w}"] = pos.clone() if whole else tensors.digest(pos)
        model.load_state_dict({n: inputs[f"p{patch}/state/{n}"] for n in states[str(patch)]["names"]})
        for h, w in SIZES:
            with torch.no_grad():
                out_t[f"p{patch}/features/{h}x{w}"] = model(inputs[f"images{h}x{w}"])
    meta = {"vit": VIT, "sizes": SIZES, "patches": PATCHES, "states": states, "official": prov}
    tensors.write(out / "pos_embed.safetensors", out_t, meta)


def generate(moco_v3: Path, dino: Path, out: Path) -> None:
    prov = official.provenance(moco_v3, dino)
    with official.cuda_is_cpu():
        _loss(out, prov)
        _head(out, prov)
        _pos_embed(out, prov)
