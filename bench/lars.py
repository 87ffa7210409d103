"""LARS step time: the fused kernels (kernels/lars.py, three launches) vs the unfused reference (the
official per-parameter loop, `lars_ref_`) on the parameter list of MoCo v3's ResNet-50 (online encoder
with its 2-layer projector, and the predictor: what the optimizer steps), fp32.

    python -m bench.lars                 # on a GPU: one table, and a JSON line per row
    python -m bench.lars --smoke         # CPU (interpreter): runs every path once, NOT a measurement

Also a part of bench/throughput.py's section "r50" (bench/r50.py).
"""
from __future__ import annotations

import argparse
import json

import torch

from bench.timing import measure
from fastmoco.kernels.lars import lars_, lars_ref_

HP = dict(lr=9.6, weight_decay=1e-6, momentum=0.9, trust_coefficient=0.001)  # R50 100 ep at batch 4096


def r50_moco_shapes(smoke: bool) -> list[torch.Size]:
    """Shapes of the trainable parameters of MoCo v3 R50 (resnet18 with small heads under --smoke)."""
    from fastmoco.moco import MoCo

    with torch.device("meta"):
        model = MoCo("resnet18", dim=32, mlp_dim=64) if smoke else MoCo("resnet50", dim=256, mlp_dim=4096)
    return [p.shape for p in model.parameters() if p.requires_grad]


SMOKE_TENSORS = 12  # under the interpreter the fused step on all of resnet18 takes ~24 s: its first tensors


def bench_lars(device: torch.device, smoke: bool = False) -> list[dict]:
    shapes = r50_moco_shapes(smoke)[:SMOKE_TENSORS] if smoke else r50_moco_shapes(smoke)
    gen = torch.Generator(device=device).manual_seed(0)
    params = [torch.randn(s, device=device, generator=gen) for s in shapes]
    grads = [[1e-3 * torch.randn(s, device=device, generator=gen) for s in shapes] for _ in range(2)]
    mus = [torch.zeros(s, device=device) for s in shapes]
    warmup, steps, repeats = (1, 1, 1) if smoke else (5, 20, 5)
    recs = []
    for name, fn in (("fused", lars_), ("reference", lars_ref_)):
        t = measure(lambda i: fn(params, grads[i % 2], mus, **HP), device, warmup, steps, repeats)
        recs.append({"bench": "lars", "impl": name, "tensors": len(shapes), "elements": sum(p.numel() for p in params),
                     "ms": t.ms, "spread": t.spread, "smoke": smoke, "device": str(device)})
    return recs


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        raise SystemExit("bench.lars: no GPU; --smoke runs the paths once on the CPU (not a measurement)")
    recs = bench_lars(device, smoke=args.smoke)
    label = " (SMOKE: not a measurement)" if args.smoke else ""
    print(f"LARS step, MoCo v3 R50 parameter list ({recs[0]['tensors']} tensors, {recs[0]['elements']:,} "
          f"elements){label}")
    for r in recs:
        print(f"  {r['impl']:<10} {r['ms']:8.3f} ms  (spread {r['spread']:.0%})")
    for r in recs:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
