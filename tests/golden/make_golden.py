"""Regenerate the golden files: run the official MoCo v3 and DINO code on small fixed inputs and write
what it computes under tests/golden/ (numbers only; the official code is never copied here).

    python tests/golden/make_golden.py --moco-v3 /work/official/moco-v3 --dino /work/official/dino --out tests/golden
    python tests/golden/make_golden.py ... --only lars,schedules        # some of them

Each tests/golden/gen_<name>.py has `generate(moco_v3: Path, dino: Path, out: Path) -> None`; this script
imports every one (as `golden.gen_<name>`, tests/ on sys.path) after `golden.official.setup` made both
checkouts importable (one gloo process, timm 1.0 shimmed for moco-v3's vits.py) and calls it. CPU and fp32
only: CUDA is hidden before torch loads, so the official code's autocast and GradScaler turn themselves off.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

os.environ["CUDA_VISIBLE_DEVICES"] = ""     # before torch is imported: fp32 on the CPU, as the tests run
os.environ.setdefault("OMP_NUM_THREADS", "1")

HERE = Path(__file__).resolve().parent
MAX_BYTES = 2 * 1024 * 1024                 # all golden files together


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--moco-v3", type=Path, required=True, help="checkout of facebookresearch/moco-v3")
    p.add_argument("--dino", type=Path, required=True, help="checkout of facebookresearch/dino")
    p.add_argument("--out", type=Path, default=HERE, help="where the golden files go (default: tests/golden)")
    p.add_argument("--only", default="", help="comma-separated generator names (gen_<name>.py), default all")
    args = p.parse_args(argv)

    sys.path.insert(0, str(HERE.parent))    # `golden` is tests/golden
    from golden import official

    official.setup(args.moco_v3, args.dino)
    names = sorted(f.stem[len("gen_"):] for f in HERE.glob("gen_*.py"))
    only = [n for n in args.only.split(",") if n]
    unknown = sorted(set(only) - set(names))
    if unknown:
        raise SystemExit(f"--only {','.join(unknown)}: no tests/golden/gen_<name>.py (known: {', '.join(names)})")
    args.out.mkdir(parents=True, exist_ok=True)
    for name in only or names:
        start = time.time()
        module = importlib.import_module(f"golden.gen_{name}")
        module.generate(args.moco_v3.resolve(), args.dino.resolve(), args.out.resolve())
        print(f"gen_{name}: {time.time() - start:.1f} s", flush=True)
    files = sorted(f for f in args.out.iterdir() if f.suffix in (".safetensors", ".json", ".npz", ".pt"))
    total = sum(f.stat().st_size for f in files)
    for f in files:
        print(f"  {f.name:40s} {f.stat().st_size / 1024:8.1f} KiB")
    print(f"  {'total':40s} {total / 1024:8.1f} KiB")
    if total > MAX_BYTES:
        raise SystemExit(f"the golden files take {total} bytes, over the {MAX_BYTES} allowed: make the cases smaller")


if __name__ == "__main__":
    main()
