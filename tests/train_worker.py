"""Run by tests/test_train.py under torchrun or python: train, then dump what the tests inspect.

    python tests/train_worker.py MODE OUT CONFIG [--dotted.overrides ...]
MODE: fit        train; rank 0 saves both encoders (gathered) and ZeRO shard sizes to OUT
      crash-save train; then a save that fails midway; then resume from what is left
      fit-ranks  train; every rank writes OUT.rank<R>.json: rank, LOCAL_RANK, its shard of epoch 0
      wait-at:K  fastmoco.train.main; when K steps are done every rank writes OUT.rank<R> (its pid),
                 and rank 0 waits there until it receives a signal (the tests send it; none in
                 HANG_S: exits 1)
      kill-in-resave  fastmoco.train.main; kill -9 (of itself) in the middle of deleting an
                 existing copy of a checkpoint being saved again: one file deleted, then SIGKILL
      kill-in-staging:K  fastmoco.train.main; kill -9 (of itself) while the checkpoint of step K is
                 half written in checkpoints/.staging (DeepSpeed's files there, fastmoco's not yet)
      hang-decode-at:K  fastmoco.train.main; from step K on, PIL's Image.open never returns (a read
                 that hangs); writes OUT.rank<R> (its pid) when it starts hanging
      hang-read:NAME  fastmoco.train.main; reading the file named NAME never returns
"""
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
from limits import HANG_S


def main():
    # deepspeed's launch.py puts --local_rank=N first (fastmoco.train's parser takes it)
    mode, out, config, *overrides = [a for a in sys.argv[1:] if not a.startswith(("--local_rank", "--local-rank"))]
    if mode.startswith(("wait-at:", "kill-in-", "hang-")):
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
                deadline = time.monotonic() + HANG_S   # however long the test takes to send it
                while self.rank == 0 and self.preempt.received is None:
                    if time.monotonic() > deadline:
                        raise SystemExit(f"train_worker: rank 0 waited {HANG_S} s at step {at} for the test's "
                                         "signal; none came")
                    time.sleep(0.05)
            return real_step(self, x1, x2)

        train.Trainer.train_step = train_step
    elif mode.startswith("kill-in-staging:"):
        at = int(mode.split(":")[1])
        real_save = checkpoint.torch.save

        def save(obj, path, *args, **kwargs):
            path_ = Path(path)
            if checkpoint.tag_for(at) in path_.parts and path_.name.startswith("fastmoco_rank"):
                os.kill(os.getpid(), signal.SIGKILL)   # DeepSpeed's files are in .staging/step_K
            return real_save(obj, path, *args, **kwargs)

        checkpoint.torch.save = save
    elif mode.startswith("hang-decode-at:"):
        at = int(mode.split(":")[1])
        from PIL import Image
        real_open, real_step = Image.open, train.Trainer.train_step
        state = {"hang": False}

        def train_step(self, *views):
            state["hang"] = state["hang"] or self.step >= at
            return real_step(self, *views)

        def hanging_open(*args, **kwargs):
            if state["hang"]:
                Path(f"{out}.rank0").write_text(str(os.getpid()))
                time.sleep(10 ** 6)
            return real_open(*args, **kwargs)

        train.Trainer.train_step = train_step
        Image.open = hanging_open
    elif mode.startswith("hang-read:"):
        from fastmoco.pipelines import folder
        name, real_read = mode.split(":", 1)[1], folder.read_file

        def read_file(path):
            if Path(path).name == name:
                time.sleep(10 ** 6)
            return real_read(path)

        folder.read_file = read_file
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
    train.main(["--config", config, *argv])   # an argv list: the function; the process ends below


if __name__ == "__main__":
    from fastmoco.distributed import process_entry
    process_entry(lambda argv: main())()   # ends like fastmoco's own entries (end_process)
