"""The torchvision/PIL fallback: MoCo v3's official augmentations with the same interface.

The transforms follow moco-v3's main_moco.py (PIL images throughout):
RandomResizedCrop (bilinear), RandomApply(ColorJitter) with the four
adjustments in random order, RandomGrayscale, RandomApply(PIL
GaussianBlur(radius=sigma)), RandomApply(ImageOps.solarize(128)),
RandomHorizontalFlip, ToTensor, Normalize.

Unlike torchvision's transforms, every random draw comes from a
`torch.Generator` seeded with mix_seed(seed, epoch, sample index, view), so a
sample's views are a pure function of (seed, epoch, index): a resumed run
yields bit-identical batches to the uninterrupted one, whatever the number
of workers.
"""
from __future__ import annotations

import io
import math
import signal

import torch
import torch.utils.data
from PIL import Image, ImageFilter, ImageOps
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from .base import (BLUR_SIGMA, EVAL_CROP_FRACTION, IMAGENET_MEAN, IMAGENET_STD, SOLARIZE_THRESHOLD, DataCursor,
                   TwoCropLoader, augment_params, mix_seed, set_parent_death_signal)
from .folder import sample_source


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _coin(g: torch.Generator, p: float) -> bool:
    return float(torch.rand((), generator=g)) < p


def crop_window(height: int, width: int, scale: tuple[float, float], g: torch.Generator,
                ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params, drawing from `g`: (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(g, scale[0], scale[1])
        aspect = math.exp(_uniform(g, *log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=g))
            left = int(torch.randint(0, width - w + 1, (), generator=g))
            return top, left, h, w
    in_ratio = width / height   # fallback: centre crop with the ratio clamped
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


INTERPOLATION = {"linear": InterpolationMode.BILINEAR, "cubic": InterpolationMode.BICUBIC}


def augment(img: Image.Image, aug: dict, spec: dict, g: torch.Generator) -> torch.Tensor:
    """One view of crop `spec` (augment_params' crops: size, scale, blur, solarize) of a PIL RGB image:
    (3, S, S) float32, normalised."""
    size = spec["size"]
    top, left, h, w = crop_window(img.height, img.width, tuple(spec["scale"]), g)
    img = TF.resized_crop(img, top, left, h, w, [size, size], INTERPOLATION[aug["interpolation"]])
    if _coin(g, aug["jitter_prob"]):
        b = _uniform(g, max(0.0, 1 - aug["brightness"]), 1 + aug["brightness"])
        c = _uniform(g, max(0.0, 1 - aug["contrast"]), 1 + aug["contrast"])
        s = _uniform(g, max(0.0, 1 - aug["saturation"]), 1 + aug["saturation"])
        hue = _uniform(g, -aug["hue"], aug["hue"])
        for op in torch.randperm(4, generator=g).tolist():   # torchvision's random order
            if op == 0:
                img = TF.adjust_brightness(img, b)
            elif op == 1:
                img = TF.adjust_contrast(img, c)
            elif op == 2:
                img = TF.adjust_saturation(img, s)
            else:
                img = TF.adjust_hue(img, hue)
    if _coin(g, aug["grayscale_prob"]):
        img = TF.to_grayscale(img, num_output_channels=3)
    if _coin(g, spec["blur"]):
        img = img.filter(ImageFilter.GaussianBlur(radius=_uniform(g, *BLUR_SIGMA)))
    if _coin(g, spec["solarize"]):
        img = ImageOps.solarize(img, SOLARIZE_THRESHOLD)
    if _coin(g, aug["flip_prob"]):
        img = TF.hflip(img)
    return TF.normalize(TF.to_tensor(img), IMAGENET_MEAN, IMAGENET_STD)


def eval_view(img: Image.Image, size: int) -> torch.Tensor:
    img = TF.resize(img, int(round(size / EVAL_CROP_FRACTION)), InterpolationMode.BILINEAR)
    img = TF.center_crop(img, [size, size])
    return TF.normalize(TF.to_tensor(img), IMAGENET_MEAN, IMAGENET_STD)


class TwoCropDataset(torch.utils.data.Dataset):
    """Item (epoch, index) -> (*views, label) (one view per crop spec); the epoch travels with the index
    so that (persistent) workers need no state."""

    def __init__(self, samples, aug: dict, seed: int, train: bool = True, max_bad_fraction: float = 1.0):
        # (path, label) list or a sample source (folder.FileSamples with its read timeout, shards)
        self.source, self.aug, self.seed, self.train = sample_source(samples, threads=1), aug, seed, train
        self.bad = self.source.bad_samples(max_bad_fraction)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        img, index, label = self._load(index)
        if not self.train:
            v = eval_view(img, self.aug["image_size"])
            return v, v, label
        views = []
        for view, spec in enumerate(self.aug["crops"]):
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, index, view))
            views.append(augment(img, self.aug, spec, g))
        return (*views, label)

    def _load(self, index: int) -> tuple[Image.Image, int, int]:
        """(RGB image, index, label) of sample `index`, or of its stand-in when it cannot be read or
        decoded (damaged, deleted since the scan, in a truncated shard); see folder.BadSamples."""
        while True:
            index = self.bad.replacement(index)
            (data, label), = self.source.read_batch([index])
            if isinstance(data, OSError):
                self.bad.mark(index, f"unreadable ({data.strerror or data})")
                continue
            try:
                with Image.open(io.BytesIO(data)) as f:
                    return f.convert("RGB"), index, label
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                self.bad.mark(index, f"does not decode ({type(e).__name__}: {e})")


