"""Checkpoints that a crash during a save cannot destroy, and the run directory that holds them.

Layout under `<out_dir>/checkpoints/`:
    step_00001200/            one complete checkpoint
        <DeepSpeed's files>   module (online + momentum encoder), optimizer, ZeRO shards
        fastmoco_rank00000.pt fp32 momentum state (this rank's ZeRO-3 shards), RNG: tensors
                              and numbers only
        COMPLETE              JSON: step, data position, run shape, config, and the manifest
                              (every file of the checkpoint with its size)
    latest                    name of the newest complete checkpoint
    .staging/                 where a checkpoint is written before it is complete
    .trash/                   where a pruned checkpoint, or the older copy of a re-saved step, is
                              deleted (both folders are removed once empty)

Every rank writes into `.staging/<tag>`; after a barrier rank 0 writes COMPLETE
and renames the directory into place (atomic on one filesystem), then
replaces `latest` atomically and prunes old checkpoints. Re-saving a step that
exists (a run resumed from an older checkpoint) renames the old copy into
`.trash` first, renames the new one in, and only then deletes the old one, so
`step_*` with COMPLETE always holds every file its manifest lists. A crash at
any point leaves the previous complete checkpoint untouched; `find_latest`
returns the newest checkpoint whose manifest files are all there, warning
about any newer one it skips (evaluation takes a run's checkpoint through it
too). A failed write (disk full) removes the staging directory on every rank
and raises `CheckpointError` naming the path.

Every file is read by `load_file`: torch.load(weights_only=True), DeepSpeed's
files with an allowlist of the three record types DeepSpeed writes; `load` routes
DeepSpeed's own reads through it, so neither resume nor evaluation unpickles code.

The run directory (`logging.out_dir`): `claim_out_dir` makes it one run's. Rank 0
holds `RunLock` (`.fastmoco.lock`) for the life of the process, so a second run
there (also with --overwrite) is refused naming the holder; under the lock it
refuses a previous run's files unless resuming or overwriting, and removes the
debris of saves that a kill interrupted (`clean_debris`), saying what it removed.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import pickle
import random
import re
import shutil
import socket
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

STAGING = ".staging"
TRASH = ".trash"
MARKER = "COMPLETE"
# What a run writes into logging.out_dir; a fresh run refuses a directory holding any of them.
RUN_FILES = ("checkpoints", "metrics.jsonl", "tb", "config.json", "eval", "report.html")
# Held (fcntl.lockf) by the run writing into logging.out_dir, for its whole life; holds who that is.
LOCK = ".fastmoco.lock"


class CheckpointError(RuntimeError):
    """A checkpoint or run directory that cannot be written or used; the message names the path."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _max_over_ranks(code: int) -> int:
    """SYNC POINT (checkpoints only): the largest of every rank's `code`."""
    if not (dist.is_available() and dist.is_initialized()):
        return code
    t = torch.tensor([code], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


# -- RNG state as tensors and numbers (loads with weights_only=True) ----------------------------------
def rng_state() -> dict:
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# -- writing -------------------------------------------------------------------------------------------
_DISK_FULL, _OTHER_FAILURE = 2, 1


def _failure_code(e: BaseException) -> int:
    text = str(e)
    # torch.save reports a full disk as "unexpected pos" / "iostream error" from its zip writer
    if (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or "unexpected pos" in text \
            or "iostream" in text:
        return _DISK_FULL
    return _OTHER_FAILURE


def _manifest(directory: Path) -> dict[str, int]:
    """{relative path: size} of every file under `directory`."""
    return {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}


def _discard(path: Path, trash: Path) -> None:
    """Delete directory `path` by renaming it into `trash` first: a kill while deleting leaves
    debris in `trash` (removed at the next start, `clean_debris`), never a half-deleted `step_*`."""
    trash.mkdir(exist_ok=True)
    aside = trash / path.name
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(path, aside)
    shutil.rmtree(aside)


def _remove_if_empty(directory: Path) -> None:
    try:
        directory.rmdir()
    except OSError:   # not empty (another save's files) or already gone
        pass


def _replace_dir(new: Path, final: Path, trash: Path) -> None:
    """Put `new` at `final`; an existing `final` is moved aside first and deleted last."""
    if final.exists():
        trash.mkdir(exist_ok=True)
        aside = trash / final.name
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
        os.replace(new, final)
        shutil.rmtree(aside)
    else:
        os.replace(new, final)


def save(engine, ckpt_dir: str | Path, *, step: int, meta: dict, per_rank: dict, keep: int = 2) -> Path:
    """Write a checkpoint of `engine` plus fastmoco's state; returns its final path. Collective."""
    ckpt_dir = Path(ckpt_dir)
    rank = _rank()
    tag = tag_for(step)
    staging = ckpt_dir / STAGING
    final = ckpt_dir / tag
    code, error = 0, None
    try:
        if rank == 0:
            shutil.rmtree(staging / tag, ignore_errors=True)  # debris of an earlier interrupted save
            staging.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        code, error = _failure_code(e), e
    if not _max_over_ranks(code):  # collective: every rank takes the same branch
        try:
            engine.save_checkpoint(str(staging), tag=tag, save_latest=False)
            torch.save({**per_rank, "rng": rng_state()}, staging / tag / f"fastmoco_rank{rank:05d}.pt")
        except (OSError, RuntimeError) as e:
            code, error = _failure_code(e), e
    code = _max_over_ranks(code)
    if not code and rank == 0:
        try:
            files = _manifest(staging / tag)
            _write_atomic(staging / tag / MARKER, json.dumps({"step": step, **meta, "files": files}, indent=1))
            _replace_dir(staging / tag, final, ckpt_dir / TRASH)
            _write_atomic(ckpt_dir / "latest", tag)
            for old in complete_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
                _discard(old, ckpt_dir / TRASH)
        except OSError as e:
            code, error = _failure_code(e), e
        for scratch in (staging, ckpt_dir / TRASH):   # a clean run leaves neither behind
            _remove_if_empty(scratch)
    code = _max_over_ranks(code)
    if code:
        if rank == 0:
            shutil.rmtree(staging / tag, ignore_errors=True)  # a partial checkpoint must not keep the disk full
            _remove_if_empty(staging)
        _barrier()
        if code == _DISK_FULL:
            raise CheckpointError(f"no space left on device while saving {final}; the previous checkpoint "
                                  "is intact")
        detail = f"{type(error).__name__}: {error}" if error is not None else "failed on another rank"
        raise CheckpointError(f"could not write checkpoint {final} ({detail}); the previous checkpoint is intact")
    return final


# -- finding and reading -------------------------------------------------------------------------------
def read_meta(path: str | Path) -> dict:
    path = Path(path)
    try:
        return json.loads((path / MARKER).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a complete fastmoco checkpoint (no {MARKER} file)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / MARKER} is damaged: {e}") from None


def problems(path: str | Path) -> list[str]:
    """Why the complete checkpoint `path` cannot load: missing or short files of its manifest."""
    path = Path(path)
    try:
        files = read_meta(path).get("files", {})
    except CheckpointError as e:
        return [str(e)]
    found = []
    for rel, size in files.items():
        f = path / rel
        if not f.is_file():
            found.append(f"missing {rel}")
        elif f.stat().st_size != size:
            found.append(f"{rel} has {f.stat().st_size} bytes, {size} were written")
    return found


def complete_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Checkpoints with a COMPLETE marker, oldest first (their files are not checked)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.glob("step_*") if (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def find_latest(ckpt_dir: str | Path, warn: bool = True) -> Path | None:
    """The newest complete checkpoint that has every file of its manifest; newer damaged ones
    are skipped with a warning naming them."""
    for path in reversed(complete_checkpoints(ckpt_dir)):
        bad = problems(path)
        if not bad:
            return path
        if warn:
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            warnings.warn(f"skipping damaged checkpoint {path}: {bad[0]}{more}", RuntimeWarning, stacklevel=2)
    return None


def _deepspeed_types() -> list:
    """The classes DeepSpeed pickles into the checkpoints of fastmoco's runs (bf16 or fp32, ZeRO 0-3): the
    ZeRO optimizer states hold a LossScaler (two numbers), a ZeroStageEnum and fragment_address records
    (two ints each). Nothing else beyond tensors, numbers, strings and containers is let through."""
    from fastmoco.quiet import library_logs
    with library_logs():   # DeepSpeed's first import announces the accelerator it picked
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def _refusal(e: Exception) -> str:
    """What torch's weights-only unpickler refused, in a few words (its own message goes on to suggest
    weights_only=False or allowlisting the global, which fastmoco never does)."""
    found = re.search(r"GLOBAL (\S+)", str(e))
    if found:
        return found.group(1)
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (lines or [type(e).__name__])[0][:200]


def load_file(path: str | Path, map_location="cpu", *, mmap: bool = False, deepspeed_types: bool = True):
    """A checkpoint file read with torch.load(weights_only=True): tensors, numbers, strings, containers and
    (`deepspeed_types`) the few classes DeepSpeed writes. Anything else (an object whose unpickling would
    run code) is refused before it runs, with a CheckpointError naming the file and what it holds. Every
    file of a checkpoint is read through here: fastmoco's, DeepSpeed's at resume (`load`) and evaluation's."""
    path = Path(path)
    allowed = ("tensors, numbers, strings, containers and DeepSpeed's checkpoint records" if deepspeed_types
               else "tensors, numbers, strings and containers")
    try:
        with torch.serialization.safe_globals(_deepspeed_types() if deepspeed_types else []):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} does not load as tensors and numbers only (it holds {_refusal(e)}; only "
                              f"{allowed} are read, weights_only=True): refused, nothing in it was run") from None
    except Exception as e:  # noqa: BLE001 - a damaged file (truncated zip, bad records): name it
        raise CheckpointError(f"{path} cannot be read ({type(e).__name__}: {_refusal(e)})") from None


class _WeightsOnlyFiles:
    """Stands in for a DeepSpeed engine's `checkpoint_engine` while a checkpoint loads: every file
    DeepSpeed reads (model states, optimizer states of any ZeRO stage) goes through `load_file`;
    everything else is the engine's own."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def load(self, path, map_location=None):
        return load_file(path, map_location)


def load(engine, path: str | Path) -> tuple[dict, dict]:
    """Load a complete checkpoint into `engine`; returns (meta, this rank's fastmoco state). Every file
    is read with weights_only=True (`load_file`)."""
    path = Path(path)
    meta = read_meta(path)
    bad = problems(path)
    if bad:
        raise CheckpointError(f"checkpoint {path} cannot load: {'; '.join(bad[:3])}")
    world = dist.get_world_size() if dist.is_initialized() else 1
    if meta.get("world_size", world) != world:
        raise CheckpointError(f"{path} was written by {meta['world_size']} processes; this run has {world}")
    own = path / f"fastmoco_rank{_rank():05d}.pt"
    per_rank = load_file(own, deepspeed_types=False)   # fastmoco's own file: tensors and numbers only
    files = engine.checkpoint_engine
    engine.checkpoint_engine = _WeightsOnlyFiles(files)
    try:
        load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
    finally:
        engine.checkpoint_engine = files
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load the checkpoint in {path}")
    set_rng_state(per_rank.pop("rng"))
    return meta, per_rank


# -- the run directory ---------------------------------------------------------------------------------
def check_out_dir(out_dir: str | Path) -> None:
    """Every process, before anything slow: `out_dir` is (or can be made) a directory it can write into."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"logging.out_dir {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write_test_{socket.gethostname()}_{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"logging.out_dir {out} is not writable ({e.strerror or e})") from None


class RunLock:
    """An exclusive lock on `<out_dir>/.fastmoco.lock` for the life of this process.

    A POSIX record lock (fcntl.lockf): the kernel releases it when the process ends, however it
    ends (SIGKILL included), and unlike flock() it is not inherited by forked children, so a loader
    worker that outlives its run cannot keep the directory locked. The file holds who has it (host,
    PID, since when) for the message another run gets; it stays when the run ends (deleting a
    lock file races with the next run taking it). The holding process must never open the file
    again: closing any descriptor of it would drop a POSIX lock."""

    _held: dict[str, RunLock] = {}   # POSIX locks are per process: one RunLock per file in a process

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / LOCK
        key = os.path.realpath(self.path)
        if key in RunLock._held:
            raise CheckpointError(f"logging.out_dir {out_dir} is already in use by this process")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise CheckpointError(f"cannot lock {self.path} ({e.strerror or e})") from None
            raise CheckpointError(f"logging.out_dir {out_dir} is in use by another training run "
                                  f"({self._holder()}): wait for it to end or stop it, or choose another "
                                  "logging.out_dir") from None
        since = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        holder = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": since})
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        self.fd, self._key = fd, key
        RunLock._held[key] = self

    def _holder(self) -> str:
        """Who holds the lock, from the file (the holder writes it just after locking: retry briefly)."""
        for _ in range(20):
            try:
                info = json.loads(self.path.read_text())
                return f"host {info['host']}, PID {info['pid']}, since {info['since']}"
            except (OSError, ValueError, KeyError, TypeError):
                time.sleep(0.05)
        return f"the holder is not recorded in {self.path}"

    def release(self) -> None:
        if RunLock._held.pop(self._key, None) is not None:
            os.close(self.fd)   # closing the file drops the lock


def _size_text(path: Path) -> str:
    total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    return f"{total / 2 ** 20:.1f} MiB"


def clean_debris(ckpt_dir: str | Path) -> list[str]:
    """Remove what interrupted saves left in `ckpt_dir` (only under the run lock: no save is under way):
    partial checkpoints in .staging, old copies in .trash, `step_*` folders without COMPLETE (a
    deletion killed midway, by a version that deleted in place) and *.tmp files. Returns one line each."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [p for scratch in (STAGING, TRASH) if (ckpt_dir / scratch).is_dir()
             for p in sorted((ckpt_dir / scratch).iterdir())]
    found += [p for p in sorted(ckpt_dir.glob("step_*")) if p.is_dir() and not (p / MARKER).is_file()]
    found += sorted(ckpt_dir.glob("*.tmp"))
    removed = []
    for p in found:
        why = "no COMPLETE file" if p.name.startswith("step_") and p.parent == ckpt_dir else "interrupted save"
        removed.append(f"{p} ({_size_text(p) if p.is_dir() else f'{p.stat().st_size} bytes'}, {why})")
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    for scratch in (STAGING, TRASH):
        _remove_if_empty(ckpt_dir / scratch)
    return removed


def _take_out_dir(out: Path, resume: str, overwrite: bool) -> tuple[RunLock, list[str]]:
    """Rank 0's part of `claim_out_dir`: lock, then the previous-run check, --overwrite and debris."""
    lock = RunLock(out)
    try:
        used = [name for name in RUN_FILES if (out / name).exists()]
        if used == ["checkpoints"] and not any((out / "checkpoints").iterdir()):
            used = []
        notes = []
        if used and not resume:
            if not overwrite:
                raise CheckpointError(
                    f"logging.out_dir {out} holds a previous run ({', '.join(used)}): pass --resume auto to "
                    "continue it, --overwrite to delete its checkpoints and metrics and start again, or choose "
                    "another logging.out_dir")
            for name in used:
                p = out / name
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            notes.append(f"--overwrite: removed the previous run's {', '.join(str(out / n) for n in used)}")
        debris = clean_debris(out / "checkpoints")
        if debris:
            notes.append("removed the debris of interrupted saves: " + "; ".join(debris))
        return lock, notes
    except BaseException:
        lock.release()
        raise


def claim_out_dir(out_dir: str | Path, *, resume: str, overwrite: bool) -> tuple[RunLock | None, list[str]]:
    """Make `out_dir` this run's (collective when torch.distributed is initialized): rank 0 takes the
    run lock (another run writing there is refused, naming it), refuses a previous run there unless
    `resume` or `overwrite` (which deletes that run's RUN_FILES), and removes debris of interrupted
    saves. Every rank gets rank 0's outcome, so all fail together. Returns rank 0's lock (None
    elsewhere) and what it removed, one line each."""
    out = Path(out_dir)
    if resume and overwrite:
        raise CheckpointError("--resume and --overwrite exclude each other")
    lock, notes, error = None, [], None
    if _rank() == 0:
        try:
            lock, notes = _take_out_dir(out, resume, overwrite)
        except CheckpointError as e:
            error = str(e)
        except OSError as e:
            error = f"could not prepare logging.out_dir {out} ({type(e).__name__}: {e})"
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        shared = [error]
        dist.broadcast_object_list(shared, src=0)   # collective: every rank learns rank 0's outcome
        error = shared[0]
    if error is not None:
        if lock is not None:
            lock.release()
        raise CheckpointError(error)
    return lock, notes
