"""DINO speed: the Trainer's DINO step against the official code's build, and the fused loss.

    python bench/throughput.py --only dino [--batch 64]

- step/trainer: `fastmoco.train.Trainer.train_step` built from configs/dino_vit_s16.json (DeepSpeed bf16,
  ZeRO-1, fused DINO loss, multi-tensor fp32 EMA) on 2 global 224-px + the config's local 96-px crops
  (data.local_crops: 8, the README's vanilla recipe) already on the device; img/s (one image = all its crops). At batch 64 (DINO's per GPU) and at the
  largest of 128, 256, 512 that fits (step/trainer-largest).
- step/e2e: the same Trainer fed by its DALI multi-crop loader on a JPEG folder (end to end).
- step/peer: bench/peer.py's PeerDINO as main_dino.py trains it: timm ViT-S/16, fp16 autocast +
  GradScaler, unfused loss, per-parameter clipping (3.0) and EMA loops, AdamW (torch's default).
- loss/fused and loss/unfused: `dino_loss` vs `dino_loss_ref` forward + backward at K = 65536,
  B = batch, 12 student and 2 teacher crops, bf16; ms and extra peak memory.
Smoke mode (automatic without CUDA): tiny shapes; not a measurement.
"""
from __future__ import annotations

import tempfile

import torch

from bench.timing import REPO, free, run_builds, time_step

CONFIG = "configs/dino_vit_s16.json"
SMOKE_CONFIG = "configs/dino_tiny.json"
ROTATE = 2
CLIP = 3.0


def _crops(batch: int, sizes: list[int], device, dtype, seed: int) -> list[list[torch.Tensor]]:
    g = torch.Generator(device=device).manual_seed(seed)
    return [[torch.randn(batch, 3, s, s, device=device, dtype=dtype, generator=g) for s in sizes]
            for _ in range(ROTATE)]


def _sizes(cfg) -> list[int]:
    from fastmoco.pipelines.base import augment_params

    return [c["size"] for c in augment_params(cfg.data)["crops"]]


def bench_trainer(batch: int, device, smoke: bool, data_dir=None, build: str = "trainer") -> dict:
    """The Trainer's step on device batches, or (data_dir) fed by its own DALI multi-crop loader."""
    rec = {"section": "dino", "name": "step", "build": build, "shape": f"b{batch}"}
    from bench.model_step import release_trainer, trainer_from_config

    with tempfile.TemporaryDirectory(prefix="fastmoco-dino-") as tmp:
        trainer = trainer_from_config(SMOKE_CONFIG if smoke else CONFIG, batch=batch, out_dir=tmp, data_dir=data_dir)
        cfg = trainer.cfg
        try:
            if data_dir is None:
                crops = _crops(batch, _sizes(cfg), device, torch.bfloat16 if trainer.bf16 else torch.float32, 0)
                batches = (crops[i % ROTATE] for i in iter(int, 1))
            else:
                batches = (views for _ in iter(int, 1) for *views, _ in trainer.loader)

            def step(i):
                trainer.train_step(*next(batches))
                trainer.step += 1

            res = time_step(step, device, smoke)
            notes = f"DeepSpeed {'bf16' if trainer.bf16 else 'fp32'} ZeRO-{trainer.zero_stage}, " \
                    f"{len(_sizes(cfg))} crops" + (f", DALI on {data_dir}" if data_dir is not None else "")
        finally:
            release_trainer(trainer)
    ips = batch * 1e3 / res["ms"]
    return {**rec, "status": "ok", "batch": batch, "metrics": {**res, "img_per_s": ips, "notes": notes},
            "figures": {"img_per_s": ips}}


def bench_peer(batch: int, device, smoke: bool) -> dict:
    from bench.peer import PeerDINO, peer_clip_gradients
    from fastmoco.config import load_config

    rec = {"section": "dino", "name": "step", "build": "peer", "shape": f"b{batch}"}
    cfg = load_config(str(REPO / (SMOKE_CONFIG if smoke else CONFIG)))
    m = cfg.model
    with torch.device(device):
        model = PeerDINO(m.arch, m.img_size, m.patch_size or 16, m.num_heads, cfg.dino.out_dim, m.drop_path)
    amp = device.type == "cuda"
    decay = [p for n, p in model.student.named_parameters() if p.requires_grad and not
             (n.endswith(".bias") or p.dim() == 1)]
    no_decay = [p for n, p in model.student.named_parameters() if p.requires_grad and
                (n.endswith(".bias") or p.dim() == 1)]
    opt = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=5e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    crops = _crops(batch, _sizes(cfg), device, torch.float32, seed=0)

    def step(i):
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            loss = model(crops[i % ROTATE], teacher_temp=0.04)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        peer_clip_gradients(model.student, CLIP)
        scaler.step(opt)
        scaler.update()
        model.update_teacher(0.996)

    res = time_step(step, device, smoke)
    ips = batch * 1e3 / res["ms"]
    notes = "fp16 autocast + GradScaler, timm ViT, per-parameter clip and EMA loops"
    return {**rec, "status": "ok", "batch": batch, "metrics": {**res, "img_per_s": ips, "notes": notes},
            "figures": {"img_per_s": ips}}


def bench_loss(batch: int, device, smoke: bool) -> list[dict]:
    from fastmoco.kernels.dino_loss import dino_loss, dino_loss_ref

    K, vs = (130, 5) if smoke else (65536, 12)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    student = torch.randn(vs, batch, K, device=device, generator=g).to(dtype).requires_grad_()
    teacher = torch.randn(2, batch, K, device=device, generator=g).to(dtype)
    center = torch.zeros(K, device=device)
    out = []
    for build, fn in (("fused", dino_loss), ("unfused", dino_loss_ref)):
        def step(i):
            loss, _ = fn(student, teacher, center, 0.1, 0.04)
            torch.autograd.grad(loss, student)

        if device.type == "cuda":
            step(0)
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        res = time_step(step, device, smoke)
        if device.type == "cuda":
            res["extra_peak_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        calls = 1e3 / res["ms"]
        out.append({"section": "dino", "name": "loss", "build": build, "shape": f"V{vs} B{batch} K{K}",
                    "status": "ok", "metrics": {**res, "calls_per_s": calls}, "figures": {"calls_per_s": calls}})
    return out


def bench_dino(device, *, batch: int = 0, smoke: bool = False, data_dir=None) -> list[dict]:
    batch = batch or (4 if smoke else 64)
    builds = [("trainer", lambda: bench_trainer(batch, device, smoke)), ("peer", lambda: bench_peer(batch, device, smoke))]
    if data_dir is not None:
        builds.insert(1, ("e2e", lambda: bench_trainer(batch, device, smoke, data_dir, "e2e")))
    recs = run_builds("dino", builds, device)
    largest = None   # the largest batch that fits, of a few doublings
    for b in ([] if smoke else [2 * batch, 4 * batch, 8 * batch]):
        free(device)
        try:
            largest = bench_trainer(b, device, smoke, build="trainer-largest")
        except torch.OutOfMemoryError:
            break
    if largest is not None:
        recs.append(largest)
    free(device)
    return recs + bench_loss(batch, device, smoke)


# -- report ---------------------------------------------------------------------------------------

TITLES = {"dino": "DINO: the Trainer's step vs the official build (2x224 + 10x96 crops), fused vs unfused loss "
                  "(bench/dino.py)"}


def table(recs: list[dict], markdown: bool) -> str:
    from bench.report import simple_table

    return simple_table(recs, markdown, "entry")
