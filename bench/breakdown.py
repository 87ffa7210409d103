"""Where a training step's time goes: the Trainer's step cut into phases, the data stall of an
end-to-end run, and the kernels that dominate.

    python bench/breakdown.py --arch vit_b --batch 256 --steps 20             # device batches, then DALI
    python bench/breakdown.py --smoke                                          # CPU: tiny model, NOT a measurement
    python bench/throughput.py --only breakdown --arch vit_b                   # the same, as a bench section

The step is `Trainer.train_step` exactly as `train.py` runs it (bench/model_step.py builds the
Trainer), followed by the MetricLogger calls `fit` makes. Markers are put at phase boundaries
only while the breakdown runs, by wrapping the calls that bound each phase (the EMA update, the
loss, `engine.backward`, `engine.step`) on this Trainer's objects; the training code has no
marker of its own, so its normal step gains no host sync:

    data        waiting for the next batch (next(loader))
    online      online encoder forward: concat, backbone, projector, predictor (+ the lr setting)
    ema         the momentum update (fp32 master -> momentum master, bf16 copy)
    momentum    momentum encoder forward (+ the key all-gather)
    loss        contrastive loss
    backward    engine.backward (gradient reduction included)
    optimizer   engine.step (DeepSpeed's optimizer wrapper: fp32 step, bf16 copies, all-gathers)
    logging     MetricLogger.record + after_step

On the GPU each marker is a CUDA event on the current stream (the phases are GPU time between
them; one synchronize after the last step); on the CPU, time.perf_counter(). The data-stall
fraction is the data phase's share of the end-to-end step; the DALI loader's own host clock says how
much of it the training thread spends in pipe.run() and, within it, in the feeder (`data_host_ms`). The kernel table comes from
torch.profiler over a few more steps, which also give how busy the GPU was (`device_busy`: a step
the host holds back leaves it idle; both sources); the optimizer phase's own kernels (and its host
time, which says whether it is host-bound) from one more profiled pass (`phase_kernels`).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

if __package__ in (None, ""):  # run as a script: import the bench as the package it is
    _here = Path(__file__).resolve().parent
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import torch  # noqa: E402

PHASES = ("data", "online", "ema", "momentum", "loss", "backward", "optimizer", "logging")
TOP_KERNELS = 15


class Markers:
    """Timestamps at phase boundaries: CUDA events on the GPU (no sync until `phases`), else
    time.perf_counter()."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.steps: list[list] = []

    def new_step(self) -> None:
        self.steps.append([])

    def mark(self) -> None:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.steps[-1].append(e)
        else:
            self.steps[-1].append(time.perf_counter())

    def phases(self) -> list[list[float]]:
        """Per step, the milliseconds of each phase. SYNC POINT: once, after the last step."""
        if self.cuda:
            torch.cuda.synchronize()
            return [[a.elapsed_time(b) for a, b in zip(s, s[1:])] for s in self.steps]
        return [[(b - a) * 1e3 for a, b in zip(s, s[1:])] for s in self.steps]


def _marked(fn, markers: Markers, before: bool = True, after: bool = False):
    def wrapper(*args, **kwargs):
        if before:
            markers.mark()
        out = fn(*args, **kwargs)
        if after:
            markers.mark()
        return out

    return wrapper


@contextlib.contextmanager
def instrumented(trainer, markers: Markers):
    """Markers at the phase boundaries inside `trainer.train_step`, for this Trainer only."""
    from fastmoco import ops

    model, engine = trainer.model, trainer.engine
    with mock.patch.object(model, "update_momentum_encoder", _marked(model.update_momentum_encoder, markers,
                                                                     after=True)), \
            mock.patch.object(ops, "symmetric_contrastive_loss", _marked(ops.symmetric_contrastive_loss, markers)), \
            mock.patch.object(engine, "backward", _marked(engine.backward, markers)), \
            mock.patch.object(engine, "step", _marked(engine.step, markers, after=True)):
        yield


def data_host_ms(before: dict, after: dict) -> dict | None:
    """The training thread's ms per batch in the DALI loader's pipe.run() and, within it, in its
    feeder, between two `host_time()` readings."""
    n = after["batches"] - before["batches"]
    if n <= 0:
        return None
    return {"run_ms": (after["run_s"] - before["run_s"]) * 1e3 / n,
            "feeder_ms": (after["feeder_s"] - before["feeder_s"]) * 1e3 / n, "batches": n}


