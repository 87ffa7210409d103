"""Command-line evaluation: `fastmoco-knn`, `fastmoco-linear`, `fastmoco-export`.

    fastmoco-knn    --checkpoint runs/vit_b --train /data/imagenet/train --val /data/imagenet/val
    fastmoco-linear --checkpoint runs/vit_b --train ... --val ... [--epochs 90] [--fast]
    fastmoco-export --checkpoint runs/vit_b --out vit_b.safetensors      # + vit_b.moco_v3.pth.tar
    torchrun --nproc_per_node 8 -m fastmoco.evaluation.cli knn ...       # every rank extracts a shard

--checkpoint takes a fastmoco checkpoint (a step_* directory, a run's out_dir
or its checkpoints/ folder: the newest one whose files are all there, as
--resume takes it), an official MoCo v3 checkpoint (.pth.tar) or an exported
backbone (.safetensors); every file is read as weights only. Errors (a missing
folder, a class of val absent from train, weights of another architecture, a
damaged or refused file) are one line naming the file and the key; exit status 2.
fastmoco-export writes nothing unless the backbone loads, refuses to replace an
existing file unless --force, and prints one line of Python that loads the result.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch

from fastmoco import quiet
from fastmoco.config import DataConfig
from fastmoco.distributed import get_rank, get_world_size, process_entry


def _setup_distributed() -> torch.device:
    """One process, or torchrun's ranks (nccl on GPUs, gloo on CPUs); the device of this rank."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


def _common(p: argparse.ArgumentParser, train_required: bool = True) -> None:
    p.add_argument("--checkpoint", required=True, help="fastmoco checkpoint/run dir, official .pth.tar, "
                                                       "or .safetensors backbone")
    p.add_argument("--train", required=train_required, help="labelled ImageFolder or tar shard set (train split)")
    p.add_argument("--val", required=train_required, help="labelled ImageFolder or tar shard set (val split)")
    p.add_argument("--train-list", default="", help="optional file list for --train")
    p.add_argument("--val-list", default="", help="optional file list for --val")
    p.add_argument("--encoder", default="", choices=("online", "momentum"),
                   help="which encoder's backbone; default: the method's (MoCo v3: online, DINO: the teacher)")
    p.add_argument("--batch-size", type=int, default=256, help="per process")
    p.add_argument("--image-size", type=int, default=0, help="default: the checkpoint's")
    p.add_argument("--backend", default="dali", choices=("dali", "torchvision"))
    p.add_argument("--num-threads", type=int, default=8)
    p.add_argument("--json", default="", help="also write the result to this JSON file")
    quiet.add_flag(p)


def _backbone_and_splits(args, device):
    from fastmoco.evaluation.features import LabelledSplit
    from fastmoco.evaluation.weights import build_backbone, default_encoder, load_weights

    train = LabelledSplit.scan("--train", args.train, args.train_list)
    val = LabelledSplit.scan("--val", args.val, args.val_list, reference=train)
    sd, info = load_weights(args.checkpoint)
    args.encoder = args.encoder or default_encoder(info)
    backbone = build_backbone(info, sd, args.encoder).to(device)
    size = args.image_size or info.img_size
    data = DataConfig(backend=args.backend, num_threads=args.num_threads, image_size=size)
    return backbone, train, val, data, size, info


def _extract_both(backbone, train, val, data, *, size: int, batch: int, device) -> list:
    """[(features, labels) of train, of val]: the evaluation transform, bf16 forward on a GPU."""
    from fastmoco.evaluation.features import extract_features

    bf16 = device.type == "cuda"
    kw = dict(batch_size=batch, image_size=size, device=device, dtype=torch.bfloat16 if bf16 else torch.float32)
    return [extract_features(backbone, split.loader(data, **kw), image_size=size, split=split, bf16=bf16)
            for split in (train, val)]


def _num_classes(train, labels: torch.Tensor) -> int:
    return train.num_classes or int(labels.max()) + 1


def _write_json(path: str, result: dict) -> None:
    if path and get_rank() == 0:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, path)


@process_entry
def knn_main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="fastmoco-knn", description="Weighted kNN accuracy of a frozen backbone "
                                "(DINO's protocol: cosine similarity, votes exp(sim / T)).")
    _common(p)
    p.add_argument("--k", type=int, nargs="+", default=[20, 200])
    p.add_argument("--temperature", type=float, default=0.07)
    args = p.parse_args(argv)
    quiet.configure(args.verbose)
    with _errors():
        from fastmoco.evaluation.knn import format_knn, knn_accuracy

        device = _setup_distributed()
        backbone, train, val, data, size, info = _backbone_and_splits(args, device)
        (bank, bank_labels), (queries, query_labels) = _extract_both(backbone, train, val, data, size=size,
                                                                     batch=args.batch_size, device=device)
        result = knn_accuracy(bank, bank_labels, queries, query_labels, ks=args.k, temperature=args.temperature,
                              num_classes=_num_classes(train, bank_labels))
        if get_rank() == 0:
            print(f"{info.path} ({info.arch}, {args.encoder} encoder): kNN on {args.val} "
                  f"({queries.shape[0]} queries, {bank.shape[0]} neighbours): {format_knn(result)}", flush=True)
        _write_json(args.json, {"checkpoint": info.path, "arch": info.arch, "encoder": args.encoder,
                                "knn": {str(k): {"top1": a[0], "top5": a[1]} for k, a in result.items()},
                                "train_samples": bank.shape[0], "val_samples": queries.shape[0],
                                "world_size": get_world_size()})


