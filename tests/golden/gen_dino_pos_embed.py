"""Golden figures of DINO's position-embedding resampling, from the official code.

Runs facebookresearch/dino's VisionTransformer.interpolate_pos_encoding (vision_transformer.py) on a
random (fixed-seed) learned table of a model built for 224 px, with patch 16 and 8, at 96 px (every
local crop) and 160 px; at 224 px (the model's own grid) it returns the table as is, which is checked
here rather than stored. Writes `dino_pos_embed.pt`:
{"/16": {"table": (1, 1 + 14*14, C), "96": (1, 1 + 6*6, C), "160": ...}, "/8": ...}.
Channels are resampled independently, so C is small (8); a test may tile them over a wider model.

    python tests/golden/gen_dino_pos_embed.py --moco-v3 PATH --dino PATH --out tests/golden
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

IMG = 224
PATCHES = (16, 8)
SIZES = (96, 160, 224)
CHANNELS = 8


def generate(moco_v3: Path, dino: Path, out: Path) -> None:
    sys.path.insert(0, str(dino))
    try:
        import vision_transformer as vits  # the official module, from the checkout
    finally:
        sys.path.remove(str(dino))
    g = torch.Generator().manual_seed(0)
    result = {}
    for patch in PATCHES:
        vit = vits.VisionTransformer(img_size=[IMG], patch_size=patch, embed_dim=CHANNELS, depth=0, num_heads=1)
        with torch.no_grad():
            vit.pos_embed.copy_(torch.randn(vit.pos_embed.shape, generator=g))
        entry = {"table": vit.pos_embed.detach().clone()}
        for size in SIZES:
            tokens = torch.zeros(1, (size // patch) ** 2 + 1, CHANNELS)  # only its shape is read
            with torch.no_grad():
                table = vit.interpolate_pos_encoding(tokens, size, size).detach().clone()
            if size == IMG:
                assert torch.equal(table, entry["table"]), "the official table changed at its own size"
            else:
                entry[str(size)] = table
        result[f"/{patch}"] = entry
    out.mkdir(parents=True, exist_ok=True)
    torch.save(result, out / "dino_pos_embed.pt")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--moco-v3", type=Path, required=True, help="checkout of facebookresearch/moco-v3")
    p.add_argument("--dino", type=Path, required=True, help="checkout of facebookresearch/dino")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    a = p.parse_args(argv)
    generate(a.moco_v3, a.dino, a.out)


if __name__ == "__main__":
    main()
