"""Self-supervised pretraining on DeepSpeed: MoCo v3, or DINO (config key `method`, fastmoco/methods.py).

    deepspeed fastmoco/train.py --config configs/vit_h.json          # one or many GPUs / nodes
    torchrun --nproc_per_node 8 fastmoco/train.py --config configs/vit_b.json
    python fastmoco/train.py --config configs/tiny.json --optim.base_lr 1e-4   # one process

Dotted options after --config override the JSON (see fastmoco/config.py).
`--resume auto` continues from the newest loadable checkpoint in
<logging.out_dir>/checkpoints (or starts when there is none), `--resume DIR`
from that one. One run at a time owns an out_dir (a lock held for its life:
another run there is refused, naming it). A fresh run refuses an out_dir that
holds a previous run unless `--overwrite` (which deletes that run's
checkpoints, metrics.jsonl, tb/ and config.json, and says so); debris of
interrupted saves is removed at start. A resume compares every config key and
the run's shape with the checkpoint's (fastmoco.config.RESUME_RULES): a change
that cannot load is refused, one that changes the run's meaning is refused
unless `--allow-change KEY` (repeatable; e.g. schedule.epochs to train longer),
and the accepted changes are printed. SIGTERM / SIGINT, or the exit of a
launcher above the ranks, save a checkpoint at the next agreed step boundary
and exit 0 (fastmoco/preemption.py).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import copy
import os
import socket
import sys
import time
from pathlib import Path

import torch

from fastmoco import checkpoint
from fastmoco.checkpoint import CheckpointError
from fastmoco.config import (Config, ConfigError, check_allow_change, load_config, resume_changes, to_dict,
                             validate_deepspeed)
from fastmoco import quiet
from fastmoco.distributed import process_entry
from fastmoco.metrics import LogWriteError, MetricLogger, NonFiniteLossError, write_log_file
from fastmoco.methods import get_method
from fastmoco.optim import after_initialize, build_optimizer
from fastmoco.pipelines import DatasetError
from fastmoco.preemption import DataWaitInterrupted, Preemption, exit_with_parent


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="JSON config file")
    p.add_argument("--resume", default="", help="'auto' or a checkpoint directory")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an out_dir holding a previous run: delete its checkpoints, "
                        "metrics.jsonl, tb/ and config.json first")
    p.add_argument("--allow-change", action="append", default=[], metavar="KEY",
                   help="resume although config KEY (dotted, or run.global_batch / run.steps_per_epoch / "
                        "run.zero_stage) differs from the checkpoint's; repeatable")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    quiet.add_flag(p)
    return p.parse_known_args(argv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fill_single_process_env() -> None:
    """Plain `python train.py`: no launcher set the rendezvous, so it is one process of one.
    The variables stay for the life of the process: DeepSpeed's ZeRO-3 reads LOCAL_RANK during
    the step too. A child process that is a run of its own is started without them
    (`fastmoco.distributed.RENDEZVOUS_VARS`)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def init_distributed(use_cuda: bool) -> None:
    """torch.distributed through DeepSpeed (nccl on GPUs, gloo on CPUs); nothing when it is up already.

    On a machine without CUDA, DeepSpeed JIT-compiles its shm_comm C++ op at every start of an
    environment whose build is not in ~/.cache/torch_extensions (a minute or more; environments that
    share that cache rebuild it over each other). Its one user is DeepSpeed's inference_all_reduce,
    which fastmoco never calls, so the op is marked unavailable and nothing is compiled."""
    deepspeed = quiet.import_deepspeed()

    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        from deepspeed.accelerator import get_accelerator

        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is not None:
            deepspeed.ops.__compatible_ops__[builder.NAME] = False   # DeepSpeed keeps this dict: edits persist
    with quiet.library_logs():
        deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo")


