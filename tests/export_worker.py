"""Run by tests/test_export.py and tests/test_unpickling.py under torchrun (2 ranks): several tiny cases
in one process group, so DeepSpeed starts once for all of them.

    python -m torch.distributed.run --nproc_per_node 2 tests/export_worker.py MODE ROOT CASE [CASE ...]
CASE: <method>-z<stage>[-frozen][-bf16] (method: moco | dino | r50; frozen: the patch projection is frozen;
      bf16: bf16 module and DeepSpeed's fp32 copies, else fp32).
MODE train:  train ROOT/<CASE> two steps (DINO's first lr is 0), its checkpoint at step 2; rank 0 writes
             ROOT/<CASE>/live.pt: every parameter and buffer of the module by name, gathered whole (ZeRO-3):
             in fp32 the run's weights exactly, under bf16 their bf16 copies.
MODE resume: resume ROOT/<CASE>'s checkpoint through fastmoco.checkpoint.load (a new Trainer), then try
             `checkpoint.load` of each ROOT/<CASE>/planted/<kind>/step_00000002; rank 0 writes
             ROOT/<CASE>/resume.json: {"mismatch": names whose resumed weights differ from live.pt,
             "planted": {kind: the error, or "loaded"}}.
"""
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"moco": "tiny.json", "dino": "dino_tiny.json", "r50": "r50_tiny.json"}
COMMON = ["--logging.log_every", "1", "--logging.tensorboard", "false", "--schedule.max_steps", "2",
          "--deepspeed.train_micro_batch_size_per_gpu", "4"]
STEP = "step_00000002"


def config_of(case: str, out_dir: Path):
    """The run config of one case name."""
    from fastmoco.config import load_config

    method, stage, *flags = case.split("-")
    frozen = ["--model.frozen_patch_embed", str("frozen" in flags).lower()] if method != "r50" else []
    return load_config(str(ROOT / "configs" / CONFIGS[method]),
                       [*COMMON, "--logging.out_dir", str(out_dir), "--deepspeed.zero_optimization.stage", stage[1:],
                        "--deepspeed.bf16.enabled", str("bf16" in flags).lower(), *frozen])


def live_weights(model: torch.nn.Module) -> dict:
    """Every parameter and buffer of `model`, whole, copied to the CPU (collective under ZeRO-3)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        return {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}


def train(run: Path, case: str) -> None:
    from fastmoco.train import Trainer

    t = Trainer(config_of(case, run))
    t.fit()
    live = live_weights(t.model)
    if t.rank == 0:
        frozen = sorted(n for n, p in t.model.named_parameters() if not p.requires_grad)
        torch.save({"live": live, "checkpoint": str(t.last_checkpoint), "frozen": frozen}, run / "live.pt")


def resume(run: Path, case: str) -> None:
    from fastmoco import checkpoint
    from fastmoco.train import Trainer

    t = Trainer(config_of(case, run), resume=str(run / "checkpoints" / STEP))
    now = live_weights(t.model)
    planted = {}
    for kind in sorted(p.name for p in (run / "planted").iterdir()):
        try:
            checkpoint.load(t.engine, run / "planted" / kind / STEP)
            planted[kind] = "loaded"
        except checkpoint.CheckpointError as e:
            planted[kind] = str(e)
    if t.rank == 0:
        live = torch.load(run / "live.pt")["live"]
        mismatch = sorted(k for k in live.keys() | now.keys()
                          if k not in live or k not in now or not torch.equal(live[k], now[k]))
        (run / "resume.json").write_text(json.dumps({"mismatch": mismatch, "planted": planted}, indent=1))


def main():
    mode, root, *cases = sys.argv[1:]
    for case in cases:
        {"train": train, "resume": resume}[mode](Path(root) / case, case)
        torch.distributed.barrier()


if __name__ == "__main__":
    from fastmoco.distributed import process_entry
    process_entry(lambda argv: main())()   # ends like fastmoco's own entries (end_process)
