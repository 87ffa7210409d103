"""A small ImageFolder of real photographs for tests, benches and the README demo.

    fastmoco-make-demo-data OUT_DIR [--num-images 256] [--val-images 512]   # OUT_DIR/train, OUT_DIR/val

The photographs are the ones shipped inside scikit-image (`skimage.data`,
nothing downloaded). Each class folder holds random crops of one photograph,
resized so the shorter side is 300-500 px with aspect 3/4-4/3 (ImageNet-like
sizes) and saved as JPEG quality 90. So a kNN on the labels is meaningful: two
crops of the same photograph share a class. The command writes a train and a
val split (small details of the same photographs: VAL_AREA, another seed) for the README
demo's kNN monitor.

Idempotent: a `.complete` marker records the parameters; a folder made with the
same parameters is left as it is.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

# Colour photographs first; the grey ones (saved as 1-channel JPEGs) come last
# so that `color_only=True` simply drops them.
COLOR_SOURCES = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry",
                 "motorcycle", "retina", "rocket")
GRAY_SOURCES = ("camera", "coins", "moon")

SHORT_SIDE = (300, 500)          # pixels, like ImageNet's typical sizes
ASPECT = (3 / 4, 4 / 3)          # width / height
AREA = (0.4, 1.0)                # crop area, fraction of the source photograph, before the resize
VAL_AREA = (0.03, 0.15)          # the val split: small details of the photographs (a harder kNN)
JPEG_QUALITY = 90
VAL_SEED_OFFSET = 1_000_003      # the val split's crops: another seed than train's
_MARKER = ".complete"


def _load_source(name: str) -> np.ndarray:
    """(H, W, 3) or (H, W) uint8 photograph shipped with scikit-image."""
    import skimage.data

    if name == "motorcycle":
        return skimage.data.stereo_motorcycle()[0]
    return getattr(skimage.data, name)()


def _sample(photo: np.ndarray, rng: np.random.Generator, area_range: tuple[float, float] = AREA):
    """One random crop of `photo`, resized to an ImageNet-like size (PIL image)."""
    from PIL import Image

    h, w = photo.shape[:2]
    aspect = float(np.exp(rng.uniform(np.log(ASPECT[0]), np.log(ASPECT[1]))))
    area = rng.uniform(*area_range) * h * w
    cw = int(min(w, round(np.sqrt(area * aspect))))
    ch = int(min(h, round(cw / aspect)))
    y0 = int(rng.integers(0, h - ch + 1))
    x0 = int(rng.integers(0, w - cw + 1))
    crop = Image.fromarray(photo[y0:y0 + ch, x0:x0 + cw])
    short = int(rng.integers(SHORT_SIDE[0], SHORT_SIDE[1] + 1))
    scale = short / min(cw, ch)
    size = (max(1, round(cw * scale)), max(1, round(ch * scale)))
    return crop.resize(size, Image.BICUBIC)


def make_demo_data(out_dir: str | os.PathLike, num_images: int = 256, seed: int = 0,
                   color_only: bool = False, area: tuple[float, float] = AREA) -> Path:
    """Write `num_images` JPEGs under `out_dir/<photograph>/`; return `out_dir`.

    Classes are the source photographs (8 colour, plus 3 grey unless
    `color_only`), images spread round-robin over them; each a crop of `area`
    (fraction of the photograph) resized to an ImageNet-like size.
    """
    out = Path(out_dir)
    sources = COLOR_SOURCES if color_only else COLOR_SOURCES + GRAY_SOURCES
    params = {"num_images": int(num_images), "seed": int(seed), "sources": list(sources),
              "quality": JPEG_QUALITY, "version": 1}
    if tuple(area) != AREA:
        params["area"] = list(area)
    marker = out / _MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == params:
                return out
        except (OSError, json.JSONDecodeError):
            pass
        marker.unlink()
    photos = {name: _load_source(name) for name in sources}
    for name in sources:
        (out / name).mkdir(parents=True, exist_ok=True)
    for i in range(num_images):
        name = sources[i % len(sources)]
        rng = np.random.default_rng([seed, i])
        img = _sample(photos[name], rng, tuple(area))
        path = out / name / f"{name}_{i:05d}.jpg"
        tmp = path.with_suffix(".tmp")
        img.save(tmp, format="JPEG", quality=JPEG_QUALITY)
        os.replace(tmp, path)
    marker.write_text(json.dumps(params))
    return out


def make_demo_splits(out_dir: str | os.PathLike, num_images: int = 256, val_images: int = 512, seed: int = 0,
                     color_only: bool = False) -> tuple[Path, Path | None]:
    """`out_dir/train` and (when `val_images`) `out_dir/val`: the same classes, different crops."""
    out = Path(out_dir)
    train = make_demo_data(out / "train", num_images, seed, color_only)
    val = make_demo_data(out / "val", val_images, seed + VAL_SEED_OFFSET, color_only, VAL_AREA) \
        if val_images > 0 else None
    return train, val


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--num-images", type=int, default=256, help="train split")
    ap.add_argument("--val-images", type=int, default=512, help="val split (0: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--color-only", action="store_true", help="leave out the grey photographs")
    args = ap.parse_args(argv)
    train, val = make_demo_splits(args.out_dir, args.num_images, args.val_images, args.seed, args.color_only)
    print(f"demo data: {args.num_images} JPEGs in {train}" + (f", {args.val_images} in {val}" if val else ""))


if __name__ == "__main__":
    main()
