"""Quiet by default: a run prints fastmoco's lines; `--verbose` brings the libraries' back; a missing
data folder names the config key and the override that fixes it."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from limits import run_until_hang

ROOT = Path(__file__).resolve().parents[1]
NOISE = ("Setting accelerator to CPU", "No CUDA runtime is found", "shm_comm", "USDT:", "gpuGetDeviceCount",
         "[WARNING]", "[INFO]", "FutureWarning")


def train(tmp_path, *args):
    cmd = [sys.executable, str(ROOT / "fastmoco" / "train.py"), "--config", str(ROOT / "configs" / "tiny.json"),
           "--logging.out_dir", str(tmp_path / "run"), *args]
    p = run_until_hang(cmd, "train.py on configs/tiny.json", cwd=tmp_path, capture_output=True, text=True)
    return p.returncode, p.stdout + p.stderr


@pytest.mark.parametrize("key,override", [("data.path", ["--data.source", "folder", "--data.path"]),
                                          ("eval.val_path", ["--eval.train_path", "{real}", "--eval.val_path"])])
def test_a_missing_data_folder_is_one_line_naming_its_key_and_override(tmp_path, key, override):
    from fastmoco.pipelines.demo_data import make_demo_data
    real = make_demo_data(tmp_path / "real", 4, seed=0)
    missing = tmp_path / "no_such_folder"
    args = [a.replace("{real}", str(real)) for a in override] + [str(missing)]
    code, out = train(tmp_path, *args)
    assert code != 0
    lines = [line for line in out.splitlines() if line.strip()]
    what = {"data.path": "image folder", "eval.val_path": "eval.val_path split: folder"}[key]
    assert lines == [f"fastmoco: {what} '{missing}' does not exist or is not a directory: set {key} in the "
                     f"config or on the command line (--{key} DIR)"], out


@pytest.mark.skipif(torch.cuda.is_available(), reason="DeepSpeed announces a CPU accelerator only without CUDA")
def test_a_run_prints_no_library_notices_unless_verbose(tmp_path):
    code, out = train(tmp_path, "--schedule.max_steps", "2")
    assert code == 0, out
    assert "done: 2 steps" in out
    assert [n for n in NOISE if n in out] == [], out
    code, out = train(tmp_path, "--schedule.max_steps", "2", "--overwrite", "--verbose")
    assert code == 0, out
    assert "Setting accelerator to CPU" in out, out   # what --verbose brings back


def test_the_progress_bar_shows_one_time_left(tmp_path, capsys):
    """tqdm's [elapsed<left] is the bar's only ETA; metrics.jsonl keeps the window's eta_s."""
    import json

    from fastmoco.metrics import MetricLogger
    log = MetricLogger(tmp_path, log_every=2, check_every=2, total_steps=4, global_batch=8,
                       device=torch.device("cpu"), tensorboard=False, progress=True)
    for step in (1, 2):
        log.record(torch.tensor(1.5))
        log.after_step(step, 1e-3, 0.99, 0)
    log.bar.refresh()
    log.close()
    shown = capsys.readouterr().err.splitlines()[-1]
    assert "loss=1.5000" in shown and "<" in shown and "eta" not in shown, shown
    assert "eta_s" in json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
