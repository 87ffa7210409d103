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

What it shows, besides the accuracy: at each evaluation a few fixed val
images (QUERIES, spread over the split) get their NEIGHBOURS nearest train
images (cosine similarity of the features the kNN just used) and, for a ViT,
the class-token attention maps of the last block (fastmoco.evaluation.attention).
Rank 0 writes them to `<out_dir>/eval/step_<N>/` (retrievals.json,
attention_<i>.png; staged and renamed into place) and logs the first image's
attention figure to TensorBoard (`eval/attention`). At the end of the run
`write_report` writes the run's HTML report (fastmoco.evaluation.report).
"""
from __future__ import annotations

import io
import json
import random
import shutil
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from fastmoco.config import ConfigError
from fastmoco.distributed import get_rank
from fastmoco.evaluation.features import LabelledSplit, extract_features
from fastmoco.evaluation.knn import knn_accuracy, topk_similarities
from fastmoco.evaluation.weights import ENCODERS
from fastmoco.methods import get_method

QUERIES = 4           # fixed val images shown at each evaluation (neighbours, attention maps)
NEIGHBOURS = 5        # nearest train images shown per query
EVAL_DIR = "eval"     # under the run's out_dir: one folder per evaluation
RETRIEVALS = "retrievals.json"


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


def _encoded(source, i: int) -> io.BytesIO:
    """Sample i of a loader's source (a file or a tar shard's member) as an image file in memory."""
    data = io.BytesIO(source.read(i)[0].tobytes())
    data.name = source.name(i)
    return data


class KnnMonitor:
    def __init__(self, train: LabelledSplit, val: LabelledSplit, *, data_cfg, image_size: int, batch_size: int,
                 device, dtype, ks, temperature: float, encoder: str, bf16: bool, every_epochs: int = 0,
                 at_start: bool = False, out_dir: str | Path | None = None):
        self.train_split, self.val_split = train, val
        self.every_epochs, self.at_start = every_epochs, at_start
        self.ks, self.temperature, self.encoder, self.bf16 = list(ks), temperature, encoder, bf16
        self.image_size = image_size
        kwargs = dict(batch_size=batch_size, image_size=image_size, device=device, dtype=dtype)
        self.train_loader = train.loader(data_cfg, **kwargs)
        self.val_loader = val.loader(data_cfg, **kwargs)
        self.eval_dir = Path(out_dir) / EVAL_DIR if out_dir else None
        n = self.val_loader.plan.num_samples
        self.queries = np.unique(np.linspace(0, n - 1, min(QUERIES, n)).round().astype(np.int64))

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
                   every_epochs=e.every_epochs, at_start=e.at_start, out_dir=cfg.logging.out_dir)

    def due(self, epoch: int) -> bool:
        """After `epoch` completed epochs, is an evaluation due (besides the one at the end)?"""
        return self.every_epochs > 0 and epoch > 0 and epoch % self.every_epochs == 0

    def backbone_of(self, model) -> torch.nn.Module:
        """The evaluated backbone: `online_backbone` / `momentum_backbone` of the method's module."""
        return getattr(model, f"{self.encoder}_backbone")

    @torch.no_grad()
    def evaluate(self, model, step: int | None = None, tb=None) -> tuple[dict[int, tuple[float, float]], float]:
        """({k: (top-1 %, top-5 %)}, seconds) of the chosen encoder of `model` (a MoCo). Collective.
        With `step`, rank 0 also records the queries' neighbours and attention maps (see the module
        docstring) and logs the first attention figure to `tb` (a SummaryWriter) when given."""
        from fastmoco.models.vit import VisionTransformer

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
            shown = step is not None and (self.eval_dir is not None or tb is not None)
            pictures = maps = None
            if shown and isinstance(backbone, VisionTransformer):  # every rank: a forward (ZeRO-3 gathers)
                from fastmoco.evaluation.attention import AttentionError, attention_of_files
                try:  # the same files on every rank: all fail alike, the collectives stay in step
                    pictures, maps = attention_of_files(backbone, [_encoded(self.val_loader.source, i)
                                                                   for i in self.queries],
                                                        size=self.image_size, device=self.val_loader.device,
                                                        dtype=self.val_loader.dtype, bf16=self.bf16)
                except AttentionError as e:  # a picture must not stop the training
                    warnings.warn(f"kNN monitor: no attention maps at step {step}: {e}", RuntimeWarning,
                                  stacklevel=2)
        if shown and get_rank() == 0:
            self._show(step, tb, self._retrievals(bank, bank_labels, queries, query_labels), pictures, maps)
        return result, time.perf_counter() - t0

    def _retrievals(self, bank, bank_labels, queries, query_labels) -> list[dict]:
        """The fixed queries, each with its NEIGHBOURS nearest train images (cosine similarity)."""
        import torch.nn.functional as F

        q = F.normalize(queries[torch.as_tensor(self.queries, device=queries.device)].float(), dim=1)
        sims, idx = topk_similarities(q, F.normalize(bank.float(), dim=1), NEIGHBOURS)
        names = self.train_split.classes

        def item(path, label, **extra):
            label = int(label)
            return {"path": path, "label": label, "class": names[label] if names else str(label), **extra}

        val, train = self.val_loader.source, self.train_loader.source
        return [item(val.name(i), query_labels[i],
                     neighbours=[item(train.name(j), bank_labels[j], similarity=round(float(s), 4))
                                 for s, j in zip(sims[row].tolist(), idx[row].tolist())])
                for row, i in enumerate(self.queries.tolist())]

    def _show(self, step: int, tb, retrievals: list[dict], pictures, maps) -> None:
        """Rank 0: `<eval_dir>/step_<N>/` (staged, then renamed into place) and the TensorBoard image."""
        from fastmoco.checkpoint import _replace_dir, tag_for
        from fastmoco.evaluation.attention import render, write_png
        from fastmoco.evaluation.figures import png_bytes, rgb_array

        figures = []
        for i, (query, picture) in enumerate(zip(retrievals, pictures or [])):
            title = f"{Path(query['path']).name} ({query['class']}), {self.encoder} encoder, step {step}"
            figures.append(render(picture, maps[i], title=title))
            query["attention"] = f"attention_{i}.png"
        if tb is not None and figures:
            tb.add_image("eval/attention", rgb_array(figures[0]), step, dataformats="HWC")
        if self.eval_dir is None:
            return
        final = self.eval_dir / tag_for(step)
        staged = self.eval_dir / f".{final.name}.tmp"
        record = {"step": step, "encoder": self.encoder, "train_path": self.train_split.path,
                  "val_path": self.val_split.path, "image_size": self.image_size, "queries": retrievals}
        try:
            shutil.rmtree(staged, ignore_errors=True)
            staged.mkdir(parents=True)
            for i, fig in enumerate(figures):
                write_png(staged / f"attention_{i}.png", png_bytes(fig))
            (staged / RETRIEVALS).write_text(json.dumps(record, indent=1))
            _replace_dir(staged, final, self.eval_dir / ".trash")
        except OSError as e:  # a full disk: the checkpoints matter more than these pictures
            shutil.rmtree(staged, ignore_errors=True)
            warnings.warn(f"kNN monitor: could not write {final} ({e}); the training goes on", RuntimeWarning,
                          stacklevel=2)

    def write_report(self, out_dir: str | Path) -> str:
        """Rank 0: the run's HTML report (fastmoco.evaluation.report); the line saying where it is
        ("" on other ranks). Called once, at the end of the run."""
        if get_rank() != 0:
            return ""
        from fastmoco.evaluation.report import write_report
        try:
            return f"report: {write_report(out_dir)}"
        except (OSError, ValueError) as e:  # the training is done and saved: say so, do not fail the run
            return f"report: not written ({type(e).__name__}: {e})"
