"""Checkpoints that a crash during a save cannot destroy.

Layout under `<out_dir>/checkpoints/`:
    step_00001200/            one complete checkpoint
        <DeepSpeed's files>   module (online + momentum encoder), optimizer, ZeRO shards
        fastmoco_rank00000.pt fp32 momentum state (this rank's ZeRO-3 shards), RNG
        COMPLETE              JSON: step, epoch, data position, world size, config
    latest                    name of the newest complete checkpoint
    .staging/                 where a checkpoint is written before it is complete

Every rank writes into `.staging/<tag>`; after a barrier rank 0 writes COMPLETE
and renames the directory into place (atomic on one filesystem), then
replaces `latest` atomically and prunes old checkpoints. A crash at any point
leaves the previous complete checkpoint untouched, and `find_latest` only
ever returns a directory with COMPLETE in it.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

STAGING = ".staging"
MARKER = "COMPLETE"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, ckpt_dir: str | Path, *, step: int, meta: dict, per_rank: dict, keep: int = 2) -> Path:
    """Write a checkpoint of `engine` plus fastmoco's state; returns its final path. Collective."""
    ckpt_dir = Path(ckpt_dir)
    rank = dist.get_rank() if dist.is_initialized() else 0
    tag = tag_for(step)
    staging = ckpt_dir / STAGING
    if rank == 0:
        shutil.rmtree(staging / tag, ignore_errors=True)  # debris of an earlier interrupted save
        staging.mkdir(parents=True, exist_ok=True)
    _barrier()
    engine.save_checkpoint(str(staging), tag=tag, save_latest=False)
    torch.save({**per_rank, "rng": rng_state()}, staging / tag / f"fastmoco_rank{rank:05d}.pt")
    _barrier()
    final = ckpt_dir / tag
    if rank == 0:
        _write_atomic(staging / tag / MARKER, json.dumps({"step": step, **meta}, indent=1))
        if final.exists():  # same step saved before (e.g. a resumed run): replace it whole
            shutil.rmtree(final)
        os.replace(staging / tag, final)
        _write_atomic(ckpt_dir / "latest", tag)
        for old in complete_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def complete_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.glob("step_*") if (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def find_latest(ckpt_dir: str | Path) -> Path | None:
    done = complete_checkpoints(ckpt_dir)
    return done[-1] if done else None


def load(engine, path: str | Path) -> tuple[dict, dict]:
    """Load a complete checkpoint into `engine`; returns (meta, this rank's fastmoco state)."""
    path = Path(path)
    if not (path / MARKER).is_file():
        raise FileNotFoundError(f"{path} is not a complete fastmoco checkpoint (no {MARKER} file)")
    meta = json.loads((path / MARKER).read_text())
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if meta.get("world_size", world) != world:
        raise ValueError(f"{path} was written by {meta['world_size']} processes; this run has {world}")
    load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path}")
    per_rank = torch.load(path / f"fastmoco_rank{rank:05d}.pt", map_location="cpu", weights_only=False)
    set_rng_state(per_rank.pop("rng"))
    return meta, per_rank