def _worker_init(worker_id: int) -> None:
    """A worker dies with the process that started it, even one killed by SIGKILL: torch's own check
    (is the parent still there?) runs only between batches, not in a read that never returns.
    (Linux sends the signal when the thread that forked the worker ends: iterate the loader in the
    thread that lives as long as the iteration, as the Trainer does in the main thread.)"""
    set_parent_death_signal(signal.SIGKILL)


class _BatchSampler:
    """Batches of (epoch, index) from the loader's cursor to the end of the cursor's epoch."""

    def __init__(self, cursor: DataCursor):
        self.cursor = cursor

    def __iter__(self):
        start = self.cursor.epoch
        for epoch, _, idx in self.cursor.batches():
            if epoch != start:
                return
            yield [(epoch, int(j)) for j in idx]

    def __len__(self) -> int:
        return self.cursor.plan.num_batches


class TorchvisionTwoCropLoader(TwoCropLoader):
    """`TwoCropLoader` on a torch DataLoader with `num_workers` worker processes."""

    def __init__(self, samples, cfg, *, batch_size: int, shard_id: int = 0,
                 num_shards: int = 1, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 train: bool = True, drop_last: bool | None = None, num_workers: int | None = None):
        # (path, label) list, or shards.ShardSamples; one read thread per worker process
        self.source = source = sample_source(samples, cfg.read_timeout, threads=1)
        super().__init__(cfg, len(source), batch_size=batch_size, shard_id=shard_id, num_shards=num_shards,
                         device=device, dtype=dtype, train=train,
                         plan=source.plan(batch_size, shard_id=shard_id, num_shards=num_shards, seed=cfg.seed,
                                          train=train, drop_last=drop_last))
        workers = cfg.num_threads if num_workers is None else num_workers
        self.dataset = TwoCropDataset(source, augment_params(cfg), cfg.seed, train, cfg.max_bad_fraction)
        pin = self.device.type == "cuda"
        # Workers are forked per iteration (cheap next to an epoch): persistent ones
        # were seen to stall interpreter shutdown / garbage collection for 5 s each.
        self.dataloader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=_BatchSampler(self.cursor), num_workers=workers, pin_memory=pin,
            persistent_workers=False, prefetch_factor=4 if workers > 0 else None, worker_init_fn=_worker_init)

    def _batches(self):
        for *views, labels in self.dataloader:
            yield (*(v.to(self.device, self.dtype, non_blocking=True) for v in views),
                   labels.to(self.device, torch.int64, non_blocking=True))
