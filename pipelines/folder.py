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
- size: a JPEG or PNG of more than MAX_PIXELS pixels is skipped (DALI's
  decoder would say only "Image too large", PIL calls it a decompression bomb);
  it is found by walking the marker segments in the file (4 bytes read per
  segment), so an ICC profile or EXIF block of any size before it is fine;
- only regular files: a FIFO, socket or device is named and skipped (opening
  a FIFO would wait forever for a writer); every read opens without waiting;
- `verify=True` also decodes each file fully with PIL, skipping what does not
  decode (DALI's decoders train on some damaged JPEGs without an error).

The results are kept per dataset (`check_files`, `CHECK_CACHE` beside the data
or in ~/.cache/fastmoco/checked) keyed by each file's relative path, size and
mtime, so a dataset is decoded once: later runs and evaluation only stat each
file. With several ranks the files to check are split among them.

A missing root, a root with no class folder or no usable image raise
`DatasetError` (a ValueError) naming the path, and so does a scan where more
than `max_bad_fraction` of the files are unusable. Empty class folders warn
and keep their index, so labels match torchvision's ImageFolder. Directory
symlinks are followed once: a directory reached again (a link to a parent or
to another listed folder) is skipped with a warning naming the link, so a
loop cannot multiply the samples. Files keep the path they were found at
(not resolved), so a broken or self-referencing link is named as the link.

What the checks cannot see (a file deleted or replaced while the run goes on,
a JPEG damaged inside when `verify` is off) fails when read or decoded during
training: the loaders report it to `BadSamples`, which names the file, hands
out a replacement sample and refuses the run past `max_bad_fraction`. Loaders
read through `FileReader`: a read that blocks past its timeout (a hung
filesystem) stops the run naming the file.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import hashlib
import json
import os
import queue
import socket
import stat
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_JPEG_SOI = b"\xff\xd8\xff"
_JPEG_EOI = b"\xff\xd9"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"IEND\xaeB`\x82"
_TAIL_BYTES = 64                 # how far back from the end EOI/IEND may sit (zero padding)
_HEAD_BYTES = 24                 # a PNG's signature and IHDR width and height
# PIL refuses larger images as decompression bombs (2 x Image.MAX_IMAGE_PIXELS); nvimgcodec's libjpeg-turbo
# prints "[ERROR] ... Image too large" naming no file, then another decoder allocates the whole image.
MAX_PIXELS = 178_956_970
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


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _not_regular(mode: int) -> str | None:
    """None for a regular file, else what it is ("not a regular file: a FIFO")."""
    if stat.S_ISREG(mode):
        return None
    return "not a regular file: " + next((what for test, what in _KINDS if test(mode)), "of an unknown kind")


def open_regular(path: str | os.PathLike):
    """`path` open for binary reading, refusing anything but a regular file. The open does not wait
    (O_NONBLOCK): opening a FIFO for reading would block until some process writes to it."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        why = _not_regular(os.fstat(fd).st_mode)
        if why is not None:
            raise OSError(errno.EINVAL, why, str(path))
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_file(path: str | os.PathLike) -> np.ndarray:
    """The bytes of regular file `path` as a uint8 array (DALI's encoded input)."""
    with open_regular(path) as f:
        buf = np.empty(os.fstat(f.fileno()).st_size, dtype=np.uint8)
        n = f.readinto(buf)   # until full or the end (a file shrunk meanwhile)
    return buf[:n]


class FileReader:
    """Reads files in daemon threads with a deadline: a read that has not returned after `timeout`
    seconds (a hung network filesystem) raises DatasetError naming the file, where the caller would
    otherwise wait forever. The blocked thread stays (no thread can be interrupted), but a daemon
    thread does not hold up the process's exit. The waiting caller can be interrupted by a signal
    handler that raises. Threads start at the first read in each process (a forked worker gets its own)."""

    def __init__(self, num_threads: int = 8, timeout: float = 300.0):
        self.num_threads, self.timeout = max(1, int(num_threads)), float(timeout)
        self._pid: int | None = None
        self._tasks: queue.SimpleQueue | None = None

    def _start(self) -> None:
        self._tasks = queue.SimpleQueue()
        for i in range(self.num_threads):
            threading.Thread(target=self._work, args=(self._tasks,), name=f"fastmoco-read-{i}", daemon=True).start()
        self._pid = os.getpid()

    @staticmethod
    def _work(tasks: queue.SimpleQueue) -> None:
        while (task := tasks.get()) is not None:
            path, future = task
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(read_file(path))
                except BaseException as e:  # noqa: BLE001 - handed to the waiting caller
                    future.set_exception(e)

    def read(self, paths: list[str]) -> list[np.ndarray | OSError]:
        """Each file's bytes, or the OSError that reading it raised (missing, not a regular file)."""
        if self._pid != os.getpid():
            self._start()
        futures = []
        for path in paths:
            futures.append(concurrent.futures.Future())
            self._tasks.put((path, futures[-1]))
        _, pending = concurrent.futures.wait(futures, timeout=self.timeout)
        if pending:
            # the files being read when time ran out (the rest wait in the queue behind them)
            late = [path for path, f in zip(paths, futures) if f.running()] or \
                [path for path, f in zip(paths, futures) if f in pending]
            for f in pending:
                f.cancel()
            more = f" (and {len(late) - 1} more files)" if len(late) > 1 else ""
            raise DatasetError(f"reading {late[0]}{more} has not returned after {self.timeout:g} s "
                               "(data.read_timeout): a hung filesystem?")
        out = []
        for f in futures:
            e = f.exception()
            if e is not None and not isinstance(e, OSError):
                raise e
            out.append(e if e is not None else f.result())
        return out

    def __getstate__(self) -> dict:   # a loader worker started by pickling (spawn) starts its own threads
        return {**self.__dict__, "_pid": None, "_tasks": None}

    def close(self) -> None:
        """Let this process's idle threads end (one that is blocked ends when its read returns)."""
        if self._pid == os.getpid():
            for _ in range(self.num_threads):
                self._tasks.put(None)
        self._pid = None


def check_image_file(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be decoded safely (a short reason), or None if it looks fine."""
    try:
        with open_regular(path) as f:
            return image_problem(f, os.fstat(f.fileno()).st_size)
    except OSError as e:
        return f"unreadable ({e.strerror or e})"


def image_problem(f, size: int) -> str | None:
    """`check_image_file` of the `size` bytes open as the binary file `f` (a file, or a shard
    member in a BytesIO)."""
    head = f.read(_HEAD_BYTES)
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
        return _too_large(w, h)
    if head.startswith(_PNG_SIGNATURE):
        if not tail.rstrip(b"\x00").endswith(_PNG_IEND):
            return "truncated PNG (no IEND chunk)"
        return _too_large(int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big"))
    return "not a JPEG or PNG file (unrecognised header)"


def _too_large(width: int, height: int) -> str | None:
    if width * height > MAX_PIXELS:
        return f"image too large ({width}x{height} pixels, more than {MAX_PIXELS})"
    return None


def _verify_decode(path) -> str | None:
    """Why `path` (a file name or a binary file object) does not decode fully with PIL, or None."""
    from PIL import Image

    try:
        with (contextlib.nullcontext(path) if hasattr(path, "read") else open_regular(path)) as f, \
                Image.open(f) as im:
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


# -- the check results of a dataset, kept for later runs --------------------------------------------------
CHECK_CACHE = ".fastmoco-checked.json"
_CHECKS_VERSION = 1          # raise when the checks change: results of older checks are not reused
_HEADER, _DECODED = 1, 2     # how far a file was checked: header and end only / decoded with PIL


def check_cache_paths(root: str | os.PathLike) -> list[Path]:
    """Where the check results of dataset `root` are kept: beside the data, and (a dataset that is
    read-only for this user) in the user's cache directory, under a hash of the root's real path."""
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    key = hashlib.sha256(os.path.realpath(root).encode()).hexdigest()[:16]
    return [Path(root) / CHECK_CACHE, home / "fastmoco" / "checked" / f"{key}.json"]


def _load_check_cache(root: Path) -> dict:
    """{path relative to root: [size, mtime_ns, how far checked, reason or None]} from every place."""
    files = {}
    for path in check_cache_paths(root):
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(d, dict) and d.get("version") == _CHECKS_VERSION and isinstance(d.get("files"), dict):
            files.update(d["files"])
    return files


def _save_check_cache(root: Path, files: dict) -> None:
    """Atomically, in the first place that takes it; a warning when none does."""
    text = json.dumps({"version": _CHECKS_VERSION, "root": os.path.realpath(root), "files": files},
                      separators=(",", ":"))
    errors = []
    for path in check_cache_paths(root):
        tmp = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text)
            os.replace(tmp, path)
            return
        except OSError as e:
            errors.append(f"{path}: {e.strerror or e}")
            try:
                tmp.unlink(missing_ok=True)
            except OSError:   # its folder could not be made
                pass
    warnings.warn(f"could not keep the image checks of {root} ({'; '.join(errors)}): the next run checks every "
                  "file again", RuntimeWarning, stacklevel=3)


def _stat_regular(path: str) -> os.stat_result | str:
    """The file's stat, or why it cannot be read (missing, a broken link, not a regular file)."""
    try:
        st = os.stat(path)
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    why = _not_regular(st.st_mode)
    return st if why is None else f"unreadable ({why})"


def _shards_are_ranks(shard_id: int, num_shards: int) -> bool:
    """Whether the shards are the ranks of the initialized torch.distributed job (then they check together)."""
    if num_shards <= 1:
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() == num_shards \
        and dist.get_rank() == shard_id


def _run_checks(paths: list[str], verify: bool, num_workers: int, shard_id: int, num_shards: int) -> list:
    """`_check` of every path, in threads. When the shards are ranks that all have the same list
    (the same dataset, the same cache), each checks every num_shards-th file and the results are
    gathered (collective: every rank of the job scans then)."""
    def local(part):
        with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
            return list(pool.map(lambda p: _check(p, verify), part))

    if not _shards_are_ranks(shard_id, num_shards):
        return local(paths)
    import torch.distributed as dist

    digests = [None] * num_shards
    dist.all_gather_object(digests, hashlib.sha256("\n".join(paths).encode()).hexdigest())
    if len(set(digests)) > 1:   # the ranks see different files or caches: each checks its own list
        return local(paths)
    parts = [None] * num_shards
    dist.all_gather_object(parts, local(paths[shard_id::num_shards]))
    out: list = [None] * len(paths)
    for r, part in enumerate(parts):
        out[r::num_shards] = part
    return out


def check_files(paths: list[str], root: str | os.PathLike, *, verify: bool, num_workers: int = 16,
                shard_id: int = 0, num_shards: int = 1) -> list[str | None]:
    """Why each file cannot be used (None: usable): not a regular file, then `_check` (header and end;
    with `verify` a full decode). A file's result is kept (`CHECK_CACHE`) keyed by its path
    relative to `root`, size and mtime, and reused while those stay the same: a dataset is decoded
    once, later runs and evaluation only stat its files. Results of unreadable files are not kept
    (permissions may change without the mtime)."""
    root = Path(root)
    level = _DECODED if verify else _HEADER
    cache = _load_check_cache(root)
    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:   # stat is I/O bound (NFS)
        stats = list(pool.map(_stat_regular, paths))
    rels = [os.path.relpath(p, root) for p in paths]
    reasons: list[str | None] = [None] * len(paths)
    todo = []
    for i, st in enumerate(stats):
        if isinstance(st, str):
            reasons[i] = st
            continue
        kept = cache.get(rels[i])
        if kept and kept[:2] == [st.st_size, st.st_mtime_ns] and (kept[2] >= level or kept[3] is not None):
            reasons[i] = kept[3]
        else:
            todo.append(i)
    for i, reason in zip(todo, _run_checks([paths[i] for i in todo], verify, num_workers, shard_id, num_shards)):
        reasons[i] = reason
        if reason is None or not reason.startswith("unreadable"):
            cache[rels[i]] = [stats[i].st_size, stats[i].st_mtime_ns, level, reason]
    if todo and shard_id == 0:
        _save_check_cache(root, cache)
    return reasons


def dataset_fingerprint(samples, root: str | os.PathLike) -> str:
    """What identifies a dataset to a resumed run (its data position indexes this list): the usable
    files, as paths relative to `root`, and their labels, in order; for a sample source (tar shards)
    the names of its members (shard and key), in order."""
    h = hashlib.sha256()
    if hasattr(samples, "read"):   # a sample source (tar shards): its members' names, in order
        for i in range(len(samples)):
            h.update(f"{os.path.relpath(samples.name(i), root)}\n".encode())
        return f"{len(samples)} samples, sha256 {h.hexdigest()[:16]}"
    for path, label in samples:
        h.update(f"{os.path.relpath(path, root)}\t{label}\n".encode())
    return f"{len(samples)} files, sha256 {h.hexdigest()[:16]}"


def list_classes(root: str | os.PathLike) -> list[str]:
    """Class folder names of an ImageFolder root in label order (sorted; hidden folders left out)."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def scan_image_folder(root: str | os.PathLike, file_list: str | os.PathLike = "", *,
                      verify: bool = False, num_workers: int = 16, max_bad_fraction: float = 1.0,
                      shard_id: int = 0, num_shards: int = 1) -> list[tuple[str, int]]:
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
            if not path.exists():
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
    reasons = check_files([path for path, _ in candidates], root_path, verify=verify, num_workers=num_workers,
                          shard_id=shard_id, num_shards=num_shards)
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

    def __init__(self, samples: list[tuple[str, int]], read_timeout: float = 300.0, threads: int = 8):
        self.files = [s[0] for s in samples]
        self.labels = [int(s[1]) for s in samples]
        self.reader = FileReader(threads, read_timeout)   # regular files only; a hung read names its file

    def __len__(self) -> int:
        return len(self.files)

    def name(self, i: int) -> str:
        return self.files[i]

    def read_batch(self, indices: list[int]) -> list[tuple[np.ndarray | OSError, int]]:
        """(bytes, label) per sample, read in parallel; an unreadable file gives its OSError."""
        return list(zip(self.reader.read([self.files[i] for i in indices]), (self.labels[i] for i in indices)))

    def read(self, i: int) -> tuple[np.ndarray, int]:
        (data, label), = self.read_batch([i])
        if isinstance(data, OSError):
            raise data
        return data, label

    def close(self) -> None:
        self.reader.close()

    def bad_samples(self, max_fraction: float) -> BadSamples:
        return BadSamples(self.files, max_fraction)

    def plan(self, batch_size: int, *, shard_id: int, num_shards: int, seed: int, train: bool,
             drop_last: bool | None = None):
        from .base import ShardPlan

        return ShardPlan(len(self), batch_size, shard_id=shard_id, num_shards=num_shards, seed=seed, train=train,
                         drop_last=drop_last)


def sample_source(samples, read_timeout: float = 300.0, threads: int = 8):
    """A loader's `samples` as an encoded-sample source: a (path, label) list becomes `FileSamples`
    (reads in `threads` threads, `read_timeout` per read); a source (shards.ShardSamples) is used as it is."""
    return samples if hasattr(samples, "read") else FileSamples(samples, read_timeout, threads)
