"""Model step: one MoCo v3 training step, measured as training runs it.

Builds of the same step, measured in the same run:

- `trainer`: `fastmoco.train.Trainer.train_step`, the step `train.py` runs, with the
  Trainer built as `train.py` builds it from the arch's recipe config (configs/vit_*.json:
  DeepSpeed engine, bf16 module, fp32 EMA master read from the optimizer's fp32 master,
  AdamW(fused), the config's ZeRO stage and activation checkpointing), one process,
  fed by batches already on the device (bf16, as the loaders deliver them).
- `e2e`: the same Trainer fed by its own DALI loader on a folder of real JPEGs at the
  same micro batch. `e2e / trainer` is then the input pipeline's cost and nothing else.
- `reference`: the `trainer` build under `ops.fused(attention="off", layernorm="off",
  contrastive="off", ema="off")`: fastmoco's own unfused PyTorch path.
- `peer`: built as the official MoCo v3 code (facebookresearch/moco-v3,
  moco/builder.py MoCo_ViT + main_moco.py) builds it: a timm ViT with MoCo v3's
  stop-gradient patch embedding, nn.Sequential BN-MLP heads (Linear without
  bias, BatchNorm1d, ReLU; last BN affine=False), each crop forwarded
  separately, fp16 autocast with GradScaler, AdamW (torch's default
  implementation), the momentum update as a per-parameter Python loop, loss by
  einsum + CrossEntropyLoss. Given every benefit: its labels are made on the
  device and no loss.item() is logged per step (the official code does both,
  each a host sync); GradScaler's own inf check remains, as in the original.
- `peer_compile`: the peer with both encoders under torch.compile (default mode).

FLOPs per image come from `bench.flops` (base encoder forward + backward on two
crops, momentum encoder forward on two crops); MFU divides by the device's
dense bf16 peak (fp16's is the same on these GPUs).
"""
from __future__ import annotations

import gc
import os
import tempfile
import time
import traceback
from pathlib import Path

import torch

from bench import flops
from bench.peer import PeerMoCo
from bench.timing import REPO, measure

# chunked: the Trainer with memory.backbone_chunk (fastmoco/chunked.py), not in the default builds
BUILDS = ("trainer", "e2e", "reference", "peer", "peer_compile", "chunked")
ROTATE = 3            # input batches cycled through, so no cache holds the next step's input
TAU = 0.2             # MoCo v3's ViT temperature
LR, WEIGHT_DECAY = 1.5e-4, 0.1
MOMENTUM = 0.99
MAX_HALVINGS = 2      # on out-of-memory, retry a build at batch/2, then batch/4

# Batch per GPU for about 80 GiB, with the reference build still fitting (it keeps the
# N x N attention probabilities for backward); ViT-H at a small batch to keep the bench short.
# A build that runs out of memory is retried at half the batch (its row shows the batch).
DEFAULT_BATCH = {"vit_small": 512, "vit_base": 256, "vit_large": 128, "vit_huge": 32}
# Timed steps per repeat (3 repeats): fewer for the big models so the full bench stays within minutes.
DEFAULT_STEPS = {"vit_small": 6, "vit_base": 5, "vit_large": 4, "vit_huge": 3}

# Fused ops and the kernel symbols each needs (the names `fastmoco.ops` dispatches to).
KERNEL_SYMBOLS = {
    "attention": ("fastmoco.kernels.attention", ("attention",)),
    "layernorm": ("fastmoco.kernels.layernorm", ("layernorm", "add_layernorm")),
    "contrastive": ("fastmoco.kernels.contrastive", ("symmetric_contrastive_loss",)),
    "ema": ("fastmoco.kernels.ema", ("ema_multi_",)),
}


def kernel_availability() -> dict[str, str | None]:
    """op -> None when its kernel imports, else the reason it does not."""
    import importlib

    out = {}
    for op, (module, names) in KERNEL_SYMBOLS.items():
        try:
            mod = importlib.import_module(module)
            missing = [n for n in names if not hasattr(mod, n)]
            out[op] = f"{module} has no {', '.join(missing)}" if missing else None
        except Exception as e:  # a kernel being written may not import yet: say why, go on
            out[op] = f"{type(e).__name__}: {e}".splitlines()[0]
    return out


