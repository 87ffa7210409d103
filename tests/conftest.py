import os

# Before torch loads OpenBLAS/OpenMP: on 2 cores their thread pools fight each other
# (the Triton interpreter's tl.dot ran ~500x slower under load).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Triton kernels are decorated at import: the interpreter must be chosen before
# any test module imports them. Without a GPU there is no other way to run them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marker gpu); none is present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
