"""Two-crop input pipelines of fastmoco (installed as `fastmoco.pipelines`).

    loader = build_loader(cfg.data, batch_size=256, shard_id=rank, num_shards=world,
                          device="cuda", dtype=torch.bfloat16)
    steps_per_epoch = len(loader)
    loader.load_state_dict(saved)        # resuming: what loader.state_dict() gave
    while loader.epoch < epochs:
        for view1, view2, labels in loader:   # the rest of the loader's epoch
            ...

Backends: DALI (default; GPU decode and augmentation, or its CPU twin when
`device` is the CPU), torchvision/PIL (fallback, also used when DALI cannot
be imported), synthetic (`cfg.source == "synthetic"`, no files). Sources: an
ImageFolder or file list (`"folder"`), tar shards (`"shards"`, pipelines/shards.py).
"""
from __future__ import annotations

import warnings

import torch

from .base import IMAGENET_MEAN, IMAGENET_STD, DataCursor, ShardPlan, TwoCropLoader, augment_params, mix_seed
from .folder import (CHECK_CACHE, BadImageWarning, DatasetError, check_image_file, dataset_fingerprint,
                     scan_image_folder)
from .synthetic import SyntheticTwoCropLoader

__all__ = [
    "CHECK_CACHE", "IMAGENET_MEAN", "IMAGENET_STD", "BadImageWarning", "DataCursor", "DatasetError", "ShardPlan", "SyntheticTwoCropLoader",
    "TwoCropLoader", "augment_params", "build_loader", "check_image_file", "dataset_fingerprint", "mix_seed",
    "scan_image_folder",
]


def build_loader(cfg, *, batch_size: int, shard_id: int = 0, num_shards: int = 1,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 train: bool = True, drop_last: bool | None = None) -> TwoCropLoader:
    """The two-crop loader `cfg` (a DataConfig) asks for; see the module docstring. `drop_last`
    (default: `train`): whether a shard's last partial batch is left out (ShardPlan)."""
    if cfg.source == "synthetic":
        return SyntheticTwoCropLoader(cfg, batch_size=batch_size, shard_id=shard_id, num_shards=num_shards,
                                      device=device, dtype=dtype, train=train, drop_last=drop_last)
    if cfg.source not in ("folder", "shards"):
        raise ValueError(f"data.source must be 'folder', 'shards' or 'synthetic', got {cfg.source!r}")
    if cfg.backend not in ("dali", "torchvision"):
        raise ValueError(f"data.backend must be 'dali' or 'torchvision', got {cfg.backend!r}")
    if cfg.source == "shards":
        from .shards import ShardSamples

        samples = ShardSamples(cfg.path, verify=cfg.verify_images, max_bad_fraction=cfg.max_bad_fraction,
                               shuffle_buffer=cfg.shuffle_buffer)
    else:
        samples = scan_image_folder(cfg.path, cfg.file_list, max_bad_fraction=cfg.max_bad_fraction,
                                    verify=cfg.verify_images, shard_id=shard_id, num_shards=num_shards)
    kwargs = dict(batch_size=batch_size, shard_id=shard_id, num_shards=num_shards, device=device,
                  dtype=dtype, train=train, drop_last=drop_last)
    loader = None
    if cfg.backend == "dali":
        from .dali import HAS_DALI, DaliTwoCropLoader

        if HAS_DALI:
            loader = DaliTwoCropLoader(samples, cfg, **kwargs)
        else:
            warnings.warn("data.backend is 'dali' but nvidia-dali cannot be imported: "
                          "using the torchvision loader (much slower)", RuntimeWarning, stacklevel=2)
    if loader is None:
        from .torchvision_loader import TorchvisionTwoCropLoader

        loader = TorchvisionTwoCropLoader(samples, cfg, **kwargs)
    loader.fingerprint = dataset_fingerprint(samples, cfg.path)
    return loader
