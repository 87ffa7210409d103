"""Run by tests/test_train.py under torchrun or python: train, then dump what the tests inspect.

    python tests/train_worker.py MODE OUT CONFIG [--dotted.overrides ...]
MODE: fit        train; rank 0 saves the momentum encoder (gathered) and ZeRO shard sizes to OUT
      crash-save train; then a save that fails midway; then resume from what is left
"""
import json
import sys

import torch


def main():
    mode, out, config, *overrides = sys.argv[1:]
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
        with deepspeed.zero.GatheredParameters([p for _, p in mom]):
            gathered = {n: p.detach().clone().float() for n, p in mom}
        if t.rank == 0:
            torch.save({"momentum": gathered, "shards": shards}, out)
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
        except OSError:
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


if __name__ == "__main__":
    main()
