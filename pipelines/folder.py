"""Find and check the images of a dataset before any pipeline sees them.

`scan_image_folder(root)` lists (path, label) for an ImageFolder layout
(`root/<class>/<image>`, labels = index of the class name in sorted order,
as torchvision's ImageFolder numbers them), or for a file list of
"<relative path> <label>" lines. Every file is checked cheaply here so a
decoder never meets a bad file mid-epoch:

- header: JPEG (FF D8 FF) or PNG signature, else skipped with a warning;
- end: a JPEG must end with the EOI marker FF D9 (trailing zero padding
  tolerated), a PNG with its IEND chunk, else "truncated", skipped;
- JPEG frame: the SOF header must give a non-zero size and 1, 3 or 4
  components (4 = CMYK/YCCK, which the decoders convert to RGB), else skipped;
  it is found by walking the marker segments in the file (4 bytes read per
  segment), so an ICC profile or EXIF block of any size before it is fine;
- `verify=True` also decodes each file fully with PIL (slow: for small or
  suspicious datasets), skipping what does not decode.

A missing root, a root with no class folder or no usable image raise
`DatasetError` (a ValueError) naming the path, and so does a scan where more
than `max_bad_fraction` of the files are unusable. Empty class folders warn
and keep their index, so labels match torchvision's ImageFolder. Directory
symlinks are followed once: a directory reached again (a link to a parent or
to another listed folder) is skipped with a warning naming the link, so a
loop cannot multiply the samples. Files keep the path they were found at
(not resolved), so a broken or self-referencing link is named as the link.

What the cheap checks cannot see (a JPEG damaged inside its entropy-coded
data, a file deleted while the run goes on) fails when decoded during
training: the loaders report it to `BadSamples`, which names the file, hands
out a replacement sample and refuses the run past `max_bad_fraction`.
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_JPEG_SOI = b"\xff\xd8\xff"
_JPEG_EOI = b"\xff\xd9"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"IEND\xaeB`\x82"
_TAIL_BYTES = 64                 # how far back from the end EOI/IEND may sit (zero padding)
_SIGNATURE_BYTES = 8
# JPEG start-of-frame markers (baseline, progressive, lossless, ...): C0-CF except DHT/JPG/DAC.
_SOF_MARKERS = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


class DatasetError(ValueError):
    """A dataset that cannot be used; the message names the path."""


class BadImageWarning(UserWarning):
    """An image file that is skipped; the message names the file."""


def _jpeg_frame(f) -> tuple[int, int, int] | None:
    """(height, width, components) from the first SOF segment of the JPEG open as `f`, or None.
    Walks the segments from the file: only their 4-byte headers are read."""
    f.seek(2)
    while True:
        head = f.read(2)
        if len(head) < 2 or head[0] != 0xFF:
            return None
        marker = head[1]
        while marker == 0xFF:       # fill bytes
            nxt = f.read(1)
            if not nxt:
                return None
            marker = nxt[0]
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:   # markers without a length
            continue
        length = f.read(2)
        if len(length) < 2:
            return None
        seg_len = int.from_bytes(length, "big")
        if marker in _SOF_MARKERS:
            body = f.read(6)        # precision, height, width, components
            if len(body) < 6:
                return None
            return int.from_bytes(body[1:3], "big"), int.from_bytes(body[3:5], "big"), body[5]
        if marker == 0xDA or seg_len < 2:   # start of scan before any frame header
            return None
        f.seek(seg_len - 2, os.SEEK_CUR)


def check_image_file(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be decoded safely (a short reason), or None if it looks fine."""
    try:
        with open(path, "rb") as f:
            return image_problem(f, os.path.getsize(path))
    except OSError as e:
        return f"unreadable ({e.strerror or e})"


