"""Triton kernels of fastmoco (installed as `fastmoco.kernels`).

One op per module: `attention`, `layernorm`, `contrastive`, `ema`. Each holds
the Triton kernels, their launchers, an autograd wrapper, and `<op>_ref`: the
unfused PyTorch version that tests and benches compare against.
Nothing here touches the GPU at import time.
"""
