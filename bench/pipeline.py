"""Data pipeline and end to end.

- data: images/s of the two-crop loaders (`benchmark_pipeline`, also a CLI:
  `python -m bench.pipeline DATA_DIR --backend dali [--source shards]`) on a JPEG
  folder, and (rows "dali shards", "torchvision shards") on the same images as tar
  shards (`fastmoco-make-shards`, made once beside the folder): DALI (GPU
  decode and augmentation; its CPU twin without a GPU) and the torchvision/PIL
  fallback. One image = its two augmented views, delivered in the training dtype on
  the training device, counted as the training loop sees them. For DALI on the GPU
  also the GPU time DALI's own kernels take per batch (CUDA kernel time traced by
  torch.profiler over a few batches; DALI shares the GPU with the model, so this is
  what the pipeline costs the training step).
- e2e: `fastmoco/train.py` run as a subprocess for a few dozen steps on a config
  (default configs/vit_b.json) fed by the real DALI pipeline; the figure is the
  median img/s of the logged intervals after the first (which holds start-up,
  compilation and autotuning).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.timing import REPO
from fastmoco.distributed import RENDEZVOUS_VARS

DEFAULT_DATA_ROOT = REPO / "bench" / "results"  # git-ignored


def _make_part(args) -> str:
    from fastmoco.pipelines.demo_data import make_demo_data

    out, n, seed = args
    return str(make_demo_data(out, num_images=n, seed=seed))


def bench_folder(data: str, images: int, *, smoke: bool, quick: bool = False) -> tuple[Path | None, str | None]:
    """The JPEG folder of the data, e2e and breakdown sections: `data` when given, else the demo folder
    of `images` photographs (default 4096; 1024 quick; 16 smoke). (folder, None), or (None, why not)."""
    if data:
        return Path(data), None
    n = images or (16 if smoke else 1024 if quick else 4096)
    try:
        return demo_folder(n), None
    except Exception as e:  # demo data being written: say so, go on
        return None, f"no data folder: making the demo folder failed: {type(e).__name__}: {e}".splitlines()[0]


def demo_folder(num_images: int, root: Path = DEFAULT_DATA_ROOT, workers: int | None = None) -> Path:
    """An ImageFolder of real photographs (skimage.data) at ImageNet-like sizes and JPEG quality
    (`fastmoco.pipelines.demo_data`), made once per size and reused.

    Made in parallel: each worker writes its own part with its own seed, and the parts'
    files are then moved into one folder under names that keep them apart (on the GPU
    box this turns ~20 s of single-core JPEG encoding into a few)."""
    import shutil
    from concurrent.futures import ProcessPoolExecutor

    out = root / f"demo_data_{num_images}"
    marker = out / ".bench-complete"
    if marker.is_file() and marker.read_text().strip() == str(num_images):
        return out
    shutil.rmtree(out, ignore_errors=True)
    workers = max(1, min(workers or os.cpu_count() or 1, 8, num_images // 32 or 1))
    sizes = [num_images // workers + (k < num_images % workers) for k in range(workers)]
    parts = [(out / ".parts" / f"p{k}", n, k) for k, n in enumerate(sizes)]
    if workers == 1:
        done = [_make_part(parts[0])]
    else:
        with ProcessPoolExecutor(workers) as pool:
            done = list(pool.map(_make_part, parts))
    for k, part in enumerate(done):
        for f in Path(part).glob("*/*.jpg"):
            (out / f.parent.name).mkdir(parents=True, exist_ok=True)
            f.rename(out / f.parent.name / f"p{k}_{f.name}")
    shutil.rmtree(out / ".parts")
    marker.write_text(str(num_images))
    return out


def demo_shards(data_dir: Path, root: Path = DEFAULT_DATA_ROOT, shard_size: int = 32 * 10**6) -> Path:
    """`data_dir` as tar shards in root/<name>_shards (made once: the writer keeps finished shards)."""
    from fastmoco.pipelines.make_shards import make_shards

    out = root / f"{Path(data_dir).name}_shards"
    make_shards(data_dir, out, shard_size=shard_size, log=lambda msg: None)
    return out


def bench_data(data_dir: Path, backends: list[str], *, batch: int, threads: int, num_batches: int, warmup: int,
               image_size: int, device, sources: tuple[str, ...] = ("folder",)) -> list[dict]:
    out = []
    for source, backend in [(s, b) for s in sources for b in backends]:
        name = backend if source == "folder" else f"{backend} {source}"
        rec = {"section": "data", "name": name, "build": str(device.type), "shape": f"b{batch} t{threads}"}
        try:
            path = data_dir if source == "folder" else demo_shards(data_dir)
            r = benchmark_pipeline(str(path), backend, batch_size=batch, num_threads=threads,
                                   num_batches=num_batches, warmup=warmup, image_size=image_size, device=device,
                                   source=source)
            ips = r["images_per_s"]
            metrics = {"img_per_s": ips, "batches": r.get("batches"), "seconds": r.get("seconds"),
                       "images_in_folder": r.get("samples_in_dataset"), "dtype": r.get("dtype")}
            for k in ("gpu_ms_per_batch", "gpu_fraction"):
                if k in r:
                    metrics[k] = r[k]
            out.append({**rec, "status": "ok", "batch": batch, "metrics": metrics, "figures": {"img_per_s": ips}})
        except Exception as e:  # DALI absent, a pipeline being written: say so, go on
            out.append({**rec, "status": "unavailable", "reason": f"{type(e).__name__}: {e}".splitlines()[0][:300]})
    return out


def read_intervals(metrics_path: Path) -> list[dict]:
    """Logged intervals of a metrics.jsonl, one per step (a repeated step is a zero-length
    closing flush), in order."""
    rows, seen = [], set()
    for line in metrics_path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "img_per_s" in r and "step" in r and r["step"] not in seen and r["img_per_s"] > 0:
            seen.add(r["step"])
            rows.append(r)
    return rows


def steady_img_per_s(intervals: list[dict]) -> float | None:
    """Median img/s of the intervals after the first (start-up); the only one if there is one."""
    if not intervals:
        return None
    rest = intervals[1:] or intervals
    return statistics.median(r["img_per_s"] for r in rest)


def bench_e2e(config: str, data_dir: Path | None, *, batch: int, steps: int, log_every: int, timeout_s: float,
              extra: list[str], env_extra: dict | None = None) -> dict:
    rec = {"section": "e2e", "name": Path(config).stem, "build": "train.py", "shape": f"b{batch}"}
    train = REPO / "fastmoco" / "train.py"
    if not train.is_file():
        return {**rec, "status": "unavailable", "reason": "fastmoco/train.py does not exist yet"}
    if not (REPO / config).is_file() and not Path(config).is_file():
        return {**rec, "status": "unavailable", "reason": f"config {config} does not exist"}
    with tempfile.TemporaryDirectory(prefix="fastmoco-e2e-") as tmp:
        cmd = [sys.executable, str(train), "--config", config,
               "--schedule.max_steps", str(steps), "--logging.out_dir", tmp,
               "--logging.log_every", str(log_every), "--logging.check_finite_every", str(log_every),
               "--logging.tensorboard", "false", "--logging.progress", "false",
               "--checkpoint.every_steps", "0", "--checkpoint.every_epochs", "0",
               # one process: the global batch is the micro batch
               "--deepspeed.train_batch_size", str(batch), "--deepspeed.train_micro_batch_size_per_gpu", str(batch)]
        if data_dir is not None:
            cmd += ["--data.source", "folder", "--data.path", str(data_dir)]
        cmd += extra
        # a run of its own: not this process's rendezvous (the in-process Trainer builds set it)
        env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARS} | (env_extra or {})
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {**rec, "status": "unavailable", "reason": f"train.py did not finish within {timeout_s:.0f} s",
                    "command": " ".join(cmd)}
        wall = time.perf_counter() - t0
        metrics_path = Path(tmp) / "metrics.jsonl"
        if p.returncode != 0 or not metrics_path.is_file():
            tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]
            return {**rec, "status": "unavailable", "command": " ".join(cmd),
                    "reason": f"train.py exited {p.returncode}: {tail[0][:300]}"}
        intervals = read_intervals(metrics_path)
    ips = steady_img_per_s(intervals)
    if ips is None:
        return {**rec, "status": "unavailable", "reason": "metrics.jsonl has no img_per_s line",
                "command": " ".join(cmd)}
    metrics = {"img_per_s": ips, "intervals_img_per_s": [r["img_per_s"] for r in intervals],
               "steps": steps, "log_every": log_every, "wall_s": wall,
               "last_loss": intervals[-1].get("loss")}
    return {**rec, "status": "ok", "batch": batch, "metrics": metrics, "figures": {"img_per_s": ips},
            "command": " ".join(cmd)}


def _gpu_kernel_ms(loader, batches: int) -> float | None:
    """Mean CUDA kernel time per batch while `batches` batches are produced, or None."""
    try:
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        return None
    it = iter(loader)
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(batches):
                next(it)
            torch.cuda.synchronize()
    except StopIteration:
        return None
    # Kernels of every stream in the process (DALI's included); CPU ops carry none of their own.
    total_us = sum(getattr(e, "self_device_time_total", 0.0) for e in prof.key_averages())
    return total_us / 1e3 / batches


def benchmark_pipeline(data_dir: str, backend: str = "dali", batch_size: int = 256, num_threads: int = 16,
                       num_batches: int = 50, warmup: int = 5, image_size: int = 224,
                       device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                       profile_batches: int = 5, hw_decoder_load: float = 0.65, source: str = "folder") -> dict:
    """Images/s of `backend` ("dali" | "torchvision" | "synthetic") on `data_dir`, an image folder or
    (`source="shards"`) a shard set.

    `num_threads`: DALI CPU threads, or torchvision DataLoader workers. The
    epoch wraps around when `num_batches + warmup` exceed it. Returns
    images_per_s, seconds, batches, and for DALI on a GPU gpu_ms_per_batch
    (kernel time) and gpu_fraction (kernel time / wall time per batch).
    """
    from fastmoco.config import DataConfig
    from fastmoco.pipelines import build_loader, scan_image_folder
    from fastmoco.pipelines.dali import HAS_DALI, DaliTwoCropLoader
    from fastmoco.pipelines.shards import ShardSamples

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = DataConfig(source="synthetic" if backend == "synthetic" else source, path=str(data_dir),
                     backend=backend if backend != "synthetic" else "dali", image_size=image_size,
                     num_threads=num_threads, synthetic_size=max(batch_size * 4, 1024))
    if backend == "dali":
        if not HAS_DALI:
            raise ImportError("nvidia-dali is not installed")
        samples = ShardSamples(data_dir) if source == "shards" else scan_image_folder(data_dir)
        loader = DaliTwoCropLoader(samples, cfg, batch_size=batch_size, device=device,
                                   dtype=dtype, hw_decoder_load=hw_decoder_load)
    else:
        loader = build_loader(cfg, batch_size=batch_size, device=device, dtype=dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    stream = iter(_Endless(loader))
    for _ in range(warmup):
        next(stream)
    sync()
    start = time.perf_counter()
    for _ in range(num_batches):
        v1, v2, labels = next(stream)
    sync()
    seconds = time.perf_counter() - start
    result = {"backend": backend, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
              "batch_size": batch_size, "num_threads": num_threads, "image_size": image_size,
              "batches": num_batches, "seconds": seconds,
              "images_per_s": num_batches * batch_size / seconds,
              "samples_in_dataset": loader.num_samples}
    if backend == "dali" and device.type == "cuda" and profile_batches > 0:
        ms = _gpu_kernel_ms(_Endless(loader), profile_batches)
        if ms is not None:
            result["gpu_ms_per_batch"] = ms
            result["gpu_fraction"] = ms / (1e3 * seconds / num_batches)
    return result


class _Endless:
    """Iterate a loader across epoch ends (for profiling a few batches anywhere)."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        while len(self.loader):
            yield from self.loader  # each pass: the rest of the loader's epoch; then it goes on with the next


