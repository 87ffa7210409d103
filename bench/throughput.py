"""fastmoco's throughput bench: model step, kernels, data pipeline, end to end, in one run.

    python bench/throughput.py                       # everything, on this device
    python bench/throughput.py --only model,kernels --arch vit_b --batch 128 --steps 10
    python bench/throughput.py --quick               # fewer archs, steps and shapes
    python bench/throughput.py --smoke               # tiny shapes (automatic without CUDA): NOT a measurement
    python bench/throughput.py --update              # measure, then store the figures as this device's reference
    python bench/throughput.py --only model --arch vit_h --builds trainer --max-batch vit_h   # + largest batch
    python bench/throughput.py --from RUN.jsonl [--update] [--markdown]   # check/store/print a saved run

Prints one table per section and writes every result as a JSON line (with the
device, versions, command, commit and date) to bench/results/ or --out. Then
compares the run with bench/reference_timings.json for this device name and
exits 1 naming every figure more than the tolerance below its reference.
Sections: model (train.py's Trainer step on device batches and fed by DALI, its
unfused reference, the official MoCo v3 build eager and torch.compile, the largest
micro batch with --max-batch; see bench/model_step.py), breakdown (the Trainer's
step by phase, data stall, top kernels; bench/breakdown.py), kernels (each fused
op vs its reference; bench/kernels.py), data and e2e (bench/pipeline.py).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the bench as the package it is
    _here = Path(__file__).resolve().parent
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import torch  # noqa: E402

from bench import reference, report  # noqa: E402
from fastmoco import quiet  # noqa: E402
from bench.report import SMOKE_LABEL, header, print_report  # noqa: E402
from bench.model_step import ARCH_ALIASES  # noqa: E402
from bench.timing import REPO, run_metadata  # noqa: E402

SECTIONS = tuple(report.ENTRIES)
FULL_ARCHS = ("vit_small", "vit_base", "vit_large", "vit_huge")
QUICK_ARCHS = ("vit_small", "vit_base")
COMPILE_PRIORITY = ("vit_base", "vit_small", "vit_large", "vit_huge")  # the headline arch compiles first


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(SECTIONS), help=f"sections, comma-separated: {','.join(SECTIONS)}")
    p.add_argument("--arch", default="", help="model archs, comma-separated (vit_s, vit_b, vit_l, vit_h or full names)")
    p.add_argument("--builds", default="trainer,e2e,reference,peer,peer_compile",
                   help="model builds to run; also 'chunked': the Trainer with --backbone-chunk")
    p.add_argument("--backbone-chunk", type=lambda v: v if v == "auto" else int(v), default=256,
                   help="the chunked build's memory.backbone_chunk (images per backbone call, or auto)")
    p.add_argument("--max-batch", default="", help="archs whose largest micro batch per GPU to search (Trainer "
                                                  "step, the arch's recipe: vit_h is ZeRO-3 + bf16 + checkpointing)")
    p.add_argument("--max-batch-start", type=int, default=64, help="first batch the search tries")
    p.add_argument("--max-batch-limit", type=int, default=4096, help="largest batch the search tries")
    p.add_argument("--max-batch-seconds", type=float, default=120, help="time for each arch's search")
    p.add_argument("--breakdown-steps", type=int, default=0, help="measured steps of the breakdown (default 20)")
    p.add_argument("--batch", type=int, default=0, help="model-step batch per GPU (default: per arch, fills 80 GiB)")
    p.add_argument("--steps", type=int, default=0, help="timed steps per repeat (default: per arch)")
    p.add_argument("--repeats", type=int, default=0, help="timed repeats; the figure is their median (default 3)")
    p.add_argument("--warmup", type=int, default=0, help="untimed warm-up steps, the first included (default 2)")
    p.add_argument("--compile-budget", type=float, default=None,
                   help="seconds the torch.compile peer may take in all (default 90; ViT-B compiles first; --quick 0)")
    p.add_argument("--kernels", default="attention,layernorm,contrastive,ema", help="kernel entries to run")
    p.add_argument("--data", default="", help="JPEG folder (ImageFolder layout) for data and e2e; "
                                             "default: one made from skimage.data photographs")
    p.add_argument("--data-images", type=int, default=0, help="size of the default folder (default 4096)")
    p.add_argument("--e2e-config", default="configs/vit_b.json")
    p.add_argument("--e2e-batch", type=int, default=0, help="micro batch of the e2e run (default 128)")
    p.add_argument("--e2e-steps", type=int, default=0, help="steps of the e2e run (default 50)")
    p.add_argument("--e2e-timeout", type=float, default=0, help="seconds before the e2e run is given up")
    p.add_argument("--time-budget", type=float, default=0,
                   help="seconds for the whole run: what would start past it is skipped, and said so (0: none)")
    p.add_argument("--quick", action="store_true", help="ViT-S and ViT-B only, fewer steps and shapes, no compile")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (automatic without CUDA); not a measurement")
    p.add_argument("--out", default="", help="folder for the JSON lines (default bench/results, or $OUT)")
    p.add_argument("--reference", default=str(reference.DEFAULT_PATH), help="reference timings file")
    p.add_argument("--tolerance", type=float, default=None, help="override the reference file's tolerance")
    p.add_argument("--update", action="store_true", help="write this run's figures as this device's reference")
    p.add_argument("--no-compare", action="store_true", help="do not check against the reference")
    p.add_argument("--from", dest="from_run", default="", help="a saved run (JSON lines): check/update/print it, "
                                                               "measure nothing")
    p.add_argument("--markdown", action="store_true", help="print the tables as Markdown (for bench/RESULTS.md)")
    quiet.add_flag(p)
    args = p.parse_args(argv)
    quiet.configure(args.verbose)
    # the official-style DINO peer builds its head with torch.nn.utils.weight_norm, as DINO does
    warnings.filterwarnings("ignore", message=r".*torch\.nn\.utils\.weight_norm.* is deprecated",
                            category=FutureWarning)
    args.only = [s for s in args.only.split(",") if s]
    bad = set(args.only) - set(SECTIONS)
    if bad:
        p.error(f"--only: unknown section(s) {', '.join(sorted(bad))} (known: {', '.join(SECTIONS)})")
    return args


# -- output --------------------------------------------------------------------------------------------

class Sink:
    """Appends each record (with the run's metadata) to the run's JSON lines as it is made, so a run
    cut short still leaves what it measured; prints one progress line per record."""

    def __init__(self, path: Path, meta: dict):
        self.path, self.meta, self.records = path, meta, []
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")

    def emit(self, rec: dict) -> None:
        rec = {**rec, "meta": self.meta}
        self.records.append(rec)
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        what = f"[{rec['section']}] {rec['name']} {rec.get('build', '')} {rec.get('shape', '')}".rstrip()
        if rec["status"] != "ok":
            print(f"{what}: {rec['status']}: {rec.get('reason')}", flush=True)
        else:
            m = rec.get("metrics", {})
            key = next((k for k in ("img_per_s", "kernel_ms", "trainer_over_peer") if k in m), None)
            val = f"{key} {m[key]:.4g}" if key and m[key] is not None else ""
            print(f"{what}: {val}" + (f"  ({SMOKE_LABEL})" if self.meta.get("smoke") else ""), flush=True)


class Deadline:
    """--time-budget: a run that must end inside one device call skips, and records as skipped,
    whatever would start after the budget is spent, so its table and JSON lines stay whole."""

    def __init__(self, seconds: float):
        self.seconds, self.t0 = seconds, time.perf_counter()

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0) if self.seconds > 0 else float("inf")

    def skipped(self, rec: dict) -> dict | None:
        if self.left() > 0:
            return None
        return {**rec, "status": "skipped", "reason": f"--time-budget of {self.seconds:.0f} s spent"}


# -- sections ------------------------------------------------------------------------------------------

class ModelBench:
    """The model-step section in two phases: the eager builds (trainer, e2e, reference, peer) first; the
    torch.compile peer last, after every other section, with what is left of the time (its
    compilation alone takes a minute or more per arch, the headline ViT-B first)."""

    COMPILE_MIN_S = 60  # a first compile is not started with less time than this left

    def __init__(self, args, sink: Sink, device, smoke: bool, meta: dict, deadline: Deadline,
                 data_dir: Path | None = None):
        from bench import flops, model_step

        self.args, self.sink, self.device, self.smoke, self.deadline = args, sink, device, smoke, deadline
        self.data_dir = data_dir  # the e2e build's JPEG folder
        self.model_step = model_step
        self.builds = [b for b in args.builds.split(",") if b]
        bad = set(self.builds) - set(model_step.BUILDS)
        if bad:
            raise SystemExit(f"--builds: unknown {', '.join(sorted(bad))} (known: {', '.join(model_step.BUILDS)})")
        if smoke:
            self.archs = ["vit_test"]
            self.shape = dict(img=32, dim=32, mlp_dim=64)
        else:
            self.archs = [ARCH_ALIASES.get(a, a) for a in args.arch.split(",") if a] or list(
                QUICK_ARCHS if args.quick else FULL_ARCHS)
            self.shape = dict(img=224, dim=256, mlp_dim=4096)
        self.peak = flops.peak_tflops(meta["device"]["name"]) if device.type == "cuda" else None
        self.mem_scale = 1
        if device.type == "cuda" and torch.cuda.get_device_properties(device).total_memory >= 120 * 2**30:
            self.mem_scale = 2  # H200-class memory: the default batches double
        self.warmup = args.warmup or (1 if smoke else 2)
        self.repeats = args.repeats or (1 if smoke else 2 if args.quick else 3)
        self.results: dict[tuple[str, str], dict] = {}

    def run(self, arch: str, build: str) -> dict:
        late = self.deadline.skipped({"section": "model", "name": arch, "build": build})
        if late:
            return late
        a, ms = self.args, self.model_step
        batch = a.batch or (2 if self.smoke else ms.DEFAULT_BATCH.get(arch, 64) * self.mem_scale)
        trainer = self.results.get((arch, "trainer"), {})
        if build == "e2e" and trainer.get("status") == "ok":
            batch = trainer["batch"]  # the same micro batch as the model step it is compared with
        steps = a.steps or (1 if self.smoke else max(2, ms.DEFAULT_STEPS.get(arch, 4) // (2 if a.quick else 1)))
        return ms.bench_build(build, arch, batch=batch, device=self.device, amp=self.device.type == "cuda",
                              smoke=self.smoke, warmup=self.warmup, steps=steps, repeats=self.repeats,
                              peak_tflops=self.peak, data_dir=self.data_dir,
                              chunk=(2 if self.smoke else a.backbone_chunk) if build == "chunked" else 0, **self.shape)

    def max_batches(self) -> None:
        for arch in [ARCH_ALIASES.get(x, x) for x in self.args.max_batch.split(",") if x]:
            arch = "vit_test" if self.smoke else arch
            rec = self.deadline.skipped({"section": "model", "name": arch, "build": "max_batch"})
            a = self.args
            seconds = min(a.max_batch_seconds, self.deadline.left())
            self.sink.emit(rec or self.model_step.max_batch(
                arch, device=self.device, smoke=self.smoke, start=2 if self.smoke else a.max_batch_start,
                limit=8 if self.smoke else a.max_batch_limit, seconds=seconds, peak_tflops=self.peak, **self.shape))

    def _emit(self, arch: str, build: str, rec: dict) -> None:
        self.results[arch, build] = rec
        self.sink.emit(rec)

    def eager(self) -> None:
        for arch in self.archs:
            for build in self.builds:
                if build != "peer_compile":
                    self._emit(arch, build, self.run(arch, build))

    def compiled(self) -> None:
        """The first compile runs if the budget allows one; a later one only if one more as long as
        the longest so far still fits in the budget."""
        if "peer_compile" not in self.builds:
            return
        a = self.args
        budget = a.compile_budget if a.compile_budget is not None else (0 if a.quick else 90)
        spent = longest = 0.0
        order = [x for x in COMPILE_PRIORITY if x in self.archs] + [x for x in self.archs if x not in COMPILE_PRIORITY]
        for arch in order:
            left = min(budget - spent, self.deadline.left())
            rec = {"section": "model", "name": arch, "build": "peer_compile", "status": "skipped"}
            if self.smoke:
                rec["reason"] = "smoke mode: torch.compile is not run on tiny CPU shapes"
            elif budget <= 0:
                rec["reason"] = "torch.compile not run: --compile-budget 0 (the --quick default)"
            elif left < max(longest, self.COMPILE_MIN_S if not longest else 0):
                rec["reason"] = (f"time: {left:.0f} s left of the torch.compile budget ({budget:.0f} s, "
                                 f"--compile-budget) or of --time-budget; one takes about "
                                 f"{max(longest, self.COMPILE_MIN_S):.0f} s")
            else:
                t0 = time.perf_counter()
                rec = self.run(arch, "peer_compile")
                took = time.perf_counter() - t0
                spent, longest = spent + took, max(longest, took)
            self._emit(arch, "peer_compile", rec)

    def ratios(self) -> None:
        for arch in self.archs:
            trainer = self.results.get((arch, "trainer"), {})
            if trainer.get("status") != "ok":
                continue
            ratios = {}
            for other in ("peer", "peer_compile", "reference"):
                r = self.results.get((arch, other), {})
                if r.get("status") == "ok":
                    ratios[f"trainer_over_{other}"] = trainer["metrics"]["img_per_s"] / r["metrics"]["img_per_s"]
            chunked = self.results.get((arch, "chunked"), {})
            if chunked.get("status") == "ok":  # the extra forward's cost per image: goal >= 1 / 1.4
                ratios["chunked_over_trainer"] = chunked["metrics"]["img_per_s"] / trainer["metrics"]["img_per_s"]
            e2e = self.results.get((arch, "e2e"), {})
            if e2e.get("status") == "ok":  # the input pipeline's cost: goal >= 0.95
                ratios["e2e_over_trainer"] = e2e["metrics"]["img_per_s"] / trainer["metrics"]["img_per_s"]
            if ratios:
                self.sink.emit({"section": "model", "name": arch, "build": "ratio", "status": "ok",
                                "metrics": ratios})


def run_kernels(args, sink: Sink, device, smoke: bool) -> None:
    from bench import kernels

    ops = [o for o in args.kernels.split(",") if o]
    bad = set(ops) - set(kernels.ENTRIES)
    if bad:
        raise SystemExit(f"--kernels: unknown {', '.join(sorted(bad))} (known: {', '.join(kernels.ENTRIES)})")
    for rec in kernels.bench_kernels(ops, device, smoke, args.quick):
        sink.emit(rec)


def _data_dir(args, smoke: bool) -> tuple[Path | None, str | None]:
    from bench import pipeline

    return pipeline.bench_folder(args.data, args.data_images, smoke=smoke, quick=args.quick)


def run_data(args, sink: Sink, device, smoke: bool, data_dir: Path | None, why: str | None) -> None:
    from bench import pipeline

    backends = ["dali", "torchvision"]
    if data_dir is None:
        for b in backends + [f"{b} shards" for b in backends]:
            sink.emit({"section": "data", "name": b, "build": device.type, "status": "unavailable", "reason": why})
        return
    threads = 2 if smoke else min(16, os.cpu_count() or 1)
    if smoke:
        kw = dict(batch=4, threads=threads, num_batches=2, warmup=1, image_size=32)
    else:
        kw = dict(batch=256, threads=threads, num_batches=10 if args.quick else 30, warmup=4, image_size=224)
    for rec in pipeline.bench_data(data_dir, backends, device=device, sources=("folder", "shards"), **kw):
        sink.emit(rec)


def run_e2e(args, sink: Sink, device, smoke: bool, data_dir: Path | None, why: str | None,
            deadline: Deadline) -> None:
    from bench import pipeline

    if data_dir is None:
        sink.emit({"section": "e2e", "name": Path(args.e2e_config).stem, "build": "train.py",
                   "status": "unavailable", "reason": why})
        return
    if smoke:
        extra = ["--model.arch", "vit_test", "--model.img_size", "32", "--data.image_size", "32",
                 "--moco.dim", "32", "--moco.mlp_dim", "64", "--data.num_threads", "2"]
        kw = dict(batch=args.e2e_batch or 4, steps=args.e2e_steps or 3, log_every=1,
                  timeout_s=args.e2e_timeout or 60)
    else:
        extra = ["--data.num_threads", str(min(16, os.cpu_count() or 1))]
        steps = args.e2e_steps or (30 if args.quick else 50)
        kw = dict(batch=args.e2e_batch or 128, steps=steps, log_every=10, timeout_s=args.e2e_timeout or 240)
    kw["timeout_s"] = max(30.0, min(kw["timeout_s"], deadline.left()))
    sink.emit(pipeline.bench_e2e(args.e2e_config, data_dir, extra=extra, **kw))


def run_breakdown(args, sink: Sink, device, smoke: bool, data_dir: Path | None) -> None:
    from bench import breakdown, model_step

    archs = [ARCH_ALIASES.get(a, a) for a in args.arch.split(",") if a]
    arch = "vit_test" if smoke else (archs[0] if len(archs) == 1 else "vit_base")  # one arch: the headline
    shape = dict(img=32, dim=32, mlp_dim=64) if smoke else dict(img=224, dim=256, mlp_dim=4096)
    batch = args.batch or (4 if smoke else model_step.DEFAULT_BATCH.get(arch, 64))
    for rec in breakdown.bench_breakdown(arch, batch=batch, device=device, smoke=smoke,
                                         steps=args.breakdown_steps or (2 if smoke else 20), warmup=1 if smoke else 3,
                                         data_dir=data_dir, profile_steps=1 if smoke else 3, **shape):
        sink.emit(rec)


# -- main --------------------------------------------------------------------------------------------

def load_run(path: Path) -> tuple[list[dict], dict]:
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not records:
        raise SystemExit(f"{path}: no records")
    return records, records[0]["meta"]


def check(records: list[dict], meta: dict, args) -> int:
    """Compare with (and with --update, store into) the reference file; the exit status."""
    if meta.get("smoke"):
        print(f"reference: {SMOKE_LABEL}; nothing compared" + ("; --update refused" if args.update else ""))
        return 0
    ref_path = Path(args.reference)
    ref = reference.load(ref_path)
    status = 0
    if not args.no_compare:
        cmp = reference.compare(records, meta["device"]["name"], ref, args.tolerance)
        print(cmp.report())
        status = 0 if cmp.ok else 1
    if args.update:
        ref, n = reference.update(records, meta, ref)
        if args.tolerance is not None:
            ref["tolerance"] = args.tolerance
        reference.save(ref, ref_path)
        print(f"reference: wrote {n} figures for {meta['device']['name']!r} to {ref_path}")
        status = 0
    return status


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_run:
        records, meta = load_run(Path(args.from_run))
        if not args.markdown:
            print(header(meta))
        print_report(records, meta, args.markdown)
        return check(records, meta, args)

    cuda = torch.cuda.is_available()
    smoke = args.smoke or not cuda
    if not cuda:
        # The kernels run under the Triton interpreter; it must be chosen before any is decorated.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    meta = run_metadata(device, smoke, [sys.argv[0]] + (sys.argv[1:] if argv is None else list(argv)))
    out_dir = Path(args.out or os.environ.get("OUT") or REPO / "bench" / "results")
    slug = re.sub(r"[^A-Za-z0-9]+", "-", meta["device"]["name"]).strip("-")[:40]
    stamp = meta["date"].replace(":", "").replace("+0000", "Z")
    sink = Sink(out_dir / f"bench-{stamp}-{slug}{'-smoke' if smoke else ''}.jsonl", meta)
    print(header(meta), flush=True)

    t0 = time.perf_counter()
    deadline = Deadline(args.time_budget)
    data_dir, why = (None, None)
    model = None
    needs_data = {"data", "e2e", "breakdown", "eval", "dino", "r50"} & set(args.only)
    if needs_data or ("model" in args.only and "e2e" in args.builds):
        data_dir, why = _data_dir(args, smoke)
    for section in args.only:
        ts = time.perf_counter()
        late = deadline.skipped({"section": section, "name": "(all)"})
        if late:
            sink.emit(late)
            continue
        if section == "model":
            model = ModelBench(args, sink, device, smoke, meta, deadline, data_dir)
            model.eager()
            model.max_batches()
        elif section == "kernels":
            run_kernels(args, sink, device, smoke)
        elif section == "data":
            run_data(args, sink, device, smoke, data_dir, why)
        elif section == "e2e":
            run_e2e(args, sink, device, smoke, data_dir, why, deadline)
        elif section == "breakdown":
            run_breakdown(args, sink, device, smoke, data_dir)
        elif section == "eval":
            from bench.evaluation import bench_evaluation

            for rec in bench_evaluation(device, data_dir=data_dir, smoke=smoke):
                sink.emit(rec)
        elif section == "dino":
            from bench.dino import bench_dino

            for rec in bench_dino(device, batch=args.batch if args.only == ["dino"] else 0, smoke=smoke,
                                  data_dir=data_dir):
                sink.emit(rec)
        elif section == "r50":
            from bench.r50 import bench_r50

            for rec in bench_r50(device, batch=args.batch if args.only == ["r50"] else 0, smoke=smoke,
                                 data_dir=data_dir):
                sink.emit(rec)
        print(f"[{section}] done in {time.perf_counter() - ts:.0f} s", flush=True)
    if model is not None:  # the torch.compile peer last, with the time that is left
        ts = time.perf_counter()
        model.compiled()
        model.ratios()
        print(f"[model: torch.compile peer] done in {time.perf_counter() - ts:.0f} s", flush=True)

    print_report(sink.records, meta, args.markdown)
    print(f"results: {sink.path} ({len(sink.records)} records, {time.perf_counter() - t0:.0f} s)")
    return check(sink.records, meta, args)


if __name__ == "__main__":
    sys.exit(main())
