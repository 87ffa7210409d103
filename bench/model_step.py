"""Model step: one MoCo v3 training step on synthetic input already on the device.

Four builds of the same step, measured in the same run:

- `fused`: what fastmoco's training does per step on one GPU: `fastmoco.moco.MoCo`
  with the Triton kernels (ops "auto" = on for CUDA tensors), fp32 parameters under
  torch.autocast(bfloat16), AdamW(fused=True) on the trainable parameters, the
  momentum m a 0-dim device tensor, zero_grad(set_to_none=True), no host sync.
- `reference`: the same under `ops.fused(attention="off", layernorm="off",
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

import contextlib
import gc
import time
import traceback

import torch

from bench import flops
from bench.peer import PeerMoCo
from bench.timing import measure

BUILDS = ("fused", "reference", "peer", "peer_compile")
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
    """ops modes for the fused build and notes naming any op left unfused.

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


# -- fastmoco builds -------------------------------------------------------------------------------

def _fastmoco_step(arch: str, img: int, batch: int, dim: int, mlp_dim: int, device: torch.device,
                   amp: bool):
    from fastmoco.moco import MoCo

    with torch.device(device):  # parameters made on the device: ViT-H builds in seconds, not minutes
        model = MoCo(arch, img_size=img, dim=dim, mlp_dim=mlp_dim, tau=TAU)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, fused=device.type == "cuda")
    m = torch.tensor(MOMENTUM, device=device)  # 0-dim device tensor: no host sync
    # The loaders hand the training loop views in the training dtype (bf16 on the GPU).
    inputs = _inputs(batch, img, device, torch.bfloat16 if amp else torch.float32, seed=0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)

    def step(i: int) -> None:
        x1, x2 = inputs[i % ROTATE]
        with autocast:
            loss = model(x1, x2, m)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


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


def _measure_build(build: str, arch: str, img: int, batch: int, dim: int, mlp_dim: int, device: torch.device,
                   amp: bool, smoke: bool, warmup: int, steps: int, repeats: int) -> dict:
    context = contextlib.nullcontext()
    notes: list[str] = []
    if build in ("fused", "reference"):
        from fastmoco import ops

        if build == "fused":
            modes, notes = fused_modes(device, smoke)
        else:
            modes = {op: "off" for op in ops.OPS}
        context = ops.fused(**modes)
        notes.insert(0, "bf16 autocast, fp32 params, AdamW(fused)" if amp else "fp32 (smoke)")
        step = _fastmoco_step(arch, img, batch, dim, mlp_dim, device, amp)
    else:
        notes.append("fp16 autocast + GradScaler, timm ViT" if amp else "fp32 (smoke)")
        if build == "peer_compile":
            torch._dynamo.reset()
            notes.append("torch.compile on both encoders")
        step = _peer_step(arch, img, batch, dim, mlp_dim, device, amp, compile_encoders=build == "peer_compile")
    with context:
        t0 = time.perf_counter()
        step(0)  # first step alone: compilation and autotuning show up as first_step_s
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        first_step_s = time.perf_counter() - t0
        timing = measure(lambda i: step(i + 1), device, max(0, warmup - 1), steps, repeats)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"ms": timing.ms, "ms_runs": timing.ms_runs, "spread": timing.spread, "peak_gib": peak,
            "first_step_s": first_step_s, "notes": notes}


def bench_build(build: str, arch: str, *, img: int, batch: int, dim: int, mlp_dim: int, device: torch.device,
                amp: bool, smoke: bool, warmup: int, steps: int, repeats: int, peak_tflops: float | None) -> dict:
    """One build at `batch` (halved on out-of-memory); returns a result record."""
    rec = {"section": "model", "name": arch, "build": build, "img_size": img}
    res, error, halvings = None, None, 0
    while True:
        _free(device)
        try:
            res = _measure_build(build, arch, img, batch, dim, mlp_dim, device, amp, smoke, warmup, steps, repeats)
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
    figures = {"img_per_s": img_per_s} if build in ("fused", "reference") else {}
    return {**rec, "status": "ok", "batch": batch, "metrics": metrics, "figures": figures,
            "notes": "; ".join(res["notes"])}
