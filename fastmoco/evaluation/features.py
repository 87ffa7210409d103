"""Class-token features of a frozen backbone over a labelled image split, on every rank at once.

    split = LabelledSplit.scan("val", "/data/imagenet/val", classes=train_split.classes)
    feats, labels = extract_features(backbone, split.loader(...), bf16=True)   # (N, C) fp32, (N,)

The images go through the evaluation transform of the training pipeline
(resize the shorter side to S / 0.875, centre crop S, normalise: DALI on the
GPU, its CPU twin on the CPU, or the torchvision fallback). Rank r extracts
samples r, r + world, ... (`ShardPlan(train=False)`), the forward runs in bf16
where asked, features are kept in fp32, and the shards are gathered so every
rank ends with all N features in dataset order.

Labels: an ImageFolder split's labels are indices into its own sorted class
folders; a split evaluated against another (val against train) is relabelled
to the other's class indices by name, and a class that the other lacks is an
error naming it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from fastmoco.distributed import get_rank, get_world_size


class EvalDataError(ValueError):
    """An evaluation split that cannot be used; the message names the folder and the class."""


def class_folders(root: str | os.PathLike) -> list[str]:
    """The class names of an ImageFolder root, in label order (torchvision's rule)."""
    from fastmoco.pipelines.folder import list_classes

    return list_classes(root)


@dataclass
class LabelledSplit:
    """A labelled image split: its folder (or file list) and its class names in label order
    (None for a file list: labels are used as written)."""
    name: str
    path: str
    file_list: str = ""
    classes: list[str] | None = None
    relabel: torch.Tensor | None = None    # own label -> label of the reference split
    source: str = "folder"                 # or "shards": a manifest or folder of tar shards

    @classmethod
    def scan(cls, name: str, path: str, file_list: str = "", reference: "LabelledSplit | None" = None):
        if not path:
            raise EvalDataError(f"{name} split: no folder given")
        from fastmoco.pipelines.shards import is_shard_set, manifest_classes

        shards = is_shard_set(path)   # tar shards (fastmoco-make-shards): classes from their manifest
        if not shards and not Path(path).is_dir():
            fix = f": set {name} in the config or on the command line (--{name} DIR)" if "." in name else ""
            raise EvalDataError(f"{name} split: folder {path!r} does not exist or is not a directory{fix}")
        split = cls(name, str(path), file_list, source="shards" if shards else "folder")
        if shards:
            split.classes = manifest_classes(path)
        elif not file_list:
            split.classes = class_folders(path)
            if not split.classes:
                raise EvalDataError(f"{name} split: {path!r} has no class folders (expected root/<class>/<image>)")
        if reference is not None and split.classes is not None and reference.classes is not None:
            known = {c: i for i, c in enumerate(reference.classes)}
            unknown = [c for c in split.classes if c not in known]
            if unknown:
                raise EvalDataError(f"{name} split {path!r}: class {unknown[0]!r} is not in the "
                                    f"{reference.name} split {reference.path!r}"
                                    + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
            split.relabel = torch.tensor([known[c] for c in split.classes], dtype=torch.int64)
        return split

    @property
    def num_classes(self) -> int | None:
        return len(self.classes) if self.classes is not None else None

    def loader(self, data_cfg, *, batch_size: int, image_size: int, device, dtype, train: bool = False,
               drop_last: bool | None = None):
        """The split through the training pipeline's evaluation transform (or, `train=True`, its
        augmentation as set in `data_cfg`, shuffled each epoch), sharded over the ranks; `drop_last`
        as in ShardPlan (default: `train`)."""
        from fastmoco.pipelines import build_loader

        cfg = replace(data_cfg, source=self.source, path=self.path, file_list=self.file_list, image_size=image_size)
        return build_loader(cfg, batch_size=batch_size, shard_id=get_rank(), num_shards=get_world_size(),
                            device=device, dtype=dtype, train=train, drop_last=drop_last)

    def labels_of(self, labels: torch.Tensor) -> torch.Tensor:
        return labels if self.relabel is None else self.relabel.to(labels.device)[labels]


def eval_batches(loader) -> int:
    """Batches of the largest shard: every rank runs this many forwards (ZeRO-3 gathers parameters
    in each forward, so ranks must make the same calls)."""
    plan = loader.plan
    per_shard = -(-plan.num_samples // plan.num_shards)
    return -(-per_shard // plan.batch_size)


@torch.no_grad()
def extract_features(backbone: torch.nn.Module, loader, *, image_size: int,
                     split: LabelledSplit | None = None, bf16: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C) fp32 class-token features and (N,) int64 labels of the loader's whole split, in dataset
    order, on every rank. `backbone(x, head=False)` gives the class token (fastmoco's ViT)."""
    was_training = backbone.training
    backbone.eval()
    device = loader.device
    feats, labels = [], []
    loader.set_epoch(0)
    batches = iter(loader)
    try:
        for _ in range(eval_batches(loader)):
            batch = next(batches, None)
            x = batch[0] if batch is not None else None
            if x is None:  # this shard is done: a dummy forward keeps ZeRO-3's collectives in step
                x = torch.zeros(1, 3, image_size, image_size, device=device, dtype=loader.dtype)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda"):
                out = backbone(x, head=False)
            if batch is not None:
                feats.append(out.float())
                labels.append(batch[-1].to(device))
    finally:
        backbone.train(was_training)
    width = backbone.embed_dim
    f = torch.cat(feats) if feats else torch.zeros(0, width, device=device)
    y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64, device=device)
    if split is not None:
        y = split.labels_of(y)
    return gather_shards(f, loader.plan.num_samples), gather_shards(y, loader.plan.num_samples)


def gather_shards(t: torch.Tensor, n: int) -> torch.Tensor:
    """Rank r's rows are samples r, r + world, ...: all ranks' rows back in sample order, (n, ...)."""
    world = get_world_size()
    if world == 1:
        return t
    rows = -(-n // world)
    padded = torch.zeros(rows, *t.shape[1:], dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.stack(parts, 1).reshape(rows * world, *t.shape[1:])[:n]  # row j*world + r = rank r's j-th
