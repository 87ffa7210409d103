"""Issue 21 (Reliability II): one run per out_dir, signals through every launcher, every resume change
decided, no hang on a bad file, no debris, clear errors. Each test replays a repro of the issue on the
CPU (tiny config, synthetic data unless the item is about files); kill and hang points are hooks in
tests/train_worker.py."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from limits import HANG_S, communicate_until_hang, run_until_hang, wait_until

from test_reliability import (TRAIN, _damage_middle, _jpeg_folder, _popen, _wait_for, ckpt_names, copy_run,
                              steps_logged, train)
from test_train import COMMON, ROOT, TINY, WORKER, free_port, run

BIN = Path(sys.executable).parent


def _alive(pid: int) -> bool:
    """Running (a zombie that nobody reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in "ZX"
    except OSError:
        return False


def _wait_gone(pids, what):
    wait_until(lambda: not any(_alive(p) for p in pids), what, every=0.2)


def _waiting_run(out, marker, *args):
    """One process that stops before step 3 until it gets a signal (train_worker's wait-at:2)."""
    return _popen([sys.executable, WORKER, "wait-at:2", str(marker), TINY, "--logging.out_dir", str(out), *COMMON,
                   "--schedule.max_steps", "12", "--checkpoint.every_steps", "1", *args])


@pytest.fixture(scope="module")
def run4(tmp_path_factory):
    """4 steps, a checkpoint every 2: step_00000002 and step_00000004 (copy before changing)."""
    out = tmp_path_factory.mktemp("run4")
    train(out, "--schedule.max_steps", "4", "--checkpoint.every_steps", "2")
    assert ckpt_names(out) == ["step_00000002", "step_00000004"]
    return out


# -- 1: one run per out_dir ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_1_a_second_run_in_a_live_out_dir_is_refused_naming_the_holder_on_every_rank(tmp_path):
    out, marker = tmp_path / "run", tmp_path / "wait"
    live = _waiting_run(out, marker)
    pid = _wait_for(Path(f"{marker}.rank0"), live)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert (out / "checkpoints" / "step_00000002" / "COMPLETE").is_file()
    holder = f"is in use by another training run (host {os.uname().nodename}, PID {pid}, since "

    second = train(out, "--resume", "auto", "--schedule.max_steps", "12", check=False)
    assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
    assert holder in second.stderr.strip().splitlines()[-1]
    over = train(out, "--overwrite", "--schedule.max_steps", "4", check=False)   # must not delete a live run
    assert over.returncode == 1 and holder in over.stderr and "removed" not in over.stdout
    # two ranks: rank 0 is refused and rank 1 with it (no hang in the rendezvous of the next collective: a rank
    # left waiting there fails as a hang, and without its own refusal below)
    two = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
               TRAIN, "--config", TINY, "--logging.out_dir", str(out), *COMMON, "--resume", "auto",
               "--deepspeed.train_micro_batch_size_per_gpu", "4"], check=False,
              what="a second training run (2 gloo ranks under torchrun) in a live out_dir, which both ranks refuse")
    assert two.returncode != 0
    assert two.stderr.count(holder) == 2, two.stderr[-4000:]   # each rank says why
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before   # nothing touched

    os.kill(pid, signal.SIGTERM)
    _, err = communicate_until_hang(live, "the live training run sent SIGTERM, which should save and exit")
    assert live.returncode == 0, err[-3000:]
    p = train(out, "--resume", "auto", "--schedule.max_steps", "4")   # the lock went with its run
    assert "resumed from" in p.stdout and steps_logged(out) == [1, 2, 3, 4]


def test_1_the_lock_goes_with_its_process_even_under_sigkill_and_not_with_a_forked_child(tmp_path):
    """POSIX record locks: released by the kernel when the holder dies, never held by its children."""
    from fastmoco.checkpoint import CheckpointError, RunLock
    script = textwrap.dedent(f"""
        import os, sys, time
        from fastmoco.checkpoint import RunLock
        lock = RunLock({str(tmp_path)!r})
        child = os.fork()
        if child == 0:            # a loader worker: lives on after its parent is killed
            time.sleep({HANG_S})
            os._exit(0)
        print(child, flush=True)
        time.sleep({HANG_S})      # both outlive the checks below, however slow; the test kills them
    """)
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = int(holder.stdout.readline())
    with pytest.raises(CheckpointError, match=f"is in use by another training run .*PID {holder.pid}, since"):
        RunLock(tmp_path)
    holder.kill()
    holder.wait()
    try:
        assert _alive(child)
        RunLock(tmp_path).release()    # the orphaned child does not keep the directory locked
    finally:
        os.kill(child, signal.SIGKILL)


