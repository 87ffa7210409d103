"""The kNN monitor of a pretraining run (config section `eval`).

    monitor = KnnMonitor.from_config(cfg, device=..., dtype=...)   # checks the folders up front
    result = monitor.evaluate(model.base_encoder)                  # {k: (top-1, top-5)}, seconds

At the configured epochs (and at the start and the end where asked) the
chosen encoder's backbone (online by default, as MoCo v3 evaluates; or the
momentum encoder) extracts class-token features of the labelled train and val
folders through the evaluation transform, and a weighted kNN classifies val
against train (fastmoco.evaluation.knn). The training is not disturbed: the
loaders are the monitor's own (the training loader's position is untouched),
the RNG states of python, numpy and torch (CPU and CUDA) are restored
afterwards, and the backbone's train/eval mode is put back, so a run with the
monitor has the same losses as one without.
"""
from __future__ import annotations

import random
import time
from dataclasses import replace

import numpy as np
import torch

from fastmoco.config import ConfigError
from fastmoco.evaluation.features import LabelledSplit, extract_features
from fastmoco.evaluation.knn import knn_accuracy
from fastmoco.evaluation.weights import ENCODERS
from fastmoco.methods import get_method


class _KeepRng:
    """Save every RNG the training draws from, restore it on exit."""

    def __enter__(self):
        self.state = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
                      torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)

    def __exit__(self, *exc):
        py, npy, cpu, cuda = self.state
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


class KnnMonitor:
    def __init__(self, train: LabelledSplit, val: LabelledSplit, *, data_cfg, image_size: int, batch_size: int,
                 device, dtype, ks, temperature: float, encoder: str, bf16: bool, every_epochs: int = 0,
                 at_start: bool = False):
        self.train_split, self.val_split = train, val
        self.every_epochs, self.at_start = every_epochs, at_start
        self.ks, self.temperature, self.encoder, self.bf16 = list(ks), temperature, encoder, bf16
        self.image_size = image_size
        kwargs = dict(batch_size=batch_size, image_size=image_size, device=device, dtype=dtype)
        self.train_loader = train.loader(data_cfg, **kwargs)
        self.val_loader = val.loader(data_cfg, **kwargs)

    @classmethod
    def from_config(cls, cfg, *, micro_batch: int, device, dtype, bf16: bool) -> "KnnMonitor | None":
        """The monitor `cfg.eval` asks for (None when its train_path is empty); every key checked."""
        e = cfg.eval
        if not e.train_path:
            if e.val_path:
                raise ConfigError("eval.val_path is set but eval.train_path is empty: the kNN needs both")
            return None
        if not e.val_path:
            raise ConfigError("eval.train_path is set but eval.val_path is empty: the kNN needs both")
        if e.encoder not in ("", *ENCODERS):
            raise ConfigError(f"eval.encoder must be one of {', '.join(ENCODERS)} (or '': the method's), "
                              f"got {e.encoder!r}")
        if e.every_epochs < 0:
            raise ConfigError(f"eval.every_epochs must be >= 0, got {e.every_epochs}")
        if not e.k or any(not isinstance(k, int) or k < 1 for k in e.k):
            raise ConfigError(f"eval.k must be a list of integers >= 1, got {e.k!r}")
        if e.temperature <= 0:
            raise ConfigError(f"eval.temperature must be > 0, got {e.temperature}")
        if e.batch_size < 0:
            raise ConfigError(f"eval.batch_size must be >= 0, got {e.batch_size}")
        if e.backend not in ("", "dali", "torchvision"):
            raise ConfigError(f"eval.backend must be '', 'dali' or 'torchvision', got {e.backend!r}")
        try:
            train = LabelledSplit.scan("eval.train_path", e.train_path, e.train_list)
            val = LabelledSplit.scan("eval.val_path", e.val_path, e.val_list, reference=train)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        data_cfg = replace(cfg.data, backend=e.backend or cfg.data.backend)
        return cls(train, val, data_cfg=data_cfg, image_size=cfg.model.img_size,
                   batch_size=e.batch_size or micro_batch, device=device, dtype=dtype, ks=e.k,
                   temperature=e.temperature, encoder=e.encoder or get_method(cfg).default_encoder, bf16=bf16,
                   every_epochs=e.every_epochs,
                   at_start=e.at_start)

    def due(self, epoch: int) -> bool:
        """After `epoch` completed epochs, is an evaluation due (besides the one at the end)?"""
        return self.every_epochs > 0 and epoch > 0 and epoch % self.every_epochs == 0

    def backbone_of(self, model) -> torch.nn.Module:
        """The evaluated backbone: `online_backbone` / `momentum_backbone` of the method's module."""
        return getattr(model, f"{self.encoder}_backbone")

    @torch.no_grad()
    def evaluate(self, model) -> tuple[dict[int, tuple[float, float]], float]:
        """({k: (top-1 %, top-5 %)}, seconds) of the chosen encoder of `model` (a MoCo). Collective."""
        t0 = time.perf_counter()
        backbone = self.backbone_of(model)
        with _KeepRng():
            bank, bank_labels = extract_features(backbone, self.train_loader, image_size=self.image_size,
                                                 split=self.train_split, bf16=self.bf16)
            queries, query_labels = extract_features(backbone, self.val_loader, image_size=self.image_size,
                                                     split=self.val_split, bf16=self.bf16)
            classes = self.train_split.num_classes
            result = knn_accuracy(bank, bank_labels, queries, query_labels, ks=self.ks,
                                  temperature=self.temperature, num_classes=classes)
        return result, time.perf_counter() - t0
