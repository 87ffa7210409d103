"""An ImageFolder (or file list) into WebDataset tar shards with DALI index files and a manifest.

    fastmoco-make-shards SRC OUT [--shard-size 1GB] [--val SRC_VAL] [--file-list L] [--verify]

OUT gets `train-000000.tar` ... (members `KEY.jpg` / `KEY.png` and `KEY.cls`,
the label in ASCII), `train-000000.idx` (DALI's webdataset index, the format
of its `wds2idx`) and `manifest.json` (see pipelines/shards.py); with
`--val`, OUT/val the same for the val split, labelled with the train split's
class indices (matched by folder name). Samples are shuffled (seed `--seed`)
before they are cut into shards of about `--shard-size` bytes, so every shard
mixes the classes and the loaders' shard order + buffer shuffle gives a
well-mixed epoch.

Damaged inputs are found by the folder scan's checks (header, end marker,
JPEG frame; `--verify` decodes each with PIL too), named in a warning and
left out (the manifest lists them under "skipped").

Resumable and atomic per shard: a shard is written to a temporary name,
synced and renamed, its index likewise, then a small record `.NAME.json` with
the fingerprint of its samples (paths, sizes, labels); a rerun keeps every
shard whose record, tar size and index match and writes the rest. The
manifest is written last (atomically), so a manifest means a complete set.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import tarfile
import warnings
from pathlib import Path

import numpy as np

from .folder import BadImageWarning, DatasetError, list_classes, scan_image_folder
from .shards import LABEL_EXT, MANIFEST, MANIFEST_FORMAT, format_index, sha256_file

TAR_BLOCK = 512
MEMBER_OVERHEAD = 3 * TAR_BLOCK     # two headers and padding per sample, for sizing shards
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"--shard-size: expected a size such as 1GB, 500MB or 2GiB, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _member_key(position: int, path: str) -> str:
    """A sample's key: its position in the shuffled order and its file stem, no dots or spaces
    (WebDataset splits a member name at its first dot; DALI's index is space separated)."""
    return f"{position:09d}_" + re.sub(r"[^A-Za-z0-9_-]", "_", Path(path).stem)


def write_shard(path: Path, samples: list[tuple[str, int, str]]) -> dict:
    """One shard of (source file, label, key) samples: NAME.tar and NAME.idx, each written to a
    temporary name and renamed. Returns its manifest entry."""
    tmp = path.with_name(f".{path.name}.tmp")
    index = []
    with open(tmp, "wb") as raw:
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for src, label, key in samples:
                ext = "png" if src.lower().endswith(".png") else "jpg"
                members = []
                pair = ((f"{key}.{ext}", Path(src).read_bytes()), (f"{key}.{LABEL_EXT}", str(label).encode()))
                for name, data in pair:
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    tar.addfile(info, io.BytesIO(data))
                    padded = -(-len(data) // TAR_BLOCK) * TAR_BLOCK
                    members.append((name.rsplit(".", 1)[1], tar.offset - padded, len(data), name))
                index.append(members)
        raw.flush()
        os.fsync(raw.fileno())
    sha = sha256_file(tmp)   # read back from the page cache: what is on disk
    os.replace(tmp, path)
    _write_atomic(path.with_suffix(".idx"), format_index(index).encode())
    return {"name": path.name, "index": path.with_suffix(".idx").name, "samples": len(samples),
            "bytes": path.stat().st_size, "sha256": sha}


def _fingerprint(samples: list[tuple[str, int, str]]) -> str:
    h = hashlib.sha256()
    for src, label, key in samples:
        h.update(f"{src}\0{os.path.getsize(src)}\0{label}\0{key}\n".encode())
    return h.hexdigest()


def make_shards(src: str | os.PathLike, out: str | os.PathLike, *, shard_size: int = 10**9, file_list: str = "",
                verify: bool = False, seed: int = 0, prefix: str = "train",
                classes: list[str] | None = None, log=print) -> dict:
    """Shards of the ImageFolder (or file list) `src` in `out`; returns the manifest (also written).
    `classes`: label the split with these class names' indices (the train split's, for a val split)."""
    src, out = Path(src).expanduser(), Path(out).expanduser()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = scan_image_folder(src, file_list, verify=verify)
    skipped = [str(w.message) for w in caught if issubclass(w.category, BadImageWarning)]
    for msg in skipped:
        log(f"fastmoco-make-shards: {msg}")
    own = None if file_list else list_classes(src)
    if classes is not None and own is not None:
        known = {c: i for i, c in enumerate(classes)}
        missing = [c for c in own if c not in known]
        if missing:
            raise DatasetError(f"{src}: class folder {missing[0]!r} is not a class of the train split")
        samples = [(p, known[own[label]]) for p, label in samples]
    else:
        classes = own if own is not None else [str(i) for i in range(max(label for _, label in samples) + 1)]
    order = np.random.default_rng(seed).permutation(len(samples))
    planned, current, size = [], [], 0
    for position, i in enumerate(order.tolist()):
        path, label = samples[i]
        nbytes = os.path.getsize(path) + MEMBER_OVERHEAD
        if current and size + nbytes > shard_size:
            planned.append(current)
            current, size = [], 0
        current.append((path, label, _member_key(position, path)))
        size += nbytes
    planned.append(current)

    out.mkdir(parents=True, exist_ok=True)
    entries, kept = [], 0
    for n, shard in enumerate(planned):
        tar = out / f"{prefix}-{n:06d}.tar"
        record = out / f".{tar.stem}.json"
        fingerprint = _fingerprint(shard)
        done = None
        if record.is_file() and tar.with_suffix(".idx").is_file():
            done = json.loads(record.read_text())
            if done.get("fingerprint") != fingerprint or not tar.is_file() or tar.stat().st_size != done["bytes"]:
                done = None
        if done is None:
            done = write_shard(tar, shard) | {"fingerprint": fingerprint}
            _write_atomic(record, json.dumps(done).encode())
        else:
            kept += 1
        entries.append({k: v for k, v in done.items() if k != "fingerprint"})
    manifest = {"format": MANIFEST_FORMAT, "samples": sum(e["samples"] for e in entries), "classes": classes,
                "shards": entries, "source": str(src), "seed": seed, "skipped": skipped}
    _write_atomic(out / MANIFEST, json.dumps(manifest, indent=1).encode())
    log(f"fastmoco-make-shards: {out / MANIFEST}: {manifest['samples']} samples, {len(classes)} classes, "
        f"{len(entries)} shards ({kept} kept from an earlier run), {len(skipped)} inputs skipped")
    return manifest


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="fastmoco-make-shards", description=__doc__.split("\n")[0])
    ap.add_argument("src", help="ImageFolder root (SRC/<class>/<image>), or the root of --file-list")
    ap.add_argument("out", help="output folder (created): shards, index files, manifest.json")
    ap.add_argument("--shard-size", default="1GB", help="about this many bytes per shard (default 1GB)")
    ap.add_argument("--val", default="", help="a val ImageFolder: sharded into OUT/val with the train classes")
    ap.add_argument("--file-list", default="", help="'<relative path> <label>' lines instead of class folders")
    ap.add_argument("--val-list", default="", help="file list of the val split")
    ap.add_argument("--verify", action="store_true", help="decode every image with PIL first (slow)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sample order before sharding")
    args = ap.parse_args(argv)
    try:
        size = parse_size(args.shard_size)
        train = make_shards(args.src, args.out, shard_size=size, file_list=args.file_list, verify=args.verify,
                            seed=args.seed)
        if args.val:
            make_shards(args.val, Path(args.out) / "val", shard_size=size, file_list=args.val_list,
                        verify=args.verify, seed=args.seed, prefix="val",
                        classes=None if args.file_list else train["classes"])
    except (DatasetError, ValueError) as e:
        raise SystemExit(f"fastmoco-make-shards: {e}") from None


if __name__ == "__main__":
    main()