# -- 7: debris of interrupted saves --------------------------------------------------------------------------
@pytest.mark.slow
def test_7_debris_of_interrupted_saves_is_removed_at_the_next_start_saying_what(run4, tmp_path):
    out = copy_run(run4, tmp_path / "run")
    ckpt = out / "checkpoints"
    p = run([sys.executable, WORKER, "kill-in-staging:6", str(tmp_path / "unused"), TINY, "--logging.out_dir",
             str(out), *COMMON, "--resume", "auto", "--schedule.max_steps", "8", "--checkpoint.every_steps", "2"],
            check=False, what="training worker that SIGKILLs itself while saving step 6")
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    staged = ckpt / ".staging" / "step_00000006"
    assert any(staged.iterdir())             # DeepSpeed's files of the interrupted save
    half = ckpt / "step_00000001"            # a prune that a kill interrupted (older versions deleted in place)
    half.mkdir()
    (half / "mp_rank_00_model_states.pt").write_bytes(b"\0" * 1000)
    (ckpt / "latest.tmp").write_text("step_0000")

    p = train(out, "--resume", "auto", "--schedule.max_steps", "8", "--checkpoint.every_steps", "2")
    note = next(line for line in p.stdout.splitlines() if line.startswith("removed the debris"))
    for path, why in ((staged, "interrupted save"), (half, "no COMPLETE file"), (ckpt / "latest.tmp", "")):
        assert f"{path} (" in note and why in note, note
    assert "resumed from" in p.stdout and "step_00000004 at step 4" in p.stdout
    assert sorted(x.name for x in ckpt.iterdir()) == ["latest", "step_00000006", "step_00000008"]
    assert steps_logged(out) == list(range(1, 9))


@pytest.mark.slow
def test_7_a_clean_run_leaves_no_staging_or_trash_folder(run4):
    assert sorted(p.name for p in (run4 / "checkpoints").iterdir()) == ["latest", "step_00000002", "step_00000004"]


