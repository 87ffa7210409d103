"""The bf16 training step reads nothing back on the host, and DeepSpeed's part of it launches no
kernel per parameter, at the ZeRO stages the recipes ship (ViT-S/B and DINO: 1, ViT-L: 2).

A host read in the step (`.item()`, `bool(tensor)`: aten's `_local_scalar_dense`) makes the host wait
for the GPU, then the GPU wait for the host's next launches. DeepSpeed's bf16 ZeRO-1/2 defaults do
one a step (its inf/NaN scan over every gradient) and reduce every gradient twice more for a norm
nothing reads; fastmoco.train turns both off (`_no_host_sync_in_step`).

On the CPU the client AdamW takes torch's single-tensor path, which reads its step count on the host
(on CUDA the fused AdamW does not): ops under the client optimizer's own step are left out of the
counts here, and so are views (no kernel; DeepSpeed's step still makes a few per parameter), and the
GPU test checks the whole step with CUDA's sync debug mode.

Run as a script, this file is the worker:  python tests/test_host_sync.py OUT STAGE CONFIG[:ARCH] ...
"""
import collections
import json
import os
import sys
import traceback
from pathlib import Path

import pytest
import torch

from limits import run_until_hang

ROOT = Path(__file__).resolve().parents[1]


def _run_worker(tmp_path, stage: int, runs: list[str], env=None) -> dict:
    out = tmp_path / "result.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    env.pop("TRITON_INTERPRET", None)   # the step's torch paths; each kernel has its own tests
    cmd = [sys.executable, __file__, str(out), str(stage), *runs]
    p = run_until_hang(cmd, f"host-sync worker (ZeRO-{stage}, {', '.join(runs)})", cwd=ROOT, env=env,
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise AssertionError(f"{cmd} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_bf16_step_reads_nothing_on_the_host_and_launches_nothing_per_parameter(tmp_path, stage):
    """One bf16 training step (after two) of a 2-block and a 12-block ViT: no host read
    outside the client optimizer, and DeepSpeed's `engine.step()` dispatches the same kernels whatever
    the number of parameters (DeepSpeed's defaults: a read a step and four reductions per gradient)."""
    r = _run_worker(tmp_path, stage, ["tiny.json:vit_test", "tiny.json:vit_tiny"])
    small, large = r["tiny.json:vit_test"], r["tiny.json:vit_tiny"]
    assert small["optimizer"] == large["optimizer"] == "DeepSpeedZeroOptimizer", r
    assert large["params"] > 4 * small["params"], r   # the two models differ enough to show a loop
    for run, got in r.items():
        assert got["syncs"] == {}, f"{run}, ZeRO-{stage}: host reads in the step at {got['syncs']}"
    assert large["step_ops"] == small["step_ops"], (
        f"ZeRO-{stage}: engine.step() dispatches {small['step_ops_by_name']} for {small['params']} parameters "
        f"and {large['step_ops_by_name']} for {large['params']}: a kernel per parameter")


@pytest.mark.slow
def test_the_other_methods_bf16_steps_read_nothing_on_the_host(tmp_path):
    """The same for DINO (its recipes' ZeRO-1: per-parameter clipping, the frozen last layer, the
    teacher's EMA after the step) and MoCo v3's ResNet-50 (ZeRO-1 in configs/r50_100ep.json: LARS over
    the flat partitions, BatchNorm over the global batch; at ZeRO-0 DeepSpeed's bf16 wrapper reads
    every gradient's inf/NaN check on the host, 71 reads a step for r50_tiny)."""
    r = _run_worker(tmp_path, 1, ["dino_tiny.json", "r50_tiny.json"])
    for run, got in r.items():
        assert got["optimizer"] == "DeepSpeedZeroOptimizer", r
        assert got["syncs"] == {}, f"{run}, ZeRO-1: host reads in the step at {got['syncs']}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (marker gpu); none is present")
@pytest.mark.parametrize("stage", [1, 2])
def test_bf16_step_reads_nothing_on_the_host_on_the_gpu(tmp_path, stage):
    """The whole third step on CUDA (forward, EMA, loss, backward, DeepSpeed's step with the fused
    AdamW) under torch.cuda.set_sync_debug_mode("error"): any synchronizing call raises in the worker.
    FASTMOCO_TUNE=0: ops take their untimed defaults (the timing of the first calls syncs on purpose)."""
    r = _run_worker(tmp_path, stage, ["tiny.json", "dino_tiny.json", "r50_tiny.json"], {"FASTMOCO_TUNE": "0"})
    for run, got in r.items():
        assert got["device"] == "cuda" and got["syncs"] == {}, (run, got)


class _Dispatches(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts, outside the client optimizer's step: host reads (by call site) and the ops other than
    views that `engine.step()` dispatches (by name)."""

    def __init__(self):
        super().__init__()
        self.syncs, self.step_ops = collections.Counter(), collections.Counter()
        self.in_step = self.in_client = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.in_client:
            name = func.overloadpacket.__name__
            if name == "_local_scalar_dense":
                frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename]
                self.syncs[" <- ".join(f"{f.filename.split('site-packages/')[-1]}:{f.lineno}"
                                       for f in reversed(frames[-3:]))] += 1
            if self.in_step and not func.is_view:   # views launch no kernel
                self.step_ops[name] += 1
        return func(*args, **(kwargs or {}))


def _flagged(obj, method: str, mode: _Dispatches, flag: str) -> None:
    """obj.method, with mode.<flag> True while it runs."""
    inner = getattr(obj, method)

    def call(*a, **k):
        setattr(mode, flag, True)
        try:
            return inner(*a, **k)
        finally:
            setattr(mode, flag, False)
    setattr(obj, method, call)


def _measure(run: str, stage: int, out_dir: Path) -> dict:
    """One step of configs/CONFIG (its arch, or ARCH) in bf16 at ZeRO-`stage`, after two."""
    from fastmoco.config import load_config
    from fastmoco.train import Trainer

    config, _, arch = run.partition(":")
    t = Trainer(load_config(str(ROOT / "configs" / config), [
        *(["--model.arch", arch] if arch else []), "--deepspeed.bf16.enabled", "true",
        "--deepspeed.zero_optimization.stage", str(stage), "--logging.tensorboard", "false",
        "--logging.out_dir", str(out_dir)]))
    batches = iter(t.loader)
    for _ in range(2):   # the first steps build state (optimizer moments, kernels' choices, cached plans
        views = next(batches)[:-1]   # keyed by addresses, which settle once the moments exist)
        t.train_step(*views)
        t.step += 1
    mode = _Dispatches()
    _flagged(t.engine, "step", mode, "in_step")
    _flagged(t.optimizer.optimizer, "step", mode, "in_client")   # the AdamW that DeepSpeed's wrapper steps
    views = [v.to(t.device) for v in next(batches)[:-1]]   # as DALI hands them: on the device
    cuda = t.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    with mode:
        t.train_step(*views)
    if cuda:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    return {"optimizer": type(t.optimizer).__name__, "device": t.device.type,
            "params": sum(p.numel() for p in t.engine.module.parameters() if p.requires_grad),
            "syncs": dict(mode.syncs), "step_ops": sum(mode.step_ops.values()),
            "step_ops_by_name": dict(sorted(mode.step_ops.items()))}


def _worker(out: str, stage: str, runs: list[str]) -> None:
    from fastmoco.train import fill_single_process_env

    fill_single_process_env()
    result = {run: _measure(run, int(stage), Path(out).parent / run.replace(":", "-")) for run in runs}
    Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    from fastmoco.distributed import process_entry
    process_entry(lambda argv: _worker(argv[0], argv[1], argv[2:]))()
