"""The bench suite (bench/): FLOP counts, the reference check, and the CPU smoke run.

The smoke run is not a measurement; it keeps every section's code working in CI.
"""
import json
import os
import sys
from pathlib import Path

import pytest
import triton
from limits import HANG_S, run_until_hang

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import flops, reference, report  # noqa: E402

SECTIONS = tuple(report.ENTRIES)


# -- FLOPs ----------------------------------------------------------------------------------------

def test_vit_b16_macs_match_hand_count():
    n, c = 197, 768  # 14 x 14 patches + class token
    per_block = n * c * 3 * c + 2 * n * n * c + n * c * c + 2 * n * c * 4 * c
    hand = 12 * per_block + 196 * (3 * 16 * 16) * c
    assert flops.vit_forward_macs("vit_base", 224) == hand
    assert round(hand / 1e9, 1) == 17.6


@pytest.mark.parametrize("arch, gmacs", [("vit_small", 4.6), ("vit_large", 61.6), ("vit_huge", 167.3)])
def test_vit_macs_other_sizes(arch, gmacs):
    assert round(flops.vit_forward_macs(arch, 224) / 1e9, 1) == gmacs


def test_moco_step_flops_counts_both_encoders():
    enc = flops.vit_encoder_macs("vit_base", 224, mlp_dim=4096, dim=256)
    pred = flops.mlp_macs(2, 256, 4096, 256)
    assert enc.projector == 768 * 4096 + 4096 * 4096 + 4096 * 256
    # per crop: base fwd + bwd (3x, patch embedding frozen: forward only) + momentum forward; 2 crops, 2 FLOPs/MAC
    expect = 2 * 2 * (3 * (enc.blocks + enc.projector + pred) + enc.patch_embed + enc.total)
    assert flops.moco_step_flops_per_image("vit_base") == expect
    passes = expect / (2 * 2 * flops.vit_forward_macs("vit_base"))  # per crop, in backbone forwards
    assert 3.95 < passes < 4.0  # base forward + backward (3) + momentum forward (1), less the frozen patch bwd


def test_peak_lookup_by_device_name():
    assert flops.peak_tflops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4)
    assert flops.peak_tflops("NVIDIA H100 PCIe") == pytest.approx(756.0)
    assert flops.peak_tflops("NVIDIA H200") == pytest.approx(989.4)
    assert flops.peak_tflops("NVIDIA H100 NVL") is None
    assert flops.peak_tflops("Some Future GPU") is None


# -- reference check ------------------------------------------------------------------------------

META = {"date": "2026-01-01T00:00:00+00:00", "device": {"name": "Test GPU 80GB"}, "commit": "abc",
        "command": "python bench/throughput.py", "smoke": False,
        "versions": {"python": "3", "torch": "2"}}


def _run(img_s=1000.0, kernel_per_s=50.0, pipe=9000.0):
    return [
        {"section": "model", "name": "vit_base", "build": "fused", "batch": 256, "status": "ok",
         "metrics": {"img_per_s": img_s}, "figures": {"img_per_s": img_s}, "meta": META},
        {"section": "model", "name": "vit_base", "build": "peer", "batch": 256, "status": "ok",
         "metrics": {"img_per_s": 500.0}, "figures": {}, "meta": META},
        {"section": "kernels", "name": "attention", "build": "fwd+bwd", "shape": "B512 N197 H12 D64",
         "status": "ok", "metrics": {"kernel_ms": 1e3 / kernel_per_s}, "figures": {"kernel_per_s": kernel_per_s},
         "meta": META},
        {"section": "data", "name": "dali", "build": "cuda", "shape": "b256 t16", "batch": 256, "status": "ok",
         "metrics": {"img_per_s": pipe}, "figures": {"img_per_s": pipe}, "meta": META},
        {"section": "e2e", "name": "vit_b", "build": "train.py", "status": "unavailable", "reason": "x",
         "meta": META},
    ]


