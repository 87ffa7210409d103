import os

import pytest
import torch

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