def fused_modes(device: torch.device, smoke: bool) -> tuple[dict[str, str], list[str]]:
    """ops modes for the trainer and e2e builds, and notes naming any op left unfused.

    On CUDA "auto" is the kernel. In CPU smoke mode "on" runs each kernel under the
    Triton interpreter so the code path is exercised. An op whose kernel does not
    import runs its reference, and the build's label says so."""
    modes, notes = {}, []
    for op, reason in kernel_availability().items():
        if reason is None:
            modes[op] = "on" if (smoke and device.type != "cuda") else "auto"
        else:
            modes[op] = "off"
            notes.append(f"{op}: reference (kernel unavailable: {reason})")
    return modes, notes


def _inputs(batch: int, img: int, device: torch.device, dtype: torch.dtype, seed: int):
    g = torch.Generator(device=device).manual_seed(seed)
    return [tuple(torch.randn(batch, 3, img, img, device=device, dtype=dtype, generator=g) for _ in range(2))
            for _ in range(ROTATE)]


# -- fastmoco builds: train.py's Trainer ---------------------------------------------------------

# The recipe each arch trains with (ZeRO stage, bf16, activation checkpointing, optimizer).
ARCH_ALIASES = {"vit_s": "vit_small", "vit_b": "vit_base", "vit_l": "vit_large", "vit_h": "vit_huge"}
ARCH_CONFIGS = {"vit_small": "configs/vit_s.json", "vit_base": "configs/vit_b.json",
                "vit_large": "configs/vit_l.json", "vit_huge": "configs/vit_h.json"}
SMOKE_CONFIG = "configs/tiny.json"


def trainer_from_config(config: str, *, batch: int, out_dir: str, data_dir: Path | None = None, threads: int = 0,
                        extra: tuple[str, ...] = ()):
    """`fastmoco.train.Trainer` as `train.py` builds it from a recipe config for one process at micro
    batch `batch`: data from `data_dir` (DALI, the config's default backend) or, when None, the
    synthetic source (left unused: the model-step builds feed device batches). `extra`: overrides."""
    from fastmoco.config import load_config
    from fastmoco.train import Trainer, fill_single_process_env

    overrides = ["--deepspeed.train_batch_size", str(batch), "--deepspeed.train_micro_batch_size_per_gpu", str(batch),
                 "--logging.out_dir", out_dir, "--logging.tensorboard", "false", "--logging.progress", "false",
                 *extra]
    if data_dir is None:
        # made per batch, never read: its size only sets the schedule's length (steps per epoch)
        overrides += ["--data.source", "synthetic", "--data.synthetic_size", str(batch * 1000)]
    else:
        overrides += ["--data.source", "folder", "--data.path", str(data_dir),
                      "--data.num_threads", str(threads or min(16, os.cpu_count() or 1))]
    cfg = load_config(str(REPO / config), overrides)
    # One process of one, for the life of the process (ZeRO-3 reads LOCAL_RANK in the step); the
    # train.py e2e run is started without them (bench/pipeline.py).
    fill_single_process_env()
    return Trainer(cfg)


def build_trainer(arch: str, *, img: int, batch: int, dim: int, mlp_dim: int, smoke: bool, out_dir: str,
                  data_dir: Path | None = None, threads: int = 0, chunk: int | str = 0):
    """The Trainer of the arch's recipe config (`trainer_from_config`) at this shape; `chunk`: its
    memory.backbone_chunk."""
    config = SMOKE_CONFIG if smoke else ARCH_CONFIGS.get(arch)
    if config is None:
        raise ValueError(f"no recipe config for arch {arch!r} (known: {', '.join(ARCH_CONFIGS)})")
    extra = ("--model.arch", arch, "--model.img_size", str(img), "--data.image_size", str(img),
             "--moco.dim", str(dim), "--moco.mlp_dim", str(mlp_dim), "--memory.backbone_chunk", str(chunk))
    return trainer_from_config(config, batch=batch, out_dir=out_dir, data_dir=data_dir, threads=threads, extra=extra)