def test_reference_passes_unchanged_and_flags_planted_regression():
    ref, n = reference.update(_run(), META, {"tolerance": 0.10, "devices": {}})
    assert n == 3  # fastmoco's own figures only; the peer is context, unavailable entries have none
    same = reference.compare(_run(), "Test GPU 80GB", ref)
    assert same.ok and len(same.passed) == 3 and not same.regressions
    assert reference.compare(_run(img_s=920.0), "Test GPU 80GB", ref).ok  # -8%: within 10%
    assert reference.compare(_run(img_s=1500.0), "Test GPU 80GB", ref).ok  # faster is never a failure

    bad = reference.compare(_run(img_s=850.0, kernel_per_s=30.0), "Test GPU 80GB", ref)
    assert not bad.ok
    assert sorted(k for k, _, _ in bad.regressions) == [
        "kernels/attention/fwd+bwd/B512 N197 H12 D64/kernel_per_s", "model/vit_base/fused/b256/img_per_s"]
    assert "REGRESSION model/vit_base/fused/b256/img_per_s" in bad.report()
    assert "FAILED" in bad.report()


def test_reference_other_device_shape_and_missing_figures():
    ref, _ = reference.update(_run(), META, {"tolerance": 0.10, "devices": {}})
    other = reference.compare(_run(img_s=1.0), "Another GPU", ref)
    assert other.ok and not other.has_reference
    partial = [r for r in _run(img_s=10.0) if r["section"] != "model"]
    cmp = reference.compare(partial, "Test GPU 80GB", ref)
    assert cmp.ok and cmp.not_measured == ["model/vit_base/fused/b256/img_per_s"]
    halved = _run(img_s=10.0)
    halved[0]["batch"] = 128  # another batch is another figure, never held to b256's reference
    assert reference.compare(halved, "Test GPU 80GB", ref).ok


def test_reference_refuses_smoke_runs():
    with pytest.raises(ValueError, match="not a measurement"):
        reference.update(_run(), {**META, "smoke": True}, {"devices": {}})


def _write_run(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _cli(*args, env=None):
    return run_until_hang([sys.executable, str(REPO / "bench" / "throughput.py"), *args],
                          f"bench/throughput.py {args[0]} (a saved run against a reference)", cwd=REPO,
                          capture_output=True, text=True, env=env)


def test_cli_update_then_check_a_saved_run(tmp_path):
    ref_file = tmp_path / "ref.json"
    ref_file.write_text('{"tolerance": 0.10, "devices": {}}\n')
    good = _write_run(tmp_path / "good.jsonl", _run())
    p = _cli("--from", str(good), "--reference", str(ref_file), "--update")
    assert p.returncode == 0, p.stdout + p.stderr
    stored = json.loads(ref_file.read_text())
    assert stored["devices"]["Test GPU 80GB"]["model/vit_base/fused/b256/img_per_s"]["value"] == 1000.0

    p = _cli("--from", str(good), "--reference", str(ref_file))
    assert p.returncode == 0 and "reference check: PASSED" in p.stdout, p.stdout + p.stderr
    slow = _write_run(tmp_path / "slow.jsonl", _run(pipe=5000.0))
    p = _cli("--from", str(slow), "--reference", str(ref_file))
    assert p.returncode == 1, p.stdout + p.stderr
    assert "REGRESSION data/dali/cuda/b256 t16/img_per_s" in p.stdout


def test_shipped_reference_file_is_valid():
    ref = json.loads((REPO / "bench" / "reference_timings.json").read_text())
    assert 0 < ref["tolerance"] < 1 and isinstance(ref["devices"], dict)
    for device, figures in ref["devices"].items():
        for key, entry in figures.items():
            assert key.count("/") == 4 and entry["value"] > 0, (device, key)


# -- smoke run ------------------------------------------------------------------------------------

@pytest.mark.long
def test_smoke_run_has_every_section(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "")}
    p = run_until_hang([sys.executable, str(REPO / "bench" / "throughput.py"), "--smoke", "--out", str(tmp_path)],
                       "bench/throughput.py --smoke (every section on the CPU)", cwd=REPO, capture_output=True,
                       text=True, env=env)
    out = p.stdout
    assert p.returncode == 0, out[-3000:] + p.stderr[-3000:]
    assert "SMOKE (CPU): not a measurement" in out.splitlines()[0]
    for title in ("== model step", "== kernels", "== data pipeline", "== end to end", "== step breakdown",
                  "== evaluation", "== DINO", "== MoCo v3 ResNet-50"):
        line = next((ln for ln in out.splitlines() if ln.startswith(title)), None)
        assert line is not None and "SMOKE (CPU): not a measurement" in line, title
    assert "nothing compared" in out
    from test_quiet import NOISE   # quiet by default: the profiler's USDT lines, DeepSpeed's notices
    assert [n for n in NOISE if n in out + p.stderr] == [], (out + p.stderr)[-3000:]

    files = list(tmp_path.glob("bench-*-smoke.jsonl"))
    assert len(files) == 1
    records = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert {r["section"] for r in records} == set(SECTIONS)
    assert all(r["meta"]["smoke"] and r["meta"]["command"] and r["meta"]["device"]["name"] for r in records)
    model = {r["build"]: r for r in records if r["section"] == "model"}
    assert set(model) >= {"trainer", "e2e", "reference", "peer", "peer_compile", "ratio"}
    assert "DeepSpeed fp32 ZeRO-0" in model["trainer"]["notes"]  # the Trainer's own step, as train.py builds it
    assert model["e2e"]["batch"] == model["trainer"]["batch"]  # fed by DALI at the same micro batch
    assert set(model["ratio"]["metrics"]) >= {"e2e_over_trainer", "trainer_over_peer", "trainer_over_reference"}
    for build in ("trainer", "e2e", "reference", "peer"):  # these must run everywhere
        assert model[build]["status"] == "ok", model[build]
        assert model[build]["metrics"]["img_per_s"] > 0
    assert {r["name"] for r in records if r["section"] == "kernels"} >= {"attention", "layernorm", "contrastive",
                                                                         "ema"}
    data = {r["name"]: r for r in records if r["section"] == "data"}
    assert set(data) == {"dali", "torchvision", "dali shards", "torchvision shards"}
    assert data["torchvision shards"]["status"] == "ok", data["torchvision shards"]   # the shard row runs on the CPU
    phases = {r["build"]: r for r in records if r["section"] == "breakdown"}
    assert set(phases) == {"device", "dali"} and all(r["status"] == "ok" for r in phases.values()), phases
    assert "data stall of the end-to-end step" in out and "top kernels" in out
    host = phases["dali"]["metrics"]["data_host"]   # the loader's own clock over the phases' steps
    assert host["batches"] == phases["dali"]["metrics"]["steps"] and 0 < host["feeder_ms"] < host["run_ms"], host
    assert "host time of its data phase: pipe.run()" in out
    r50 = {(r["name"], r["build"]): r for r in records if r["section"] == "r50"}
    assert set(r50) == {("step", "trainer"), ("step", "e2e"), ("step", "peer"), ("lars", "fused"),
                        ("lars", "reference")} and all(r["status"] == "ok" for r in r50.values()), r50
    assert "LARS" in r50[("step", "trainer")]["metrics"]["notes"]  # the R50 recipe's optimizer, not AdamW


