"""The DALI graph's external source (pipelines/dali.py EncodedFeeder) reads each batch ahead, on a
thread of its own, during the step before it: same batches in the cursor's order, bad and vanished
samples replaced as before, a failed read raised in the training thread, no thread left by close()."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from fastmoco.pipelines import BadImageWarning, DatasetError
from fastmoco.pipelines.base import DataCursor, ShardPlan
from fastmoco.pipelines.dali import EncodedFeeder
from fastmoco.pipelines.folder import BadSamples, FileSamples

WAIT_S = 60   # for a thread on a busy 2-core machine


class RecordingSource:
    """Sample i's bytes are [i]; each read_batch is recorded with the thread that made it; samples in
    `fail` give an OSError, a batch holding one of `raise_on` raises DatasetError."""

    def __init__(self, n: int, fail=(), raise_on=()):
        self.paths = [f"img{i}.jpg" for i in range(n)]
        self.fail, self.raise_on = set(fail), set(raise_on)
        self.reads: list[tuple[str, list[int]]] = []
        self.closed = False

    def read_batch(self, indices):
        self.reads.append((threading.current_thread().name, list(indices)))
        if self.raise_on & set(indices):
            raise DatasetError(f"reading {self.paths[min(self.raise_on & set(indices))]} has not returned")
        return [(FileNotFoundError(2, "No such file or directory") if i in self.fail
                 else np.array([i], np.uint8), i % 3) for i in indices]

    def bad_samples(self, max_fraction):
        return BadSamples(self.paths, max_fraction)

    def close(self):
        self.closed = True


def _cursor(n: int, batch: int) -> DataCursor:
    return DataCursor(ShardPlan(n, batch, seed=0, train=True))


def _batches(cursor: DataCursor, n: int) -> list[list[int]]:
    """The first n batches' sample indices from the cursor's position."""
    return [[int(i) for i in idx] for _, (_, _, idx) in zip(range(n), cursor.batches(across_epochs=True))]


def _wait_for(cond, what: str):
    deadline = time.monotonic() + WAIT_S
    while not cond():
        assert time.monotonic() < deadline, f"waited {WAIT_S} s for {what}"
        time.sleep(0.01)


def _fed(out) -> list[int]:
    data, labels = out
    return [int(d[0]) for d in data]


def test_each_batch_is_read_ahead_off_the_training_thread_in_the_cursor_order():
    src, cursor = RecordingSource(10), _cursor(10, 4)
    feeder = EncodedFeeder(src, cursor)
    expect = _batches(cursor, 9)
    main = threading.current_thread().name

    assert _fed(feeder()) == expect[0] and src.reads == [(main, expect[0])]   # nothing was ahead of the first
    _wait_for(lambda: len(src.reads) == 2, "the second batch to be read ahead before it is asked for")
    assert src.reads[1] == ("fastmoco-read-ahead", expect[1])
    for k in range(1, 8):   # into the third epoch: each batch read once, ahead, off the training thread
        data, labels = feeder()
        assert [int(d[0]) for d in data] == expect[k] and [int(x[0]) for x in labels] == [i % 3 for i in expect[k]]
    _wait_for(lambda: len(src.reads) == 9, "the ninth batch's read ahead")
    assert src.reads == [(main, expect[0])] + [("fastmoco-read-ahead", e) for e in expect[1:]]
    assert feeder.calls == 8 and feeder.wait_s > 0
    feeder.close()


def test_a_sample_gone_when_read_ahead_or_marked_since_is_replaced_and_named():
    src, cursor = RecordingSource(8, fail={5}), _cursor(8, 4)
    batches = _batches(cursor, 2)
    gone = 5
    k = 0 if gone in batches[0] else 1
    feeder = EncodedFeeder(src, cursor)
    with pytest.warns(BadImageWarning, match=r"skipping img5\.jpg: unreadable \(No such file or directory\)"):
        fed = [_fed(feeder()), _fed(feeder())]
    stand_in = (gone + 1) % 8
    assert fed[k] == [stand_in if i == gone else i for i in batches[k]]
    assert feeder.bad.bad == {gone}

    # marked bad after its batch was read ahead (the read succeeded): the stand-in is read instead
    nxt = _batches(cursor, 3)[2]
    victim = nxt[0]
    _wait_for(lambda: len(src.reads) >= 3 + (k == 0), "the third batch's read ahead")
    with pytest.warns(BadImageWarning, match=f"skipping img{victim}.jpg: does not decode"):
        feeder.bad.mark(victim, "does not decode")
    out = _fed(feeder())
    assert victim not in out and len(out) == 4 and out[1:] == [feeder.bad.replacement(i) for i in nxt[1:]]
    assert out[0] == feeder.bad.replacement(victim) != victim
    feeder.close()


def test_a_failed_read_ahead_is_raised_in_the_training_thread():
    cursor = _cursor(8, 4)
    batches = _batches(cursor, 2)
    src = RecordingSource(8, raise_on={batches[1][2]})
    feeder = EncodedFeeder(src, cursor)
    assert _fed(feeder()) == batches[0]
    with pytest.raises(DatasetError, match=f"reading img{batches[1][2]}.jpg has not returned"):
        feeder()
    feeder.close()


def test_close_ends_the_read_ahead_thread_and_closes_the_source(tmp_path):
    files = []
    for i in range(6):
        files.append((str(tmp_path / f"{i}.bin"), i % 2))
        (tmp_path / f"{i}.bin").write_bytes(bytes([i]) * (i + 1))
    src, cursor = FileSamples(files, threads=2), _cursor(6, 3)
    first = _batches(cursor, 1)[0]
    before = set(threading.enumerate())
    feeder = EncodedFeeder(src, cursor)
    data, labels = feeder()
    assert [d.tobytes() for d in data] == [bytes([i]) * (i + 1) for i in first]
    assert [int(x[0]) for x in labels] == [i % 2 for i in first]
    thread, = [t for t in set(threading.enumerate()) - before if t.name == "fastmoco-read-ahead"]
    feeder.close()
    thread.join(WAIT_S)
    assert not thread.is_alive(), "the read-ahead thread outlived close()"
    assert src.reader._pid is None   # the source's reader threads were told to end too