def run_phases(trainer, batches, steps: int, warmup: int, host_clock=None) -> dict:
    """Mean and median ms per phase over `steps` steps (after `warmup`), and the data-stall fraction;
    with `host_clock` (the DALI loader's `host_time`), its `data_host_ms` over the same steps."""
    from fastmoco.metrics import MetricLogger

    c = trainer.cfg.logging
    markers = Markers(trainer.device)
    host_before = None
    with tempfile.TemporaryDirectory(prefix="fastmoco-breakdown-") as tmp:
        log = MetricLogger(tmp, log_every=c.log_every, check_every=c.check_finite_every,
                           total_steps=trainer.step + warmup + steps, global_batch=trainer.global_batch,
                           device=trainer.device, rank=trainer.rank, tensorboard=False, progress=False,
                           start_step=trainer.step)
        with instrumented(trainer, markers):
            for i in range(warmup + steps):
                if i == warmup and host_clock:
                    host_before = host_clock()
                markers.new_step()
                markers.mark()
                x1, x2 = next(batches)
                markers.mark()
                loss = trainer.train_step(x1, x2)
                trainer.step += 1
                log.record(loss)
                log.after_step(trainer.step, trainer.lrs[trainer.step - 1], trainer.momenta[trainer.step - 1], 0)
                markers.mark()
        log.close()
    data_host = data_host_ms(host_before, host_clock()) if host_before else None
    per_step = markers.phases()[warmup:]
    bad = [len(s) for s in per_step if len(s) != len(PHASES)]
    if bad:
        raise RuntimeError(f"a step crossed {bad[0] + 1} markers, expected {len(PHASES) + 1}: a wrapped call "
                           "ran more or less often than once per step")
    cols = list(zip(*per_step))
    mean = {p: statistics.fmean(col) for p, col in zip(PHASES, cols)}
    total = sum(mean.values())
    return {"phase_ms": mean, "phase_median_ms": {p: statistics.median(col) for p, col in zip(PHASES, cols)},
            "step_ms": total, "data_stall": mean["data"] / total if total else 0.0, "steps": steps,
            "data_host": data_host}


def _profiled_steps(trainer, batches, steps: int):
    """torch.profiler (CPU, and CUDA on the GPU) over `steps` Trainer steps; the profile."""
    from torch.profiler import ProfilerActivity, profile

    cuda = trainer.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            x1, x2 = next(batches)
            trainer.train_step(x1, x2)
            trainer.step += 1
        if cuda:
            torch.cuda.synchronize()
    return prof


def busy_fraction(intervals: list[tuple[float, float]]) -> tuple[float, float]:
    """(busy, span) of (start, end) intervals: the length of their union, and from the first start
    to the last end."""
    if not intervals:
        return 0.0, 0.0
    busy, (cur_start, cur_end) = 0.0, min(intervals)
    for start, end in sorted(intervals):
        if start > cur_end:
            busy += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    busy += cur_end - cur_start
    return busy, max(end for _, end in intervals) - min(start for start, _ in intervals)


def device_busy(prof, steps: int) -> dict | None:
    """How much of the profiled steps the GPU spent computing: the union of its kernels and copies
    (every stream, DALI's too) over the span from the first one's start to the last one's end. Low
    busy in a slow step means the GPU waits for the host (kernel launches, DeepSpeed's host work, the
    data feeder): fewer launches (CUDA graphs), less host work or host work off the step's thread
    would pay, faster kernels would not. None without device events (the CPU)."""
    from torch.autograd import DeviceType

    spans = [(e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA]
    busy, span = busy_fraction(spans)
    if not span:
        return None
    return {"busy": busy / span, "idle_ms_per_step": (span - busy) / 1e3 / steps}


def top_kernels(trainer, batches, steps: int, n: int = TOP_KERNELS) -> tuple[list[dict], dict | None]:
    """The n operations with the most self time (device kernels on the GPU, CPU ops otherwise)
    over `steps` steps of torch.profiler, and how busy the GPU was (`device_busy`)."""
    cuda = trainer.device.type == "cuda"
    prof = _profiled_steps(trainer, batches, steps)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key) > 0]
    total = sum(getattr(e, key) for e in events) or 1.0
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    return [{"name": e.key[:90], "ms_per_step": getattr(e, key) / 1e3 / steps, "share": getattr(e, key) / total,
             "calls_per_step": e.count / steps} for e in events[:n]], device_busy(prof, steps)


