"""The training entry on the CPU: DeepSpeed on gloo, 1 and 2 processes, ZeRO 0/2/3,
resume, interrupted checkpoint writes, and bad input."""
import json
import math
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
from limits import run_until_hang

from fastmoco.config import ConfigError, load_config, validate_deepspeed
from fastmoco.train import resolve_deepspeed_config

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.json")
WORKER = str(ROOT / "tests" / "train_worker.py")
COMMON = ["--logging.log_every", "1", "--logging.check_finite_every", "1", "--logging.tensorboard", "false"]


def run(cmd, check=True, what="a subprocess"):
    """cmd from the repository root, allowed HANG_S; `what` names it in the failure of a hang."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)  # the reference path; the kernels have their own tests
    p = run_until_hang(cmd, what, cwd=ROOT, env=env, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return p


def train_1proc(out_dir, *overrides, mode="fit", dump=None):
    return run([sys.executable, WORKER, mode, str(dump or out_dir / "dump.pt"), TINY,
                "--logging.out_dir", str(out_dir), *COMMON, *overrides], what=f"training worker ({mode}, 1 process)")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def train_2proc(out_dir, *overrides):
    return run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
                WORKER, "fit", str(out_dir / "dump.pt"), TINY, "--logging.out_dir", str(out_dir), *COMMON,
                "--deepspeed.train_micro_batch_size_per_gpu", "4", *overrides],
               what="training worker (fit, 2 gloo ranks under torchrun)")


def losses(out_dir):
    return {r["step"]: r["loss"] for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """One process, micro batch 8, 12 steps (over an epoch boundary: 8 steps per epoch)."""
    out = tmp_path_factory.mktemp("baseline")
    train_1proc(out, "--schedule.max_steps", "12")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_two_processes_equal_one_on_the_global_batch(baseline, tmp_path, stage):
    """To fp32 rounding: measured 6e-7 relative at most over 12 steps under ZeRO-3. (Before the momentum
    encoder's small ZeRO-3 parameters were gathered again after each EMA update, its forward read them one
    update late: 3.7e-5 off by step 8.)"""
    train_2proc(tmp_path, "--schedule.max_steps", "8", "--deepspeed.zero_optimization.stage", str(stage))
    one, two = losses(baseline), losses(tmp_path)
    assert sorted(two) == list(range(1, 9))
    for s in two:
        assert two[s] == pytest.approx(one[s], rel=5e-6), (s, two[s], one[s])
    dump = torch.load(tmp_path / "dump.pt")
    if stage == 3:
        # every rank holds half (rounded up) of every parameter of both encoders
        assert any(k.startswith("momentum.") for k in dump["shards"])
        for name, (local, full) in dump["shards"].items():
            assert local == (full + 1) // 2, name
        assert len(dump["shards"]) == 2 * sum(1 for k in dump["shards"] if k.startswith("online."))
    else:
        assert dump["shards"] == {}


@pytest.mark.slow
def test_sharded_momentum_encoder_equals_unsharded(tmp_path):
    """After k steps the ZeRO-3 momentum encoder, gathered, equals a plain one-process run's."""
    ref = tmp_path / "ref"
    train_1proc(ref, "--schedule.max_steps", "4")
    z3 = tmp_path / "z3"
    train_2proc(z3, "--schedule.max_steps", "4", "--deepspeed.zero_optimization.stage", "3")
    a, b = torch.load(ref / "dump.pt")["momentum"], torch.load(z3 / "dump.pt")["momentum"]
    assert a.keys() == b.keys() and len(a) > 20
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(baseline, tmp_path):
    train_1proc(tmp_path, "--schedule.max_steps", "6")          # stops mid-epoch 0, checkpoint at step 6
    assert (tmp_path / "checkpoints" / "step_00000006" / "COMPLETE").is_file()
    cmd = [sys.executable, str(ROOT / "fastmoco" / "train.py"), "--config", TINY, "--resume", "auto",
           "--logging.out_dir", str(tmp_path), "--schedule.max_steps", "12", *COMMON]
    p = run(cmd, what="training run resumed from step 6 (fastmoco/train.py, 1 process)")
    assert "resumed from" in p.stdout and "step_00000006" in p.stdout
    one, two = losses(baseline), losses(tmp_path)
    assert sorted(two) == list(range(1, 13))
    for s in range(7, 13):  # after the resume, across the epoch boundary at 8
        assert two[s] == one[s], (s, two[s], one[s])
    for s in range(1, 7):
        assert two[s] == one[s]