def main(argv: list[str] | None = None) -> None:
    """python -m bench.pipeline DATA_DIR --backend dali --batch-size 256 --num-threads 16"""
    import argparse

    ap = argparse.ArgumentParser(description="two-crop loader throughput")
    ap.add_argument("data_dir")
    ap.add_argument("--backend", default="dali", choices=["dali", "torchvision", "synthetic"])
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--num-threads", type=int, default=16)
    ap.add_argument("--num-batches", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--device", default=None)
    ap.add_argument("--hw-decoder-load", type=float, default=0.65)
    ap.add_argument("--source", default="folder", choices=["folder", "shards"],
                    help="shards: DATA_DIR is a shard manifest or folder (fastmoco-make-shards)")
    args = ap.parse_args(argv)
    res = benchmark_pipeline(args.data_dir, args.backend, args.batch_size, args.num_threads, args.num_batches,
                             args.warmup, args.image_size, args.device, hw_decoder_load=args.hw_decoder_load,
                             source=args.source)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()


# -- report ---------------------------------------------------------------------------------------

TITLES = {"data": "data pipeline: two-crop images/s on a JPEG folder and its tar shards (one image = its two views)",
          "e2e": "end to end: fastmoco/train.py fed by the real pipeline (median of logged intervals after the first)"}


def table(recs: list[dict], markdown: bool) -> str:
    from bench.report import simple_table

    return simple_table(recs, markdown, "backend" if recs[0]["section"] == "data" else "config")