def phase_kernels(trainer, batches, steps: int, phase: str = "optimizer", n: int = TOP_KERNELS) -> dict:
    """What one phase spends its time on, over `steps` steps of torch.profiler: its host time per
    step, the device time of the kernels it launched (on the CPU: the self time of its ops), and
    the n largest of those. A phase whose kernels are a small part of its time is host-bound.
    The phase's call (`engine.step` for "optimizer", `engine.backward` for "backward") runs
    inside a record_function range; a kernel counts when the op that launched it is in it."""
    from torch.profiler import record_function

    call = {"optimizer": "step", "backward": "backward"}[phase]
    label = f"fastmoco::{phase}"
    cuda = trainer.device.type == "cuda"
    original = getattr(trainer.engine, call)

    def ranged(*args, **kwargs):
        with record_function(label):
            return original(*args, **kwargs)

    with mock.patch.object(trainer.engine, call, ranged):
        prof = _profiled_steps(trainer, batches, steps)

    def inside(evt) -> bool:
        while evt is not None:
            if evt.name == label:
                return True
            evt = evt.cpu_parent
        return False

    events = prof.events()
    host_us = sum(e.cpu_time_total for e in events if e.name == label)
    per_name: dict[str, list[float]] = {}
    for e in events:
        if e.name == label or not inside(e):
            continue
        if cuda:
            for k in e.kernels:
                per_name.setdefault(k.name, []).append(k.duration)
        elif e.self_cpu_time_total > 0:
            per_name.setdefault(e.name, []).append(e.self_cpu_time_total)
    work_us = sum(sum(v) for v in per_name.values())
    top = sorted(per_name.items(), key=lambda kv: sum(kv[1]), reverse=True)[:n]
    return {"phase": phase, "host_ms_per_step": host_us / 1e3 / steps, "work_ms_per_step": work_us / 1e3 / steps,
            "top": [{"name": name[:90], "ms_per_step": sum(v) / 1e3 / steps, "calls_per_step": len(v) / steps}
                    for name, v in top]}


def bench_breakdown(arch: str, *, img: int, batch: int, dim: int, mlp_dim: int, device: torch.device, smoke: bool,
                    steps: int, warmup: int, data_dir: Path | None, profile_steps: int) -> list[dict]:
    """Records (section "breakdown"): the phases with device batches, the phases fed by the DALI
    loader (its data-stall fraction), and the top kernels of the device-batch step."""
    from bench import model_step

    out = []
    for source in ("device", "dali"):
        rec = {"section": "breakdown", "name": arch, "build": source, "img_size": img}
        if source == "dali" and data_dir is None:
            out.append({**rec, "status": "unavailable", "reason": "no JPEG folder"})
            continue
        try:
            with tempfile.TemporaryDirectory(prefix="fastmoco-breakdown-") as tmp:
                trainer = model_step.build_trainer(arch, img=img, batch=batch, dim=dim, mlp_dim=mlp_dim, smoke=smoke,
                                                   out_dir=tmp, data_dir=data_dir if source == "dali" else None)
                try:
                    batches = (model_step.loader_batches(trainer) if source == "dali"
                               else model_step.device_batches(trainer, batch, img))
                    res = run_phases(trainer, batches, steps, warmup,
                                     getattr(trainer.loader, "host_time", None) if source == "dali" else None)
                    kernels, busy = top_kernels(trainer, batches, profile_steps)
                    if source != "device":   # the table's kernels are the device-batch step's; busy: both
                        kernels = []
                    optimizer = (phase_kernels(trainer, batches, profile_steps, "optimizer")
                                 if source == "device" else None)
                    notes = model_step.trainer_notes(trainer)
                finally:
                    model_step.release_trainer(trainer)
        except Exception as e:  # noqa: BLE001 - one source failing must not cost the other its table
            out.append({**rec, "status": "unavailable", "reason": f"{type(e).__name__}: {e}".splitlines()[0][:300]})
            continue
        metrics = {**res, "img_per_s": batch / (res["step_ms"] / 1e3), "top_kernels": kernels,
                   "optimizer_kernels": optimizer, "gpu_busy": busy}
        out.append({**rec, "status": "ok", "batch": batch, "metrics": metrics, "figures": {}, "notes": notes})
    return out


TITLES = {"breakdown": "step breakdown: the Trainer's step by phase (bench/breakdown.py), device batches and DALI"}


