"""Issue 14: no run destroyed, no run stuck, no silent damage. Each test replays one repro of the
issue on the CPU (tiny config, synthetic data unless the item is about files); kills happen at
named moments (a hook in tests/train_worker.py, or a signal sent once a worker says it waits)."""
import dataclasses
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from limits import communicate_until_hang, run_until_hang, wait_until

from test_train import COMMON, ROOT, TINY, WORKER, free_port, losses, run

TRAIN = str(ROOT / "fastmoco" / "train.py")


def train(out_dir, *args, check=True):
    return run([sys.executable, TRAIN, "--config", TINY, "--logging.out_dir", str(out_dir), *COMMON, *args],
               check=check, what="training run (fastmoco/train.py, 1 process)")


def steps_logged(out_dir):
    return [json.loads(line)["step"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def ckpt_names(out_dir):
    return sorted(p.name for p in (out_dir / "checkpoints").glob("step_*"))


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """One process, micro batch 8, 12 uninterrupted steps (8 per epoch), a loss per step."""
    out = tmp_path_factory.mktemp("baseline")
    train(out, "--schedule.max_steps", "12")
    return losses(out)


@pytest.fixture(scope="module")
def run8(tmp_path_factory):
    """8 steps with a checkpoint every 4: step_00000004 and step_00000008 (copy before changing)."""
    out = tmp_path_factory.mktemp("run8")
    train(out, "--schedule.max_steps", "8", "--checkpoint.every_steps", "4")
    assert ckpt_names(out) == ["step_00000004", "step_00000008"]
    return out


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


# -- 1: a second run in a used out_dir ---------------------------------------------------------------
@pytest.mark.slow
def test_1_fresh_run_in_a_used_out_dir_is_refused_and_overwrite_says_what_it_removes(run8, tmp_path):
    from fastmoco.checkpoint import LOCK
    out = copy_run(run8, tmp_path / "run")

    def files():   # (the lock file says who held the directory last)
        return {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != LOCK}

    before = files()
    p = train(out, "--schedule.max_steps", "4", check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert f"logging.out_dir {out} holds a previous run" in p.stderr and "--resume auto" in p.stderr
    assert files() == before  # nothing touched

    p = train(out, "--schedule.max_steps", "4", "--overwrite")
    assert f"--overwrite: removed the previous run's {out / 'checkpoints'}" in p.stdout
    assert ckpt_names(out) == ["step_00000004"]
    assert steps_logged(out) == [1, 2, 3, 4]                     # no record of the old run
    printed = p.stdout.split("checkpoint: ")[1].splitlines()[0]
    assert Path(printed) == out / "checkpoints" / "step_00000004" and (Path(printed) / "COMPLETE").is_file()
    assert (out / "checkpoints" / "latest").read_text() == "step_00000004"


# -- 2: a kill while an existing step is saved again --------------------------------------------------
@pytest.mark.slow
def test_2_kill_while_the_old_copy_of_a_resaved_step_is_deleted_leaves_a_loadable_checkpoint(
        run8, baseline, tmp_path):
    out = copy_run(run8, tmp_path / "run")
    p = run([sys.executable, WORKER, "kill-in-resave", str(tmp_path / "unused"), TINY, "--logging.out_dir",
             str(out), *COMMON, "--resume", str(out / "checkpoints" / "step_00000004"),
             "--schedule.max_steps", "8", "--checkpoint.every_steps", "4"], check=False)
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]   # the kill point was reached
    p = train(out, "--resume", "auto", "--schedule.max_steps", "12")
    assert f"resumed from {out / 'checkpoints' / 'step_00000008'} at step 8" in p.stdout
    got = losses(out)
    assert sorted(got) == list(range(1, 13))
    for s in range(9, 13):
        assert got[s] == baseline[s], (s, got[s], baseline[s])


@pytest.mark.slow
def test_2_resume_auto_skips_a_damaged_checkpoint_naming_it(run8, baseline, tmp_path):
    out = copy_run(run8, tmp_path / "run")
    damaged = out / "checkpoints" / "step_00000008"
    (damaged / "mp_rank_00_model_states.pt").unlink()
    p = train(out, "--resume", "auto", "--schedule.max_steps", "12")
    assert f"skipping damaged checkpoint {damaged}: missing mp_rank_00_model_states.pt" in p.stderr
    assert f"resumed from {out / 'checkpoints' / 'step_00000004'} at step 4" in p.stdout
    got = losses(out)
    assert steps_logged(out) == list(range(1, 13))       # records after step 4 were dropped, not doubled
    for s in range(5, 13):
        assert got[s] == baseline[s], (s, got[s], baseline[s])


# -- 3: files that only fail when decoded, big ICC profiles, files deleted during a run ---------------
def _jpeg(rng, path, size=(40, 48), **save_kwargs):
    from PIL import Image
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path, "JPEG", **save_kwargs)


def _jpeg_folder(root, per_class: int, seed: int, classes=("a",)):
    """root/<class>/<i>.jpg: small random-noise JPEGs."""
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            _jpeg(rng, root / c / f"{i}.jpg")


def _damage_middle(path):
    """A second frame header in the middle of the entropy-coded data: the file's header and end
    marker stay valid, so it passes the pre-scan; PIL fails on it."""
    data = bytearray(path.read_bytes())
    sos = data.find(b"\xff\xda")
    mid = (sos + len(data)) // 2
    data[mid:mid + 4] = b"\xff\xc0\x00\x11"
    path.write_bytes(bytes(data))


def _damage_huffman_table(path):
    """A bogus Huffman table: passes the pre-scan, fails in every decoder."""
    data = bytearray(path.read_bytes())
    i = data.find(b"\xff\xc4")
    data[i + 4:i + 30] = b"\xff" * 26
    path.write_bytes(bytes(data))


def test_3_jpeg_with_a_200kb_icc_profile_is_kept(tmp_path):
    from PIL import Image

    from fastmoco.pipelines import check_image_file, scan_image_folder
    (tmp_path / "a").mkdir()
    rng = np.random.default_rng(0)
    icc = rng.integers(0, 256, 200_000, dtype=np.uint8).tobytes()
    _jpeg(rng, tmp_path / "a" / "icc.jpg", icc_profile=icc)
    with Image.open(tmp_path / "a" / "icc.jpg") as im:   # the profile sits before the frame header
        assert len(im.info["icc_profile"]) == 200_000
    assert check_image_file(tmp_path / "a" / "icc.jpg") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [Path(p).name for p, _ in scan_image_folder(tmp_path)] == ["icc.jpg"]


def test_3_torchvision_decode_failure_or_deleted_file_is_named_and_replaced(tmp_path):
    from fastmoco.config import DataConfig
    from fastmoco.pipelines import BadImageWarning, DatasetError, augment_params, scan_image_folder
    from fastmoco.pipelines.torchvision_loader import TwoCropDataset
    _jpeg_folder(tmp_path, 6, seed=1)
    _damage_middle(tmp_path / "a" / "2.jpg")
    samples = scan_image_folder(tmp_path)
    assert len(samples) == 6   # the damage passes the cheap pre-scan
    cfg = DataConfig(image_size=16)
    ds = TwoCropDataset(samples, augment_params(cfg), seed=0, max_bad_fraction=0.5)
    with pytest.warns(BadImageWarning, match=r"2\.jpg: does not decode"):
        v1, v2, label = ds[(0, 2)]
    r1, r2, _ = ds[(0, 3)]          # the stand-in is the next sample, with that sample's own views
    assert torch.equal(v1, r1) and torch.equal(v2, r2)
    (tmp_path / "a" / "4.jpg").unlink()   # deleted while the run goes on
    with pytest.warns(BadImageWarning, match=r"4\.jpg: unreadable \(No such file or directory\)"):
        v1, _, _ = ds[(1, 4)]
    assert torch.equal(v1, ds[(1, 5)][0])
    (tmp_path / "a" / "0.jpg").unlink()
    (tmp_path / "a" / "1.jpg").unlink()   # 4 of 6 bad > max_bad_fraction 0.5
    with pytest.warns(BadImageWarning), pytest.raises(DatasetError, match="max_bad_fraction"):
        ds[(1, 0)]


@pytest.mark.slow
def test_3_torchvision_run_over_a_damaged_jpeg_names_it_and_finishes(tmp_path):
    data = tmp_path / "data"
    _jpeg_folder(data, 8, seed=2, classes=("a", "b"))
    _damage_middle(data / "a" / "3.jpg")
    p = train(tmp_path / "run", "--data.source", "folder", "--data.path", str(data), "--data.backend",
              "torchvision", "--data.num_threads", "0", "--schedule.max_steps", "4",
              "--deepspeed.train_micro_batch_size_per_gpu", "4", "--data.max_bad_fraction", "0.1")
    # 16 files, 4 steps: every file is read; 1 of 16 bad is within 0.1
    assert f"skipping {data / 'a' / '3.jpg'}: does not decode" in p.stderr
    assert steps_logged(tmp_path / "run") == [1, 2, 3, 4]


@pytest.mark.slow
def test_3_dali_decoder_failure_and_deleted_file_are_named_and_replaced(tmp_path):
    pytest.importorskip("nvidia.dali")
    from fastmoco.config import DataConfig
    from fastmoco.pipelines import BadImageWarning, scan_image_folder
    from fastmoco.pipelines.dali import DaliTwoCropLoader
    _jpeg_folder(tmp_path, 8, seed=5)
    _damage_huffman_table(tmp_path / "a" / "3.jpg")
    samples = scan_image_folder(tmp_path)
    assert len(samples) == 8          # passes the pre-scan; DALI's decoder fails on it naming no file
    loader = DaliTwoCropLoader(samples, DataConfig(image_size=16, num_threads=1, max_bad_fraction=0.25),
                               batch_size=4)
    (tmp_path / "a" / "5.jpg").unlink()   # deleted while the run goes on
    loader.set_epoch(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = [(v1.shape, labels.shape) for v1, _, labels in loader]
    assert batches == [((4, 3, 16, 16), (4,))] * 2 and loader.state_dict()["epoch"] == 1
    text = "\n".join(str(w.message) for w in caught if issubclass(w.category, BadImageWarning))
    assert f"skipping {tmp_path / 'a' / '3.jpg'}: does not decode" in text
    assert f"skipping {tmp_path / 'a' / '5.jpg'}: unreadable" in text
    assert loader.bad.bad == {3, 5}


def test_3_scan_refuses_a_folder_with_too_many_bad_files(tmp_path):
    from fastmoco.pipelines import DatasetError, scan_image_folder
    _jpeg_folder(tmp_path, 3, seed=3)
    (tmp_path / "a" / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.warns(UserWarning, match="bad.jpg"):
        assert len(scan_image_folder(tmp_path, max_bad_fraction=0.25)) == 3    # 1 of 4: allowed
    with pytest.warns(UserWarning), pytest.raises(DatasetError, match=r"1 of 4 .*max_bad_fraction = 0\.2"):
        scan_image_folder(tmp_path, max_bad_fraction=0.2)


# -- 4: resume with a config that changes the run's meaning -------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("change, expect", [
    (["--deepspeed.train_micro_batch_size_per_gpu", "4"], "run.global_batch: 8 -> 4"),
    (["--deepspeed.train_micro_batch_size_per_gpu", "16"], "run.global_batch: 8 -> 16"),
    (["--model.arch", "vit_tiny"], "model.arch: 'vit_test' -> 'vit_tiny'"),
    (["--schedule.epochs", "5"], "schedule.epochs: 3 -> 5"),
    (["--data.seed", "1"], "data.seed: 0 -> 1"),
])
def test_4_resume_with_a_changed_meaning_is_refused_naming_key_and_values(run8, tmp_path, change, expect):
    out = copy_run(run8, tmp_path / "run")
    p = train(out, "--resume", "auto", *change, check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert expect in p.stderr
    # a change that cannot load says so (issue 21); the others say how to accept them
    assert ("(cannot change: " if change[0] == "--model.arch" else "--allow-change") in p.stderr
    assert ckpt_names(out) == ["step_00000004", "step_00000008"] and steps_logged(out) == list(range(1, 9))


@pytest.mark.slow
def test_4_allow_change_accepts_a_longer_schedule(run8, tmp_path):
    out = copy_run(run8, tmp_path / "run")
    p = train(out, "--resume", "auto", "--schedule.epochs", "4", "--allow-change", "schedule.epochs",
              "--schedule.max_steps", "9")
    assert "resumed from" in p.stdout and "step_00000008 at step 8" in p.stdout
    assert steps_logged(out)[-1] == 9


# -- 6: signals and a dying launcher -------------------------------------------------------------------
def _wait_for(path, proc, log=None):
    """The pid a worker writes to `path` at its hook point (tests/train_worker.py), once it is there;
    `log`: the file the worker writes its output to, if not to pipes."""
    def there():
        if proc.poll() is not None:
            out, err = proc.communicate()
            out = Path(log).read_text() if log is not None else out
            raise AssertionError(f"worker ended before {path.name}:\n{out[-4000:]}\n{(err or '')[-4000:]}")
        return path.exists() and path.read_text().strip().isdigit()   # the whole pid, not a file half written

    wait_until(there, f"the worker to reach its hook point (its pid in {path.name})")
    return int(path.read_text())


def _popen(cmd, log=None):
    """A worker; its output in pipes, or in file `log` (several at once: an undrained pipe would stall one)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.PIPE if log is None else open(log, "w")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT if log else out, text=True)


def _wait_all(procs, logs, what):
    for n, (proc, log) in enumerate(zip(procs, logs)):
        communicate_until_hang(proc, f"{what}: process {n}", log=log)
        assert proc.returncode == 0, Path(log).read_text()[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_6_signal_saves_at_the_next_step_and_exits_0_one_process(baseline, tmp_path, sig):
    out = tmp_path / "run"
    marker = tmp_path / "wait"
    proc = _popen([sys.executable, WORKER, "wait-at:3", str(marker), TINY, "--logging.out_dir", str(out), *COMMON,
                   "--schedule.max_steps", "12"])
    os.kill(_wait_for(Path(f"{marker}.rank0"), proc), sig)   # while step 4 is about to run
    stdout, stderr = communicate_until_hang(proc, f"training worker (1 process) sent {sig.name} at step 3, "
                                                  "which should save at step 4 and exit")
    assert proc.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr
    ckpt = out / "checkpoints" / "step_00000004"
    lines = [line for line in stdout.splitlines() if line.startswith("fastmoco: stopped")]
    assert lines == [f"fastmoco: stopped by {sig.name} at step 4; checkpoint: {ckpt}"]
    assert ckpt_names(out) == ["step_00000004"] and steps_logged(out) == [1, 2, 3, 4]
    train(out, "--resume", "auto", "--schedule.max_steps", "12")
    got = losses(out)
    assert sorted(got) == list(range(1, 13))
    for s in range(1, 13):
        assert got[s] == baseline[s], (s, got[s], baseline[s])


def _torchrun(marker, out, *args, nproc=2):
    return _popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                   free_port(), WORKER, "wait-at:2", str(marker), TINY, "--logging.out_dir", str(out), *COMMON,
                   "--logging.check_finite_every", "2", "--deepspeed.train_micro_batch_size_per_gpu", "4",
                   "--schedule.max_steps", "12", *args])


@pytest.mark.slow
def test_6_sigterm_to_one_of_two_ranks_stops_both_at_the_agreed_step(baseline, tmp_path):
    out = tmp_path / "run"
    marker = tmp_path / "wait"
    proc = _torchrun(marker, out)
    os.kill(_wait_for(Path(f"{marker}.rank0"), proc), signal.SIGTERM)   # rank 1 gets no signal
    stdout, stderr = communicate_until_hang(proc, "training worker (2 gloo ranks under torchrun), rank 0 sent "
                                                  "SIGTERM at step 3, which should save at step 4 and exit")
    assert proc.returncode == 0, stderr[-3000:]
    ckpt = out / "checkpoints" / "step_00000004"
    # signalled during step 3; ranks agree every 2 steps (check_finite_every): both stop after step 4
    assert f"fastmoco: stopped by SIGTERM at step 4; checkpoint: {ckpt}" in stdout
    assert {"fastmoco_rank00000.pt", "fastmoco_rank00001.pt"} <= {p.name for p in ckpt.iterdir()}
    assert ckpt_names(out) == ["step_00000004"]
    got = losses(out)
    assert sorted(got) == [1, 2, 3, 4]
    for s in got:
        assert got[s] == pytest.approx(baseline[s], rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_6_ranks_save_and_exit_when_their_launcher_is_killed(tmp_path):
    out = tmp_path / "run"
    marker = tmp_path / "wait"
    proc = _torchrun(marker, out)
    pids = [_wait_for(Path(f"{marker}.rank{r}"), proc) for r in (0, 1)]
    proc.kill()          # SIGKILL: the launcher cannot forward anything
    proc.wait()          # (gone at once: nothing of its own runs after SIGKILL)
    wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in pids),
               "the 2 ranks of a SIGKILLed torchrun to save and exit")
    ckpt = out / "checkpoints" / "step_00000004"
    assert (ckpt / "COMPLETE").is_file(), sorted(p.name for p in (out / "checkpoints").iterdir())
    from fastmoco.checkpoint import problems
    assert problems(ckpt) == []


# -- 7: config and environment errors -----------------------------------------------------------------
CONFIG_ERRORS = [
    (["--schedule.epochs", "0"], "schedule.epochs must be >= 1, got 0"),
    (["--schedule.epochs", "-2"], "schedule.epochs must be >= 1, got -2"),
    (["--optim.betas", "[0.9]"], "optim.betas must be two numbers in [0, 1), got [0.9]"),
    (["--logging.log_every", "0"], "logging.log_every must be >= 1, got 0"),
    (["--data.num_threads", "0"], "data.num_threads must be >= 1"),
    (["--checkpoint.every_steps", "-1"], "checkpoint.every_steps must be >= 0"),
    (["--schedule.warmup_epochs", "4"], "schedule.warmup_epochs must be in [0, schedule.epochs = 3], got 4.0"),
    (["--logging.out_dir", ""], "logging.out_dir must be a non-empty path"),
    (["--deepspeed.gradient_clippin", "1.0"], "unknown config key deepspeed.gradient_clippin"),
    (["--deepspeed.zero_optimization.stagee", "2"], "deepspeed.zero_optimization.stagee: Extra inputs"),
    (["--deepspeed.zero_optimization.stage", "7"], "deepspeed.zero_optimization.stage: Input should be"),
    ("list", "the root must be an object"),
    ("out_dir_file", "exists and is not a directory"),
    ("out_dir_under_file", "is not writable"),
]


@pytest.mark.slow
@pytest.mark.parametrize("args, expect", CONFIG_ERRORS, ids=[e[1].split()[0] + str(i)
                                                            for i, e in enumerate(CONFIG_ERRORS)])
def test_7_config_errors_name_the_key_without_a_traceback(tmp_path, args, expect):
    config, out = TINY, tmp_path / "run"
    if args == "list":
        config, args = tmp_path / "list.json", []
        config.write_text("[1, 2]")
    elif args == "out_dir_file":
        out.write_text("a file")
        args = []
    elif args == "out_dir_under_file":
        (tmp_path / "file").write_text("a file")
        out, args = tmp_path / "file" / "run", []
    p = run([sys.executable, TRAIN, "--config", str(config), "--logging.out_dir", str(out), *args], check=False)
    assert p.returncode == 1
    assert "Traceback" not in p.stderr
    assert expect in p.stderr.strip().splitlines()[-1], p.stderr[-2000:]
    assert "shm_comm_op" not in p.stdout + p.stderr   # refused before deepspeed.init_distributed printed it


@pytest.mark.slow
def test_7_disk_full_names_the_path_removes_the_staging_dir_and_keeps_the_previous_checkpoint(tmp_path):
    """A 5 MiB tmpfs (a checkpoint of the tiny model is ~3 MiB) mounted in a user namespace."""
    if shutil.which("unshare") is None or run_until_hang(
            ["unshare", "-rm", "true"], "unshare -rm true (a user+mount namespace)", capture_output=True).returncode:
        pytest.skip("no unprivileged user+mount namespace (unshare -rm) to mount a small tmpfs in")
    mnt, keep = tmp_path / "mnt", tmp_path / "copy"
    mnt.mkdir()
    cmd = [sys.executable, TRAIN, "--config", TINY, "--logging.out_dir", str(mnt / "run"), *COMMON,
           "--schedule.max_steps", "6", "--checkpoint.every_steps", "2"]
    script = (f"mount -t tmpfs -o size=5m tmpfs {mnt} && {{ {' '.join(cmd)}; echo $? > {tmp_path / 'rc'}; }}; "
              f"cp -a {mnt / 'run'} {keep}")
    p = run(["unshare", "-rm", "sh", "-c", script], check=False,
            what="training run (fastmoco/train.py) on a 5 MiB tmpfs in a user+mount namespace")
    assert (tmp_path / "rc").read_text().strip() == "1", p.stderr[-3000:]
    msg = p.stderr.strip().splitlines()[-1]
    assert msg.startswith(f"fastmoco: no space left on device while saving {mnt / 'run' / 'checkpoints'}/step_")
    assert "Traceback" not in p.stderr
    assert not (keep / "checkpoints" / ".staging").exists()   # the partial one is gone, and its folder
    from fastmoco.checkpoint import problems
    good = keep / "checkpoints" / "step_00000002"
    assert ckpt_names(keep) == ["step_00000002"] and problems(good) == []
    train(keep, "--resume", "auto", "--schedule.max_steps", "3")   # and it loads


# -- 8: data folders with symlinks --------------------------------------------------------------------
def test_8_symlinks_loop_self_link_and_broken_link_are_named_not_multiplied(tmp_path):
    from fastmoco.pipelines import scan_image_folder
    _jpeg_folder(tmp_path, 4, seed=4, classes=("a", "b"))
    (tmp_path / "a" / "up").symlink_to(tmp_path, target_is_directory=True)     # a loop to the root
    (tmp_path / "b" / "again").symlink_to(tmp_path / "b", target_is_directory=True)
    (tmp_path / "a" / "self.jpg").symlink_to(tmp_path / "a" / "self.jpg")
    (tmp_path / "b" / "broken.jpg").symlink_to(tmp_path / "gone.jpg")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = scan_image_folder(tmp_path, max_bad_fraction=0.5)
    names = sorted((Path(p).parent.name, Path(p).name, label) for p, label in samples)
    assert names == [(c, f"{i}.jpg", label) for label, c in enumerate("ab") for i in range(4)]
    text = "\n".join(str(w.message) for w in caught)
    assert f"skipping {tmp_path / 'a' / 'up'}: a link to {tmp_path}" in text
    assert f"skipping {tmp_path / 'b' / 'again'}: a link to {tmp_path / 'b'}" in text
    assert f"skipping {tmp_path / 'a' / 'self.jpg'}: unreadable" in text
    assert f"skipping {tmp_path / 'b' / 'broken.jpg'}: unreadable" in text


# -- 9: metrics ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_9_the_last_partial_window_is_logged(baseline, tmp_path):
    out = tmp_path / "run"
    train(out, "--schedule.max_steps", "6", "--logging.log_every", "4", "--logging.check_finite_every", "2")
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [4, 6]
    assert recs[0]["loss"] == pytest.approx(sum(baseline[s] for s in range(1, 5)) / 4, rel=1e-6)
    assert recs[1]["loss"] == pytest.approx((baseline[5] + baseline[6]) / 2, rel=1e-6)


def test_9_truncate_records_drops_later_steps_and_a_torn_line(tmp_path):
    from fastmoco.metrics import truncate_records
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in (2, 4, 6, 8)) + '{"step": 1')
    truncate_records(path, 4)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [2, 4]


# -- 10: two "nodes" on localhost ----------------------------------------------------------------------
@pytest.mark.slow
def test_10_two_nodes_shard_the_data_save_and_resume(baseline, tmp_path):
    out = tmp_path / "run"

    def nodes(script, *args):
        port = free_port()
        logs = [tmp_path / f"node{n}_{port}.log" for n in (0, 1)]
        procs = [_popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(n),
                         "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port, *script,
                         TINY, "--logging.out_dir", str(out), *COMMON,
                         "--deepspeed.train_micro_batch_size_per_gpu", "4", *args], log) for n, log in zip((0, 1), logs)]
        _wait_all(procs, logs, f"{Path(script[0]).name} on 2 nodes (torchrun --nnodes 2, 1 rank each)")

    nodes([WORKER, "fit-ranks", str(tmp_path / "dump")], "--schedule.max_steps", "4")
    ranks = [json.loads(Path(f"{tmp_path / 'dump'}.rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["local_rank"], r["shard_id"], r["num_shards"]) for r in ranks] == [(0, 0, 0, 2),
                                                                                          (1, 0, 1, 2)]
    assert not set(ranks[0]["epoch0"]) & set(ranks[1]["epoch0"])        # each node its own samples
    ckpt = out / "checkpoints" / "step_00000004"
    assert {"fastmoco_rank00000.pt", "fastmoco_rank00001.pt"} <= {p.name for p in ckpt.iterdir()}
    nodes([TRAIN, "--config"], "--resume", "auto", "--schedule.max_steps", "6")   # both nodes continue
    got = losses(out)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for s in got:   # the two nodes' global batch is the one-process batch: same losses
        assert got[s] == pytest.approx(baseline[s], rel=1e-5, abs=1e-6), s


# -- 11: per-rank state loads without unpickling code --------------------------------------------------
class _Payload:
    def __init__(self, flag):
        self.flag = flag

    def __reduce__(self):
        return (Path.touch, (Path(self.flag),))


@pytest.mark.slow
def test_11_per_rank_state_is_tensors_and_a_pickled_object_is_refused(run8, tmp_path):
    out = copy_run(run8, tmp_path / "run")
    ckpt = out / "checkpoints" / "step_00000008"
    state = torch.load(ckpt / "fastmoco_rank00000.pt", weights_only=True)
    assert {"momentum", "rng"} <= set(state) and isinstance(state["rng"]["python"]["state"], torch.Tensor)
    flag = tmp_path / "code_ran"
    buf = io.BytesIO()
    torch.save({**state, "rng": _Payload(str(flag))}, buf, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    (ckpt / "fastmoco_rank00000.pt").write_bytes(buf.getvalue())
    meta = json.loads((ckpt / "COMPLETE").read_text())
    meta["files"]["fastmoco_rank00000.pt"] = len(buf.getvalue())   # as if the whole checkpoint came so
    (ckpt / "COMPLETE").write_text(json.dumps(meta))
    p = train(out, "--resume", str(ckpt), "--schedule.max_steps", "9", check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert f"{ckpt / 'fastmoco_rank00000.pt'} does not load as tensors and numbers only" in p.stderr
    assert not flag.exists()


def test_11_rng_state_round_trips_through_weights_only(tmp_path):
    import random

    from fastmoco.checkpoint import rng_state, set_rng_state
    random.seed(3)
    np.random.seed(4)
    np.random.standard_normal()   # a cached Gaussian in numpy's state
    torch.manual_seed(5)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expect = (random.random(), np.random.standard_normal(), torch.rand(3))
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.standard_normal(), torch.rand(3))
    assert got[0] == expect[0] and got[1] == expect[1] and torch.equal(got[2], expect[2])


def test_3_verify_images_names_and_skips_a_jpeg_damaged_inside_before_training(tmp_path):
    """DALI decodes some damaged JPEGs without failing: `data.verify_images` finds them up front."""
    from fastmoco.config import DataConfig
    from fastmoco.pipelines import BadImageWarning, build_loader
    _jpeg_folder(tmp_path, 6, seed=7)
    _damage_middle(tmp_path / "a" / "4.jpg")
    cfg = DataConfig(path=str(tmp_path), backend="torchvision", image_size=16, num_threads=0, max_bad_fraction=0.5,
                     verify_images=False)
    assert build_loader(cfg, batch_size=2).num_samples == 6          # the cheap checks pass it
    with pytest.warns(BadImageWarning, match=r"4\.jpg: does not decode"):
        loader = build_loader(dataclasses.replace(cfg, verify_images=True), batch_size=2)
    assert loader.num_samples == 5
