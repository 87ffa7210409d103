"""What every two-crop loader shares: the interface, epoch order, sharding and resume state.

A loader yields `(view1, view2, labels)` for the rest of the current epoch:
views (B, 3, S, S) NCHW contiguous on the target device in the training dtype,
normalised with ImageNet mean/std; labels int64 (B,). Iterating it again goes
on with the next epoch.

Position (`DataCursor`, one per loader): the (epoch, step) of the next batch is
the only record of where a loader is. Every backend pulls its batches from it:
`cursor.batches()` gives (epoch, step, sample indices) from that position on,
across epoch ends when training. `state_dict()` is the position, normalised (a
finished epoch is (epoch + 1, 0)), plus what a backend needs to continue
exactly (DALI: its random generators' state); resume is `load_state_dict`.
`set_epoch(e)` jumps to the start of epoch e.

Epoch order (`ShardPlan`): one global permutation of all samples per
(seed, epoch), identical on every rank, cut into global batches of
batch_size x num_shards; rank r takes the r-th block of batch_size of each.
So step b of any number of ranks sees the same global batch as step b of one
process with the whole batch (the training tests rely on it: 2 ranks give the
1-process loss), the shards are disjoint, equal in length (ranks stay in
lockstep) and together cover every sample once per epoch except the
`num_samples % num_shards` dropped at the end. Training drops
the last partial batch of each shard unless `drop_last=False` (the linear
probe's training, as main_lincls: a dataset smaller than one batch still
trains); evaluation (`train=False`) keeps the dataset order, gives shard r the
samples r, r + num_shards, ... and keeps the last partial batch, so every
sample is seen exactly once.
"""
from __future__ import annotations

import abc
import ctypes
from collections.abc import Iterator

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# MoCo v3's augmentation constants (the rest are config values, `augment_params`); both backends read these.
BLUR_SIGMA = (0.1, 2.0)           # MoCo v3 / SimCLR GaussianBlur range
SOLARIZE_THRESHOLD = 128
EVAL_CROP_FRACTION = 0.875        # resize 256 -> crop 224


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def set_parent_death_signal(sig: int) -> bool:
    """Ask Linux to send `sig` to this process when the thread that started it exits (loader workers,
    ranks under a launcher); False where unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def mix_seed(*parts: int) -> int:
    """A 31-bit seed that is a pure function of `parts` (numpy SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0] >> 1)


INTERPOLATIONS = ("linear", "cubic")


def augment_params(cfg) -> dict:
    """The graph's parameters from a DataConfig (validated). `crops`: one spec per view, in output
    order: the two global crops (size image_size, scale (crop_min, 1), blur/solarize of view 1 and 2),
    then `local_crops` local ones (DINO's multi-crop); every view shares the colour parameters."""
    p = {k: getattr(cfg, k) for k in ("image_size", "crop_min", "jitter_prob", "brightness", "contrast",
                                      "saturation", "hue", "grayscale_prob", "flip_prob", "interpolation")}
    for key in ("blur_prob", "solarize_prob"):
        if len(getattr(cfg, key)) != 2:
            raise ValueError(f"data.{key} needs two values, [view1, view2], got {getattr(cfg, key)!r}")
    probs = {key: getattr(cfg, key) for key in ("jitter_prob", "grayscale_prob", "flip_prob", "local_blur_prob",
                                                 "local_solarize_prob")}
    probs.update({f"{key}[{i}]": v for key in ("blur_prob", "solarize_prob") for i, v in enumerate(getattr(cfg, key))})
    for key, v in probs.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise ValueError(f"data.{key} is a probability: it must lie in [0, 1], got {v!r}")
    blur, sol = [float(v) for v in cfg.blur_prob], [float(v) for v in cfg.solarize_prob]
    if not 0.0 < p["crop_min"] <= 1.0:
        raise ValueError(f"data.crop_min must lie in (0, 1], got {p['crop_min']}")
    if p["interpolation"] not in INTERPOLATIONS:
        raise ValueError(f"data.interpolation must be one of {', '.join(INTERPOLATIONS)}, got {p['interpolation']!r}")
    if cfg.local_crops < 0:
        raise ValueError(f"data.local_crops must be >= 0, got {cfg.local_crops}")
    local = [float(v) for v in cfg.local_scale]
    if cfg.local_crops and (len(local) != 2 or not 0.0 < local[0] <= local[1] <= 1.0 or cfg.local_size < 1):
        raise ValueError(f"data.local_scale must be [min, max] within (0, 1] and data.local_size >= 1, got "
                         f"{cfg.local_scale} and {cfg.local_size}")
    p["crops"] = [{"size": p["image_size"], "scale": [p["crop_min"], 1.0], "blur": blur[v], "solarize": sol[v]}
                  for v in (0, 1)]
    p["crops"] += [{"size": int(cfg.local_size), "scale": local, "blur": float(cfg.local_blur_prob),
                    "solarize": float(cfg.local_solarize_prob)}] * cfg.local_crops
    return p