def test_kernels_table_shows_tuning_choices():
    """GPU-only details (the tuner's choice, split vs padded head dim) reach the table."""
    from bench.kernels import _autotune_summary, _entry
    from bench.kernels import table as kernels_table

    class FakeAutotuner:  # what triton.autotune keeps after tuning: {config: [median, p20, p80]}
        configs_timings = {triton.Config({"BLOCK_M": 64, "TAIL_D": 0}, num_warps=4): [0.30, 0.29, 0.31],
                           triton.Config({"BLOCK_M": 128, "TAIL_D": 16}, num_warps=8): [0.25, 0.24, 0.26]}

    summary = _autotune_summary(FakeAutotuner(), "bwd")
    assert summary["bwd_best_padded_ms"] == 0.30 and summary["bwd_best_split_ms"] == 0.25
    assert "TAIL_D=16" in summary["bwd_config"]
    att = _entry("attention", "B64 N257 H16 D80", 0.5, 2.0, 1e12, "tflops", summary, fb=True)
    ln = _entry("layernorm", "M100 C768", 0.1, 0.2, 1e9, "gbps",
                {"default_config_ms": 0.15, "speedup_vs_default_config": 1.5,
                 "fwd_config": "rows 1, warps 4, stages 3, 8/SM"}, fb=False)
    table = kernels_table([att, ln], markdown=True)
    assert "best padded 0.300 ms, best split 0.250 ms" in table
    assert "default config 0.150 ms (tuned 1.50x; fwd rows 1, warps 4, stages 3, 8/SM)" in table


# -- step breakdown and largest-batch search (a Trainer per run: each in its own process) --------------

