"""How every figure of the bench is timed, and what is recorded with it.

`measure(step, warmup, steps, repeats)`: `warmup` calls excluded; then
`repeats` runs of `steps` calls, each run timed between two CUDA events (on
the CPU: perf_counter); the figure is the median over runs of the mean time
per call. `step(i)` gets the call index so callers rotate their inputs and no
cache flatters a repeated input. The only host syncs are at run boundaries.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Timing:
    ms: float              # median over repeats of the mean ms per call
    ms_runs: list[float]   # mean ms per call of each repeat
    steps: int
    repeats: int

    @property
    def spread(self) -> float:
        """(max - min) / median over repeats: how much to trust `ms`."""
        return (max(self.ms_runs) - min(self.ms_runs)) / self.ms if self.ms else 0.0


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step: Callable[[int], object], device: torch.device, warmup: int, steps: int,
            repeats: int) -> Timing:
    i = 0
    for _ in range(warmup):
        step(i)
        i += 1
    synchronize(device)  # sync: warm-up (compilation, autotuning, allocator growth) ends here
    runs = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                step(i)
                i += 1
            end.record()
            end.synchronize()  # sync: one per repeat, outside the timed region
            runs.append(start.elapsed_time(end) / steps)
        else:
            t0 = time.perf_counter()
            for _ in range(steps):
                step(i)
                i += 1
            runs.append((time.perf_counter() - t0) * 1e3 / steps)
    return Timing(statistics.median(runs), runs, steps, repeats)


def time_step(step: Callable[[int], object], device: torch.device, smoke: bool) -> dict:
    """A training step's ms (`measure`: 3 warm-up calls, 3 repeats of 10; smoke: 1 call) and peak GiB."""
    t = measure(step, device, warmup=1 if smoke else 3, steps=2 if smoke else 10, repeats=1 if smoke else 3)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"ms": t.ms, "spread": t.spread, "peak_gib": peak}


def free(device: torch.device) -> None:
    """Drop what the previous build left, so the next starts from free memory and a fresh peak."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def run_builds(section: str, builds: list[tuple[str, Callable[[], dict]]], device: torch.device) -> list[dict]:
    """Each (build, fn) from free memory; one that runs out of memory becomes an "oom" record. Then the
    ratios of the step rows: trainer / peer and e2e / trainer, where both ran."""
    recs = []
    for build, fn in builds:
        free(device)
        try:
            recs.append(fn())
        except torch.OutOfMemoryError as e:
            recs.append({"section": section, "name": "step", "build": build, "status": "oom",
                         "reason": str(e).splitlines()[0][:200]})
    free(device)
    ok = {r["build"]: r for r in recs if r["name"] == "step" and r["status"] == "ok"}
    for num, den, key in (("trainer", "peer", "over_peer"), ("e2e", "trainer", "over_trainer")):
        if num in ok and den in ok:
            ok[num]["metrics"][key] = ok[num]["figures"]["img_per_s"] / ok[den]["figures"]["img_per_s"]
    return recs


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _version(*dists: str) -> str:
    """Installed version of the first distribution found (metadata only: importing deepspeed
    or DALI just to read a version would cost seconds)."""
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "not installed"


def run_metadata(device: torch.device, smoke: bool, argv: list[str] | None = None) -> dict:
    """Recorded with every result: device, versions, command, commit, date."""
    commit = _git("rev-parse", "--short=12", "HEAD")
    dirty = bool(commit) and bool(_git("status", "--porcelain", "--untracked-files=no"))
    if not commit:  # a copy of the tree without .git (the GPU box): the caller may say which commit
        commit = os.environ.get("FASTMOCO_COMMIT", "unknown (no git)")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        props = torch.cuda.get_device_properties(device)
        dev = {"name": name, "memory_gib": round(props.total_memory / 2**30, 1),
               "sm_count": props.multi_processor_count, "cuda": torch.version.cuda,
               "driver_capability": f"{props.major}.{props.minor}"}
    else:
        dev = {"name": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"}
    argv = sys.argv if argv is None else argv
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": dev,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "triton": _version("triton", "pytorch-triton"), "timm": _version("timm"),
                     "dali": _version("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110"),
                     "deepspeed": _version("deepspeed")},
        "command": "python " + " ".join(shlex.quote(a) for a in argv),
        "commit": commit + ("-dirty" if dirty else ""),
        "smoke": smoke,
    }
