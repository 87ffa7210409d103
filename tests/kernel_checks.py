"""Checks the kernel tests share: outputs poisoned before the call (an element a kernel fails to
write fails the test), the three-way comparison kernel vs fp32 reference vs same-dtype torch, and
compiling kernels for the H100 (sm_90) on a machine without a GPU, which catches what the
interpreter cannot: configs the compiler rejects, register spills, shared memory overflow."""
import contextlib
import json
import os
import sys
from unittest import mock

import torch
from limits import run_until_hang


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


_HOPPER_COMPILE = r"""
import json, os, re, subprocess, sys, tempfile
from concurrent.futures import ProcessPoolExecutor

def compile_one(spec):
    import importlib
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    constexprs = spec["constexprs"]
    signature = {name: "constexpr" if name in constexprs else spec["args"][name] for name in fn.arg_names}
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in spec["divisible_by_16"]}
    src = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    try:
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})
    except Exception as e:  # reported, not raised: the test names the config
        return {"error": f"{type(e).__name__}: {str(e)[-2000:]}"}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    return {"registers": int(m[1]), "spill_bytes": int(m[4]), "shared_bytes": kernel.metadata.shared}

specs = json.load(sys.stdin)
with ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
    print(json.dumps(list(pool.map(compile_one, specs))))
"""


def compile_for_hopper(specs: list[dict]) -> list[dict]:
    """Compiles Triton kernels for sm_90 (H100) with the ptxas that ships with Triton; no GPU needed.

    Each spec: module, kernel (its @triton.jit name), args {name: "*bf16" | "i32" | "fp32" ...},
    constexprs {name: value}, divisible_by_16 [names], num_warps, num_stages. Runs in a subprocess
    without TRITON_INTERPRET (the compiler needs the real @triton.jit functions). Returns, per spec,
    {registers, spill_bytes, shared_bytes} from the cubin, or {error}.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = run_until_hang([sys.executable, "-c", _HOPPER_COMPILE], f"the sm_90 compile of {len(specs)} kernel(s)",
                          input=json.dumps(specs), capture_output=True, text=True, env=env)
    assert proc.returncode == 0, f"the sm_90 compile run failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout)


H100_SHARED_BYTES = 232448  # 227 KiB: the most dynamic shared memory one program may have on sm_90


def assert_fits_hopper(label: str, result: dict) -> None:
    assert "error" not in result, f"{label} does not compile for sm_90: {result.get('error')}"
    assert result["spill_bytes"] == 0, f"{label} spills {result['spill_bytes']} bytes of registers"
    assert result["shared_bytes"] <= H100_SHARED_BYTES, f"{label} needs {result['shared_bytes']} B of shared memory"