@pytest.mark.long
@pytest.mark.slow
def test_dali_resume_reproduces_the_uninterrupted_run(tmp_path):
    """DALI's CPU twin on JPEGs: resumed mid-epoch, the losses after the resume (across two epoch
    boundaries) equal the uninterrupted run's bit for bit: files and random augmentations continue."""
    pytest.importorskip("nvidia.dali")
    from fastmoco.pipelines.demo_data import make_demo_data

    photos = make_demo_data(tmp_path / "photos", num_images=24, seed=4)
    data = ["--data.source", "folder", "--data.path", str(photos), "--data.backend", "dali",
            "--data.num_threads", "1", "--schedule.epochs", "3", "--checkpoint.every_epochs", "0"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    train_1proc(whole, "--schedule.max_steps", "7", *data)        # 3 steps per epoch
    train_1proc(part, "--schedule.max_steps", "2", *data)         # stops mid-epoch 0, checkpoint at step 2
    cmd = [sys.executable, str(ROOT / "fastmoco" / "train.py"), "--config", TINY, "--resume", "auto",
           "--logging.out_dir", str(part), "--schedule.max_steps", "7", *COMMON, *data]
    p = run(cmd, what="training run on DALI resumed from step 2 (fastmoco/train.py, 1 process)")
    assert "resumed from" in p.stdout and "step_00000002" in p.stdout
    one, two = losses(whole), losses(part)
    assert sorted(two) == list(range(1, 8))
    for s in range(1, 8):
        assert two[s] == one[s], (s, two[s], one[s])


@pytest.mark.slow
def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path):
    dump = tmp_path / "crash.json"
    train_1proc(tmp_path, "--schedule.max_steps", "4", mode="crash-save", dump=dump)
    r = json.loads(dump.read_text())
    assert r["crashed"]
    assert r["latest"] == r["good"] and r["latest"].endswith("step_00000004")
    assert r["resumed_step"] == 4 and math.isfinite(r["loss_after_resume"])
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert "step_00000005" not in ckpts  # the half-written one never looks complete


@pytest.mark.parametrize("override, world, expect", [
    (["--deepspeed.train_batch_size", "9"], 2, "train_batch_size 9 does not divide over 2 processes"),
    (["--deepspeed.train_micro_batch_size_per_gpu", "1"], 2, "train_micro_batch_size_per_gpu must be an integer >= 2"),
    (["--deepspeed.gradient_accumulation_steps", "2"], 1, "gradient_accumulation_steps"),
    (["--deepspeed.optimizer", '{"type": "Adam"}'], 1, "deepspeed.optimizer"),
])
def test_deepspeed_batch_config_errors(override, world, expect):
    cfg = load_config(TINY, override)
    with pytest.raises(ConfigError, match=expect):
        resolve_deepspeed_config(cfg, world=world, use_cuda=False)


def test_deepspeed_batch_config_resolves_micro_batch_and_bf16():
    ds = resolve_deepspeed_config(load_config(TINY, ["--deepspeed.train_batch_size", "16"]), world=2, use_cuda=False)
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["bf16"]["enabled"] is False
    assert resolve_deepspeed_config(load_config(TINY), world=1, use_cuda=True)["bf16"]["enabled"] is True


