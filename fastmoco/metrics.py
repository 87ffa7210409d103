"""Training metrics without a host sync per step.

Each step's loss is copied into a device buffer. Every `check_every` steps the
buffer is checked for non-finite values (one sync for the window); every
`log_every` steps its mean, reduced over ranks on the device, is logged: a
progress bar, JSON lines (`metrics.jsonl`) and TensorBoard, all on rank 0.
The last, partial window is logged by the final `flush`. A run that starts
at `start_step` (a resume) first drops the records after that step from
`metrics.jsonl` (rewritten atomically) and from TensorBoard (`purge_step`),
so a run killed after its last checkpoint leaves no duplicate steps. A record
that cannot be written (a full disk) raises `LogWriteError` naming the file.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist


class NonFiniteLossError(RuntimeError):
    def __init__(self, step: int, value: float, what: str = "loss"):
        detail = f"non-finite loss ({value}) at step {step}" if what == "loss" else \
            f"non-finite {what} after step {step}"
        super().__init__(detail)
        self.step, self.value = step, value


class LogWriteError(RuntimeError):
    """metrics.jsonl, config.json or TensorBoard's events could not be written; the message names the file."""


def write_log_file(path: Path, text: str, append: bool = False) -> None:
    """Append `text` to `path`, or replace `path` with it atomically; an OSError becomes LogWriteError."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        if append:
            with open(path, "a") as f:
                f.write(text)
        else:
            tmp.write_text(text)
            os.replace(tmp, path)
    except OSError as e:
        if not append:
            tmp.unlink(missing_ok=True)
        raise LogWriteError(f"could not write {path} ({e.strerror or e})") from None


class MetricLogger:
    def __init__(self, out_dir: str | Path, *, log_every: int, check_every: int, total_steps: int,
                 global_batch: int, device: torch.device, rank: int = 0, tensorboard: bool = True,
                 progress: bool = True, start_step: int = 0):
        if log_every <= 0 or check_every <= 0:
            raise ValueError("logging.log_every and logging.check_finite_every must be positive")
        self.log_every, self.check_every = log_every, check_every
        self.total_steps, self.global_batch = total_steps, global_batch
        self.rank = rank
        self.losses = torch.zeros(max(log_every, check_every), device=device)  # this window's losses
        self.first = start_step  # step number of losses[0]
        self.n = 0
        self.log_first = start_step
        self.loss_sum = torch.zeros((), device=device)
        self.t_last = time.perf_counter()
        self.path = Path(out_dir) / "metrics.jsonl"
        self.bar = self.tb = None
        if rank == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            truncate_records(self.path, start_step)   # LogWriteError when it cannot
            if progress:
                from tqdm import tqdm
                self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                    self.tb = SummaryWriter(str(Path(out_dir) / "tb"), purge_step=start_step + 1)
                except ImportError:  # tensorboard is a dependency, but keep training without it
                    self.tb = None

    def record(self, loss: torch.Tensor) -> None:
        """Store this step's loss on the device; no sync."""
        self.losses[self.n].copy_(loss.detach(), non_blocking=True)
        self.n += 1

    def after_step(self, step: int, lr: float, momentum: float, epoch: int) -> None:
        """`step`: steps done so far. Checks and logs when due."""
        if step % self.check_every == 0 or step % self.log_every == 0 or self.n == len(self.losses):
            self.flush(step, lr, momentum, epoch, log=step % self.log_every == 0)

    def flush(self, step: int, lr: float, momentum: float, epoch: int, log: bool = True) -> None:
        """Check the window (SYNC POINT: once per window) and log the steps since the last
        record if asked (also when the check already emptied the window)."""
        if self.n:
            self._check_window()
        if not log or step <= self.log_first:
            return
        total = self.loss_sum.clone()
        if dist.is_initialized():
            dist.all_reduce(total)
            total /= dist.get_world_size()
        steps = step - self.log_first
        loss = total.item() / max(steps, 1)
        now = time.perf_counter()
        img_s = steps * self.global_batch / max(now - self.t_last, 1e-9)
        eta = (self.total_steps - step) * self.global_batch / max(img_s, 1e-9)
        self.t_last, self.log_first = now, step
        self.loss_sum.zero_()
        if self.rank != 0:
            return
        rec = {"step": step, "epoch": epoch, "loss": loss, "lr": lr, "momentum": momentum,
               "img_per_s": img_s, "eta_s": eta, "time": time.time()}
        write_log_file(self.path, json.dumps(rec) + "\n", append=True)
        if self.tb is not None:
            self._tensorboard({f"train/{k}": rec[k] for k in ("loss", "lr", "momentum", "img_per_s")}, step)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            # tqdm shows the time left (its [elapsed<left]); metrics.jsonl keeps this window's eta_s
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", m=f"{momentum:.5f}", img_s=f"{img_s:.0f}")

    def _check_window(self) -> None:
        window = self.losses[: self.n]
        bad = (~torch.isfinite(window)).sum()
        if dist.is_initialized():
            dist.all_reduce(bad)
        if bad.item():
            local = window.cpu()
            idx = [i for i, v in enumerate(local.tolist()) if not math.isfinite(v)]
            i = idx[0] if idx else 0
            raise NonFiniteLossError(self.first + i + 1, local[i].item() if idx else float("nan"))
        self.loss_sum += window.sum()
        self.first += self.n
        self.n = 0

    def log_eval(self, step: int, epoch: int, knn: dict, seconds: float, split: str = "val") -> None:
        """One evaluation record: {"step", "epoch", "eval": {"knn_top1@k", "knn_top5@k", "seconds"}}
        in metrics.jsonl, `eval/...` in TensorBoard, the k=first top-1 on the progress bar (rank 0)."""
        if self.rank != 0:
            return
        rec = {f"knn_top{t}@{k}": acc[i] for k, acc in knn.items() for i, t in enumerate((1, 5))}
        rec["seconds"] = seconds
        write_log_file(self.path, json.dumps({"step": step, "epoch": epoch, "eval": rec, "split": split,
                                              "time": time.time()}) + "\n", append=True)
        if self.tb is not None:
            self._tensorboard({f"eval/{k}": v for k, v in rec.items()}, step)
        line = (f"step {step}: kNN on {split} " + ", ".join(f"k={k} top-1 {a[0]:.2f}%" for k, a in knn.items())
                + f" ({seconds:.1f} s)")
        if self.bar is not None:
            k = next(iter(knn))
            self.bar.set_postfix_str(f"knn@{k} {knn[k][0]:.1f}%", refresh=True)
            self.bar.write(line)
        else:
            print(line, flush=True)

    def _tensorboard(self, scalars: dict, step: int) -> None:
        try:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        except OSError as e:
            raise LogWriteError(f"could not write TensorBoard events under {self.path.parent / 'tb'} "
                                f"({e.strerror or e})") from None

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            try:
                self.tb.close()
            except OSError:   # already reported, or the run is ending on another error
                pass


def truncate_records(path: Path, last_step: int) -> None:
    """Keep only the records of `path` (JSON lines) with step <= `last_step`; a line torn by a
    kill is dropped too. Rewritten atomically, and only when something goes."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    keep = []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("step", 0) <= last_step:
            keep.append(line)
    if len(keep) == len(lines):
        return
    write_log_file(path, "".join(line + "\n" for line in keep))