def _trainer_step(trainer, batches):
    """step(i): Trainer.train_step on the next (x1, x2) of `batches`, as `fit` calls it."""
    def step(i: int) -> None:
        x1, x2 = next(batches)
        trainer.train_step(x1, x2)
        trainer.step += 1

    return step


def device_batches(trainer, batch: int, img: int):
    """Endless (x1, x2) already on the device in the training dtype, cycling ROTATE batches."""
    dtype = torch.bfloat16 if trainer.bf16 else torch.float32
    inputs = _inputs(batch, img, trainer.device, dtype, seed=0)
    i = 0
    while True:
        yield inputs[i % ROTATE]
        i += 1


def loader_batches(trainer):
    """Endless (x1, x2) from the Trainer's own loader, epoch after epoch."""
    while True:
        for x1, x2, _ in trainer.loader:
            yield x1, x2


def trainer_notes(trainer) -> str:
    return (f"Trainer: DeepSpeed {'bf16' if trainer.bf16 else 'fp32'} ZeRO-{trainer.zero_stage}, "
            f"{type(trainer.optimizer).__name__}, fp32 EMA master")


# -- the peer: the official MoCo v3 code's build -----------------------------------------------------

def _peer_step(arch: str, img: int, batch: int, dim: int, mlp_dim: int, device: torch.device, amp: bool,
               compile_encoders: bool):
    with torch.device(device):
        model = PeerMoCo(arch, img, dim, mlp_dim, TAU)
    model.train()
    if compile_encoders:
        model.base_encoder = torch.compile(model.base_encoder)
        model.momentum_encoder = torch.compile(model.momentum_encoder)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    inputs = _inputs(batch, img, device, torch.float32, seed=0)  # the DataLoader's fp32 views
    autocast = torch.autocast(device.type, dtype=torch.float16, enabled=amp)

    def step(i: int) -> None:
        x1, x2 = inputs[i % ROTATE]
        with autocast:
            loss = model(x1, x2, MOMENTUM)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return step


# -- running one build ------------------------------------------------------------------------------

def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def release_trainer(trainer) -> None:
    """Drop a Trainer's engine (ZeRO-3 hooks included) so the next build starts from free memory."""
    destroy = getattr(trainer.engine, "destroy", None)
    if destroy is not None:
        destroy()
    trainer.engine = trainer.optimizer = trainer.model = trainer.loader = None


def _measure_build(build: str, arch: str, img: int, batch: int, dim: int, mlp_dim: int, device: torch.device,
                   amp: bool, smoke: bool, warmup: int, steps: int, repeats: int, data_dir: Path | None = None,
                   chunk: int = 0) -> dict:
    if build in ("trainer", "e2e", "reference", "chunked"):
        from fastmoco import ops

        if build == "e2e" and data_dir is None:
            raise ValueError("the e2e build needs a JPEG folder (--data, or the bench's demo folder)")
        modes, notes = fused_modes(device, smoke) if build != "reference" else ({op: "off" for op in ops.OPS}, [])
        with tempfile.TemporaryDirectory(prefix="fastmoco-bench-") as tmp, ops.fused(**modes):
            trainer = build_trainer(arch, img=img, batch=batch, dim=dim, mlp_dim=mlp_dim, smoke=smoke, out_dir=tmp,
                                    data_dir=data_dir if build == "e2e" else None,
                                    chunk=chunk if build == "chunked" else 0)
            try:
                notes.insert(0, trainer_notes(trainer))
                if build == "chunked":
                    found = f" (auto: {trainer.model.backbone_chunk or 'the whole batch'})" if chunk == "auto" else ""
                    notes.insert(1, f"backbone in chunks of {chunk}{found} images (memory.backbone_chunk)")
                if build == "e2e":
                    notes.insert(1, f"DALI loader on {data_dir}")
                batches = loader_batches(trainer) if build == "e2e" else device_batches(trainer, batch, img)
                res = _time_step(_trainer_step(trainer, batches), device, warmup, steps, repeats)
            finally:
                release_trainer(trainer)
        return {**res, "notes": notes}
    notes = ["fp16 autocast + GradScaler, timm ViT" if amp else "fp32 (smoke)"]
    if build == "peer_compile":
        torch._dynamo.reset()
        notes.append("torch.compile on both encoders")
    step = _peer_step(arch, img, batch, dim, mlp_dim, device, amp, compile_encoders=build == "peer_compile")
    return {**_time_step(step, device, warmup, steps, repeats), "notes": notes}


