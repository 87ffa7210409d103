"""Golden attention maps from the official DINO code: its ViT's `get_last_selfattention`.

    python tests/golden/gen_attention.py /path/to/facebookresearch/dino      # (checked at 7c446df5)
    python tests/golden/make_golden.py ... --only attention                   # the same, with the others

writes tests/golden/attention.safetensors: a DINO ViT with fastmoco's `vit_test` shape (width 72, depth 2,
3 heads, patch 8, 32 px, DINO's own init under seed 0, weights rounded to fp16 and stored so), a seeded
input batch, and what the official model returns for it (the last block's attention, (B, H, N, N) fp32).
tests/test_attention_maps.py loads the weights into fastmoco's ViT and compares its last-block attention.
The official code is imported from the path given, never copied.
"""
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

OUT = Path(__file__).with_name("attention.safetensors")
SHAPE = dict(img_size=[32], patch_size=8, embed_dim=72, depth=2, num_heads=3, mlp_ratio=4, qkv_bias=True)
BATCH = 2


def generate(moco_v3: Path, dino: Path, out: Path) -> None:
    """make_golden.py's entry: the official DINO ViT from `dino`, the file into `out`."""
    main(str(dino), out / OUT.name)


def main(dino_repo: str, out: Path = OUT) -> None:
    if dino_repo not in sys.path:
        sys.path.insert(0, dino_repo)
    import vision_transformer as vits  # the official module

    torch.manual_seed(0)
    model = vits.VisionTransformer(**SHAPE, norm_layer=partial(nn.LayerNorm, eps=1e-6)).eval()
    with torch.no_grad():
        for p in model.state_dict().values():
            p.copy_(p.half().float())       # stored as fp16: the official output is of the stored weights
    x = torch.randn(BATCH, 3, 32, 32)
    with torch.no_grad():
        attn = model.get_last_selfattention(x)
    tensors = {f"weights/{k}": v.half().contiguous() for k, v in model.state_dict().items()}
    tensors.update({"input": x.contiguous(), "attention": attn.float().contiguous()})
    meta = {k: str(v) for k, v in SHAPE.items()}
    meta["source"] = "facebookresearch/dino vision_transformer.py VisionTransformer.get_last_selfattention"
    save_file(tensors, str(out), metadata=meta)
    print(f"{out}: attention {tuple(attn.shape)}, {len(tensors) - 2} weight tensors")


if __name__ == "__main__":
    main(sys.argv[1])