@pytest.mark.parametrize("config, override, check, norm", [
    ("vit_b.json", [], False, False),     # the recipes' ZeRO-1 / ZeRO-2: both off
    ("vit_l.json", [], False, False),
    ("vit_h.json", [], False, None),      # ZeRO-3: DeepSpeed takes no compute_grad_norm there
    ("vit_b.json", ["--deepspeed.gradient_clipping", "1.0"], False, None),   # clipping reads the norm
    ("vit_b.json", ["--deepspeed.bf16.check_grad_overflow", "true",
                    "--deepspeed.zero_optimization.compute_grad_norm", "true"], True, True),   # the config's own
])
def test_deepspeed_step_defaults_without_host_sync(config, override, check, norm):
    """What DeepSpeed gets (tests/test_host_sync.py measures what they do to the step)."""
    ds = resolve_deepspeed_config(load_config(str(ROOT / "configs" / config), override), world=1, use_cuda=True)
    assert ds["bf16"].get("check_grad_overflow") is check
    assert ds["zero_optimization"].get("compute_grad_norm") is norm
    validate_deepspeed(ds)   # DeepSpeed's own parser takes them


def train_cli(tmp_path, *overrides):
    return run([sys.executable, str(ROOT / "fastmoco" / "train.py"), "--config", TINY,
                "--logging.out_dir", str(tmp_path / "run"), *COMMON, *overrides], check=False,
               what="training run (fastmoco/train.py, 1 process)")


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing", "empty", "unknown_key", "image_size"])
def test_bad_input_stops_before_training_with_a_clear_error(tmp_path, case):
    if case == "missing":
        p = train_cli(tmp_path, "--data.source", "folder", "--data.path", str(tmp_path / "nope"))
        expect = str(tmp_path / "nope")
    elif case == "empty":
        (tmp_path / "data" / "class_a").mkdir(parents=True)
        p = train_cli(tmp_path, "--data.source", "folder", "--data.path", str(tmp_path / "data"))
        expect = "no images"
    elif case == "unknown_key":
        p = train_cli(tmp_path, "--optim.lrr", "1")
        expect = "optim.lrr"
    else:
        p = train_cli(tmp_path, "--data.image_size", "48")
        expect = "model.img_size 32 != data.image_size 48"
    assert p.returncode != 0
    assert expect in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_non_image_file_is_skipped_with_a_warning_and_the_run_goes_on(tmp_path):
    from fastmoco.pipelines.demo_data import make_demo_data
    data = tmp_path / "data"
    make_demo_data(data, num_images=24, seed=0)
    cls = sorted(p for p in data.iterdir() if p.is_dir())[0]
    (cls / "notes.txt").write_text("not an image")
    p = train_cli(tmp_path, "--data.source", "folder", "--data.path", str(data), "--data.backend", "torchvision",
                  "--data.num_threads", "0", "--schedule.max_steps", "2",
                  "--deepspeed.train_micro_batch_size_per_gpu", "4")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "notes.txt" in p.stderr
    assert len(losses(tmp_path / "run")) == 2


def test_metric_logger_names_the_first_non_finite_step(tmp_path):
    from fastmoco.metrics import MetricLogger, NonFiniteLossError
    log = MetricLogger(tmp_path, log_every=4, check_every=4, total_steps=20, global_batch=8,
                       device=torch.device("cpu"), tensorboard=False, progress=False)
    values = [1.0, 0.9, 0.8, 0.7, 0.6, float("inf"), float("nan"), 0.5]
    with pytest.raises(NonFiniteLossError, match="at step 6") as e:
        for step, v in enumerate(values, 1):
            log.record(torch.tensor(v))
            log.after_step(step, 1e-3, 0.99, 0)
    assert e.value.step == 6
    rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert rec["step"] == 4 and rec["loss"] == pytest.approx(0.85)


@pytest.mark.slow
def test_diverging_run_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    p = train_cli(tmp_path, "--optim.base_lr", "1e30", "--checkpoint.every_steps", "1",
                  "--logging.check_finite_every", "3", "--logging.log_every", "3")
    assert p.returncode != 0
    msg = [line for line in p.stderr.splitlines() if line.startswith("fastmoco: non-finite")]
    assert msg, p.stderr[-2000:]
    step = int(msg[0].split(" at step ")[1].split(";")[0])
    good = sorted((tmp_path / "run" / "checkpoints").glob("step_*"))
    assert good and int(good[-1].name.split("_")[1]) < step      # nothing saved at or after the bad step
    assert f"Last good checkpoint: {good[-1]}" in msg[0]
    assert "Traceback" not in p.stderr