def _in_process(code: str, what: str) -> dict:
    """Run `code` (which ends by printing one JSON line) in a fresh interpreter: a Trainer initialises
    torch.distributed for its process. `what` names it in the failure of a hang."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    p = run_until_hang([sys.executable, "-c", code], what, cwd=REPO, capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


BREAKDOWN_CHECK = """
import json, time, torch
from fastmoco import ops
from bench import breakdown, model_step
with ops.fused(**{op: "off" for op in ops.OPS}):
    t = model_step.build_trainer("vit_test", img=32, batch=4, dim=32, mlp_dim=64, smoke=True, out_dir="%s")
    originals = (t.model.update_momentum_encoder, t.engine.backward, t.engine.step, ops.symmetric_contrastive_loss)
    state_update = t.model.momentum_state.update
    def slow_ema(m):  # a known delay inside the EMA phase
        time.sleep(0.2)
        state_update(m)
    t.model.momentum_state.update = slow_ema
    starts = []
    def slow_data(batches):  # and a known stall before each batch
        while True:
            starts.append(time.perf_counter())  # a step's data phase begins
            time.sleep(0.3)
            yield next(batches)
    batches = slow_data(model_step.device_batches(t, 4, 32))
    res = breakdown.run_phases(t, batches, steps=3, warmup=1)
    wall_ms = (time.perf_counter() - starts[1]) * 1e3 / 3  # the 3 measured steps (after the warm-up)
    restored = (t.model.update_momentum_encoder, t.engine.backward, t.engine.step, ops.symmetric_contrastive_loss)
    print(json.dumps({**res, "wall_ms": wall_ms, "step": t.step,
                      "restored": [a == b for a, b in zip(originals, restored)]
                                  + ["update_momentum_encoder" not in vars(t.model)]}))
"""


def test_breakdown_puts_known_delays_in_their_phases(tmp_path):
    r = _in_process(BREAKDOWN_CHECK % tmp_path, "the step breakdown of a tiny Trainer with planted delays")
    ms, med = r["phase_ms"], r["phase_median_ms"]
    assert list(ms) == ["data", "online", "ema", "momentum", "loss", "backward", "optimizer", "logging"]
    # The planted stall (300 ms), and only it, is in the data phase; the planted EMA delay (200 ms) in the EMA
    # phase. Each may run over by less than the other delay (150 ms: room for a busy machine's scheduling, none
    # for the other delay counted in the wrong phase); medians of the 3 steps, so one late wake-up is no failure.
    assert 300 <= med["data"] < 300 + 150, med
    assert 200 <= med["ema"] < 200 + 150, med
    assert all(v >= 0 for v in ms.values()) and ms["online"] > 0 and ms["backward"] > 0
    assert r["step_ms"] == pytest.approx(sum(ms.values()))
    # the phases tile the measured steps: nothing counted twice (a planted delay counted twice adds 200 ms or more;
    # the clocks differ by the moments between a marker and the data source's own timestamp)
    assert r["step_ms"] < r["wall_ms"] + 100, r
    assert r["data_stall"] == pytest.approx(ms["data"] / r["step_ms"])
    assert r["step"] == 4  # warm-up + measured steps, each one Trainer step
    assert all(r["restored"])  # the markers leave the training step as it was


def test_gpu_busy_is_the_union_of_device_intervals_over_their_span():
    from bench.breakdown import busy_fraction, device_busy, table

    # overlapping streams (DALI's beside the step's) count once; a gap of 3 counts as idle
    assert busy_fraction([(0, 4), (2, 5), (8, 10), (9, 9.5)]) == (7, 10)
    assert busy_fraction([(5, 6), (0, 1)]) == (2, 6)
    assert busy_fraction([]) == (0.0, 0.0)

    class Event:
        def __init__(self, device, start, end):
            from torch.autograd import DeviceType
            self.device_type = DeviceType.CUDA if device else DeviceType.CPU
            self.time_range = type("Range", (), {"start": start, "end": end})()

    class Prof:
        def __init__(self, events):
            self._events = events

        def events(self):
            return self._events

    # host ops are not GPU work: only device events count; 2 steps over 2000 us, 1400 us busy
    busy = device_busy(Prof([Event(False, 0, 2000), Event(True, 0, 400), Event(True, 1000, 1200),
                             Event(True, 1100, 2000)]), steps=2)
    assert busy == pytest.approx({"busy": 1400 / 2000, "idle_ms_per_step": 0.3})
    assert device_busy(Prof([Event(False, 0, 10)]), steps=1) is None   # the CPU: no line
    rec = {"section": "breakdown", "name": "vit_base", "build": "dali", "status": "ok", "batch": 256,
           "metrics": {"phase_ms": {p: 1.0 for p in ("data", "online", "ema", "momentum", "loss", "backward",
                                                      "optimizer", "logging")}, "step_ms": 8.0, "img_per_s": 1.0,
                       "data_stall": 0.125, "gpu_busy": busy}}
    assert "GPU busy (kernels and copies over the profiled steps; low: the GPU waits for the host): vit_base dali " \
           "70.0%, idle 0.3 ms a step" in table([rec])


MAX_BATCH_CHECK = """
import json, torch
from bench import model_step
real = model_step.device_batches
def device_batches(trainer, batch, img):  # memory for 5 images and no more
    if batch > 5:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
    return real(trainer, batch, img)
