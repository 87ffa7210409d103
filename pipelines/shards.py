"""Sharded tar datasets (the WebDataset convention) as a sample source of the two-crop loaders.

    fastmoco-make-shards /data/imagenet/train /data/in1k-shards --val /data/imagenet/val   # make_shards.py
    fastmoco-train configs/x.json --data.source shards --data.path /data/in1k-shards

Layout (what `make_shards` writes, and what a folder of WebDataset shards is):
each shard `NAME.tar` holds samples as groups of members `KEY.jpg` (or `.png`)
and `KEY.cls` (the label, ASCII decimal), with DALI's index file `NAME.idx`
beside it (the format of DALI's `wds2idx`: "v1.2 N", then per sample
"ext offset size name ..." with the offset of each member's data in the tar).
`manifest.json` records the number of samples, the class names, and per shard
its samples, bytes and sha256. `data.path` is the manifest or its folder; a
folder without one is read from its `*.tar` + `*.idx` pairs (labels as written).

Reading: `ShardSamples` parses the index files once (no tar is opened to list
them), then reads sample i as one `pread` covering its image and label members
(adjacent in the tar), so the DALI graph (through its external source) and the
torchvision fallback decode exactly the bytes of folder sources: the
augmentation graph is the one of `dali.py`, not a copy.

Order (`ShardOrderPlan`, a `ShardPlan`): per (seed, epoch) the shards are
permuted; the samples of that shard order are cut into `num_shards`
contiguous parts (rank r: samples N r / k to N (r + 1) / k, whole tars but at
the cuts), so each rank opens only its own shards; each part is shuffled in a
buffer of `shuffle_buffer` samples (the WebDataset / DALI reader shuffle) and
cut to N // k samples so ranks stay in lockstep. Over the ranks every sample
is visited once per epoch except the `dropped_per_epoch` ones (the rest of
N / k and of each rank's last partial batch), which the loader logs. The order
is a pure function of (seed, epoch, rank, num_shards), so the data cursor
resumes mid-epoch exactly as for folders. Evaluation keeps `ShardPlan`'s
order (rank r: samples r, r + k, ...: the order `gather_shards` undoes).

Damage: a shard shorter than its index (or its manifest size) is named and
its samples left out when the set is opened; a member that does not read,
whose label is not a number or whose image fails the cheap checks (or the
decoder) is named "SHARD.tar:KEY.jpg" in a `BadImageWarning` and replaced, as
for folders; past `data.max_bad_fraction` the run stops with a DatasetError.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .base import ShardPlan
from .folder import BadImageWarning, BadSamples, DatasetError, image_problem, verify_decode_bytes

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "fastmoco-shards/1"
INDEX_VERSION = "v1.2"                  # DALI's wds2idx format version
IMAGE_EXTS = ("jpg", "jpeg", "png")
LABEL_EXT = "cls"
DEFAULT_SHUFFLE_BUFFER = 1024           # samples; WebDataset's and DALI's readers use this order of size


# -- DALI's index format ---------------------------------------------------------
def format_index(samples: list[list[tuple[str, int, int, str]]]) -> str:
    """DALI's webdataset index text: per sample its members as (ext, data offset, size, member name)."""
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    lines += [" ".join(f"{ext} {off} {size} {name}" for ext, off, size, name in members) for members in samples]
    return "\n".join(lines) + "\n"


def parse_index(path: str | os.PathLike) -> list[list[tuple[str, int, int, str]]]:
    """The samples of a DALI webdataset index file (see `format_index`); errors name the file and line."""
    text = Path(path).read_text().splitlines()
    head = text[0].split() if text else []
    if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdigit():
        raise DatasetError(f"{path}: not a DALI webdataset index ({INDEX_VERSION}) file: first line {text[:1]}")
    samples = []
    for lineno, line in enumerate(text[1:], 2):
        f = line.split()
        if not f or len(f) % 4 or not all(x.isdigit() for x in f[1::4] + f[2::4]):
            raise DatasetError(f"{path}:{lineno}: expected 'ext offset size name' groups, got {line!r}")
        samples.append([(f[i], int(f[i + 1]), int(f[i + 2]), f[i + 3]) for i in range(0, len(f), 4)])
    if len(samples) != int(head[1]):
        raise DatasetError(f"{path}: the header announces {head[1]} samples but the file lists {len(samples)}")
    return samples


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_image_bytes(data: bytes) -> str | None:
    """Why the encoded image `data` cannot be decoded safely, or None (folder.py's cheap checks)."""
    return image_problem(io.BytesIO(data), len(data))