def resolve_deepspeed_config(cfg: Config, world: int, use_cuda: bool) -> dict:
    """The DeepSpeed config as DeepSpeed gets it: batch sizes resolved, bf16 'auto' decided."""
    ds = copy.deepcopy(cfg.deepspeed)
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"deepspeed.{key}: fastmoco builds the optimizer and schedules itself "
                              "(sections optim and schedule); remove this key")
    if ds.get("gradient_accumulation_steps", 1) != 1:
        raise ConfigError("deepspeed.gradient_accumulation_steps must be 1: MoCo contrasts the whole batch "
                          "in one step; raise the micro batch or add processes instead")
    micro = ds.get("train_micro_batch_size_per_gpu")
    total = ds.get("train_batch_size")
    if micro is None and total is None:
        raise ConfigError("deepspeed: set train_micro_batch_size_per_gpu (or train_batch_size)")
    if total is not None:
        if total % world:
            raise ConfigError(f"deepspeed.train_batch_size {total} does not divide over {world} processes")
        if micro is not None and micro * world != total:
            raise ConfigError(f"deepspeed.train_batch_size {total} != train_micro_batch_size_per_gpu {micro} "
                              f"x {world} processes")
        micro = total // world
    if not isinstance(micro, int) or micro < 2:
        raise ConfigError(f"deepspeed.train_micro_batch_size_per_gpu must be an integer >= 2 (BatchNorm "
                          f"in the heads), got {micro!r}")
    bf16 = ds.get("bf16", {}).get("enabled", "auto")
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": use_cuda if bf16 == "auto" else bool(bf16)}
    ds.update(train_micro_batch_size_per_gpu=micro, train_batch_size=micro * world, gradient_accumulation_steps=1)
    ds.setdefault("zero_allow_untested_optimizer", True)  # a client optimizer (fastmoco/optim.py): no C++ op
    ds.setdefault("steps_per_print", 10 ** 9)  # fastmoco logs itself
    _no_host_sync_in_step(ds)
    return ds


