"""Checks the kernel tests share: outputs poisoned before the call (an element a kernel fails to
write fails the test) and the three-way comparison kernel vs fp32 reference vs same-dtype torch."""
import contextlib
from unittest import mock

import torch


@contextlib.contextmanager
def poisoned_empty():
    """torch.empty returns NaN-filled float tensors: an element a kernel fails to write shows up."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    with mock.patch.object(torch, "empty", empty):
        yield


def assert_three_way(name, got, ref, same, atol):
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: NaN or inf (an unwritten element?)"
    err_kernel = (got.float() - ref).abs().max().item()
    err_torch = (same.float() - ref).abs().max().item()
    assert err_kernel <= 2 * err_torch + atol, f"{name}: kernel err {err_kernel:.3g}, torch err {err_torch:.3g}"
