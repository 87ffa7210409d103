"""Synthetic two-crop source: no files, deterministic, made on the target device.

Sample i of class i % NUM_CLASSES is a smooth random image (an 8x8 pattern
of its class plus one of its own, upsampled to S x S); each view adds its
own noise drawn per (seed, epoch, i, view). Values are already
normalised-looking (about zero mean, unit variance). Everything is integer
hashing of (seed, epoch, index, view, pixel) followed by fixed float ops, so
a batch is a pure function of its indices: bit-identical on resume. Used by
CPU training tests and the model bench.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import ShardPlan, TwoCropLoader, augment_params, mix_seed

NUM_CLASSES = 10
PATTERN = 8               # side of the low-resolution patterns
NOISE = 0.25              # per-view noise, relative to the image's unit variance
_M32 = 0xFFFFFFFF
_HASH_MUL = 0x45D9F3B     # < 2**27: products of 32-bit values stay inside int64


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer on int64 tensors (values in [0, 2**32))."""
    x = x & _M32
    x = (((x >> 16) ^ x) * _HASH_MUL) & _M32
    x = (((x >> 16) ^ x) * _HASH_MUL) & _M32
    return (x >> 16) ^ x


def _unit_noise(keys: torch.Tensor, n: int) -> torch.Tensor:
    """(len(keys), n) float32 with zero mean and unit variance, a pure function of the keys."""
    pos = torch.arange(n, device=keys.device, dtype=torch.int64)
    bits = _hash32(_hash32(keys)[:, None] + pos[None, :] * 0x9E3779B1)
    u = (bits >> 8).to(torch.float32) * (1.0 / (1 << 24))          # [0, 1)
    return (u - 0.5) * 3.4641016151377544                              # * sqrt(12)


def _key(indices: torch.Tensor, *parts: int) -> torch.Tensor:
    """int64 keys, a pure function of (parts, index): the int parts hashed once on the host."""
    return _hash32(indices ^ mix_seed(*parts))


def synthetic_batch(indices: torch.Tensor, *, seed: int, epoch: int, image_size: int, train: bool = True,
                    sizes: list[int] | None = None) -> tuple[torch.Tensor, ...]:
    """Views (B, 3, S_v, S_v) float32, one per entry of `sizes` (default two of image_size; evaluation:
    two, the same image), and labels (B,) int64 for sample `indices` (int64, any device)."""
    b = indices.numel()
    labels = indices % NUM_CLASSES
    low = 3 * PATTERN * PATTERN
    cls = _unit_noise(_key(labels, seed, 1), low)
    own = _unit_noise(_key(indices, seed, 2), low)
    pattern = ((cls + own) * 0.7071067811865476).view(b, 3, PATTERN, PATTERN)

    def at(size):
        return F.interpolate(pattern, size=(size, size), mode="bilinear", align_corners=False)

    if not train:
        base = at(image_size)
        return base, base.clone(), labels
    views = []
    for view, size in enumerate(sizes or (image_size, image_size)):
        base = at(size)
        views.append(base + NOISE * _unit_noise(_key(indices, seed, 3, epoch, view), base[0].numel()).view_as(base))
    return (*views, labels)


class SyntheticTwoCropLoader(TwoCropLoader):
    """`TwoCropLoader` over `cfg.synthetic_size` synthetic samples, made on `device`."""

    def __init__(self, cfg, *, batch_size: int, shard_id: int = 0, num_shards: int = 1,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, train: bool = True,
                 drop_last: bool | None = None):
        super().__init__(cfg, cfg.synthetic_size, batch_size=batch_size, shard_id=shard_id, num_shards=num_shards,
                         device=device, dtype=dtype, train=train,
                         plan=ShardPlan(cfg.synthetic_size, batch_size, shard_id=shard_id, num_shards=num_shards,
                                        seed=cfg.seed, train=train, drop_last=drop_last))
        self.sizes = [c["size"] for c in augment_params(cfg)["crops"]]

    def _batches(self):
        for epoch, _, idx in self.cursor.batches():
            *views, labels = synthetic_batch(torch.from_numpy(idx).to(self.device), seed=self.cfg.seed,
                                             epoch=epoch, image_size=self.cfg.image_size, train=self.train,
                                             sizes=self.sizes)
            yield (*(v.to(self.dtype) for v in views), labels)
