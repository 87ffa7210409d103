"""Training metrics without a host sync per step.

Each step's loss is copied into a device buffer. Every `check_every` steps the
buffer is checked for non-finite values (one sync for the window); every
`log_every` steps its mean, reduced over ranks on the device, is logged: a
progress bar, JSON lines (`metrics.jsonl`) and TensorBoard, all on rank 0.
"""
from __future__ import annotations

import json
import math
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
            if progress:
                from tqdm import tqdm
                self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                    self.tb = SummaryWriter(str(Path(out_dir) / "tb"))
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
        """Check the window (SYNC POINT: once per window) and log it if asked."""
        if self.n == 0:
            return
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
        if not log:
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
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k in ("loss", "lr", "momentum", "img_per_s"):
                self.tb.add_scalar(f"train/{k}", rec[k], step)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", m=f"{momentum:.5f}",
                                 img_s=f"{img_s:.0f}", eta=f"{eta / 60:.1f}min")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