def _no_host_sync_in_step(ds: dict) -> None:
    """Two DeepSpeed defaults off, unless the config sets them: under bf16, ZeRO-1/2's step scans
    every gradient for inf/NaN (two reductions per gradient, a Python loop) and reads the verdict on
    the host (`.item()`: the host waits for the whole backward, then the GPU waits for the host's
    launches), and it takes the global gradient norm (one reduction per gradient) that only
    `gradient_clipping` uses.

    bf16 has no loss scale for an overflow check to lower: a non-finite gradient makes a non-finite
    loss, which fastmoco detects every logging.check_finite_every steps and stops on, naming the step,
    with the last checkpoint finite (fastmoco/metrics.py). Where DeepSpeed refuses `compute_grad_norm`
    off (clipping on, optimizer offload, ZeRO-1 bf16 with fp32 gradient accumulation, which takes its
    BF16_Optimizer) or does not know a key (an older DeepSpeed), its default stays. ZeRO-0's bf16
    wrapper and ZeRO-3 check in any case (a host read per parameter, and one a step)."""
    from fastmoco.quiet import import_deepspeed
    import_deepspeed()
    try:
        from deepspeed.runtime.precision_config import DeepSpeedBF16Config
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    except ImportError:
        return
    if ds["bf16"]["enabled"] and "check_grad_overflow" in DeepSpeedBF16Config.model_fields:
        ds["bf16"].setdefault("check_grad_overflow", False)
    zero = ds.get("zero_optimization") or {}
    offload = (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
    fp32_accumulation = str((ds.get("data_types") or {}).get("grad_accum_dtype", "")).lower() in ("fp32", "float32", "float")
    if (zero.get("stage", 0) in (1, 2) and not ds.get("gradient_clipping") and not offload and not fp32_accumulation
            and "compute_grad_norm" in DeepSpeedZeroConfig.model_fields):
        ds["zero_optimization"] = {**zero, "compute_grad_norm": zero.get("compute_grad_norm", False)}


@contextlib.contextmanager
def _naming_the_key(keys: dict[str, str]):
    """A dataset that cannot be used at start names the config key that points to it and its override."""
    try:
        yield
    except DatasetError as e:
        named = [k for k, v in keys.items() if v and str(v) in str(e)] or list(keys)
        keys_text = " or ".join(named)
        overrides = " ".join(f"--{k} DIR" for k in named)
        raise DatasetError(f"{e}: set {keys_text} in the config or on the command line ({overrides})") from None


def _console_script(name: str) -> str:
    """How to call one of fastmoco's commands from here: its name where it is on PATH, else its path
    beside this interpreter (a .venv that is not activated), relative when under this folder."""
    import shutil
    if shutil.which(name):
        return name
    path = Path(sys.executable).parent / name
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


class Trainer:
    """Owns the engine, data, schedules and logging; `fit()` is the loop."""

    def __init__(self, cfg: Config, resume: str = "", allow_change: tuple[str, ...] = (),
                 preempt: Preemption | None = None):
        deepspeed = quiet.import_deepspeed()

        self.cfg = cfg
        if cfg.model.img_size != cfg.data.image_size:
            raise ConfigError(f"model.img_size {cfg.model.img_size} != data.image_size {cfg.data.image_size}")
        self.use_cuda = torch.cuda.is_available()
        init_distributed(self.use_cuda)
        import torch.distributed as dist
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.use_cuda else torch.device("cpu")
        ds_cfg = resolve_deepspeed_config(cfg, self.world, self.use_cuda)
        self.bf16 = ds_cfg["bf16"]["enabled"]
        self.micro = ds_cfg["train_micro_batch_size_per_gpu"]
        self.global_batch = self.micro * self.world
        self.zero_stage = ds_cfg.get("zero_optimization", {}).get("stage", 0)
        self.out_dir = Path(cfg.logging.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"

        # Data first: a missing or empty folder fails before the model is built.
        from fastmoco.pipelines import build_loader
        with _naming_the_key({"data.path": cfg.data.path}):
            self.loader = build_loader(cfg.data, batch_size=self.micro, shard_id=self.rank, num_shards=self.world,
                                       device=self.device, dtype=torch.bfloat16 if self.bf16 else torch.float32)
        self.steps_per_epoch = len(self.loader)
        if getattr(self.loader.plan, "describe", None):   # shards: what an epoch leaves out, stated
            self._print(self.loader.plan.describe())
        # The kNN monitor's folders are checked now too (None when the config has no eval section).
        from fastmoco.evaluation.monitor import KnnMonitor
        with _naming_the_key({"eval.train_path": cfg.eval.train_path, "eval.val_path": cfg.eval.val_path}):
            self.monitor = KnnMonitor.from_config(cfg, micro_batch=self.micro, device=self.device,
                                                  dtype=torch.bfloat16 if self.bf16 else torch.float32,
                                                  bf16=self.bf16)
        self.knn_history: list[tuple[int, dict]] = []
        # Before the model: a resume that would change the run's meaning is refused now.
        resume_path = self._resume_path(resume, allow_change) if resume else None
        self.method = get_method(cfg)
        self.sched = self.method.schedules(cfg, steps_per_epoch=self.steps_per_epoch, global_batch=self.global_batch)
        if not torch.isfinite(self.sched.lr).all():
            raise ConfigError(f"optim.base_lr {cfg.optim.base_lr:g} x global batch {self.global_batch} / 256 gives "
                              "a learning rate that is not a finite number")
        self.lrs = self.sched.lr.tolist()
        self.momenta = self.sched.momentum.tolist()
        self.wds = self.sched.weight_decay.tolist() if self.sched.weight_decay is not None else None
        self.step_kwargs = self.method.step_kwargs(self.sched, self.device)  # step -> the module's extra args
        self.after_step = self.method.after_step(self.sched, self.device)    # (module, step) after the update

        torch.manual_seed(cfg.seed)  # same initial weights on every rank
        model = self.method.build(cfg)
        if cfg.model.init_from:
            from fastmoco.evaluation.weights import init_from
            init_from(model, cfg.model.init_from)
        model = model.to(self.device)
        optimizer = build_optimizer(cfg.optim, self.method.param_groups(model, cfg), lr=self.lrs[0],
                                    use_cuda=self.use_cuda, zero_stage=self.zero_stage,
                                    clip_per_parameter=self.method.clip_per_parameter)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_cfg)
        after_initialize(optimizer, self.optimizer)  # where each parameter lies in what ZeRO steps
        self.model = self.engine.module
        # After DeepSpeed cast (bf16) and re-pointed/partitioned (ZeRO) the parameters; under bf16
        # the EMA reads the optimizer's fp32 master in the layout of the ZeRO stage.
        self.model.build_momentum_state(self.optimizer, self.rank)
        if cfg.memory.backbone_chunk == "auto":
            self._fit_backbone_chunk()

        self.step, self.epoch = 0, 0
        self.saved_step = -1
        self.preempt = preempt or Preemption(every=cfg.logging.check_finite_every)
        if resume_path is not None:
            self._resume(resume_path)

    def _fit_backbone_chunk(self) -> None:
        """memory.backbone_chunk auto (fastmoco/chunked.py): the largest chunk that fits, measured once.
        Held back for the first step: every trainable parameter's gradient and its two fp32 optimizer
        moments (ZeRO >= 1: this rank's share), counted whether or not the optimizer made them already."""
        from fastmoco.chunked import auto_chunk
        trainable = sum(getattr(p, "ds_numel", p.numel()) for p in self.model.parameters() if p.requires_grad)
        share = self.world if self.zero_stage >= 1 else 1
        reserve = trainable * (2 if self.bf16 else 4) + trainable * 8 // share
        chunk, line = auto_chunk(lambda x: self.model.online_backbone(x, head=False),
                                 self.method.backbone_calls(self.cfg, self.micro), device=self.device,
                                 dtype=torch.bfloat16 if self.bf16 else torch.float32, reserve=reserve)
        self.model.backbone_chunk = chunk
        self._print(line)

    # -- checkpoints ---------------------------------------------------------------------------------
    def _run_shape(self) -> dict:
        """What the config alone does not fix, as resolved for this run (the `run.*` keys of
        fastmoco.config.RESUME_RULES)."""
        return {"global_batch": self.global_batch, "steps_per_epoch": self.steps_per_epoch,
                "world_size": self.world, "zero_stage": self.zero_stage, "bf16": self.bf16,
                "dataset": self.loader.fingerprint}

    def _resume_path(self, resume: str, allow_change: tuple[str, ...]) -> Path | None:
        """The checkpoint to resume from, after comparing its run with this one (before loading it)."""
        path = checkpoint.find_latest(self.ckpt_dir) if resume == "auto" else Path(resume)
        if path is None:
            self._print(f"--resume auto: no loadable checkpoint in {self.ckpt_dir}; starting from scratch")
            return None
        cannot, refused, accepted = resume_changes(checkpoint.read_meta(path),
                                                   {"config": to_dict(self.cfg), "run": self._run_shape()},
                                                   allow=tuple(allow_change))
        if cannot or refused:
            hint = " (pass --allow-change KEY to accept a change on purpose)" if refused else ""
            raise ConfigError(f"cannot resume from {path}: this run differs in " + "; ".join(cannot + refused)
                              + hint)
        if accepted:
            self._print(f"resuming from {path} with changes: " + "; ".join(accepted))
        return path

    def _resume(self, path: Path) -> None:
        meta, state = checkpoint.load(self.engine, path)
        self.model.momentum_state.load_state_dict(state["momentum"])
        self.loader.load_state_dict(state["data"])  # this rank's data position (and DALI's random state)
        self.step, self.epoch = meta["step"], self.loader.epoch
        self._print(f"resumed from {path} at step {self.step}")

    def _check_finite_weights(self) -> None:
        """SYNC POINT (checkpoints only): a loss is finite before the update that may break the
        weights, so the weights themselves are checked before they are saved as good."""
        from fastmoco.momentum import local_data
        local = [local_data(p) for p in self.model.parameters()]
        bad = torch.stack([torch.isfinite(t).all() for t in local if t.numel()]).logical_not().sum()
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(bad)
        if bad.item():
            raise NonFiniteLossError(self.step, float("nan"), what="weights")

    def save(self) -> Path:
        self._check_finite_weights()
        data = self.loader.state_dict()  # the next batch's position (a finished epoch: the next one's start)
        meta = {"data": {"epoch": data["epoch"], "step": data["step"]}, "world_size": self.world,
                "run": self._run_shape(), "config": to_dict(self.cfg)}
        per_rank = {"momentum": self.model.momentum_state.state_dict(), "data": data}
        path = checkpoint.save(self.engine, self.ckpt_dir, step=self.step, meta=meta, per_rank=per_rank,
                               keep=self.cfg.checkpoint.keep)
        self.last_checkpoint, self.saved_step = path, self.step
        return path

    # -- the loop ------------------------------------------------------------------------------------
    def train_step(self, *views: torch.Tensor) -> torch.Tensor:
        lr, wd = self.lrs[self.step], self.wds[self.step] if self.wds is not None else None
        for group in self.optimizer.param_groups:  # a handful of groups, host floats: no sync
            group["lr"] = lr
            group["frozen"] = self.method.frozen(group, self.epoch)  # gradients dropped (optim.GradientRules)
            if wd is not None and group.get("apply_wd"):
                group["weight_decay"] = wd
        loss = self.engine(*views, **self.step_kwargs(self.step))  # MoCo: EMA update first; both encoders
        self.engine.backward(loss)
        self.engine.step()
        if self.after_step is not None:
            self.after_step(self.model, self.step)  # DINO: the teacher's EMA of the updated student
        return loss.detach()

    def fit(self) -> None:
        c = self.cfg
        started = time.monotonic()
        total = self.sched.total_steps
        stop = min(total, c.schedule.max_steps) if c.schedule.max_steps > 0 else total
        self.last_checkpoint = checkpoint.find_latest(self.ckpt_dir, warn=False)
        log = None
        stopped = False
        try:
            log = MetricLogger(self.out_dir, log_every=c.logging.log_every, check_every=c.logging.check_finite_every,
                               total_steps=stop, global_batch=self.global_batch, device=self.device,
                               rank=self.rank, tensorboard=c.logging.tensorboard, progress=c.logging.progress,
                               start_step=self.step)
            if self.rank == 0:
                write_log_file(self.out_dir / "config.json", json.dumps(to_dict(c), indent=1))
            if self.monitor is not None and self.step:
                self.knn_history = self._logged_evaluations()
            self.engine.train()
            if self.monitor is not None and self.monitor.at_start and self.step == 0:
                self.evaluate(log)
            while self.step < stop and self.epoch < c.schedule.epochs and not stopped:
                # the rest of the loader's epoch; a stop request while no batch comes ends the wait
                for *views, _ in self.preempt.batches(self.loader):
                    log.record(self.train_step(*views))
                    self.step += 1
                    log.after_step(self.step, self.lrs[self.step - 1], self.momenta[self.step - 1], self.epoch)
                    if self.preempt.stop_agreed(self.step):  # SIGTERM/SIGINT on some rank
                        stopped = True
                        break
                    every = c.checkpoint.every_steps
                    if (every and self.step % every == 0) or self.step == stop:
                        log.flush(self.step, self.lrs[self.step - 1], self.momenta[self.step - 1], self.epoch,
                                  log=False)  # never checkpoint a non-finite model
                        self.save()
                    if self.step >= stop:
                        break
                else:
                    self.epoch += 1
                    due = c.checkpoint.every_epochs and self.epoch % c.checkpoint.every_epochs == 0
                    if due and self.saved_step != self.step:
                        log.flush(self.step, self.lrs[self.step - 1], self.momenta[self.step - 1],
                                  self.epoch, log=False)
                        self.save()
                    if self.monitor is not None and self.monitor.due(self.epoch):
                        self.evaluate(log)
            if stopped and self.saved_step != self.step:
                log.flush(self.step, self.lrs[self.step - 1], self.momenta[self.step - 1], self.epoch, log=False)
                self.save()
            if self.step:
                log.flush(self.step, self.lrs[self.step - 1], self.momenta[self.step - 1], self.epoch)
            if self.monitor is not None and not stopped and (not self.knn_history
                                                             or self.knn_history[-1][0] != self.step):
                self.evaluate(log)
        # DatasetError: too many bad files, or a read that hangs; LogWriteError: metrics on a full disk
        except (NonFiniteLossError, CheckpointError, DatasetError, LogWriteError) as e:
            where = self.last_checkpoint or "none written yet"
            raise SystemExit(f"fastmoco: {e}; stopping. Last good checkpoint: {where}") from None
        except DataWaitInterrupted as e:   # no step boundary came: the other ranks wait in a collective
            where = self.last_checkpoint or "none written yet"
            raise SystemExit(f"fastmoco: stopped by {e}; not saved. Last good checkpoint: {where}") from None
        finally:
            if log is not None:
                log.close()
        if stopped:
            why = self.preempt.received or "a signal on another rank"
            self._print(f"fastmoco: stopped by {why} at step {self.step}; checkpoint: {self.last_checkpoint}")
            return
        if self.rank == 0:   # the report, and every evaluation's figures, are rank 0's
            self._print(self.closing_lines(time.monotonic() - started))

    # -- evaluation ----------------------------------------------------------------------------------
    def evaluate(self, log: MetricLogger) -> dict:
        """The kNN monitor on the current weights (collective); logged, and kept for the summary."""
        result, seconds = self.monitor.evaluate(self.model, step=self.step, tb=log.tb)
        self.knn_history.append((self.step, result))
        log.log_eval(self.step, self.epoch, result, seconds, split=self.monitor.val_split.path)
        return result

    def closing_lines(self, seconds: float) -> str:
        """The end of a run in plain words: what it did, what it learned, where to look next."""
        out, c = self.out_dir, self.cfg
        took = f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
        lines = [f"done: {self.step} steps ({self.step * self.global_batch} images) in {took}",
                 f"checkpoint: {self.last_checkpoint}", "  to continue or train longer: --resume auto",
                 f"metrics: {out / 'metrics.jsonl'}"]
        if c.logging.tensorboard:
            lines.append(f"  TensorBoard: tensorboard --logdir {out / 'tb'}")
        if self.knn_history:
            lines += [self.knn_summary(), self.learned(), self.monitor.write_report(out),
                      "  open it in a browser: loss and accuracy curves, nearest neighbours, attention maps"]
        if self.last_checkpoint:
            lines.append(f"export the backbone for timm: {_console_script('fastmoco-export')} --checkpoint {out} "
                         f"--out {out / 'backbone.safetensors'}")
        return "\n".join(lines)

    def learned(self) -> str:
        """One sentence on what the kNN monitor saw between the first and the last evaluation."""
        (s0, first), (s1, last) = self.knn_history[0], self.knn_history[-1]
        k = next(iter(last))
        if s0 == s1 or k not in first:
            return f"learned: kNN top-1 {last[k][0]:.1f}% at step {s1} (no earlier evaluation to compare with)"
        gain = last[k][0] - first[k][0]
        since = "the same network untrained" if s0 == 0 else f"step {s0}"
        if gain <= 0:
            return (f"learned: no gain in kNN top-1 over {since} ({first[k][0]:.1f}% -> {last[k][0]:.1f}%): "
                    "the features do not yet group images by class; train longer or check the recipe")
        return (f"learned: without seeing a label, the backbone now maps images so that a val image's {k} nearest "
                f"train images mostly share its class: kNN top-1 {first[k][0]:.1f}% -> {last[k][0]:.1f}% "
                f"(+{gain:.1f} points over {since})")

    def _logged_evaluations(self) -> list[tuple[int, dict]]:
        """A resumed run's evaluations so far, read from its metrics.jsonl (already cut at the resume step):
        the summary spans the whole run, and an evaluation recorded at the resume step (a finished run
        resumed) is not run and recorded again. Rank 0 reads; the other ranks learn the last step evaluated."""
        history: list[tuple[int, dict]] = []
        path = self.out_dir / "metrics.jsonl"
        if self.rank == 0 and path.is_file():
            for line in path.read_text().splitlines():
                rec = json.loads(line) if line.strip() else {}
                if "eval" not in rec or rec["step"] > self.step:
                    continue
                ks = sorted({int(key.split("@")[1]) for key in rec["eval"] if key.startswith("knn_top1@")})
                history.append((rec["step"], {k: (rec["eval"][f"knn_top1@{k}"], rec["eval"][f"knn_top5@{k}"])
                                              for k in ks}))
        last = history[-1][0] if history else -1
        if self.world > 1:
            import torch.distributed as dist
            t = torch.tensor([last], device=self.device)
            dist.broadcast(t, 0)
            last = int(t.item())
        if self.rank != 0:
            history = [(last, {})] if last >= 0 else []
        return history

    def knn_summary(self) -> str:
        """The first and the last kNN evaluation side by side, one line per k."""
        (s0, first), (s1, last) = self.knn_history[0], self.knn_history[-1]
        what = f"kNN accuracy of the {self.monitor.encoder} backbone on {self.monitor.val_split.path}"
        label0 = "at initialisation" if s0 == 0 else f"at step {s0}"
        lines = [f"{what} (weighted, T={self.monitor.temperature}):"]
        if s0 == s1:
            return "\n".join(lines + [f"  k={k:<4d} top-1 {a[0]:6.2f}%  top-5 {a[1]:6.2f}% after step {s1}"
                                     for k, a in last.items()])
        for k in last:
            lines.append(f"  k={k:<4d} top-1 {first[k][0]:6.2f}% {label0} -> {last[k][0]:6.2f}% after step {s1}"
                         f"   (top-5 {first[k][1]:.2f}% -> {last[k][1]:.2f}%)")
        return "\n".join(lines)

    def _print(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, flush=True)


@process_entry
def main(argv: list[str] | None = None) -> None:
    args, overrides = parse_args(argv)
    quiet.configure(args.verbose)
    launched = "LOCAL_RANK" in os.environ   # by torchrun / deepspeed: die with the launcher
    try:
        cfg = load_config(args.config, overrides)
        validate_deepspeed(cfg.deepspeed)
        check_allow_change(args.allow_change, cfg)
    except ConfigError as e:
        raise SystemExit(f"fastmoco: config error: {e}") from None
    fill_single_process_env()
    preempt = Preemption(every=cfg.logging.check_finite_every)
    if launched:
        exit_with_parent()
        preempt.watch_launchers()   # `deepspeed` exits on SIGTERM without telling its ranks
    try:
        checkpoint.check_out_dir(cfg.logging.out_dir)   # every rank, before anything slow
        use_cuda = torch.cuda.is_available()
        init_distributed(use_cuda)
        # Rank 0 locks the out_dir for the life of the run; every rank fails with it.
        lock, notes = checkpoint.claim_out_dir(cfg.logging.out_dir, resume=args.resume, overwrite=args.overwrite)
    except CheckpointError as e:
        raise SystemExit(f"fastmoco: {e}") from None
    for note in notes:
        print(note, flush=True)
    # From here SIGTERM/SIGINT mean: save at the next step boundary (one during start-up too).
    preempt.install()
    try:
        trainer = Trainer(cfg, resume=args.resume, allow_change=tuple(args.allow_change), preempt=preempt)
    except (ConfigError, ValueError, FileNotFoundError, CheckpointError) as e:
        raise SystemExit(f"fastmoco: {e}") from None
    try:
        trainer.fit()
    except KeyboardInterrupt:
        raise SystemExit(f"fastmoco: interrupted twice; not saved. Last checkpoint: {trainer.last_checkpoint}") \
            from None
    finally:
        # An orderly end of the process group. Process groups DeepSpeed keeps live on, and their
        # threads can still be letting go of tensors: the process ends through end_process.
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
        if lock is not None:
            lock.release()


if __name__ == "__main__":
    main()