# -- 3: resume after editing the config ----------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("change, expect", [
    (["--optim.base_lr", "3e-4"], "optim.base_lr: 0.00015 -> 0.0003"),   # (the others: test_config.py)
    (["--data.crop_min", "0.2"], "data.crop_min: 0.08 -> 0.2"),
])
def test_3_resume_refuses_a_changed_recipe_key_unless_allowed_and_then_prints_it(run4, tmp_path, change, expect):
    out = copy_run(run4, tmp_path / "run")
    p = train(out, "--resume", "auto", *change, check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr and "resumed from" not in p.stdout
    assert expect in p.stderr and "--allow-change" in p.stderr
    key = change[0][2:]
    p = train(out, "--resume", "auto", *change, "--allow-change", key, "--schedule.max_steps", "5")
    assert f"with changes: {expect} (--allow-change)" in p.stdout
    assert steps_logged(out) == [1, 2, 3, 4, 5]


@pytest.mark.slow
@pytest.mark.parametrize("args, expect", [
    (["--optim.name", "lars", "--allow-change", "optim.name"], "--allow-change optim.name: optim.name cannot change"),
    (["--deepspeed.zero_optimization.stage", "1", "--allow-change", "run.zero_stage"],
     "--allow-change run.zero_stage: run.zero_stage cannot change"),
    (["--model.arch", "vit_tiny", "--allow-change", "model.arch"], "--allow-change model.arch: model.arch cannot"),
    (["--optim.base_lr", "3e-4", "--allow-change", "optim.base_lrr"], "--allow-change optim.base_lrr: no such config"),
    (["--optim.name", "lars"], "optim.name: 'adamw' -> 'lars' (cannot change: the checkpoint's optimizer state"),
    (["--deepspeed.zero_optimization.stage", "2"], "run.zero_stage: 0 -> 2 (cannot change: DeepSpeed's files"),
])
def test_3_a_change_that_cannot_load_or_an_unknown_key_is_refused_before_loading(run4, tmp_path, args, expect):
    out = copy_run(run4, tmp_path / "run")
    p = train(out, "--resume", "auto", *args, check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert expect in p.stderr.strip().splitlines()[-1] and "resumed from" not in p.stdout
    assert steps_logged(out) == [1, 2, 3, 4]


@pytest.mark.slow
def test_3_the_dataset_is_compared_by_its_files_not_its_path_and_accepted_changes_are_printed(tmp_path):
    a, b, moved = tmp_path / "a", tmp_path / "b", tmp_path / "moved"
    _jpeg_folder(a, 8, seed=1, classes=("x", "y"))
    _jpeg_folder(b, 8, seed=1, classes=("p", "q"))     # the same number of images, other files
    out = tmp_path / "run"
    data = ["--data.source", "folder", "--data.backend", "torchvision", "--data.num_threads", "0",
            "--deepspeed.train_micro_batch_size_per_gpu", "4"]
    train(out, *data, "--data.path", str(a), "--schedule.max_steps", "2", "--checkpoint.every_steps", "2")
    p = train(out, "--resume", "auto", *data, "--data.path", str(b), check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "run.dataset: '16 files, sha256 " in p.stderr and "data.path" not in p.stderr
    os.rename(a, moved)          # the same files elsewhere, read by the other backend
    p = train(out, "--resume", "auto", *data, "--data.path", str(moved), "--data.backend", "dali",
              "--data.num_threads", "1", "--schedule.max_steps", "3")
    assert f"data.path: '{a}' -> '{moved}'" in p.stdout and "data.backend: 'torchvision' -> 'dali'" in p.stdout
    assert steps_logged(out) == [1, 2, 3]


# -- 2: SIGTERM to the top process of every launcher ---------------------------------------------------------
LAUNCHERS = {
    "deepspeed": lambda: [sys.executable, str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", free_port()],
    "torchrun": lambda: [sys.executable, str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", free_port()],
    "python -m torch.distributed.run": lambda: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                                "2", "--master_port", free_port()],
}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_2_sigterm_to_the_launcher_saves_and_every_rank_exits(tmp_path, launcher):
    """(Plain python: test_reliability.py's test_6_signal_saves_at_the_next_step_and_exits_0_one_process.)"""
    out, marker = tmp_path / "run", tmp_path / "wait"
    top = _popen([*LAUNCHERS[launcher](), WORKER, "wait-at:2", str(marker), TINY, "--logging.out_dir", str(out),
                  *COMMON, "--logging.check_finite_every", "2", "--deepspeed.train_micro_batch_size_per_gpu", "4",
                  "--schedule.max_steps", "12"], log=tmp_path / "log")
    ranks = [_wait_for(Path(f"{marker}.rank{r}"), top, log=tmp_path / "log") for r in (0, 1)]
    top.send_signal(signal.SIGTERM)
    _wait_gone(ranks, f"the 2 ranks under {launcher} sent SIGTERM to save and exit")
    communicate_until_hang(top, f"{launcher} after its ranks exited", log=tmp_path / "log")
    log = (tmp_path / "log").read_text()
    ckpt = out / "checkpoints" / "step_00000004"   # waiting before step 3; ranks agree every 2 steps
    assert (ckpt / "COMPLETE").is_file(), log[-4000:]
    assert ckpt_names(out) == ["step_00000004"] and steps_logged(out) == [1, 2, 3, 4]
    stopped = f"fastmoco: stopped by {{}} at step 4; checkpoint: {ckpt}"
    why = "the exit of its launcher deepspeed (PID {})".format(top.pid) if launcher == "deepspeed" else "SIGTERM"
    assert stopped.format(why) in log, log[-4000:]


def test_2_launchers_are_recognised_from_their_command_lines():
    from fastmoco.preemption import launcher_chain, launcher_name
    py = sys.executable
    assert launcher_name([py, "-u", "-m", "deepspeed.launcher.launch", "--world_info=e30=", "train.py"]) \
        == "deepspeed's launch.py"
    assert launcher_name([py, "/venv/bin/deepspeed", "--num_gpus", "2", "train.py"]) == "deepspeed"
    assert launcher_name(["/venv/bin/torchrun", "--nproc_per_node", "8", "train.py"]) == "torchrun"
    assert launcher_name([py, "-m", "torch.distributed.run", "train.py"]) == "torchrun"
    assert launcher_name([py, "fastmoco/train.py", "--config", "deepspeed"]) is None
    assert launcher_name(["/bin/bash"]) is None
    assert launcher_chain() == []     # pytest's parent is no launcher


# -- 4: a FIFO in the data folder, reads that hang, workers that outlive their run ---------------------------
def _bounded(fn, what):
    """fn() in a daemon thread: its result, or a failure naming `what` if it has not returned in HANG_S."""
    box = {}
    t = threading.Thread(target=lambda: box.update(result=fn()), daemon=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.start()
        t.join(HANG_S)
    assert not t.is_alive(), f"{what} still running after {HANG_S} s: a hang"
    return box["result"], "\n".join(str(w.message) for w in caught)


def test_4_a_fifo_in_the_data_folder_is_named_and_skipped_by_the_scan(tmp_path):
    from fastmoco.pipelines import scan_image_folder
    _jpeg_folder(tmp_path, 4, seed=2)
    os.mkfifo(tmp_path / "a" / "pipe.jpg")
    samples, text = _bounded(lambda: scan_image_folder(tmp_path, max_bad_fraction=0.5),
                             "the scan of a data folder holding a FIFO")
    assert [Path(p).name for p, _ in samples] == ["0.jpg", "1.jpg", "2.jpg", "3.jpg"]
    assert f"skipping {tmp_path / 'a' / 'pipe.jpg'}: unreadable (not a regular file: a FIFO)" in text


@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_4_a_file_replaced_by_a_fifo_mid_run_is_named_and_replaced(tmp_path, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    from fastmoco.config import DataConfig
    from fastmoco.pipelines import build_loader
    _jpeg_folder(tmp_path, 8, seed=3)
    cfg = DataConfig(path=str(tmp_path), backend=backend, image_size=16, num_threads=1 if backend == "dali" else 0,
                     max_bad_fraction=0.25)
    loader = build_loader(cfg, batch_size=4)
    victim = tmp_path / "a" / "5.jpg"
    victim.unlink()
    os.mkfifo(victim)                         # after the scan
    batches, text = _bounded(lambda: [v1.shape for v1, *_ in loader],
                             f"an epoch of the {backend} loader over a folder where a file became a FIFO")
    assert batches == [(4, 3, 16, 16)] * 2
    assert f"skipping {victim}: unreadable (not a regular file: a FIFO)" in text


def test_4_a_read_that_blocks_past_the_timeout_names_the_file(tmp_path, monkeypatch):
    from fastmoco.pipelines import DatasetError, folder
    files = [tmp_path / f"{i}.bin" for i in range(3)]
    for f in files:
        f.write_bytes(b"x" * 10)
    real, release = folder.read_file, threading.Event()
    # (a reader that ignores its timeout gets 1.bin after HANG_S, and fails below, rather than hangs)
    monkeypatch.setattr(folder, "read_file", lambda p: release.wait(HANG_S) and real(p) if Path(p).name == "1.bin"
                        else real(p))
    reader = folder.FileReader(num_threads=2, timeout=0.5)
    t0 = time.monotonic()
    with pytest.raises(DatasetError, match=f"reading {files[1]} has not returned after 0.5 s"):
        reader.read([str(f) for f in files])
    took = time.monotonic() - t0   # its 0.5 s, plus scheduling on a busy machine: far below the default 300 s
    assert took < 0.5 + 30, f"FileReader(timeout=0.5) gave up on a hung read after {took:.1f} s, not 0.5 s"
    release.set()
    assert [len(x) for x in reader.read([str(files[0]), str(files[2])])] == [10, 10]
    missing = reader.read([str(tmp_path / "gone.bin")])[0]
    assert isinstance(missing, FileNotFoundError)


@pytest.mark.slow
def test_4_a_hung_read_stops_the_run_naming_the_file(tmp_path):
    data = tmp_path / "data"
    _jpeg_folder(data, 8, seed=4)
    p = run([sys.executable, WORKER, "hang-read:3.jpg", str(tmp_path / "unused"), TINY, "--logging.out_dir",
             str(tmp_path / "run"), *COMMON, "--data.source", "folder", "--data.path", str(data), "--data.backend",
             "dali", "--data.num_threads", "1", "--data.read_timeout", "3",
             "--deepspeed.train_micro_batch_size_per_gpu", "4", "--schedule.max_steps", "8"], check=False,
            what="training worker whose read of 3.jpg never returns (data.read_timeout 3 s)")
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert "reading " in last and "3.jpg has not returned after 3 s (data.read_timeout)" in last
    assert "Last good checkpoint: none written yet" in last


@pytest.mark.long
@pytest.mark.slow
def test_4_sigterm_stops_a_run_that_waits_for_data(tmp_path):
    from fastmoco.preemption import DATA_WAIT_GRACE_S
    data, marker = tmp_path / "data", tmp_path / "hang"
    _jpeg_folder(data, 8, seed=5, classes=("a", "b"))
    proc = _popen([sys.executable, WORKER, "hang-decode-at:2", str(marker), TINY, "--logging.out_dir",
                   str(tmp_path / "run"), *COMMON, "--data.source", "folder", "--data.path", str(data),
                   "--data.backend", "torchvision", "--data.num_threads", "0", "--checkpoint.every_steps", "1",
                   "--deepspeed.train_micro_batch_size_per_gpu", "4", "--schedule.max_steps", "8"])
    pid = _wait_for(Path(f"{marker}.rank0"), proc)
    t0 = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    _, err = communicate_until_hang(proc, "training worker sent SIGTERM while its decode never returns")
    took = time.monotonic() - t0
    assert proc.returncode == 1 and "Traceback" not in err, err[-3000:]
    # the wait ends after DATA_WAIT_GRACE_S (10 s); the rest is the process's exit, slow on a busy machine
    assert took < DATA_WAIT_GRACE_S + 80, f"the run ended {took:.0f} s after SIGTERM, expected the data wait's " \
        f"grace ({DATA_WAIT_GRACE_S:g} s) and an exit"
    last = err.strip().splitlines()[-1]
    assert last.startswith("fastmoco: stopped by SIGTERM while waiting ") and "s for the next batch; not saved" \
        in last and last.endswith(str(tmp_path / "run" / "checkpoints" / "step_00000003"))


def test_4_a_loader_worker_dies_with_its_run_even_under_sigkill(tmp_path):
    _jpeg_folder(tmp_path, 8, seed=6)
    script = textwrap.dedent(f"""
        import time
        from PIL import Image
        from fastmoco.config import DataConfig
        from fastmoco.pipelines import scan_image_folder
        from fastmoco.pipelines.torchvision_loader import TorchvisionTwoCropLoader
        samples = scan_image_folder({str(tmp_path)!r})
        Image.open = lambda *a, **k: time.sleep(10 ** 6)      # a read that never returns
        loader = TorchvisionTwoCropLoader(samples, DataConfig(image_size=16), batch_size=4, num_workers=1)
        next(iter(loader))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    import psutil

    def started():
        assert proc.poll() is None, "the run ended before its loader worker started"
        return psutil.Process(proc.pid).children()

    wait_until(started, "the run's loader worker to start")
    time.sleep(2)   # the worker is in its read
    workers = [c.pid for c in psutil.Process(proc.pid).children()]
    proc.kill()
    proc.wait()
    try:
        _wait_gone(workers, "the loader worker of a SIGKILLed run to die with it")
    finally:
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_4_a_stop_request_ends_a_wait_for_data_that_never_ends():
    from fastmoco.preemption import DataWaitInterrupted, Preemption

    def loader():
        yield 1
        threading.Event().wait(HANG_S)     # the second batch never comes (a wait never ended: DID NOT RAISE)

    preempt = Preemption(data_grace=0.5).install()
    try:
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
        got = []
        t0 = time.monotonic()
        with pytest.raises(DataWaitInterrupted, match=r"SIGTERM while waiting \d+ s for the next batch"):
            for batch in preempt.batches(loader()):
                got.append(batch)
        took = time.monotonic() - t0
        assert got == [1] and preempt.received == "SIGTERM"
        # 0.3 s to the signal and the 0.5 s grace; room for a busy machine's scheduling, but below the default
        # grace (DATA_WAIT_GRACE_S, 10 s): a data_grace not honoured still fails
        assert took < 0.3 + 0.5 + 7, f"the wait ended {took:.1f} s after it began, expected 0.3 s + 0.5 s grace"
        # a request while batches do come changes nothing: the step boundary acts on it
        assert list(preempt.batches(iter([1, 2, 3]))) == [1, 2, 3]
    finally:
        preempt.uninstall()
        signal.setitimer(signal.ITIMER_REAL, 0)


# -- 8: a full disk while writing metrics ---------------------------------------------------------------------
@pytest.mark.slow
def test_8_a_full_disk_while_writing_metrics_is_a_clear_message(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").symlink_to("/dev/full")   # every write: ENOSPC
    p = train(out, "--resume", "auto", "--schedule.max_steps", "4", check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert p.stderr.strip().splitlines()[-1] == (f"fastmoco: could not write {out / 'metrics.jsonl'} (No space left "
                                                 "on device); stopping. Last good checkpoint: none written yet")


# -- 9: damaged JPEGs: verified once per dataset, by default ----------------------------------------------
def test_9_the_default_config_names_and_skips_a_jpeg_damaged_inside_under_dali(tmp_path):
    pytest.importorskip("nvidia.dali")
    from fastmoco.config import DataConfig
    from fastmoco.pipelines import BadImageWarning, build_loader
    _jpeg_folder(tmp_path, 6, seed=7)
    _damage_middle(tmp_path / "a" / "4.jpg")       # DALI's decoder trains on it without an error
    with pytest.warns(BadImageWarning, match=r"4\.jpg: does not decode"):
        loader = build_loader(DataConfig(path=str(tmp_path), image_size=16, num_threads=1, max_bad_fraction=0.5),
                              batch_size=2)
    assert loader.num_samples == 5


def test_9_an_image_too_large_for_the_decoders_is_named_by_the_scan(tmp_path):
    """DALI's libjpeg-turbo says "[ERROR] ... Image too large: 1200000000" naming no file (then another
    decoder allocates 1.2 GB for it): the header's size is checked first, without decoding."""
    from PIL import Image

    from fastmoco.pipelines import scan_image_folder
    _jpeg_folder(tmp_path, 2, seed=11)
    big = bytearray((tmp_path / "a" / "1.jpg").read_bytes())
    sof = big.find(b"\xff\xc0")
    big[sof + 5:sof + 9] = (20000).to_bytes(2, "big") * 2          # height, width
    (tmp_path / "a" / "1.jpg").write_bytes(bytes(big))
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "2.png")
    png = bytearray((tmp_path / "a" / "2.png").read_bytes())
    png[16:24] = (30000).to_bytes(4, "big") * 2                      # IHDR width, height
    (tmp_path / "a" / "2.png").write_bytes(bytes(png))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = scan_image_folder(tmp_path, max_bad_fraction=1.0)
    assert [Path(p).name for p, _ in samples] == ["0.jpg"]
    text = "\n".join(str(w.message) for w in caught)
    assert f"skipping {tmp_path / 'a' / '1.jpg'}: image too large (20000x20000 pixels, more than 178956970)" in text
    assert f"skipping {tmp_path / 'a' / '2.png'}: image too large (30000x30000 pixels" in text


def _counting_decodes(monkeypatch):
    from fastmoco.pipelines import folder
    calls = []
    real = folder._verify_decode
    monkeypatch.setattr(folder, "_verify_decode", lambda p: calls.append(Path(p).name) or real(p))
    return calls


def test_9_images_are_verified_once_per_dataset_and_the_result_reused_by_later_scans(tmp_path, monkeypatch):
    from fastmoco.config import DataConfig
    from fastmoco.pipelines import CHECK_CACHE, build_loader, scan_image_folder
    _jpeg_folder(tmp_path, 6, seed=8)
    _damage_middle(tmp_path / "a" / "2.jpg")
    calls = _counting_decodes(monkeypatch)
    cfg = DataConfig(path=str(tmp_path), backend="torchvision", image_size=16, num_threads=0, max_bad_fraction=0.5)
    with pytest.warns(UserWarning, match=r"2\.jpg: does not decode"):
        first = build_loader(cfg, batch_size=2)
    assert sorted(calls) == [f"{i}.jpg" for i in range(6)] and (tmp_path / CHECK_CACHE).is_file()
    calls.clear()
    with pytest.warns(UserWarning, match=r"2\.jpg: does not decode"):     # still named, not decoded again
        again = build_loader(cfg, batch_size=2, train=False)               # (evaluation's loader too)
    assert calls == [] and again.num_samples == first.num_samples == 5
    os.utime(tmp_path / "a" / "3.jpg", ns=(1, 1))       # a changed file (mtime) is checked again
    with pytest.warns(UserWarning):
        assert len(scan_image_folder(tmp_path, verify=True, max_bad_fraction=0.5)) == 5
    assert calls == ["3.jpg"]


def test_9_a_dataset_that_takes_no_file_keeps_its_checks_in_the_user_cache(tmp_path, monkeypatch):
    from fastmoco.pipelines import CHECK_CACHE, scan_image_folder
    from fastmoco.pipelines.folder import check_cache_paths
    data = tmp_path / "data"
    _jpeg_folder(data, 4, seed=9)
    (data / CHECK_CACHE).mkdir()     # nothing can be written there (not even by root, as in CI)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    calls = _counting_decodes(monkeypatch)
    scan_image_folder(data, verify=True)
    assert len(calls) == 4 and check_cache_paths(data)[1].is_file()
    scan_image_folder(data, verify=True)
    assert len(calls) == 4


def _scan_on_rank(rank, world, root):
    from fastmoco.pipelines import folder
    calls = []
    real = folder._verify_decode
    folder._verify_decode = lambda p: calls.append(p) or real(p)
    samples = folder.scan_image_folder(root, verify=True, shard_id=rank, num_shards=world)
    import torch.distributed as dist
    counts = [None] * world
    dist.all_gather_object(counts, len(calls))
    return {"samples": samples, "decoded_per_rank": counts}


@pytest.mark.slow
def test_9_ranks_verify_a_new_dataset_together(tmp_path):
    from gloo_checks import run_on_two_ranks
    from fastmoco.pipelines import scan_image_folder
    _jpeg_folder(tmp_path, 7, seed=10)
    _damage_middle(tmp_path / "a" / "5.jpg")
    out = run_on_two_ranks(_scan_on_rank, str(tmp_path))
    assert out["decoded_per_rank"] == [4, 3]          # each rank decoded its half of the 7
    with pytest.warns(UserWarning, match=r"5\.jpg: does not decode"):
        assert out["samples"] == scan_image_folder(tmp_path, verify=True, max_bad_fraction=0.5)


# -- 11: values that overflow or are out of range name their key ---------------------------------------------
def test_11_a_probability_out_of_range_names_its_key():
    from fastmoco.config import DataConfig
    from fastmoco.pipelines import augment_params
    with pytest.raises(ValueError, match=r"data\.blur_prob\[0\] is a probability: it must lie in \[0, 1\], got 1\.5"):
        augment_params(DataConfig(blur_prob=[1.5, 0.1]))
    with pytest.raises(ValueError, match=r"data\.solarize_prob needs two values"):
        augment_params(DataConfig(solarize_prob=[0.2]))
    with pytest.raises(ValueError, match=r"data\.local_blur_prob is a probability.*got -0\.1"):
        augment_params(DataConfig(local_blur_prob=-0.1))


def test_11_non_finite_numbers_are_refused_naming_the_key(tmp_path):
    from fastmoco.config import ConfigError, load_config
    with pytest.raises(ConfigError, match=r"optim\.base_lr: expected a finite number, got inf"):
        load_config(None, ["--optim.base_lr", "Infinity"])
    with pytest.raises(ConfigError, match=r"moco\.tau: expected a finite number, got nan"):
        load_config(None, ["--moco.tau", "NaN"])


@pytest.mark.slow
def test_11_a_learning_rate_that_overflows_names_the_key(tmp_path):
    p = train(tmp_path / "run", "--optim.base_lr", "1e308", "--deepspeed.train_micro_batch_size_per_gpu", "512",
              "--data.synthetic_size", "512", check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert p.stderr.strip().splitlines()[-1] == ("fastmoco: optim.base_lr 1e+308 x global batch 512 / 256 gives a "
                                                 "learning rate that is not a finite number")


# -- 12: no C++ op is compiled on the CPU ----------------------------------------------------------------------
@pytest.mark.slow
def test_12_a_cpu_run_compiles_no_deepspeed_op(tmp_path):
    ext = tmp_path / "torch_extensions"
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(ext), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    p = run_until_hang([sys.executable, TRAIN, "--config", TINY, "--logging.out_dir", str(tmp_path / "run"), *COMMON,
                        "--schedule.max_steps", "1"], "a one-step training run (fastmoco/train.py) on the CPU",
                       cwd=ROOT, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "shm_comm" not in p.stdout + p.stderr
    assert not ext.exists() or not any(ext.rglob("*.so")), sorted(ext.rglob("*"))
