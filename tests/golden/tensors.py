"""Golden files: their format, the seeded inputs both sides rebuild, and digests of large outputs.

A golden file is one safetensors file: tensors (float64 unless the value is an integer) and, in its
metadata, one JSON document under "meta" (what was run, with which values, from which official files).

    write(path, tensors, meta)              # by the generators (tests/golden/gen_*.py)
    tensors, meta = read(path)              # by the tests; a missing file names the command that makes it

Inputs that the official code and fastmoco both take (weights, images, gradients) are not stored when
they are large: both sides rebuild them with `seeded` / `fill_state` from a seed and the tensor's name,
and the golden file keeps their sums (`input_sums`), so a test fails naming the cause if torch's random
generator ever changes instead of comparing against other inputs.

Outputs too large to store whole (a ResNet's gradients) are stored as a `digest`: the tensor's norm,
its dot products with fixed random probe vectors and a few of its elements. Two tensors whose
difference has norm d differ in each probe entry by about d, so comparing digests with a tolerance
relative to the norm detects any difference above that tolerance, spread out or in one element.
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch

GOLDEN_DIR = Path(__file__).resolve().parent
REGENERATE = ("python tests/golden/make_golden.py --moco-v3 /path/to/moco-v3 --dino /path/to/dino "
              "--out tests/golden")
PROBES = 3          # random directions per digest
SAMPLES = 8         # elements per digest
FILL_FLOOR = 0.02   # the spread of a filled tensor whose official initial value is constant (biases, BN)
_CHUNK = 1 << 20    # probe vectors are drawn in chunks: a ResNet's 2.4M-element weight stays cheap


# -- files ---------------------------------------------------------------------------------------
def write(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Atomically: a half-written golden file is never left in place."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
              metadata={"meta": json.dumps(meta, sort_keys=True)})
    tmp.replace(path)


def read(name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """A golden file of tests/golden by name (e.g. "lars.safetensors")."""
    from safetensors import safe_open

    path = GOLDEN_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"golden file {path} is missing; make it with: {REGENERATE}")
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads((f.metadata() or {})["meta"])
    return tensors, meta


# -- seeded inputs -------------------------------------------------------------------------------
def name_seed(name: str, seed: int) -> int:
    """A generator seed per (name, seed): values depend on the tensor's name, not on the order."""
    return (zlib.crc32(name.encode()) * 1_000_003 + seed) % (2 ** 63)


def seeded(shape, seed: int, name: str = "", scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    """fp32 N(shift, scale^2) values, the same on every machine with the same torch."""
    g = torch.Generator().manual_seed(name_seed(name, seed))
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32) * scale + shift


def init_stats(state: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    """(len(names), 2) float64: mean and standard deviation of each floating tensor at its official init."""
    rows = []
    for n in names:
        t = state[n].double()
        rows.append([t.mean().item(), t.std().item() if t.numel() > 1 else 0.0])
    return torch.tensor(rows, dtype=torch.float64)


def fill_state(names: list[str], shapes: list[list[int]], stats: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """A model state with the official init's per-tensor mean and spread but seeded values: the inputs the
    generator gives the official model and the test gives fastmoco. A tensor whose official init is a
    constant (zero biases, BatchNorm's ones) gets spread FILL_FLOOR, so that every parameter matters."""
    out = {}
    for n, shape, (mean, std) in zip(names, shapes, stats.tolist()):
        out[n] = seeded(shape, seed, n, scale=max(std, FILL_FLOOR), shift=mean)
    return out


def input_sums(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """float64 sums of the inputs by sorted name: what a test checks its rebuilt inputs against."""
    return torch.stack([tensors[k].double().sum() for k in sorted(tensors)])


def check_inputs(tensors: dict[str, torch.Tensor], want: torch.Tensor, what: str) -> None:
    got = input_sums(tensors)
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-9, atol=1e-9):
        raise AssertionError(f"{what}: the seeded inputs rebuilt here differ from those the golden file was made "
                             f"with (torch's random generator changed?); regenerate: {REGENERATE}")


# -- digests -------------------------------------------------------------------------------------
def digest(t: torch.Tensor) -> torch.Tensor:
    """(1 + PROBES + SAMPLES,) float64: norm, dot products with PROBES fixed N(0, 1) vectors, and
    SAMPLES elements at fixed positions. Probes and positions depend only on the number of elements."""
    x = t.detach().reshape(-1).double()
    n = x.numel()
    if n == 0:
        return torch.zeros(1 + PROBES + SAMPLES, dtype=torch.float64)
    g = torch.Generator().manual_seed(n)
    dots = torch.zeros(PROBES, dtype=torch.float64)
    for k in range(PROBES):
        for start in range(0, n, _CHUNK):
            part = x[start:start + _CHUNK]
            dots[k] += torch.randn(part.numel(), generator=g, dtype=torch.float32).double() @ part
    idx = torch.randint(n, (SAMPLES,), generator=g)
    return torch.cat([x.norm()[None], dots, x[idx]])


def digest_error(got: torch.Tensor, want: torch.Tensor, floor: float = 0.0) -> float:
    """The largest digest entry difference, relative to max(the golden tensor's norm, floor)."""
    return ((got - want).abs().max() / max(want[0].item(), floor, 1e-30)).item()


def compare_digests(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rtol: float,
                    floor: float = 0.0, what: str = "") -> list[str]:
    """Lines naming each tensor whose digest differs (relative error above rtol) or is missing on one side;
    [] when all agree. `floor`: a norm below which errors count relative to the floor (rounding noise)."""
    bad = [f"{what}{k}: missing here" for k in sorted(set(want) - set(got))]
    bad += [f"{what}{k}: not in the golden file" for k in sorted(set(got) - set(want))]
    for k in sorted(set(got) & set(want)):
        err = digest_error(got[k], want[k], floor)
        if not err <= rtol:
            bad.append(f"{what}{k}: relative error {err:.2e} (norm {got[k][0].item():.6g} here, "
                       f"{want[k][0].item():.6g} official)")
    return bad


def assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float, what: str) -> None:
    """The largest difference relative to the largest golden entry (an entry near 0 carries the rounding
    noise of the others, so entry-wise relative errors would mean nothing there)."""
    if got.shape != want.shape:
        raise AssertionError(f"{what}: shape {tuple(got.shape)} here, {tuple(want.shape)} official")
    diff = (got.detach().double() - want.double()).abs()
    err = (diff.max() / want.double().abs().max().clamp_min(1e-30)).item()
    if not err <= rtol:
        at = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        raise AssertionError(f"{what}: differs by {err:.3g} of the largest official entry (tolerance {rtol:g}); "
                             f"the most at {at}: {got.reshape(-1)[diff.argmax()].item():.8g} here, "
                             f"{want.reshape(-1)[diff.argmax()].item():.8g} official")