class ShardPlan:
    """Which sample indices shard `shard_id` visits in each epoch, batch by batch."""

    def __init__(self, num_samples: int, batch_size: int, *, shard_id: int = 0, num_shards: int = 1,
                 seed: int = 0, train: bool = True, drop_last: bool | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id {shard_id} out of range for num_shards {num_shards}")
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.shard_id = int(shard_id)
        self.num_shards = int(num_shards)
        self.seed = int(seed)
        self.train = bool(train)
        self.drop_last = self.train if drop_last is None else bool(drop_last)
        if train:
            self.per_shard = self.num_samples // self.num_shards
        else:
            self.per_shard = len(range(self.shard_id, self.num_samples, self.num_shards))
        self.num_batches = (self.per_shard // self.batch_size if self.drop_last
                            else -(-self.per_shard // self.batch_size))
        if train and self.num_batches == 0:
            raise ValueError(
                f"{self.num_samples} samples over {self.num_shards} shard(s) give "
                + (f"no full batch of {self.batch_size}: use a smaller batch or more data" if self.drop_last
                   else "no sample to every shard: use fewer processes or more data"))

    def shard_indices(self, epoch: int) -> np.ndarray:
        """(per_shard,) int64 sample indices of this shard for `epoch`, in visiting order."""
        if not self.train:
            return np.arange(self.shard_id, self.num_samples, self.num_shards, dtype=np.int64)
        perm = np.random.default_rng([self.seed, int(epoch)]).permutation(self.num_samples).astype(np.int64)
        b, k, r = self.batch_size, self.num_shards, self.shard_id
        whole = self.per_shard // b   # full batches per shard
        full = whole * b * k
        blocks = perm[:full].reshape(whole, k, b)[:, r].reshape(-1)  # global batches, r-th block
        rest = self.per_shard - whole * b  # the partial batch: dropped, or kept (drop_last=False)
        tail = perm[full + r * rest: full + (r + 1) * rest]
        return np.concatenate([blocks, tail])

    def epoch_indices(self, epoch: int, start_step: int = 0) -> np.ndarray:
        """Indices still to visit in `epoch` from batch `start_step` (whole batches when training)."""
        idx = self.shard_indices(epoch)
        end = self.num_batches * self.batch_size if self.drop_last else len(idx)
        return idx[start_step * self.batch_size:end]


class DataCursor:
    """(epoch, step) of the next batch of a `ShardPlan`, and the batches from there on.

    A position is always normalised: `step` lies in [0, num_batches) when training (the end of an
    epoch is the start of the next); evaluation walks one epoch, so its end is (epoch + 1, 0) too.
    `moves` counts jumps (a `seek` elsewhere), so a backend that runs ahead (DALI) knows when to restart.
    """

    def __init__(self, plan: ShardPlan):
        self.plan = plan
        self.epoch = self.step = 0
        self.moves = 0

    def seek(self, epoch: int, step: int) -> None:
        if not 0 <= step <= self.plan.num_batches:
            raise ValueError(f"step {step} out of range for an epoch of {self.plan.num_batches} batches")
        before = (self.epoch, self.step)
        self.epoch, self.step = int(epoch), int(step)
        self._normalise()
        self.moves += (self.epoch, self.step) != before

    def advance(self) -> None:
        """The consumer took the batch at the position."""
        self.step += 1
        self._normalise()

    def _normalise(self) -> None:
        if self.step >= self.plan.num_batches:
            self.epoch, self.step = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step}

    def batches(self, across_epochs: bool | None = None) -> Iterator[tuple[int, int, np.ndarray]]:
        """(epoch, step, sample indices) from the position on, without moving it; through every later
        epoch when `across_epochs` (default: when training), else to the end of this epoch."""
        across_epochs = self.plan.train if across_epochs is None else across_epochs
        epoch, step = self.epoch, self.step
        b = self.plan.batch_size
        while True:
            idx = self.plan.epoch_indices(epoch)
            for s in range(step, self.plan.num_batches):
                yield epoch, s, idx[s * b:(s + 1) * b]
            if not across_epochs:
                return
            epoch, step = epoch + 1, 0


class TwoCropLoader(abc.ABC):
    """Interface of the DALI, torchvision and synthetic two-crop loaders: the plan of `num_samples`
    samples (or the source's own `plan`: shards.ShardOrderPlan) and its cursor, built here once for
    every backend."""

    def __init__(self, cfg, num_samples: int, *, batch_size: int, shard_id: int, num_shards: int,
                 device: torch.device | str, dtype: torch.dtype, train: bool, plan: ShardPlan | None = None):
        self.plan = plan or ShardPlan(num_samples, batch_size, shard_id=shard_id, num_shards=num_shards,
                                      seed=cfg.seed, train=train)
        self.cursor = DataCursor(self.plan)
        # What identifies the data to a resumed run (build_loader sets it from the file list; the
        # synthetic source is identified by its config).
        self.fingerprint: str | None = None
        self.cfg = cfg
        self.train = train
        self.device = torch.device(device)
        self.dtype = dtype

    # -- the interface ---------------------------------------------------------
    def __len__(self) -> int:
        return self.plan.num_batches

    @property
    def num_samples(self) -> int:
        return self.plan.num_samples

    @property
    def batch_size(self) -> int:
        return self.plan.batch_size

    @property
    def epoch(self) -> int:
        """The epoch of the next batch."""
        return self.cursor.epoch

    def set_epoch(self, epoch: int) -> None:
        self.cursor.seek(epoch, 0)

    def state_dict(self) -> dict:
        return self.cursor.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self.cursor.seek(int(sd["epoch"]), int(sd["step"]))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The rest of the cursor's epoch; the cursor moves past each batch as it is handed out."""
        epoch = self.cursor.epoch
        batches = self._batches()
        while self.cursor.epoch == epoch:
            batch = next(batches)
            self.cursor.advance()
            yield batch

    # -- what a backend provides -----------------------------------------------
    @abc.abstractmethod
    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The batches of `self.cursor.batches()`, in order (the caller moves the cursor)."""
