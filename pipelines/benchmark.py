"""Throughput of the two-crop loaders (the bench calls `benchmark_pipeline`).

    python -m fastmoco.pipelines.benchmark DATA_DIR --backend dali --batch-size 256 --num-threads 16

Counts images (each giving two views) per second as the training loop sees
them: batches in the training dtype on the training device. For DALI on the
GPU it also reports the GPU time DALI's own kernels take per batch (CUDA
kernel time traced by torch.profiler over a few batches; DALI shares the GPU
with the model, so this is what the pipeline costs the training step).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from fastmoco.config import DataConfig


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
                       profile_batches: int = 5, hw_decoder_load: float = 0.65) -> dict:
    """Images/s of `backend` ("dali" | "torchvision" | "synthetic") on `data_dir`.

    `num_threads`: DALI CPU threads, or torchvision DataLoader workers. The
    epoch wraps around when `num_batches + warmup` exceed it. Returns
    images_per_s, seconds, batches, and for DALI on a GPU gpu_ms_per_batch
    (kernel time) and gpu_fraction (kernel time / wall time per batch).
    """
    from . import build_loader
    from .dali import HAS_DALI, DaliTwoCropLoader
    from .folder import scan_image_folder

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = DataConfig(source="synthetic" if backend == "synthetic" else "folder", path=str(data_dir),
                     backend=backend if backend != "synthetic" else "dali", image_size=image_size,
                     num_threads=num_threads, synthetic_size=max(batch_size * 4, 1024))
    if backend == "dali":
        if not HAS_DALI:
            raise ImportError("nvidia-dali is not installed")
        loader = DaliTwoCropLoader(scan_image_folder(data_dir), cfg, batch_size=batch_size, device=device,
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
    args = ap.parse_args(argv)
    res = benchmark_pipeline(args.data_dir, args.backend, args.batch_size, args.num_threads, args.num_batches,
                             args.warmup, args.image_size, args.device, hw_decoder_load=args.hw_decoder_load)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