def _time_step(step, device: torch.device, warmup: int, steps: int, repeats: int) -> dict:
    t0 = time.perf_counter()
    step(0)  # first step alone: compilation and autotuning show up as first_step_s
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    first_step_s = time.perf_counter() - t0
    timing = measure(lambda i: step(i + 1), device, max(0, warmup - 1), steps, repeats)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"ms": timing.ms, "ms_runs": timing.ms_runs, "spread": timing.spread, "peak_gib": peak,
            "first_step_s": first_step_s}


def bench_build(build: str, arch: str, *, img: int, batch: int, dim: int, mlp_dim: int, device: torch.device,
                amp: bool, smoke: bool, warmup: int, steps: int, repeats: int, peak_tflops: float | None,
                data_dir: Path | None = None, chunk: int = 0) -> dict:
    """One build at `batch` (halved on out-of-memory); returns a result record. `chunk`: the
    chunked build's memory.backbone_chunk."""
    rec = {"section": "model", "name": arch, "build": build, "img_size": img}
    res, error, halvings = None, None, 0
    while True:
        _free(device)
        try:
            res = _measure_build(build, arch, img, batch, dim, mlp_dim, device, amp, smoke, warmup, steps, repeats,
                                 data_dir, chunk)
            break
        except torch.cuda.OutOfMemoryError:
            error = f"out of memory at batch {batch}"
            if halvings == MAX_HALVINGS or batch <= 1:
                break
            batch, halvings = batch // 2, halvings + 1
        except Exception as e:  # one build failing must not cost the others their figures
            error = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            traceback.print_exc(limit=4)
            break
    _free(device)  # the failed attempt's tensors went with its traceback
    if res is None:
        return {**rec, "status": "unavailable", "reason": error}
    step_s = res["ms"] / 1e3
    img_per_s = batch / step_s
    tflops = flops.moco_step_flops_per_image(arch, img, mlp_dim, dim) * img_per_s / 1e12
    metrics = {"img_per_s": img_per_s, "step_ms": res["ms"], "tflops": tflops,
               "mfu": tflops / peak_tflops if peak_tflops else None, "peak_gib": res["peak_gib"],
               "spread": res["spread"], "first_step_s": res["first_step_s"], "ms_runs": res["ms_runs"]}
    if error:
        res["notes"].append(f"batch halved after: {error}")
    # fastmoco's own builds are held to the reference figures; the peers are context.
    figures = {"img_per_s": img_per_s} if build in ("trainer", "e2e", "reference", "chunked") else {}
    return {**rec, "status": "ok", "batch": batch, "metrics": metrics, "figures": figures,
            "notes": "; ".join(res["notes"])}


# -- the largest micro batch -------------------------------------------------------------------------

