"""Class-token attention maps of a ViT's last block (DINO's pictures), and `fastmoco-attention`.

    fastmoco-attention --checkpoint runs/dino_vit_s16 --images cat.jpg dogs/ --out maps/ [--threshold 0.6]

For each image: the last block's attention of the class token over the
patches, every head, upsampled to the image (nearest: one colour per patch,
as DINO's visualize_attention.py) and overlaid on it; one PNG per image with
the image, each head and the heads' mean. `--threshold F` keeps, in each map,
the smallest set of patches that holds a fraction F of its mass (DINO's
option: sort the patches by attention, keep the largest until F is reached);
the rest of the image is dimmed.

Where the numbers come from: `VisionTransformer(x, last_attention=True)` runs
every block but the last as in training (fused kernels where the switch says)
and the last block on the reference attention path, which alone forms the
softmax probabilities (the kernel never does); tests/test_attention_maps.py
checks that this path gives the fused block's output. bf16 on a GPU
(autocast), fp32 on the CPU; the probabilities are fp32 either way.

Input: any checkpoint the evaluation commands read (a fastmoco run or
checkpoint directory, an official MoCo v3 .pth.tar, an exported .safetensors:
fastmoco.evaluation.weights), every ViT fastmoco trains (MoCo v3 and DINO
recipes, patch 16/14/8/7, conv stem, ViT-BN). Each image is resized so its
shorter side is the model's image size (or --image-size) and centre-cropped
to a square.
"""
from __future__ import annotations

import argparse
import io
import os
from pathlib import Path

import numpy as np
import torch

from fastmoco.evaluation.figures import new_figure, png_bytes

ALPHA = 0.6          # weight of the heat map over the image
DIM = 0.25           # brightness of the image outside the kept patches (--threshold)
COLORMAP = "inferno"
MAX_COLUMNS = 8      # panels per row of the figure
PANEL_INCHES = 1.7


class AttentionError(ValueError):
    """Input that cannot give attention maps; the message names the file or the value."""


# -- the maps ------------------------------------------------------------------------------------------
def load_image(path: str | os.PathLike | io.BytesIO, size: int) -> tuple[np.ndarray, torch.Tensor]:
    """(size, size, 3) uint8 picture and its normalised (3, size, size) fp32 input: the shorter side
    resized to `size` (bicubic), centre-cropped square, ImageNet mean/std. `path`: a file, or the
    encoded bytes of one (a tar shard's member) in a BytesIO whose `name` says what it is."""
    import torchvision.transforms.functional as TF
    from PIL import Image
    from torchvision.transforms import InterpolationMode

    from fastmoco.pipelines import IMAGENET_MEAN, IMAGENET_STD

    try:
        with Image.open(path) as f:
            img = f.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:
        raise AttentionError(f"image {str(getattr(path, 'name', path))!r} cannot be read "
                             f"({type(e).__name__}: {e})") from None
    img = TF.center_crop(TF.resize(img, size, InterpolationMode.BICUBIC), [size, size])
    return np.asarray(img).copy(), TF.normalize(TF.to_tensor(img), IMAGENET_MEAN, IMAGENET_STD)