@process_entry
def linear_main(argv: list[str] | None = None) -> None:
    from fastmoco.evaluation import linear as lin

    p = argparse.ArgumentParser(prog="fastmoco-linear", description="Linear probe of a frozen backbone: MoCo v3's "
                                "protocol (main_lincls.py), or --fast on cached features (not the paper's).")
    _common(p)
    p.add_argument("--epochs", type=int, default=0, help=f"default {lin.OFFICIAL_EPOCHS} "
                                                         f"(--fast: {lin.FAST_EPOCHS})")
    p.add_argument("--lr", type=float, default=lin.OFFICIAL_BASE_LR, help="per 256 samples (official mode)")
    p.add_argument("--fast", action="store_true", help="cached features, several learning rates at once, "
                                                       "best on a held-out part of train")
    p.add_argument("--holdout", type=float, default=lin.HOLDOUT)
    p.set_defaults(batch_size=None)
    args = p.parse_args(argv)
    quiet.configure(args.verbose)
    with _errors():
        device = _setup_distributed()
        backbone, train, val, data, size, info = _backbone_and_splits(args, device)
        bf16 = device.type == "cuda"
        dtype = torch.bfloat16 if bf16 else torch.float32
        if args.fast:
            (xt, yt), (xv, yv) = _extract_both(backbone, train, val, data, size=size, batch=args.batch_size or 256,
                                               device=device)
            res = lin.train_linear_fast(xt, yt, xv, yv, num_classes=_num_classes(train, yt),
                                        epochs=args.epochs or lin.FAST_EPOCHS, holdout=args.holdout)
            mode = "fast linear probe on cached features (NOT the paper's protocol)"
        else:
            batch = args.batch_size or max(1, lin.OFFICIAL_BATCH // get_world_size())
            # the official training views: RandomResizedCrop + flip, nothing else
            aug = replace(data, jitter_prob=0.0, grayscale_prob=0.0, blur_prob=[0.0, 0.0],
                          solarize_prob=[0.0, 0.0], crop_min=0.08, flip_prob=0.5)
            # main_lincls keeps the last partial batch (DataLoader's drop_last=False): a split smaller than
            # one batch still trains; the linear layer has no batch statistics a small batch would upset.
            train_loader = train.loader(aug, batch_size=batch, image_size=size, device=device, dtype=dtype,
                                        train=True, drop_last=False)
            val_loader = val.loader(data, batch_size=batch, image_size=size, device=device, dtype=dtype)
            res = lin.train_linear_official(backbone, train_loader, val_loader,
                                            num_classes=train.num_classes or _labels_max(train) + 1,
                                            epochs=args.epochs or lin.OFFICIAL_EPOCHS, base_lr=args.lr,
                                            bf16=bf16, relabel_val=val.labels_of,
                                            log=print if get_rank() == 0 else (lambda *_: None))
            mode = "linear probe, MoCo v3 protocol"
        if get_rank() == 0:
            print(f"{info.path} ({info.arch}, {args.encoder} encoder): {mode}: val top-1 {res.top1:.2f}% "
                  f"top-5 {res.top5:.2f}% (lr {res.lr:g})", flush=True)
        _write_json(args.json, {"checkpoint": info.path, "arch": info.arch, "mode": "fast" if args.fast else
                                "official", "top1": res.top1, "top5": res.top5, "lr": res.lr, **res.extra})


def _labels_max(split) -> int:
    """Largest label of a file-list split (ImageFolder splits know their classes)."""
    from fastmoco.pipelines import scan_image_folder

    return max(label for _, label in scan_image_folder(split.path, split.file_list))


@process_entry
def export_main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="fastmoco-export", description="Export a backbone for timm (safetensors) "
                                "and the whole model in the official MoCo v3 layout.")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="the backbone, .safetensors (timm names)")
    p.add_argument("--official", default=None, help="official-layout file (default <out>.moco_v3.pth.tar; "
                                                    "'' to skip)")
    p.add_argument("--encoder", default="", choices=("online", "momentum"),
                   help="default: the method's (MoCo v3: online, DINO: the teacher)")
    p.add_argument("--force", action="store_true", help="replace output files that exist")
    quiet.add_flag(p)
    args = p.parse_args(argv)
    quiet.configure(args.verbose)
    with _errors():
        from fastmoco.evaluation.weights import check_output, default_encoder, export_weights, load_code, load_weights

        check_output(Path(args.out), args.force)   # before the slow part
        sd, info = load_weights(args.checkpoint)
        encoder = args.encoder or default_encoder(info)
        out, off = export_weights(sd, info, args.out, encoder=encoder, official=args.official, force=args.force)
        library, code = load_code(info, out)
        print(f"backbone ({info.arch}, {encoder} encoder): {out}\n  {library}: {code}"
              + (f"\nofficial MoCo v3 layout: {off}" if off else ""), flush=True)


class _errors:
    """Expected failures as one line on stderr and exit status 2 (no traceback): bad input (ValueError,
    WeightsError), a checkpoint that cannot load (CheckpointError), a file system refusal (OSError)."""

    def __enter__(self):
        pass

    def __exit__(self, tp, e, tb):
        from fastmoco.checkpoint import CheckpointError

        if tp is not None and issubclass(tp, (ValueError, OSError, CheckpointError)):
            print(f"fastmoco: {e}", file=sys.stderr, flush=True)
            raise SystemExit(2)
        return False


@process_entry
def main(argv: list[str] | None = None) -> None:
    """`python -m fastmoco.evaluation.cli knn|linear|export ...` (what torchrun launches)."""
    argv = sys.argv[1:] if argv is None else argv
    commands = {"knn": knn_main, "linear": linear_main, "export": export_main}
    if not argv or argv[0] not in commands:
        raise SystemExit(f"usage: python -m fastmoco.evaluation.cli {{{','.join(commands)}}} ...")
    commands[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
