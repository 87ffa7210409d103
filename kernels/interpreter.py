"""What the kernels do differently under the Triton interpreter (TRITON_INTERPRET=1, the CPU tests).

The interpreter gets bf16 arithmetic wrong and its fp32 -> bf16 cast truncates
instead of rounding to nearest even, so kernels upcast after loading and round
by hand when storing there. On the GPU both are plain casts.
"""
import os

import triton
import triton.language as tl


def interpreting() -> bool:
    """Read at launch, not import, so a test can choose before its first launch."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def cast_rtne(x, dtype: tl.constexpr, IS_INTERPRETER: tl.constexpr):
    """fp32 x -> dtype, rounded to nearest even. The GPU's cast does that; the interpreter's
    fp32 -> bf16 cast truncates (up to 1 ulp off), so round the fp32 bits by hand there."""
    if IS_INTERPRETER:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)
