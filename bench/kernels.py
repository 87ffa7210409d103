"""Kernel microbenchmarks: each fused op against its reference (`<op>_ref`), same dtype and shapes.

Entries carry the op names of `kernels/` (attention, layernorm, add_layernorm,
contrastive, ema). Shapes are the ones a training step at the model bench's
batch produces, so the speedups here add up to the model step's. Forward and
forward+backward are timed separately; backward via torch.autograd.grad (no
.grad accumulation kernel in the timing). Throughput: attention in TFLOP/s
(model FLOPs: 4*B*H*N^2*D forward, 3x that for forward+backward), the
memory-bound ops in GB/s of the bytes they must move at least.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.timing import measure

ROTATE = 3


def _rand(shape, device, dtype, seed, requires_grad=False):
    g = torch.Generator(device=device).manual_seed(seed)
    t = torch.randn(shape, device=device, dtype=dtype, generator=g)
    return t.requires_grad_(requires_grad)


def sdpa_from_qkv(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """timm's Attention around F.scaled_dot_product_attention (the peer's attention), from qkv."""
    B, N, C3 = qkv.shape
    D = C3 // (3 * num_heads)
    q, k, v = qkv.reshape(B, N, 3, num_heads, D).permute(2, 0, 3, 1, 4).unbind(0)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, num_heads * D)


class _Timer:
    def __init__(self, device, warmup, steps, repeats):
        self.device, self.warmup, self.steps, self.repeats = device, warmup, steps, repeats

    def fwd(self, fn, inputs) -> float:
        with torch.no_grad():
            return measure(lambda i: fn(*inputs[i % len(inputs)]), self.device,
                           self.warmup, self.steps, self.repeats).ms

    def fwd_bwd(self, fn, inputs, wrt) -> float:
        """fn(*inputs) -> tensor or tuple of tensors; gradient w.r.t. the inputs at indices `wrt`."""
        grads = {}

        def step(i):
            args = inputs[i % len(inputs)]
            out = fn(*args)
            outs = out if isinstance(out, tuple) else (out,)
            key = (i % len(inputs), tuple(o.shape for o in outs))
            if key not in grads:  # upstream gradients made once per input set, outside the timing's steady state
                grads[key] = tuple(torch.randn_like(o) for o in outs)
            torch.autograd.grad(outs, [args[j] for j in wrt], grads[key])

        return measure(step, self.device, self.warmup, self.steps, self.repeats).ms


UNITS = {"tflops": 1e12, "gbps": 1e9}  # work per second -> the unit


def _entry(op, shape, kernel_ms, ref_ms, work=None, unit=None, extra=None, fb=False):
    """A result record: kernel vs reference; `work` (FLOPs or bytes per call) gives the throughput."""
    metrics = {"kernel_ms": kernel_ms, "ref_ms": ref_ms, "speedup": ref_ms / kernel_ms}
    if work is not None:
        metrics[f"kernel_{unit}"] = work / (kernel_ms / 1e3) / UNITS[unit]
        metrics[f"ref_{unit}"] = work / (ref_ms / 1e3) / UNITS[unit]
    metrics.update(extra or {})
    return {"section": "kernels", "name": op, "build": "fwd+bwd" if fb else "fwd", "shape": shape,
            "status": "ok", "metrics": metrics, "figures": {"kernel_per_s": 1e3 / kernel_ms}}


def bench_attention(cfg, t: _Timer, device, dtype) -> list[dict]:
    from fastmoco.kernels.attention import attention, attention_ref

    out = []
    for B, N, H, D in cfg["attention"]:
        inputs = [(_rand((B, N, 3 * H * D), device, dtype, s, True), H) for s in range(ROTATE)]
        shape = f"B{B} N{N} H{H} D{D}"
        fwd_flops = 4.0 * B * H * N * N * D
        for fb in (False, True):
            if fb:
                k = t.fwd_bwd(attention, inputs, (0,))
                r = t.fwd_bwd(attention_ref, inputs, (0,))
                s = t.fwd_bwd(sdpa_from_qkv, inputs, (0,)) if device.type == "cuda" else None
            else:
                k = t.fwd(attention, inputs)
                r = t.fwd(attention_ref, inputs)
                s = t.fwd(sdpa_from_qkv, inputs) if device.type == "cuda" else None
            extra = {"sdpa_ms": s, "speedup_vs_sdpa": s / k} if s else {}
            out.append(_entry("attention", shape, k, r, fwd_flops * (3 if fb else 1), "tflops", extra, fb))
    return out


def bench_layernorm(cfg, t: _Timer, device, dtype) -> list[dict]:
    from fastmoco.kernels.layernorm import add_layernorm, add_layernorm_ref, layernorm, layernorm_ref

    out = []
    for M, C in cfg["layernorm"]:
        e = torch.tensor([], dtype=dtype).element_size()
        shape = f"M{M} C{C}"
        w = [(_rand((C,), device, torch.float32, 100 + s, True), _rand((C,), device, torch.float32, 200 + s, True))
             for s in range(ROTATE)]
        ln_in = [(_rand((M, C), device, dtype, s, True), *w[s], 1e-6) for s in range(ROTATE)]
        add_in = [(_rand((M, C), device, dtype, s, True), _rand((M, C), device, dtype, 10 + s, True), *w[s], 1e-6)
                  for s in range(ROTATE)]
        out.append(_entry("layernorm", shape, t.fwd(layernorm, ln_in), t.fwd(layernorm_ref, ln_in),
                          2 * M * C * e, "gbps"))
        out.append(_entry("layernorm", shape, t.fwd_bwd(layernorm, ln_in, (0, 1, 2)),
                          t.fwd_bwd(layernorm_ref, ln_in, (0, 1, 2)), 5 * M * C * e, "gbps", fb=True))
        out.append(_entry("add_layernorm", shape, t.fwd(add_layernorm, add_in), t.fwd(add_layernorm_ref, add_in),
                          4 * M * C * e, "gbps"))
        out.append(_entry("add_layernorm", shape, t.fwd_bwd(add_layernorm, add_in, (0, 1, 2, 3)),
                          t.fwd_bwd(add_layernorm_ref, add_in, (0, 1, 2, 3)), 8 * M * C * e, "gbps", fb=True))
    return out


def bench_contrastive(cfg, t: _Timer, device, dtype) -> list[dict]:
    from fastmoco.kernels.contrastive import symmetric_contrastive_loss
    from fastmoco.kernels.contrastive import symmetric_contrastive_loss_ref as ref

    out = []
    for N, M, C in cfg["contrastive"]:
        inputs = [(_rand((N, C), device, dtype, s, True), _rand((N, C), device, dtype, 10 + s, True),
                   _rand((M, C), device, dtype, 20 + s), _rand((M, C), device, dtype, 30 + s), 0.2, 0)
                  for s in range(ROTATE)]
        shape = f"N{N} M{M} C{C}"
        out.append(_entry("contrastive", shape, t.fwd(symmetric_contrastive_loss, inputs), t.fwd(ref, inputs)))
        out.append(_entry("contrastive", shape, t.fwd_bwd(symmetric_contrastive_loss, inputs, (0, 1)),
                          t.fwd_bwd(ref, inputs, (0, 1)), fb=True))
    return out


def _encoder_shapes(arch: str, img: int, dim: int, mlp_dim: int) -> list[torch.Size]:
    """Parameter shapes of one MoCo encoder (backbone + projector), built on the meta device."""
    from fastmoco.models.heads import projector
    from fastmoco.models.vit import VisionTransformer

    with torch.device("meta"):
        enc = VisionTransformer(arch, img_size=img)
        enc.head = projector(enc.embed_dim, mlp_dim, dim)
    return [p.shape for p in enc.parameters()]


def bench_ema(cfg, t: _Timer, device, dtype) -> list[dict]:
    """momentum <- m * momentum + (1 - m) * online over an encoder's fp32 parameter list:
    one kernel over the list (ema_multi_) vs the multi-tensor reference (ema_foreach_) vs the
    official per-parameter loop (ema_ref_)."""
    from fastmoco.kernels.ema import ema_foreach_, ema_multi_, ema_ref_

    out = []
    m = torch.tensor(0.99, device=device)
    for arch, img, dim, mlp_dim in cfg["ema"]:
        shapes = _encoder_shapes(arch, img, dim, mlp_dim)
        numel = sum(s.numel() for s in shapes)
        sets = [([_rand(s, device, torch.float32, 1000 * k + i) for i, s in enumerate(shapes)],
                 [_rand(s, device, torch.float32, 1000 * k + 500 + i) for i, s in enumerate(shapes)], m)
                for k in range(2)]
        k_ms = t.fwd(ema_multi_, sets)
        f_ms = t.fwd(ema_foreach_, sets)
        r_ms = t.fwd(ema_ref_, sets)
        nbytes = 12 * numel  # read momentum + online, write momentum, fp32
        rec = _entry("ema", f"{arch} {len(shapes)} tensors {numel / 1e6:.1f}M fp32", k_ms, f_ms, nbytes, "gbps",
                     {"loop_ms": r_ms, "speedup_vs_loop": r_ms / k_ms})
        rec["build"] = "update"
        out.append(rec)
    return out


ENTRIES = {"attention": bench_attention, "layernorm": bench_layernorm, "contrastive": bench_contrastive,
           "ema": bench_ema}


def shapes_for(smoke: bool, quick: bool) -> dict:
    if smoke:  # tiny, not powers of two: the interpreter runs one program at a time
        return {"attention": [(3, 17, 3, 24)], "layernorm": [(51, 72)], "contrastive": [(12, 20, 32)],
                "ema": [("vit_test", 32, 32, 64)]}
    cfg = {
        # ViT-B/16 at batch 256 (512 crops through the base encoder); ViT-H/14 at 64.
        "attention": [(512, 197, 12, 64), (128, 257, 16, 80)],
        "layernorm": [(512 * 197, 768), (128 * 257, 1280)],
        # one GPU's batch of 256 against its own keys, and against a 16-GPU global batch
        "contrastive": [(256, 256, 256), (256, 4096, 256)],
        "ema": [("vit_base", 224, 256, 4096), ("vit_huge", 224, 256, 4096)],
    }
    if quick:
        cfg = {k: v[:1] for k, v in cfg.items()}
    return cfg


def bench_kernels(ops: list[str], device: torch.device, smoke: bool, quick: bool) -> list[dict]:
    """Run the entries named in `ops`; an entry whose kernel does not import says why."""
    cfg = shapes_for(smoke, quick)
    # Interpreter (CPU): fp32 is what it computes right; on the GPU the training dtype.
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if smoke:
        t = _Timer(device, warmup=1, steps=1, repeats=1)
    else:
        t = _Timer(device, warmup=5, steps=10 if quick else 20, repeats=3 if quick else 5)
    out = []
    for op in ops:
        try:
            out += ENTRIES[op](cfg, t, device, dtype)
        except Exception as e:  # a kernel being written may not import or run yet: say so, go on
            out.append({"section": "kernels", "name": op, "status": "unavailable",
                        "reason": f"{type(e).__name__}: {e}".splitlines()[0][:300]})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out