def table(recs: list[dict], markdown: bool = False) -> str:
    """Phases side by side for each source, then the data stall, the top kernels and the optimizer
    phase's own kernels."""
    from bench.report import render

    ok = [r for r in recs if r["status"] == "ok"]
    lines = []
    if ok:
        headers = ["phase"] + [f"{r['name']} {r['build']} b{r['batch']} ms" for r in ok] + ["share (first)"]
        first = ok[0]["metrics"]
        rows = [[p] + [f"{r['metrics']['phase_ms'][p]:.2f}" for r in ok]
                + [f"{first['phase_ms'][p] / first['step_ms']:.1%}"] for p in PHASES]
        rows.append(["step"] + [f"{r['metrics']['step_ms']:.2f}" for r in ok] + ["100%"])
        rows.append(["img/s"] + [f"{r['metrics']['img_per_s']:.1f}" for r in ok] + [""])
        lines.append(render(headers, rows, markdown))
        for r in ok:
            if r["build"] == "dali":
                lines.append(f"\ndata stall of the end-to-end step ({r['name']}, DALI): "
                             f"{r['metrics']['data_stall']:.1%} of the step")
                host = r["metrics"].get("data_host")
                if host:
                    lines.append(f"host time of its data phase: pipe.run() {host['run_ms']:.2f} ms a step, of which "
                                 f"the feeder {host['feeder_ms']:.2f} ms (the rest waits for DALI's threads)")
        busy = [r for r in ok if r["metrics"].get("gpu_busy")]
        if busy:
            lines.append("\nGPU busy (kernels and copies over the profiled steps; low: the GPU waits for the host): "
                         + "; ".join(f"{r['name']} {r['build']} {r['metrics']['gpu_busy']['busy']:.1%}, idle "
                                     f"{r['metrics']['gpu_busy']['idle_ms_per_step']:.1f} ms a step" for r in busy))
        for r in ok:
            if r["metrics"].get("top_kernels"):
                lines.append(f"\ntop kernels ({r['name']} {r['build']}, self time per step):\n")
                rows = [[k["name"], f"{k['ms_per_step']:.3f}", f"{k['share']:.1%}", f"{k['calls_per_step']:.1f}"]
                        for k in r["metrics"]["top_kernels"]]
                lines.append(render(["kernel", "ms/step", "share", "calls/step"], rows, markdown))
            ph = r["metrics"].get("optimizer_kernels")
            if ph:
                lines.append(f"\n{ph['phase']} phase alone ({r['name']} {r['build']}): host {ph['host_ms_per_step']:.2f} "
                             f"ms/step, its kernels {ph['work_ms_per_step']:.2f} ms/step:\n")
                rows = [[k["name"], f"{k['ms_per_step']:.3f}", f"{k['calls_per_step']:.1f}"] for k in ph["top"]]
                lines.append(render(["kernel", "ms/step", "calls/step"], rows, markdown))
    for r in recs:
        if r["status"] != "ok":
            lines.append(f"{r['name']} {r['build']}: {r['status']}: {r.get('reason')}")
    return "\n".join(lines)


def main(argv=None) -> int:
    from bench import model_step, pipeline

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="vit_b")
    p.add_argument("--batch", type=int, default=0, help="micro batch (default: the model bench's for the arch)")
    p.add_argument("--steps", type=int, default=0, help="measured steps (default 20; smoke 2)")
    p.add_argument("--warmup", type=int, default=0, help="unmeasured steps first (default 3; smoke 1)")
    p.add_argument("--profile-steps", type=int, default=0, help="steps under torch.profiler (default 3; smoke 1)")
    p.add_argument("--data", default="", help="JPEG folder for the DALI run (default: the bench's demo folder)")
    p.add_argument("--data-images", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny CPU shapes (automatic without CUDA); not a measurement")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    smoke = args.smoke or not cuda
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    arch = "vit_test" if smoke else model_step.ARCH_ALIASES.get(args.arch, args.arch)
    shape = dict(img=32, dim=32, mlp_dim=64) if smoke else dict(img=224, dim=256, mlp_dim=4096)
    args.quick = False
    data_dir, why = pipeline.bench_folder(args.data, args.data_images, smoke=smoke)
    if why:
        print(why)
    recs = bench_breakdown(arch, batch=args.batch or (4 if smoke else model_step.DEFAULT_BATCH.get(arch, 64)),
                           device=device, smoke=smoke, steps=args.steps or (2 if smoke else 20),
                           warmup=args.warmup or (1 if smoke else 3), data_dir=data_dir,
                           profile_steps=args.profile_steps or (1 if smoke else 3), **shape)
    if smoke:
        print("*** SMOKE (CPU): tiny shapes that keep the code working; no figure below is a measurement ***")
    print(table(recs, args.markdown))
    return 0 if all(r["status"] == "ok" for r in recs) else 1


if __name__ == "__main__":
    sys.exit(main())