# -- the set of shards ---------------------------------------------------------------
def find_manifest(path: str | os.PathLike) -> Path | None:
    p = Path(path).expanduser()
    if p.is_file() and p.name.endswith(".json"):
        return p
    return p / MANIFEST if (p / MANIFEST).is_file() else None


def is_shard_set(path: str | os.PathLike) -> bool:
    """Whether `path` is a shard manifest or a folder of shards (a manifest or a `*.tar`)."""
    p = Path(path).expanduser()
    return bool(str(path)) and (find_manifest(p) is not None or (p.is_dir() and any(p.glob("*.tar"))))


def read_manifest(path: str | os.PathLike) -> dict:
    m = find_manifest(path)
    if m is None:
        raise DatasetError(f"{path}: no shard manifest ({MANIFEST})")
    try:
        manifest = json.loads(m.read_text())
    except (OSError, ValueError) as e:
        raise DatasetError(f"{m}: unreadable shard manifest ({e})") from e
    if manifest.get("format") != MANIFEST_FORMAT:
        raise DatasetError(f"{m}: format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    return manifest


def _allow_open_files(n: int) -> None:
    """Raise this process's soft limit on open files towards `n` (at most the hard limit)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n if hard == resource.RLIM_INFINITY else min(n, hard), hard))


def manifest_classes(path: str | os.PathLike) -> list[str] | None:
    """The class names of a shard set's manifest, or None for a folder of shards without one."""
    return list(read_manifest(path)["classes"]) if find_manifest(path) is not None else None


class _MemberNames(Sequence):
    """'SHARD.tar:KEY.jpg' of sample i, built on demand (a list would cost ~100 bytes a sample)."""

    def __init__(self, samples: "ShardSamples"):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> str:
        return self.samples.name(int(i))


class ShardSamples:
    """The samples of a shard set: sample i's shard, the byte ranges of its image and label members.
    `read(i)` gives (encoded image bytes as uint8, label); see the module docstring."""

    def __init__(self, path: str | os.PathLike, *, verify: bool = False, max_bad_fraction: float = 1.0,
                 shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER):
        self.shuffle_buffer = int(shuffle_buffer)
        root = Path(path).expanduser()
        if not str(path) or not root.exists():
            raise DatasetError(f"shard set {str(path)!r} does not exist")
        manifest_path = find_manifest(root)
        if manifest_path is not None:
            manifest = read_manifest(manifest_path)
            folder = manifest_path.parent
            entries = manifest["shards"]
            self.classes: list[str] | None = list(manifest["classes"])
        else:
            folder = root
            entries = [{"name": t.name} for t in sorted(root.glob("*.tar"))]
            self.classes = None
            if not entries:
                raise DatasetError(f"shard set {str(root)!r} has no {MANIFEST} and no *.tar shards")
        self.root = folder
        self.shards: list[Path] = []
        self._members: list[list[tuple[str, int, int, str]]] = []   # (image, label) member per sample
        sizes, rows, bad = [], [], []
        for entry in entries:
            tar = folder / entry["name"]
            reason, members = self._open_shard(tar, entry, verify)
            if reason is not None:
                bad.append(str(tar))
                warnings.warn(f"skipping shard {tar}: {reason}", BadImageWarning, stacklevel=2)
                continue
            shard = len(self.shards)
            self.shards.append(tar)
            sizes.append(len(members))
            self._members.append(members)
            rows += [(shard, im[1], im[2], lab[1], lab[2]) for im, lab in members]
        if not rows:
            raise DatasetError(f"shard set {str(root)!r} has no usable samples")
        if len(bad) > max_bad_fraction * len(entries):
            raise DatasetError(f"{len(bad)} of {len(entries)} shards of {str(root)!r} are unusable, more than "
                               f"data.max_bad_fraction = {max_bad_fraction} (first: {bad[0]})")
        table = np.asarray(rows, dtype=np.int64)                    # (N, 5)
        self.shard_of = table[:, 0].astype(np.int32)
        self.image_at, self.image_size, self.label_at, self.label_size = table[:, 1:].T.copy()
        self.shard_sizes = np.asarray(sizes, dtype=np.int64)        # samples per usable shard
        self.first = np.concatenate([[0], np.cumsum(self.shard_sizes)])  # first sample of each shard
        self.names = _MemberNames(self)
        _allow_open_files(len(self.shards) + 256)   # a descriptor per shard stays open (reads are preads)
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    @staticmethod
    def _open_shard(tar: Path, entry: dict, verify: bool):
        """(why the shard is unusable or None, its (image, label) members per sample)."""
        index = tar.with_suffix(".idx")
        try:
            size = tar.stat().st_size
        except OSError as e:
            return f"unreadable ({e.strerror or e})", []
        if not index.is_file():
            return f"no index file {index.name} (make it with DALI's wds2idx or fastmoco-make-shards)", []
        if "bytes" in entry and size != entry["bytes"]:
            return f"{size} bytes, the manifest says {entry['bytes']} (truncated or replaced)", []
        members = []
        for lineno, sample in enumerate(parse_index(index), 2):
            by_ext = {m[0]: m for m in sample}
            image = next((by_ext[e] for e in IMAGE_EXTS if e in by_ext), None)
            if image is None or LABEL_EXT not in by_ext:
                return (f"{index}:{lineno}: sample {sample[0][3].split('.')[0]!r} lacks a "
                        f"{'label (.cls)' if image is not None else 'image (.jpg/.png)'} member"), []
            members.append((image, by_ext[LABEL_EXT]))
        end = max((m[1] + m[2] for pair in members for m in pair), default=0)
        if end > size:
            return f"truncated: its index lists data up to byte {end}, the file has {size}", []
        if verify and "sha256" in entry and sha256_file(tar) != entry["sha256"]:
            return "sha256 differs from the manifest's (damaged)", []
        return None, members

    def __len__(self) -> int:
        return len(self.shard_of)

    def read_batch(self, indices: list[int]) -> list[tuple[np.ndarray | OSError, int]]:
        """`folder.FileSamples.read_batch`'s interface: (bytes, label) per sample, or its OSError."""
        out = []
        for i in indices:
            try:
                out.append(self.read(i))
            except OSError as e:
                out.append((e, -1))   # the label of a sample that is replaced is not read
        return out

    def close(self) -> None:
        """Nothing to stop: reads are preads on descriptors kept per process."""

    def name(self, i: int) -> str:
        shard = int(self.shard_of[i])
        image, _ = self._members[shard][i - int(self.first[shard])]
        return f"{self.shards[shard]}:{image[3]}"

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():   # a forked torchvision worker: its own descriptors
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:   # reader threads may race here: one descriptor wins, the other is closed
            mine = os.open(self.shards[shard], os.O_RDONLY)
            fd = self._fds.setdefault(shard, mine)
            if fd != mine:
                os.close(mine)
        return fd

    def read(self, i: int) -> tuple[np.ndarray, int]:
        """(image bytes (L,) uint8, label) of sample i: one read covering both members. OSError names the
        member when the shard ends early or the label is not a number."""
        i = int(i)
        lo = min(self.image_at[i], self.label_at[i])
        hi = max(self.image_at[i] + self.image_size[i], self.label_at[i] + self.label_size[i])
        data = os.pread(self._fd(int(self.shard_of[i])), int(hi - lo), int(lo))   # thread-safe: no seek
        if len(data) != hi - lo:
            raise OSError(f"shard ends at byte {lo + len(data)}, the member needs {lo}..{hi} (truncated)")
        label = data[self.label_at[i] - lo: self.label_at[i] - lo + self.label_size[i]]
        try:
            value = int(label.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            raise OSError(f"label member {label[:16]!r} is not a decimal number") from None
        image = np.frombuffer(data, dtype=np.uint8, count=int(self.image_size[i]), offset=int(self.image_at[i] - lo))
        return image, value

    def bad_samples(self, max_fraction: float) -> "BadMembers":
        return BadMembers(self, max_fraction)

    def plan(self, batch_size: int, *, shard_id: int, num_shards: int, seed: int, train: bool,
             drop_last: bool | None = None) -> ShardPlan:
        if not train:
            return ShardPlan(len(self), batch_size, shard_id=shard_id, num_shards=num_shards, seed=seed, train=False,
                             drop_last=drop_last)
        return ShardOrderPlan(self.shard_sizes, batch_size, shard_id=shard_id, num_shards=num_shards, seed=seed,
                              shuffle_buffer=self.shuffle_buffer, drop_last=drop_last)


class BadMembers(BadSamples):
    """`BadSamples` over the members of a shard set (named 'SHARD.tar:KEY.jpg')."""

    def __init__(self, samples: ShardSamples, max_fraction: float = 1.0):
        super().__init__(samples.names, max_fraction)
        self.samples = samples

    def find_undecodable(self, indices) -> list[int]:
        found = []
        for i in dict.fromkeys(int(i) for i in indices):
            try:
                data, _ = self.samples.read(i)
                reason = check_image_bytes(data.tobytes()) or verify_decode_bytes(data.tobytes())
            except OSError as e:
                reason = f"unreadable ({e})"
            if reason is not None:
                self.mark(i, reason)
                found.append(i)
        return found


# -- the order of an epoch ---------------------------------------------------------------
def buffer_shuffle(stream: np.ndarray, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """`stream` through a shuffle buffer of `buffer` samples (WebDataset's shuffle): each output is a
    uniformly drawn buffer slot, refilled from the stream; the rest leaves in random order at the end."""
    buffer = max(1, min(int(buffer), len(stream)))
    slots = stream[:buffer].copy()
    out = np.empty_like(stream)
    picks = rng.integers(0, buffer, size=max(0, len(stream) - buffer))
    for n, (pick, incoming) in enumerate(zip(picks.tolist(), stream[buffer:].tolist())):
        out[n] = slots[pick]
        slots[pick] = incoming
    out[len(stream) - buffer:] = rng.permutation(slots)
    return out


class ShardOrderPlan(ShardPlan):
    """Training order over shards: shard permutation, one contiguous part per rank, a shuffle buffer
    (module docstring). Same interface and lockstep lengths as `ShardPlan`."""

    def __init__(self, shard_sizes, batch_size: int, *, shard_id: int = 0, num_shards: int = 1, seed: int = 0,
                 shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER, drop_last: bool | None = None):
        self.shard_sizes = np.asarray(shard_sizes, dtype=np.int64)
        super().__init__(int(self.shard_sizes.sum()), batch_size, shard_id=shard_id, num_shards=num_shards,
                         seed=seed, train=True, drop_last=drop_last)
        self.first = np.concatenate([[0], np.cumsum(self.shard_sizes)])
        self.shuffle_buffer = int(shuffle_buffer)
        if self.shuffle_buffer < 1:
            raise ValueError(f"data.shuffle_buffer must be >= 1, got {shuffle_buffer}")
        self._cached: tuple[int, np.ndarray] | None = None

    @property
    def dropped_per_epoch(self) -> int:
        """Samples no rank visits in an epoch (the rest of N / k, and each rank's partial last batch
        unless kept)."""
        return self.num_samples - len(self.epoch_indices(0)) * self.num_shards

    def describe(self) -> str:
        return (f"data: {self.num_samples} samples in {len(self.shard_sizes)} shards over {self.num_shards} rank(s): "
                f"{self.num_batches} batches of {self.batch_size} per rank and epoch; {self.dropped_per_epoch} "
                f"samples per epoch are left out (N % ranks and each rank's partial last batch; other ones each "
                f"epoch)")

    def shard_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, int(epoch), 0x5A4D]).permutation(len(self.shard_sizes))

    def rank_stream(self, epoch: int, rank: int) -> np.ndarray:
        """Rank `rank`'s samples of `epoch` in shard order, before the shuffle buffer: (N / k,) int64."""
        order = self.shard_order(epoch)
        sequence = np.concatenate([np.arange(self.first[s], self.first[s + 1]) for s in order])
        n, k = self.num_samples, self.num_shards
        return sequence[n * rank // k: n * (rank + 1) // k]

    def shard_indices(self, epoch: int) -> np.ndarray:
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        rng = np.random.default_rng([self.seed, int(epoch), self.shard_id])
        idx = buffer_shuffle(self.rank_stream(epoch, self.shard_id), self.shuffle_buffer, rng)[:self.per_shard]
        self._cached = (int(epoch), idx)
        return idx