model_step.device_batches = device_batches
rec = model_step.max_batch("vit_test", img=32, dim=32, mlp_dim=64, device=torch.device("cpu"), smoke=True,
                           start=2, limit=64, seconds=%d, peak_tflops=None)
print(json.dumps(rec))
"""


def test_max_batch_search_finds_the_largest_batch_that_fits():
    r = _in_process(MAX_BATCH_CHECK % HANG_S, "the largest-batch search of a tiny Trainer")  # its budget: no limit
    assert r["status"] == "ok" and r["batch"] == 5, r
    assert r["metrics"]["first_oom_batch"] == 6
    assert [p.split(":")[0] for p in r["metrics"]["probes"]] == ["2", "4", "8", "6", "5"]
    assert r["metrics"]["img_per_s"] > 0 and "6 ran out of memory" in r["notes"]


ZERO3_TRAINER_CHECK = """
import json, os, tempfile
from bench import model_step
with tempfile.TemporaryDirectory() as out:
    # ViT-H's recipe (configs/vit_h.json): ZeRO-3, activation checkpointing; built in-process like the bench's
    t = model_step.trainer_from_config("configs/tiny.json", batch=4, out_dir=out, extra=(
        "--deepspeed.zero_optimization.stage", "3", "--model.grad_checkpointing", "true"))
    step = model_step._trainer_step(t, model_step.device_batches(t, 4, t.cfg.data.image_size))
    for i in range(2):
        step(i)
    print(json.dumps({"step": t.step, "stage": t.engine.zero_optimization_stage()}))
"""


def test_bench_trainer_steps_under_zero3_in_process():
    """The bench builds the Trainer in its own process (no launcher): DeepSpeed's ZeRO-3 reads the
    rendezvous variables during the step, not only at build (the H200 run's KeyError 'LOCAL_RANK')."""
    r = _in_process(ZERO3_TRAINER_CHECK, "two ZeRO-3 Trainer steps built as the bench builds them")
    assert r == {"step": 2, "stage": 3}, r


def test_bench_modules_import_no_circle():
    """Each bench module imports only lower ones (imports inside functions too): what two modules
    both need lives in a third, never in each other."""
    import ast

    bench_dir = REPO / "bench"
    graph = {}
    for path in bench_dir.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "bench":
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bench."):
                deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("bench.")}
        graph[path.stem] = deps & {p.stem for p in bench_dir.glob("*.py")}

    def visit(node, stack):
        assert node not in stack, f"import circle: {' -> '.join([*stack, node])}"
        for dep in graph[node]:
            visit(dep, [*stack, node])

    for module in graph:
        visit(module, [])


PHASE_CHECK = """
import json, torch
from fastmoco import ops
from bench import breakdown, model_step
with ops.fused(**{op: "off" for op in ops.OPS}):
    t = model_step.build_trainer("vit_test", img=32, batch=4, dim=32, mlp_dim=64, smoke=True, out_dir="%s")
    step = t.engine.step
    a = torch.randn(300, 300)
    def planted_step(*args, **kwargs):  # one known op inside the optimizer phase
        torch.mm(a, a)
        return step(*args, **kwargs)
    t.engine.step = planted_step
    res = breakdown.phase_kernels(t, model_step.device_batches(t, 4, 32), steps=2)
print(json.dumps(res))
"""


