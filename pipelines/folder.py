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
- `verify=True` also decodes each file fully with PIL (slow: for small or
  suspicious datasets), skipping what does not decode.

A missing root, a root with no class folder or no usable image raise
`DatasetError` (a ValueError) naming the path. Empty class folders warn and
keep their index, so labels match torchvision's ImageFolder.
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
_HEADER_BYTES = 64 * 1024        # enough to reach the SOF marker past EXIF/ICC segments
# JPEG start-of-frame markers (baseline, progressive, lossless, ...): C0-CF except DHT/JPG/DAC.
_SOF_MARKERS = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


class DatasetError(ValueError):
    """A dataset that cannot be used; the message names the path."""


class BadImageWarning(UserWarning):
    """An image file that is skipped; the message names the file."""


def _jpeg_frame(head: bytes) -> tuple[int, int, int] | None:
    """(height, width, components) from the first SOF segment of a JPEG header, or None."""
    i = 2
    n = len(head)
    while i + 4 <= n:
        if head[i] != 0xFF:
            return None
        marker = head[i + 1]
        if marker == 0xFF:          # fill byte
            i += 1
            continue
        if marker in (0x01,) or 0xD0 <= marker <= 0xD7:   # markers without a length
            i += 2
            continue
        seg_len = int.from_bytes(head[i + 2:i + 4], "big")
        if marker in _SOF_MARKERS:
            if i + 10 > n:
                return None
            h = int.from_bytes(head[i + 5:i + 7], "big")
            w = int.from_bytes(head[i + 7:i + 9], "big")
            return h, w, head[i + 9]
        if marker == 0xDA or seg_len < 2:   # start of scan before any frame header
            return None
        i += 2 + seg_len
    return None


def check_image_file(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be decoded safely (a short reason), or None if it looks fine."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(_HEADER_BYTES)
            f.seek(max(0, size - _TAIL_BYTES))
            tail = f.read(_TAIL_BYTES)
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    if head.startswith(_JPEG_SOI):
        if not tail.rstrip(b"\x00").endswith(_JPEG_EOI):
            return "truncated JPEG (no end-of-image marker)"
        frame = _jpeg_frame(head)
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


def _verify_decode(path: str) -> str | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
    except Exception as e:  # noqa: BLE001 - any decode failure means: skip this file
        return f"does not decode ({type(e).__name__}: {e})"
    return None


def _check(path: str, verify: bool) -> str | None:
    reason = check_image_file(path)
    if reason is None and verify:
        reason = _verify_decode(path)
    return reason


def list_classes(root: str | os.PathLike) -> list[str]:
    """Class folder names of an ImageFolder root in label order (sorted; hidden folders left out)."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def scan_image_folder(root: str | os.PathLike, file_list: str | os.PathLike = "", *,
                      verify: bool = False, num_workers: int = 16) -> list[tuple[str, int]]:
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
            candidates.append((str(path.resolve()), int(label)))
    else:
        classes = list_classes(root_path)
        if not classes:
            raise DatasetError(f"image folder {str(root_path)!r} has no class folders "
                               "(expected root/<class>/<image>)")
        for label, name in enumerate(classes):
            found = 0
            for dirpath, dirnames, filenames in os.walk(root_path / name, followlinks=True):
                dirnames.sort()
                for fname in sorted(filenames):
                    if fname.startswith("."):
                        continue
                    path = os.path.join(dirpath, fname)
                    if not fname.lower().endswith(IMAGE_EXTENSIONS):
                        warnings.warn(f"skipping {path}: not an image file name ({', '.join(IMAGE_EXTENSIONS)})",
                                      BadImageWarning, stacklevel=2)
                        continue
                    candidates.append((str(Path(path).resolve()), label))
                    found += 1
            if found == 0:
                warnings.warn(f"class folder {root_path / name} holds no images; its label {label} stays "
                              "reserved (as in torchvision's ImageFolder)", BadImageWarning, stacklevel=2)
    # Reading a header and a tail per file is I/O bound: threads overlap it.
    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        reasons = list(pool.map(lambda c: _check(c[0], verify), candidates))
    samples = []
    for (path, label), reason in zip(candidates, reasons):
        if reason is None:
            samples.append((path, label))
        else:
            warnings.warn(f"skipping {path}: {reason}", BadImageWarning, stacklevel=2)
    if not samples:
        raise DatasetError(f"image folder {str(root_path)!r} has no usable JPEG/PNG images")
    return samples
