"""MoCo v3 ResNet-50 speed: the Trainer's step against the official code's build, and the LARS step.

    python bench/throughput.py --only r50 [--batch 256]

- step/trainer: `fastmoco.train.Trainer.train_step` built from configs/r50_100ep.json (DeepSpeed bf16,
  channels_last, BN over the global batch, fused LARS, multi-tensor fp32 EMA) on two 224-px views
  already on the device; img/s (one image = its two views).
- step/e2e: the same Trainer fed by its DALI loader on a JPEG folder (end to end).
- step/peer: bench/peer.py's PeerMoCoResNet as main_moco.py trains it: torchvision ResNet-50, fp16
  autocast + GradScaler, the per-parameter momentum loop, LARS by the official per-parameter loop
  (`lars_ref_`, the official moco/optimizer.py rule).
- lars/fused and lars/reference: bench/lars.py's LARS step on R50's trainable parameter list, fp32.
Smoke mode (automatic without CUDA): configs/r50_tiny.json (resnet18 at 32 px), 2 steps, and LARS by
the reference loop in every build (the fused kernels under the interpreter take ~24 s a step on
resnet18; tests/test_lars.py checks them). Not a measurement.
"""
from __future__ import annotations

import tempfile

import torch

from bench.timing import REPO, run_builds, time_step

CONFIG = "configs/r50_100ep.json"
SMOKE_CONFIG = "configs/r50_tiny.json"
BATCH = 256   # per GPU: the recipe's 4096 over 16 GPUs
ROTATE = 2


def _record(build: str, batch: int, res: dict, notes: str) -> dict:
    ips = batch * 1e3 / res["ms"]
    return {"section": "r50", "name": "step", "build": build, "shape": f"b{batch}", "status": "ok", "batch": batch,
            "metrics": {**res, "img_per_s": ips, "notes": notes}, "figures": {"img_per_s": ips}}


def bench_trainer(batch: int, device, smoke: bool, data_dir=None, build: str = "trainer") -> dict:
    """The Trainer's step on device batches, or (data_dir) fed by its own DALI loader."""
    from bench.model_step import device_batches, loader_batches, release_trainer, trainer_from_config, trainer_notes

    with tempfile.TemporaryDirectory(prefix="fastmoco-r50-") as tmp:
        trainer = trainer_from_config(SMOKE_CONFIG if smoke else CONFIG, batch=batch, out_dir=tmp, data_dir=data_dir)
        cfg = trainer.cfg
        try:
            batches = device_batches(trainer, batch, cfg.data.image_size) if data_dir is None \
                else loader_batches(trainer)

            def step(i):
                trainer.train_step(*next(batches))
                trainer.step += 1

            res = time_step(step, device, smoke)
            notes = trainer_notes(trainer) + (f", DALI on {data_dir}" if data_dir is not None else "")
        finally:
            release_trainer(trainer)
    return _record(build, batch, res, notes)


def bench_peer(batch: int, device, smoke: bool) -> dict:
    from bench.peer import PeerMoCoResNet
    from fastmoco.optim import LARS

    from fastmoco.config import load_config

    cfg = load_config(str(REPO / (SMOKE_CONFIG if smoke else CONFIG)))
    with torch.device(device):
        model = PeerMoCoResNet(cfg.model.arch, cfg.moco.dim, cfg.moco.mlp_dim, cfg.moco.tau)
    o = cfg.optim
    opt = LARS(model.parameters(), lr=o.base_lr * batch / 256, weight_decay=o.weight_decay, momentum=o.momentum,
               trust_coefficient=o.trust_coefficient)
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    g = torch.Generator(device=device).manual_seed(0)
    img = cfg.data.image_size
    views = [[torch.randn(batch, 3, img, img, device=device, generator=g) for _ in range(2)] for _ in range(ROTATE)]

    def step(i):
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            loss = model(*views[i % ROTATE], cfg.moco.momentum)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    from fastmoco import ops

    with ops.fused(lars="off"):  # the official per-parameter loop
        res = time_step(step, device, smoke)
    return _record("peer", batch, res, "fp16 autocast + GradScaler, torchvision ResNet, per-parameter momentum "
                                       "and LARS loops")


def bench_lars_rows(device, smoke: bool) -> list[dict]:
    from bench.lars import bench_lars

    out = []
    for r in bench_lars(device, smoke):
        steps = 1e3 / r["ms"]
        out.append({"section": "r50", "name": "lars", "build": r["impl"], "shape": f"{r['tensors']} tensors",
                    "status": "ok", "metrics": {"ms": r["ms"], "spread": r["spread"], "elements": r["elements"],
                                                "steps_per_s": steps},
                    "figures": {"steps_per_s": steps}})
    return out


def bench_r50(device, *, batch: int = 0, smoke: bool = False, data_dir=None) -> list[dict]:
    from fastmoco import ops

    batch = batch or (4 if smoke else BATCH)
    builds = [("trainer", lambda: bench_trainer(batch, device, smoke)), ("peer", lambda: bench_peer(batch, device, smoke))]
    if data_dir is not None:
        builds.insert(1, ("e2e", lambda: bench_trainer(batch, device, smoke, data_dir, "e2e")))
    with ops.fused(**({"lars": "off"} if smoke else {})):
        recs = run_builds("r50", builds, device)
    return recs + bench_lars_rows(device, smoke)


# -- report ---------------------------------------------------------------------------------------

TITLES = {"r50": "MoCo v3 ResNet-50: the Trainer's step vs the official build (2x224 views), LARS fused vs the "
                 "official loop (bench/r50.py)"}


def table(recs: list[dict], markdown: bool) -> str:
    from bench.report import simple_table

    return simple_table(recs, markdown, "entry")
