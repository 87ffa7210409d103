"""The data cursor's promise, checked the same way for every backend: batches taken across epoch
ends and resumed from any saved position (a fresh loader given `state_dict()`) are the batches of
one uninterrupted iteration, bit for bit."""
from __future__ import annotations

import torch


def take(loader, n: int) -> list[tuple[torch.Tensor, ...]]:
    """The next n batches, across epoch ends (each `iter` is the rest of one epoch)."""
    out = []
    while len(out) < n:
        for batch in loader:
            out.append(tuple(t.clone() for t in batch))
            if len(out) == n:
                break
    return out


def assert_same_batches(a, b) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert all(torch.equal(u, v) for u, v in zip(x, y)), f"batch {i} differs"


def assert_resume_is_uninterrupted(make_loader, stops: list[int], total: int) -> None:
    """make_loader(): a fresh loader at (0, 0). `stops`: batch counts at which a run saves, stops
    and is resumed by a fresh loader (include an epoch end); the batches after `total` agree."""
    whole = take(make_loader(), total)
    per_epoch = len(make_loader())
    pieces, loader, done = [], make_loader(), 0
    for stop in stops + [total]:
        pieces += take(loader, stop - done)
        done = stop
        sd = loader.state_dict()
        assert (sd["epoch"], sd["step"]) == divmod(done, per_epoch), sd  # normalised: an epoch end is (e+1, 0)
        loader = make_loader()
        loader.load_state_dict(sd)
    assert_same_batches(pieces, whole)