def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def max_batch(arch: str, *, img: int, dim: int, mlp_dim: int, device: torch.device, smoke: bool, start: int,
              limit: int, seconds: float, peak_tflops: float | None) -> dict:
    """The largest micro batch per GPU at which the Trainer's step runs, with the arch's recipe
    (ViT-H: ZeRO-3, bf16, activation checkpointing), and its img/s there.

    Doubles from `start` until a step runs out of memory or `limit` is reached, then bisects the
    gap while `seconds` allow; each probe is two steps (the second timed). One Trainer serves the
    probes (its micro batch setting does not bound the input); after an out-of-memory error it is
    rebuilt, so no half-finished step's state is reused."""
    rec = {"section": "model", "name": arch, "build": "max_batch", "img_size": img}
    t_end = time.perf_counter() + seconds
    probes: list[tuple[int, str]] = []
    ok = ok_ms = ok_peak = bad = None
    tmp = tempfile.TemporaryDirectory(prefix="fastmoco-maxbatch-")
    trainer = None
    try:
        b = start
        while b and time.perf_counter() < t_end:
            try:
                if trainer is None:
                    _free(device)
                    trainer = build_trainer(arch, img=img, batch=start, dim=dim, mlp_dim=mlp_dim, smoke=smoke,
                                            out_dir=tmp.name)
                _free(device)
                step = _trainer_step(trainer, device_batches(trainer, b, img))
                step(0)
                timing = measure(step, device, 0, 1, 1)  # sync inside: the probe's own step time
                ok, ok_ms = b, timing.ms
                ok_peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
                probes.append((b, f"ok {timing.ms:.0f} ms"))
            except Exception as e:  # noqa: BLE001 - out of memory is the answer; anything else ends the search
                if not _is_oom(e):
                    probes.append((b, f"{type(e).__name__}: {e}".splitlines()[0][:200]))
                    traceback.print_exc(limit=4)
                    break
                bad = b
                probes.append((b, "out of memory"))
                try:  # an engine stopped mid-step may not come apart cleanly: drop it either way
                    release_trainer(trainer)
                except Exception as drop_error:  # noqa: BLE001
                    probes.append((b, f"releasing the engine: {type(drop_error).__name__}"))
                trainer = None
            if bad is None:
                b = min(b * 2, limit) if b < limit else 0
            elif ok is None:
                b = b // 2 if b > 1 else 0
            else:
                gap = bad - ok
                b = ok + gap // 2 if gap > max(1, ok // 8) else 0  # resolution: 1/8 of the batch
    finally:
        if trainer is not None:
            release_trainer(trainer)
        tmp.cleanup()
        _free(device)
    if ok is None:
        return {**rec, "status": "unavailable", "reason": f"no batch ran: {probes}"}
    img_per_s = ok / (ok_ms / 1e3)
    tflops = flops.moco_step_flops_per_image(arch, img, mlp_dim, dim) * img_per_s / 1e12
    why = (f"{bad} ran out of memory" if bad else f"limit {limit} reached" if ok >= limit else "time budget spent")
    metrics = {"img_per_s": img_per_s, "step_ms": ok_ms, "tflops": tflops,
               "mfu": tflops / peak_tflops if peak_tflops else None, "peak_gib": ok_peak, "first_oom_batch": bad,
               "probes": [f"{b}: {what}" for b, what in probes]}
    return {**rec, "status": "ok", "batch": ok, "metrics": metrics, "figures": {},
            "notes": f"largest batch that ran ({why}); one timed step; probes " + ", ".join(metrics["probes"])}


# -- report ---------------------------------------------------------------------------------------

TITLES = {"model": "model step, one GPU (trainer: train.py's Trainer step on device batches, DeepSpeed as the "
                    "arch's config; e2e: the same fed by DALI on JPEGs; peer: the official MoCo v3 build, fp16 "
                    "autocast + GradScaler)"}


def table(recs: list[dict], markdown: bool) -> str:
    from bench.report import fmt, render

    headers = ["arch", "build", "batch", "img/s", "step ms", "TFLOP/s", "MFU", "peak GiB", "spread", "notes"]
    rows = []
    for r in recs:
        if r.get("build") == "ratio":
            continue
        if r["status"] != "ok":
            rows.append([r["name"], r["build"], "-", "-", "-", "-", "-", "-", "-", f"{r['status']}: {r.get('reason')}"])
            continue
        m = r["metrics"]
        mfu = f"{m['mfu']:.1%}" if m.get("mfu") else "-"
        spread = f"{m['spread']:.1%}" if m.get("spread") is not None else "-"
        rows.append([r["name"], r["build"], str(r.get("batch", "-")), fmt(m.get("img_per_s")), fmt(m.get("step_ms")),
                     fmt(m.get("tflops")), mfu, fmt(m.get("peak_gib")), spread, r.get("notes", "")])
    out = [render(headers, rows, markdown)]
    for r in recs:
        if r.get("build") == "ratio":
            parts = [f"{k.replace('_over_', ' / ')} = {v:.2f}x" for k, v in r["metrics"].items() if v]
            if parts:
                out.append(("\n" if markdown else "") + f"headline {r['name']}: " + "; ".join(parts))
    return "\n".join(out)
