"""Run by tests/test_evaluation.py under torchrun or python: features and kNN of a small folder.

    python tests/eval_worker.py OUT TRAIN_FOLDER VAL_FOLDER BACKEND
Rank 0 saves {"train": (features, labels), "val": (...), "knn": {...}} to OUT.
"""
import os
import sys

import torch


def main():
    out, train_dir, val_dir, backend = sys.argv[1:]
    from fastmoco.config import DataConfig
    from fastmoco.evaluation.cli import _setup_distributed
    from fastmoco.evaluation.features import LabelledSplit, extract_features
    from fastmoco.evaluation.knn import knn_accuracy
    from fastmoco.models.vit import VisionTransformer

    device = _setup_distributed()
    torch.manual_seed(0)
    backbone = VisionTransformer("vit_test", img_size=32).eval()
    train = LabelledSplit.scan("train", train_dir)
    val = LabelledSplit.scan("val", val_dir, reference=train)
    data = DataConfig(backend=backend, num_threads=1, image_size=32)
    kw = dict(batch_size=3, image_size=32, device=device, dtype=torch.float32)
    xt, yt = extract_features(backbone, train.loader(data, **kw), image_size=32, split=train)
    xv, yv = extract_features(backbone, val.loader(data, **kw), image_size=32, split=val)
    knn = knn_accuracy(xt, yt, xv, yv, ks=(1, 3), num_classes=train.num_classes, query_chunk=2)
    if int(os.environ.get("RANK", 0)) == 0:
        torch.save({"train": (xt, yt), "val": (xv, yv), "knn": knn}, out)


if __name__ == "__main__":
    from fastmoco.distributed import process_entry
    process_entry(lambda argv: main())()   # ends like fastmoco's own entries (end_process)
