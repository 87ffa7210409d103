"""Run by tests/test_train.py under torchrun or python: train, then dump what the tests inspect.

    python tests/train_worker.py MODE OUT CONFIG [--dotted.overrides ...]
MODE: fit        train; rank 0 saves both encoders (gathered) and ZeRO shard sizes to OUT
      crash-save train; then a save that fails midway; then resume from what is left
      fit-ranks  train; every rank writes OUT.rank<R>.json: rank, LOCAL_RANK, its shard of epoch 0
      wait-at:K  fastmoco.train.main; when K steps are done every rank writes OUT.rank<R> (its pid),
                 and rank 0 waits there until it receives a signal (the tests send it)
      kill-in-resave  fastmoco.train.main; kill -9 (of itself) in the middle of deleting an
                 existing copy of a checkpoint being saved again: one file deleted, then SIGKILL
"""
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch


def main():
    mode, out, config, *overrides = sys.argv[1:]
    if mode.startswith("wait-at:") or mode == "kill-in-resave":
        return run_main(mode, out, config, overrides)
    from fastmoco import checkpoint
    from fastmoco.config import load_config
    from fastmoco.train import Trainer, fill_single_process_env

    cfg = load_config(config, overrides)
    fill_single_process_env()
    t = Trainer(cfg)
    t.fit()
    if mode == "fit":
        import deepspeed
        mom = list(t.model.momentum_encoder.named_parameters())
        shards = {}
        for prefix, module in (("online", t.model.base_encoder), ("momentum", t.model.momentum_encoder)):
            for n, p in module.named_parameters():
                if hasattr(p, "ds_tensor"):
                    shards[f"{prefix}.{n}"] = [p.ds_tensor.numel(), p.ds_numel]
        online = list(t.model.base_encoder.named_parameters())
        with deepspeed.zero.GatheredParameters([p for _, p in mom + online]):
            gathered = {n: p.detach().clone().float() for n, p in mom}
            gathered_online = {n: p.detach().clone().float() for n, p in online}
        if t.rank == 0:
            torch.save({"momentum": gathered, "online": gathered_online, "shards": shards}, out)
    elif mode == "fit-ranks":
        plan = t.loader.plan
        rec = {"rank": t.rank, "local_rank": int(os.environ["LOCAL_RANK"]), "world": t.world,
               "shard_id": plan.shard_id, "num_shards": plan.num_shards, "epoch0": plan.shard_indices(0).tolist()}
        Path(f"{out}.rank{t.rank}.json").write_text(json.dumps(rec))
    elif mode == "crash-save":
        good = t.last_checkpoint

        def crash(*args, **kwargs):
            raise OSError("simulated crash while writing the checkpoint")

        real_save = checkpoint.torch.save
        checkpoint.torch.save = crash
        t.step += 1
        try:
            t.save()
            crashed = False
        except (OSError, checkpoint.CheckpointError):   # save() reports the OSError as CheckpointError
            crashed = True
        checkpoint.torch.save = real_save
        latest = checkpoint.find_latest(t.ckpt_dir)
        t2 = Trainer(cfg, resume="auto")
        x1, x2, _ = next(iter(t2.loader))
        loss = t2.train_step(x1, x2).item()
        with open(out, "w") as f:
            json.dump({"crashed": crashed, "good": str(good), "latest": str(latest), "resumed_step": t2.step,
                       "loss_after_resume": loss}, f)
    else:
        raise SystemExit(f"unknown mode {mode}")


def run_main(mode, out, config, argv):
    """fastmoco.train.main with a kill point or a wait point hooked in."""
    from fastmoco import checkpoint, train

    if mode.startswith("wait-at:"):
        at = int(mode.split(":")[1])
        real_step = train.Trainer.train_step

        def train_step(self, x1, x2):
            if self.step == at:
                Path(f"{out}.rank{self.rank}").write_text(str(os.getpid()))
                deadline = time.monotonic() + 120
                while self.rank == 0 and self.preempt.received is None and time.monotonic() < deadline:
                    time.sleep(0.05)
            return real_step(self, x1, x2)

        train.Trainer.train_step = train_step
    else:
        real_rmtree = checkpoint.shutil.rmtree

        def rmtree(path, *args, **kwargs):
            path = Path(path)
            if path.name.startswith("step_") and path.is_dir() and checkpoint.STAGING not in path.parts:
                victim = sorted(p for p in path.iterdir() if p.name != checkpoint.MARKER)[0]
                victim.unlink()                       # the old copy is half deleted ...
                os.kill(os.getpid(), signal.SIGKILL)  # ... when the process dies
            return real_rmtree(path, *args, **kwargs)

        checkpoint.shutil.rmtree = rmtree
    train.main(["--config", config, *argv])


if __name__ == "__main__":
    main()
