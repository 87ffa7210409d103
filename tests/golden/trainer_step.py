"""Run by tests/test_golden_moco.py in its own process (DeepSpeed initialises torch.distributed):
fastmoco's Trainer on the golden MoCo v3 cases, with what it computes written as digests.

    python tests/golden/trainer_step.py OUT.pt CASE [CASE ...]

For each case (tests/golden/moco_step_<case>.safetensors): the seeded initial state is written as an
official checkpoint ({"state_dict": {"module.<name>": ...}}) and becomes the run's `model.init_from`
(fastmoco/evaluation/weights.py reads it); a Trainer is built from the case's CPU config at the case's
sizes and hyper-parameters (DeepSpeed, ZeRO-0, fp32), put at the official loop's iteration, and
`Trainer.train_step` runs on the case's images. Recorded per step as the generator records the official
run: loss, lr, m, the gradients the optimizer steps on, the state after the step minus the initial state.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))

from golden import gen_moco_step as case_def  # noqa: E402
from golden import tensors  # noqa: E402


def run_case(name: str, tmp: Path) -> dict:
    from fastmoco.config import load_config
    from fastmoco.train import Trainer

    golden, meta = tensors.read(f"moco_step_{name}.safetensors")
    c = meta["case"]
    kept = {k[len("kept/"):]: v for k, v in golden.items() if k.startswith("kept/")}
    state, views = case_def.seeded_inputs(meta, kept)
    tensors.check_inputs(case_def.inputs_by_name(state, views), golden["input_sums"], f"moco_step_{name}")
    ckpt = tmp / f"{name}.pth.tar"
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}, "arch": c["arch"], "epoch": 0}, ckpt)
    overrides = {"model.init_from": str(ckpt), "moco.dim": c["dim"], "moco.mlp_dim": c["mlp_dim"],
                 "moco.tau": c["tau"], "moco.momentum": c["moco_m"], "moco.momentum_cosine": "true",
                 "optim.name": c["optimizer"], "optim.base_lr": c["base_lr"], "optim.weight_decay": c["weight_decay"],
                 "optim.momentum": c["momentum"], "optim.eps": meta["adamw_eps"], "schedule.epochs": meta["epochs"],
                 "schedule.warmup_epochs": meta["warmup_epochs"], "data.synthetic_size": meta["batch"] * meta["iters"],
                 "deepspeed.train_micro_batch_size_per_gpu": meta["batch"], "deepspeed.gradient_clipping": 0.0,
                 "logging.out_dir": str(tmp / name), "logging.tensorboard": "false", "logging.progress": "false"}
    cfg = load_config(TESTS.parent / "configs" / c["config"],
                      [a for k, v in overrides.items() for a in (f"--{k}", str(v))])
    assert (cfg.model.arch, cfg.model.img_size) == (c["arch"], c["img"]), (cfg.model.arch, cfg.model.img_size)
    trainer = Trainer(cfg)
    assert trainer.steps_per_epoch == meta["iters"], trainer.steps_per_epoch
    trainer.epoch, trainer.step = meta["epoch"], meta["epoch"] * meta["iters"]
    model = trainer.model
    start = {k: v.clone() for k, v in model.state_dict().items()}
    out, lrs, ms = {}, [], []
    real_step = trainer.optimizer.step

    def step(*a, **kw):   # what the engine steps on
        i = len(lrs)
        out.update({f"grad/{i}/{n}": tensors.digest(p.grad) for n, p in model.named_parameters() if p.grad is not None})
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        return real_step(*a, **kw)

    trainer.optimizer.step = step
    losses = []
    for i, (x1, x2) in enumerate(views):
        ms.append(float(trainer.step_kwargs(trainer.step)["m"][0]))   # the EMA gets the pair [m, 1 - m]
        losses.append(trainer.train_step(x1, x2).item())
        trainer.step += 1
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                out[f"delta/{i}/{k}"] = tensors.digest(v - start[k])
                out[f"norm/{i}/{k}"] = v.double().norm().reshape(1)
            else:
                out[f"value/{i}/{k}"] = v.clone().reshape(-1)
    out.update({"loss": torch.tensor(losses, dtype=torch.float64), "lr": torch.tensor(lrs, dtype=torch.float64),
                "m": torch.tensor(ms, dtype=torch.float64)})
    return out


def main() -> None:
    from fastmoco.train import fill_single_process_env

    out_path, *cases = sys.argv[1:]
    fill_single_process_env()
    with tempfile.TemporaryDirectory(prefix="fastmoco-golden-") as tmp:
        torch.save({name: run_case(name, Path(tmp)) for name in cases}, out_path)


if __name__ == "__main__":
    main()
