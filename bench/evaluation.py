"""Evaluation speed: feature extraction and the weighted kNN (fastmoco.evaluation).

    python bench/evaluation.py [--arch vit_b] [--batch 512] [--data DIR] [--smoke]

- features/forward: the frozen backbone's bf16 forward on batches already on the
  device (the rate extraction can reach), img/s;
- features/dali: `extract_features` end to end on a JPEG folder through the DALI
  evaluation pipeline (resize, centre crop, normalise on the GPU), img/s and
  its fraction of the forward-only rate;
- knn: `knn_accuracy` on random fp32 features, 1.28M x 50k at width 768 and
  1000 classes (ImageNet's kNN problem), k = 20 and 200, seconds.

Records are bench records (section "eval"), printed as a table and written as
JSON lines like every other entry (bench/throughput.py reads them).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the bench as the package it is
    _here = Path(__file__).resolve().parent
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import torch  # noqa: E402

from bench.timing import measure, run_metadata, synchronize  # noqa: E402

KNN_SHAPE = {"bank": 1_281_167, "queries": 50_000, "width": 768, "classes": 1000}
SMOKE_KNN_SHAPE = {"bank": 500, "queries": 70, "width": 24, "classes": 10}


def bench_forward(arch: str, batch: int, device, *, img_size: int, steps: int, repeats: int) -> dict:
    from fastmoco.models.vit import VisionTransformer

    rec = {"section": "eval", "name": "features", "build": f"{arch} forward", "shape": f"b{batch}"}
    model = VisionTransformer(arch, img_size=img_size).to(device).eval()
    xs = [torch.randn(batch, 3, img_size, img_size, device=device) for _ in range(2)]
    bf16 = device.type == "cuda"

    @torch.no_grad()
    def step(i):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return model(xs[i % 2], head=False).float()

    t = measure(step, device, warmup=2, steps=steps, repeats=repeats)
    ips = batch * 1e3 / t.ms
    return {**rec, "status": "ok", "batch": batch, "metrics": {"ms": t.ms, "spread": t.spread, "img_per_s": ips},
            "figures": {"img_per_s": ips}}


def bench_extraction(arch: str, batch: int, device, data_dir: Path, *, img_size: int, threads: int,
                     forward_ips: float | None) -> dict:
    from fastmoco.config import DataConfig
    from fastmoco.evaluation.features import LabelledSplit, extract_features
    from fastmoco.models.vit import VisionTransformer

    rec = {"section": "eval", "name": "features", "build": f"{arch} dali", "shape": f"b{batch} t{threads}"}
    try:
        model = VisionTransformer(arch, img_size=img_size).to(device).eval()
        split = LabelledSplit.scan("data", str(data_dir))
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        loader = split.loader(DataConfig(backend="dali", num_threads=threads), batch_size=batch,
                              image_size=img_size, device=device, dtype=dtype)
        extract_features(model, loader, image_size=img_size, bf16=device.type == "cuda")   # warm-up
        synchronize(device)
        t0 = time.perf_counter()
        feats, _ = extract_features(model, loader, image_size=img_size, bf16=device.type == "cuda")
        synchronize(device)
        seconds = time.perf_counter() - t0
    except Exception as e:  # DALI absent on this machine: say so, go on
        return {**rec, "status": "unavailable", "reason": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
    ips = feats.shape[0] / seconds
    metrics = {"img_per_s": ips, "images": feats.shape[0], "seconds": seconds}
    if forward_ips:
        metrics["fraction_of_forward"] = ips / forward_ips
    return {**rec, "status": "ok", "batch": batch, "metrics": metrics, "figures": {"img_per_s": ips}}


def bench_knn(device, shape: dict) -> dict:
    from fastmoco.evaluation.knn import knn_accuracy

    name = f"{shape['bank']}x{shape['queries']} c{shape['width']}"
    rec = {"section": "eval", "name": "knn", "build": "k20,200", "shape": name}
    g = torch.Generator(device=device).manual_seed(0)
    bank = torch.randn(shape["bank"], shape["width"], device=device, generator=g)
    queries = torch.randn(shape["queries"], shape["width"], device=device, generator=g)
    bank_labels = torch.randint(shape["classes"], (shape["bank"],), device=device, generator=g)
    query_labels = torch.randint(shape["classes"], (shape["queries"],), device=device, generator=g)
    kw = dict(ks=(20, 200), num_classes=shape["classes"], distributed=False)
    knn_accuracy(bank, bank_labels, queries[:1024], query_labels[:1024], **kw)       # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    synchronize(device)
    t0 = time.perf_counter()
    knn_accuracy(bank, bank_labels, queries, query_labels, **kw)
    synchronize(device)
    seconds = time.perf_counter() - t0
    metrics = {"seconds": seconds, "queries_per_s": shape["queries"] / seconds}
    if device.type == "cuda":
        metrics["extra_peak_gib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
    return {**rec, "status": "ok", "metrics": metrics, "figures": {"queries_per_s": shape["queries"] / seconds}}


def bench_evaluation(device, *, arch: str = "vit_base", batch: int = 0, data_dir: Path | None = None,
                     threads: int = 16, smoke: bool = False) -> list[dict]:
    """Every evaluation record; `smoke` (automatic without CUDA): tiny shapes, not a measurement."""
    if smoke:
        arch, img, batch, steps, repeats, knn_shape = "vit_test", 32, batch or 4, 2, 1, SMOKE_KNN_SHAPE
    else:
        img, batch, steps, repeats, knn_shape = 224, batch or 512, 10, 3, KNN_SHAPE
    out = [bench_forward(arch, batch, device, img_size=img, steps=steps, repeats=repeats)]
    if data_dir is None:
        from bench.pipeline import demo_folder
        data_dir = demo_folder(24 if smoke else 4096)
    fwd = out[0]["metrics"]["img_per_s"]
    out.append(bench_extraction(arch, batch, device, data_dir, img_size=img, threads=threads, forward_ips=fwd))
    out.append(bench_knn(device, knn_shape))
    return out


def main(argv=None) -> None:
    from bench import model_step

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="vit_b")
    p.add_argument("--batch", type=int, default=0)
    p.add_argument("--data", default="", help="JPEG folder (ImageFolder); default: one made from skimage photos")
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--smoke", action="store_true", help="tiny shapes (automatic without CUDA): NOT a measurement")
    p.add_argument("--out", default="", help="write the records as JSON lines to this file")
    args = p.parse_args(argv)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    smoke = args.smoke or device.type != "cuda"
    recs = bench_evaluation(device, arch=model_step.ARCH_ALIASES.get(args.arch, args.arch), batch=args.batch,
                            data_dir=Path(args.data) if args.data else None, threads=args.threads, smoke=smoke)
    meta = run_metadata(device, smoke)
    print(("SMOKE (CPU): not a measurement\n" if smoke else "") + table(recs, markdown=False))
    if args.out:
        with open(args.out, "a") as f:
            for r in recs:
                f.write(json.dumps({**meta, **r}) + "\n")


if __name__ == "__main__":
    main()


# -- report ---------------------------------------------------------------------------------------

TITLES = {"eval": "evaluation: feature extraction img/s (forward only, and through DALI) and the kNN time "
                  "(bench/evaluation.py)"}


def table(recs: list[dict], markdown: bool) -> str:
    from bench.report import simple_table

    return simple_table(recs, markdown, "entry")