@torch.no_grad()
def class_attention(backbone: torch.nn.Module, x: torch.Tensor, *, bf16: bool = False) -> torch.Tensor:
    """(B, heads, grid, grid) fp32: the last block's attention of the class token over the patches of
    the (B, 3, S, S) images `x`, each map summing to 1 less the class token's attention to itself.
    Collective under ZeRO-3 (a forward of the backbone module). The backbone's mode is put back."""
    patch = backbone.size.patch_size
    if x.shape[-2] % patch or x.shape[-1] % patch:
        raise AttentionError(f"images of {x.shape[-2]}x{x.shape[-1]} pixels are not a multiple of the model's "
                             f"patch size {patch}")
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16 and x.device.type == "cuda"):
            probs = backbone(x, last_attention=True)                          # (B, H, N, N) fp32
    finally:
        backbone.train(was_training)
    B, H = probs.shape[:2]
    return probs[:, :, 0, 1:].float().reshape(B, H, x.shape[-2] // patch, x.shape[-1] // patch)


def keep_mass(maps: torch.Tensor, fraction: float) -> torch.Tensor:
    """Bool mask of the maps' shape (..., gh, gw): in each map the smallest set of patches holding at
    least `fraction` of its mass (the largest patches first; DINO's --threshold)."""
    if not 0.0 < fraction <= 1.0:
        raise AttentionError(f"threshold must be in (0, 1], got {fraction}")
    flat = maps.flatten(-2).double()
    values, order = flat.sort(dim=-1, descending=True)
    before = values.cumsum(-1) - values                  # mass of the larger patches before each one
    keep_sorted = before < fraction * flat.sum(-1, keepdim=True)
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return keep.reshape(maps.shape)


def _upsample(grid: np.ndarray, size: int) -> np.ndarray:
    """(gh, gw) -> (size, size), each patch a block of equal pixels."""
    factor = size // grid.shape[0]
    if factor * grid.shape[0] != size or grid.shape[0] != grid.shape[1]:
        raise AttentionError(f"a {grid.shape[0]}x{grid.shape[1]} map does not tile a {size}-pixel square")
    return np.repeat(np.repeat(grid, factor, 0), factor, 1)


def overlay(image: np.ndarray, attn: torch.Tensor, keep: torch.Tensor | None = None) -> np.ndarray:
    """(S, S, 3) uint8: `image` with the (gh, gw) map `attn` upsampled over it as a heat map (scaled
    to its maximum); where `keep` (bool, (gh, gw)) is given, the image outside it is dimmed instead."""
    from matplotlib import colormaps

    heat = attn.double().cpu().numpy()
    heat = heat / heat.max() if heat.max() > 0 else heat
    size = image.shape[0]
    colour = colormaps[COLORMAP](_upsample(heat, size))[..., :3]
    base = image.astype(np.float64) / 255.0
    out = (1.0 - ALPHA) * base + ALPHA * colour
    if keep is not None:
        out = np.where(_upsample(keep.cpu().numpy(), size)[..., None], out, DIM * base)
    return np.clip(np.round(out * 255.0), 0, 255).astype(np.uint8)


def render(image: np.ndarray, maps: torch.Tensor, *, threshold: float | None = None, title: str = ""):
    """A figure: the image, each head's overlay (maps: (heads, gh, gw)) and the heads' mean."""
    mean = maps.mean(0)
    keep = keep_mass(torch.cat([maps, mean[None]]), threshold) if threshold else None
    panels = [("image", image)]
    panels += [(f"head {h}", overlay(image, maps[h], None if keep is None else keep[h])) for h in range(len(maps))]
    panels.append(("mean", overlay(image, mean, None if keep is None else keep[-1])))
    cols = min(len(panels), MAX_COLUMNS)
    rows = -(-len(panels) // cols)
    fig = new_figure(cols * PANEL_INCHES, rows * PANEL_INCHES + 0.4)
    for i, (name, picture) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(picture, interpolation="nearest")
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    if threshold:
        title = f"{title}  (each map: the smallest set of patches holding {threshold:.0%} of its mass)".strip()
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def attention_of_files(backbone: torch.nn.Module, paths: list, *, size: int, device, dtype=torch.float32,
                       bf16: bool = False, batch_size: int = 16) -> tuple[list[np.ndarray], torch.Tensor]:
    """The pictures of `paths` (see `load_image`) and their maps (len, heads, gh, gw) on the CPU."""
    pictures, maps = [], []
    for start in range(0, len(paths), batch_size):
        loaded = [load_image(p, size) for p in paths[start:start + batch_size]]
        pictures += [picture for picture, _ in loaded]
        x = torch.stack([t for _, t in loaded]).to(device, dtype)
        maps.append(class_attention(backbone, x, bf16=bf16).cpu())
    return pictures, torch.cat(maps)


# -- fastmoco-attention ----------------------------------------------------------------------------------
def image_files(paths: list[str]) -> list[Path]:
    """The image files named, a folder's images (sorted, recursively) in its place."""
    from fastmoco.pipelines.folder import IMAGE_EXTENSIONS

    found = []
    for p in map(Path, paths):
        if p.is_dir():
            inside = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            if not inside:
                raise AttentionError(f"folder {str(p)!r} holds no image ({', '.join(IMAGE_EXTENSIONS)})")
            found += inside
        elif p.is_file():
            found.append(p)
        else:
            raise AttentionError(f"image {str(p)!r} does not exist")
    return found


def write_png(path: Path, data: bytes) -> None:
    """`data` to `path`, atomically (a reader never sees half a file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    from fastmoco.evaluation.cli import _errors
    from fastmoco.evaluation.weights import build_backbone, load_weights
    from fastmoco import quiet
    from fastmoco.methods import METHODS
    from fastmoco.models.resnet import RESNET_ARCHS

    p = argparse.ArgumentParser(prog="fastmoco-attention", description="Class-token attention maps of the "
                                "last block of a ViT checkpoint: every head and their mean, one PNG per image.")
    p.add_argument("--checkpoint", required=True, help="fastmoco checkpoint/run dir, official .pth.tar, "
                                                       "or .safetensors backbone")
    p.add_argument("--images", required=True, nargs="+", help="image files or folders of images")
    p.add_argument("--out", required=True, help="folder for the PNGs (<image name>.png)")
    p.add_argument("--threshold", type=float, default=None,
                   help="keep in each map the smallest set of patches holding this fraction of its mass "
                        "(DINO's --threshold, e.g. 0.6)")
    p.add_argument("--encoder", default="", choices=("online", "momentum"),
                   help="which encoder's backbone; default: the method's (MoCo v3: online, DINO: the teacher)")
    p.add_argument("--image-size", type=int, default=0, help="default: the checkpoint's")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="", help="default: cuda when there is one (bf16), else cpu (fp32)")
    quiet.add_flag(p)
    args = p.parse_args(argv)
    quiet.configure(args.verbose)
    with _errors():
        if args.threshold is not None and not 0.0 < args.threshold <= 1.0:
            raise AttentionError(f"--threshold must be in (0, 1], got {args.threshold}")
        files = image_files(args.images)
        sd, info = load_weights(args.checkpoint)
        if info.arch in RESNET_ARCHS:
            raise AttentionError(f"{info.path}: a {info.arch} has no attention; attention maps need a ViT")
        encoder = args.encoder or METHODS[info.method].default_encoder
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        backbone = build_backbone(info, sd, encoder).to(device)
        size = args.image_size or info.img_size
        patch = backbone.size.patch_size
        if size % patch:
            raise AttentionError(f"--image-size {size} is not a multiple of the model's patch size {patch}")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        print(f"{info.path} ({info.arch}/{patch}, {encoder} encoder, {size} px): {len(files)} image(s), PNGs in {out}",
              flush=True)
        used: set[str] = set()
        for start in range(0, len(files), args.batch_size):
            batch = files[start:start + args.batch_size]
            pictures, maps = attention_of_files(backbone, batch, size=size, device=device,
                                                bf16=device.type == "cuda", batch_size=args.batch_size)
            for path, picture, m in zip(batch, pictures, maps):
                name = path.stem
                while name in used:  # two images of one name (from two folders)
                    name += "_"
                used.add(name)
                title = f"{path.name}: {info.arch}/{patch}, {encoder} encoder, last block"
                target = out / f"{name}.png"
                write_png(target, png_bytes(render(picture, m, threshold=args.threshold, title=title)))
                print(f"{path} -> {target}", flush=True)


if __name__ == "__main__":
    main()