def test_optimizer_phase_table_holds_only_what_runs_inside_engine_step(tmp_path):
    """The forward and backward run matmuls too; only the one planted inside engine.step may count."""
    r = _in_process(PHASE_CHECK % tmp_path, "the optimizer phase's kernel table of a tiny Trainer")
    calls = {k["name"]: k["calls_per_step"] for k in r["top"]}
    assert calls.get("aten::mm") == 1.0, r["top"]
    assert r["phase"] == "optimizer" and r["host_ms_per_step"] >= r["work_ms_per_step"] > 0, r


def test_the_chunked_build_runs_beside_the_trainer_and_is_compared_with_it(tmp_path):
    """`--builds chunked` (the GPU session's chunk stage): the Trainer with memory.backbone_chunk."""
    p = run_until_hang([sys.executable, str(REPO / "bench" / "throughput.py"), "--smoke", "--only", "model",
                        "--builds", "trainer,chunked", "--out", str(tmp_path)],
                       "bench/throughput.py --smoke --builds trainer,chunked", cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (f,) = tmp_path.glob("bench-*-smoke.jsonl")
    recs = {r["build"]: r for r in map(json.loads, f.read_text().splitlines())}
    assert recs["chunked"]["status"] == "ok" and "backbone in chunks of 2 images" in recs["chunked"]["notes"]
    assert recs["chunked"]["batch"] == recs["trainer"]["batch"] == 2   # 4 views: two chunks
    assert recs["ratio"]["metrics"]["chunked_over_trainer"] > 0


# -- bench/gpu_session.sh: its tests stage, run here on planted test files ---------------------------------------
def test_gpu_session_tests_stage_reports_every_file_and_fails_on_any(tmp_path):
    """The stage runs each file in its own pytest (here two at a time), cuts a hung one at TEST_TIMEOUT,
    lists every file with its exit status in gpu_tests.txt, fails the session when any file did not
    pass, and leaves at most 8 files under $OUT (what a device call brings back)."""
    planted = {
        "test_planted_pass.py": "@pytest.mark.gpu\ndef test_ok():\n    pass\n",
        "test_planted_fail.py": "@pytest.mark.gpu\ndef test_wrong():\n    assert 1 == 2, 'planted failure'\n",
        "test_planted_hang.py": "@pytest.mark.gpu\ndef test_hangs():\n    time.sleep(600)\n",
    }
    for name, body in planted.items():
        (tmp_path / name).write_text("import time\nimport pytest\n\n\n" + body)
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "STAGES": "tests", "TEST_JOBS": "2",
           "TEST_TIMEOUT": "20", "TEST_FILES": " ".join(str(tmp_path / n) for n in sorted(planted))}
    proc = run_until_hang(["bash", str(REPO / "bench" / "gpu_session.sh")], "gpu_session.sh's tests stage",
                          env=env, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report_text = (out / "gpu_tests.txt").read_text()
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:3] for line in report_text.splitlines()
            if line.startswith(f"| {tmp_path}")}
    assert {Path(f).name: r[0] for f, r in rows.items()} == {
        "test_planted_fail.py": "1", "test_planted_hang.py": "124", "test_planted_pass.py": "0"}, report_text
    assert int(rows[str(tmp_path / "test_planted_hang.py")][1]) < 60
    assert "planted failure" in report_text and "TIMED OUT after 20 s" in report_text
    assert "1 passed" in report_text
    log = (out / "log.txt").read_text()
    assert "== environment" in log and "something failed" in log
    assert len([p for p in out.rglob("*") if p.is_file()]) <= 8


def test_gpu_session_finds_every_gpu_test_file():
    """Without TEST_FILES the stage takes the files from pytest's own collection of `-m gpu`: the same
    files the marker selects (the stage cannot leave one out the way a hand-kept list did)."""
    script = (REPO / "bench" / "gpu_session.sh").read_text()
    command = script[script.index('files=$("$PY" -m pytest'):script.index("sort -u)") + len("sort -u")]
    command = command.replace("files=$(", "").replace('"$PY"', sys.executable).replace("\\\n", " ")
    listed = run_until_hang(["bash", "-c", command], "the stage's collection of GPU test files",
                            capture_output=True, text=True, cwd=REPO).stdout.split()
    marked = sorted(f"tests/{p.name}" for p in (REPO / "tests").glob("test_*.py")
                    if "mark.gpu" in p.read_text() and p.name != "test_bench.py")
    assert listed == marked
    assert {"tests/test_attention.py", "tests/test_momentum.py", "tests/test_pipelines_dali.py",
            "tests/test_attention_maps.py", "tests/test_chunked.py"} <= set(listed)
