"""Running the official repositories at generation time (tests/golden/make_golden.py); never at test time.

    official.setup(moco_v3, dino)   # both checkouts importable, one gloo process, timm 1.0 shimmed
    with official.cuda_is_cpu():    # the official code's .cuda() calls: the identity on this CPU run
        ...
    official.provenance(moco_v3, dino)  # sha256 of the official files the generators run, for the metadata

Shims, all here, none in the project:
- moco-v3's vits.py was written against timm 0.4.9. timm 1.0 moved `timm.models.layers.helpers.to_2tuple`
  to `timm.layers`, renamed VisionTransformer.num_tokens to num_prefix_tokens, and passes its patch
  embedding arguments (`bias`, `dynamic_img_pad`, `device`, ...) that vits.ConvStem does not take (all at
  their defaults here: a bias on the 1x1 projection, no padding, CPU). The ViT itself (patch
  embedding, class token + position embedding, pre-norm blocks, final norm, class token to the head) is
  the same computation in both versions.
- The official code has no ViT as small as fastmoco's CPU test arch: `prepare_vits` adds `vit_test`
  (and `vit_conv_test`) to vits.py's namespace, built exactly as its `vit_small` with smaller numbers.
- The official code gathers keys (moco-v3) and all-reduces the center (dino) with torch.distributed:
  one gloo process makes those the identity they are on one GPU.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import socket
import sys
import types
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

# What identifies each checkout, and the files whose content the golden files depend on.
MOCO_V3_FILES = ("moco/builder.py", "moco/optimizer.py", "moco/loader.py", "vits.py", "main_moco.py", "main_lincls.py",
                 "CONFIG.md")
DINO_FILES = ("main_dino.py", "utils.py", "vision_transformer.py", "run_with_submitit.py", "README.md")
# fastmoco's CPU test archs (fastmoco/models/vit.py VIT_SIZES), as vits.py would define them.
TINY_VITS = {"vit_test": dict(img_size=32, patch_size=8, embed_dim=72, depth=2, num_heads=3),
             "vit_conv_test": dict(img_size=32, patch_size=16, embed_dim=72, depth=1, num_heads=3, conv=True)}


def _check_checkout(path: Path, files: tuple[str, ...], flag: str) -> Path:
    path = Path(path).resolve()
    missing = [f for f in files if not (path / f).is_file()]
    if missing:
        raise SystemExit(f"{flag} {path}: not a checkout of the official repository (no {', '.join(missing)})")
    return path


def setup(moco_v3: Path, dino: Path) -> None:
    """Idempotent. Call before importing anything from the official repositories."""
    for path in (_check_checkout(moco_v3, MOCO_V3_FILES, "--moco-v3"), _check_checkout(dino, DINO_FILES, "--dino")):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    _shim_timm()
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def _shim_timm() -> None:
    import timm.layers
    import timm.models.vision_transformer as timm_vit

    if "timm.models.layers.helpers" not in sys.modules:
        try:
            import timm.models.layers.helpers  # noqa: F401  (timm < 0.9)
        except ModuleNotFoundError:
            helpers = types.ModuleType("timm.models.layers.helpers")
            helpers.to_2tuple = timm.layers.to_2tuple
            sys.modules["timm.models.layers.helpers"] = helpers
    if not hasattr(timm_vit.VisionTransformer, "num_tokens"):
        timm_vit.VisionTransformer.num_tokens = property(lambda self: self.num_prefix_tokens)


def prepare_vits(vits) -> None:
    """vits.ConvStem made to take timm 1.0's patch-embedding arguments (vit_conv_small/base look it up by
    name when called), and vits.vit_test / vits.vit_conv_test: vits.vit_small's construction at fastmoco's
    CPU test sizes. Idempotent."""
    if not getattr(vits.ConvStem, "takes_timm_1", False):
        takes = inspect.signature(vits.ConvStem.__init__).parameters

        class ConvStem(vits.ConvStem):
            takes_timm_1 = True

            def __init__(self, **kwargs):  # without timm 1.0's extra arguments (bias, dynamic_img_pad, device, ...)
                super().__init__(**{k: v for k, v in kwargs.items() if k in takes})

        vits.ConvStem = ConvStem
    for name, size in TINY_VITS.items():
        size = dict(size)
        extra = {"embed_layer": vits.ConvStem} if size.pop("conv", False) else {}
        setattr(vits, name, partial(vits.VisionTransformerMoCo, mlp_ratio=4, qkv_bias=True,
                                    norm_layer=partial(nn.LayerNorm, eps=1e-6), **size, **extra))


@contextlib.contextmanager
def cuda_is_cpu():
    """Tensor.cuda / Module.cuda as the identity: the official code moves its labels and models to the GPU."""
    saved = torch.Tensor.cuda, nn.Module.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    nn.Module.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda, nn.Module.cuda = saved


def provenance(moco_v3: Path, dino: Path) -> dict:
    """sha256 (first 16 hex digits) of each official file the golden files depend on."""
    out = {}
    for repo, root, files in (("moco-v3", moco_v3, MOCO_V3_FILES), ("dino", dino, DINO_FILES)):
        for f in files:
            out[f"{repo}/{f}"] = hashlib.sha256((Path(root) / f).read_bytes()).hexdigest()[:16]
    return out
