"""DINO speed: the Trainer's DINO step against the official code's build, and the fused loss.

    python bench/throughput.py --only dino [--batch 64]

- step/trainer: `fastmoco.train.Trainer.train_step` built from configs/dino_vit_s16.json (DeepSpeed bf16,
  ZeRO-1, fused DINO loss, multi-tensor fp32 EMA) on 2 global 224-px + 10 local 96-px crops
  already on the device; img/s (one image = its 12 crops). At batch 64 (DINO's per GPU) and at the
  largest of 128, 256, 512 that fits (step/trainer-largest).
- step/e2e: the same Trainer fed by its DALI multi-crop loader on a JPEG folder (end to end).
- step/peer: bench/peer.py's PeerDINO as main_dino.py trains it: timm ViT-S/16, fp16 autocast +
  GradScaler, unfused loss, per-parameter clipping (3.0) and EMA loops, AdamW (torch's default).
- loss/fused and loss/unfused: `dino_loss` vs `dino_loss_ref` forward + backward at K = 65536,
  B = batch, 12 student and 2 teacher crops, bf16; ms and extra peak memory.
Smoke mode (automatic without CUDA): tiny shapes; not a measurement.
"""
from __future__ import annotations

import os
import tempfile
from unittest import mock

import torch

from bench.timing import REPO, measure

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


def build_trainer(batch: int, smoke: bool, out_dir: str, data_dir=None):
    from fastmoco.config import load_config
    from fastmoco.train import Trainer, fill_single_process_env

    overrides = ["--deepspeed.train_batch_size", str(batch), "--deepspeed.train_micro_batch_size_per_gpu", str(batch),
                 "--logging.out_dir", out_dir, "--logging.tensorboard", "false", "--logging.progress", "false"]
    if data_dir is None:  # made per batch, never read: its size only sets the schedule's length
        overrides += ["--data.source", "synthetic", "--data.synthetic_size", str(batch * 1000)]
    else:
        overrides += ["--data.source", "folder", "--data.path", str(data_dir),
                      "--data.num_threads", str(min(16, os.cpu_count() or 1))]
    cfg = load_config(str(REPO / (SMOKE_CONFIG if smoke else CONFIG)), overrides)
    with mock.patch.dict(os.environ):
        fill_single_process_env()
        return Trainer(cfg), cfg


def _time(step, device, smoke: bool) -> dict:
    t = measure(step, device, warmup=1 if smoke else 3, steps=2 if smoke else 10, repeats=1 if smoke else 3)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"ms": t.ms, "spread": t.spread, "peak_gib": peak}


def bench_trainer(batch: int, device, smoke: bool, data_dir=None, build: str = "trainer") -> dict:
    """The Trainer's step on device batches, or (data_dir) fed by its own DALI multi-crop loader."""
    rec = {"section": "dino", "name": "step", "build": build, "shape": f"b{batch}"}
    with tempfile.TemporaryDirectory(prefix="fastmoco-dino-") as tmp:
        trainer, cfg = build_trainer(batch, smoke, tmp, data_dir)
        try:
            if data_dir is None:
                crops = _crops(batch, _sizes(cfg), device, torch.bfloat16 if trainer.bf16 else torch.float32, 0)
                batches = (crops[i % ROTATE] for i in iter(int, 1))
            else:
                batches = (views for _ in iter(int, 1) for *views, _ in trainer.loader)

            def step(i):
                trainer.train_step(*next(batches))
                trainer.step += 1

            res = _time(step, device, smoke)
            notes = f"DeepSpeed {'bf16' if trainer.bf16 else 'fp32'} ZeRO-{trainer.zero_stage}, " \
                    f"{len(_sizes(cfg))} crops" + (f", DALI on {data_dir}" if data_dir is not None else "")
        finally:
            trainer.engine.destroy()
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

    res = _time(step, device, smoke)
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
        res = _time(step, device, smoke)
        if device.type == "cuda":
            res["extra_peak_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        calls = 1e3 / res["ms"]
        out.append({"section": "dino", "name": "loss", "build": build, "shape": f"V{vs} B{batch} K{K}",
                    "status": "ok", "metrics": {**res, "calls_per_s": calls}, "figures": {"calls_per_s": calls}})
    return out


def _free(device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def bench_dino(device, *, batch: int = 0, smoke: bool = False, data_dir=None) -> list[dict]:
    batch = batch or (4 if smoke else 64)
    recs = []
    builds = [("trainer", lambda: bench_trainer(batch, device, smoke)), ("peer", lambda: bench_peer(batch, device, smoke))]
    if data_dir is not None:
        builds.insert(1, ("e2e", lambda: bench_trainer(batch, device, smoke, data_dir, "e2e")))
    for build, fn in builds:
        _free(device)
        try:
            recs.append(fn())
        except torch.OutOfMemoryError as e:
            recs.append({"section": "dino", "name": "step", "build": build, "status": "oom",
                         "reason": str(e).splitlines()[0][:200]})
    largest = None   # the largest batch that fits, of a few doublings
    for b in ([] if smoke else [2 * batch, 4 * batch, 8 * batch]):
        _free(device)
        try:
            largest = bench_trainer(b, device, smoke, build="trainer-largest")
        except torch.OutOfMemoryError:
            break
    if largest is not None:
        recs.append(largest)
    _free(device)
    recs += bench_loss(batch, device, smoke)
    ok = {r["build"]: r for r in recs if r["name"] == "step" and r["status"] == "ok"}
    if "trainer" in ok and "peer" in ok:
        ok["trainer"]["metrics"]["over_peer"] = ok["trainer"]["figures"]["img_per_s"] / ok["peer"]["figures"]["img_per_s"]
    return recs


# -- report ---------------------------------------------------------------------------------------

TITLES = {"dino": "DINO: the Trainer's step vs the official build (2x224 + 10x96 crops), fused vs unfused loss "
                  "(bench/dino.py)"}


def table(recs: list[dict], markdown: bool) -> str:
    from bench.report import simple_table

    return simple_table(recs, markdown, "entry")