def image_problem(f, size: int) -> str | None:
    """`check_image_file` of the `size` bytes open as the binary file `f` (a file, or a shard
    member in a BytesIO)."""
    head = f.read(_SIGNATURE_BYTES)
    f.seek(max(0, size - _TAIL_BYTES))
    tail = f.read(_TAIL_BYTES)
    frame = _jpeg_frame(f) if head.startswith(_JPEG_SOI) else None
    if head.startswith(_JPEG_SOI):
        if not tail.rstrip(b"\x00").endswith(_JPEG_EOI):
            return "truncated JPEG (no end-of-image marker)"
        if frame is None:
            return "JPEG without a readable frame header"
        h, w, comps = frame
        if h == 0 or w == 0 or comps not in (1, 3, 4):
            return f"unsupported JPEG frame ({h}x{w}, {comps} components)"
        return None
    if head.startswith(_PNG_SIGNATURE):
        if not tail.rstrip(b"\x00").endswith(_PNG_IEND):
            return "truncated PNG (no IEND chunk)"
        return None
    return "not a JPEG or PNG file (unrecognised header)"


def _verify_decode(path) -> str | None:
    """Why `path` (a file name or a binary file object) does not decode fully with PIL, or None."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
    except Exception as e:  # noqa: BLE001 - any decode failure means: skip this file
        return f"does not decode ({type(e).__name__}: {e})"
    return None


def verify_decode_bytes(data: bytes) -> str | None:
    """`_verify_decode` of encoded image bytes (a shard member)."""
    import io

    return _verify_decode(io.BytesIO(data))


def _check(path: str, verify: bool) -> str | None:
    reason = check_image_file(path)
    if reason is None and verify:
        reason = _verify_decode(path)
    return reason


def list_classes(root: str | os.PathLike) -> list[str]:
    """Class folder names of an ImageFolder root in label order (sorted; hidden folders left out)."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def scan_image_folder(root: str | os.PathLike, file_list: str | os.PathLike = "", *,
                      verify: bool = False, num_workers: int = 16,
                      max_bad_fraction: float = 1.0) -> list[tuple[str, int]]:
    """(absolute path, label) of every usable image, in sorted (class, file) order.

    With `file_list`, lines are "<path relative to root> <label>"; blank lines
    and lines starting with '#' are ignored. Bad files are skipped with a
    `BadImageWarning` naming them; see the module docstring for the checks.
    """
    root_path = Path(root).expanduser()
    if not str(root) or not root_path.is_dir():
        raise DatasetError(f"image folder {str(root)!r} does not exist or is not a directory")
    candidates: list[tuple[str, int]] = []
    if file_list:
        list_path = Path(file_list).expanduser()
        if not list_path.is_file():
            raise DatasetError(f"file list {str(file_list)!r} does not exist")
        for lineno, line in enumerate(list_path.read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            rel, _, label = line.rpartition(" ")
            if not rel or not label.lstrip("-").isdigit():
                raise DatasetError(f"{list_path}:{lineno}: expected '<relative path> <label>', got {line!r}")
            path = root_path / rel.strip()
            if not path.is_file():
                warnings.warn(f"skipping {path}: listed in {list_path} but missing", BadImageWarning,
                              stacklevel=2)
                continue
            candidates.append((os.path.abspath(path), int(label)))
    else:
        classes = list_classes(root_path)
        if not classes:
            raise DatasetError(f"image folder {str(root_path)!r} has no class folders "
                               "(expected root/<class>/<image>)")
        listed = {os.path.realpath(root_path)}   # real paths of the directories walked so far
        for label, name in enumerate(classes):
            found = 0
            for dirpath, dirnames, filenames in os.walk(root_path / name, followlinks=True):
                real = os.path.realpath(dirpath)
                if real in listed:
                    warnings.warn(f"skipping {dirpath}: a link to {real}, which is listed already (a loop?)",
                                  BadImageWarning, stacklevel=2)
                    dirnames.clear()
                    continue
                listed.add(real)
                dirnames.sort()
                for fname in sorted(filenames):
                    if fname.startswith("."):
                        continue
                    path = os.path.join(dirpath, fname)
                    if not fname.lower().endswith(IMAGE_EXTENSIONS):
                        warnings.warn(f"skipping {path}: not an image file name ({', '.join(IMAGE_EXTENSIONS)})",
                                      BadImageWarning, stacklevel=2)
                        continue
                    candidates.append((os.path.abspath(path), label))
                    found += 1
            if found == 0:
                warnings.warn(f"class folder {root_path / name} holds no images; its label {label} stays "
                              "reserved (as in torchvision's ImageFolder)", BadImageWarning, stacklevel=2)
    # Reading a header and a tail per file is I/O bound: threads overlap it.
    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        reasons = list(pool.map(lambda c: _check(c[0], verify), candidates))
    samples, bad = [], []
    for (path, label), reason in zip(candidates, reasons):
        if reason is None:
            samples.append((path, label))
        else:
            bad.append(path)
            warnings.warn(f"skipping {path}: {reason}", BadImageWarning, stacklevel=2)
    if not samples:
        raise DatasetError(f"image folder {str(root_path)!r} has no usable JPEG/PNG images")
    if len(bad) > max_bad_fraction * len(candidates):
        raise DatasetError(f"{len(bad)} of {len(candidates)} image files in {str(root_path)!r} are unusable, "
                           f"more than data.max_bad_fraction = {max_bad_fraction} (first: {bad[0]})")
    return samples


class BadSamples:
    """Samples that failed to read or decode during training, and what stands in for them.

    A failed sample is named in a `BadImageWarning` and replaced by the next sample (in
    dataset order, cyclically) not known to be bad, so a batch keeps its size and every
    rank its step count. More than `max_fraction` of the samples failing is a DatasetError.
    Each process keeps its own record (torchvision workers count separately).
    """

    def __init__(self, paths: list[str], max_fraction: float = 1.0):
        self.paths, self.max_fraction = paths, max_fraction
        self.bad: set[int] = set()

    def mark(self, index: int, reason: str) -> None:
        index = int(index)
        if index in self.bad:
            return
        self.bad.add(index)
        warnings.warn(f"skipping {self.paths[index]}: {reason}; another sample takes its place", BadImageWarning,
                      stacklevel=2)
        if len(self.bad) > self.max_fraction * len(self.paths):
            raise DatasetError(f"{len(self.bad)} of {len(self.paths)} images failed to read or decode during "
                               f"training, more than data.max_bad_fraction = {self.max_fraction} "
                               f"(latest: {self.paths[index]})")

    def replacement(self, index: int) -> int:
        """`index` itself if it is not known to be bad, else the next one that is not."""
        n = len(self.paths)
        for k in range(n):
            j = (index + k) % n
            if j not in self.bad:
                return j
        raise DatasetError(f"none of the {n} images can be read")

    def find_undecodable(self, indices) -> list[int]:
        """Which of `indices` do not read or decode on the CPU (PIL); marks them bad."""
        found = []
        for i in dict.fromkeys(int(i) for i in indices):
            reason = check_image_file(self.paths[i]) or _verify_decode(self.paths[i])
            if reason is not None:
                self.mark(i, reason)
                found.append(i)
        return found


class FileSamples:
    """The encoded-sample source of a folder scan: `read(i)` gives (file bytes as uint8, label). The
    loaders read every source (this one, shards.ShardSamples) through this interface."""

    def __init__(self, samples: list[tuple[str, int]]):
        self.files = [s[0] for s in samples]
        self.labels = [int(s[1]) for s in samples]

    def __len__(self) -> int:
        return len(self.files)

    def name(self, i: int) -> str:
        return self.files[i]

    def read(self, i: int):
        import numpy as np

        return np.fromfile(self.files[i], dtype=np.uint8), self.labels[i]

    def bad_samples(self, max_fraction: float) -> BadSamples:
        return BadSamples(self.files, max_fraction)

    def plan(self, batch_size: int, *, shard_id: int, num_shards: int, seed: int, train: bool):
        from .base import ShardPlan

        return ShardPlan(len(self), batch_size, shard_id=shard_id, num_shards=num_shards, seed=seed, train=train)


def sample_source(samples):
    """A loader's `samples` as an encoded-sample source: a (path, label) list becomes `FileSamples`;
    a source (shards.ShardSamples) is used as it is."""
    return samples if hasattr(samples, "read") else FileSamples(samples)
