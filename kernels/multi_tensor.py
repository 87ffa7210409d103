"""The block table of fastmoco's multi-tensor kernels (ema.py, lars.py): one launch over many tensors.

Program b of a launch handles BLOCK consecutive elements of one tensor:

    blk_tab    (2, B) int64   row 0: the tensor index of program b, row 1: its first element
    numel_tab  (T,)   int64   each tensor's element count
    ptr_tab    (K, T) int64   K data addresses per tensor (momentum, online, copy; or param, grad, buffer)

`block_table` builds the first on the host (once per cached plan), `program_block` and
`table_pointer` read them in a kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def block_table(tensor_idx: torch.Tensor, blocks: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tensor index, first element) of every `block`-sized program, over the tensors `tensor_idx` that
    take `blocks` programs each (int64, host)."""
    idx = torch.repeat_interleave(tensor_idx.to(torch.int64), blocks)
    first = torch.cumsum(blocks, 0) - blocks                        # each tensor's first program
    local = torch.arange(idx.numel(), dtype=torch.int64) - torch.repeat_interleave(first, blocks)
    return idx, local * block


@triton.jit
def program_block(blk_tab, numel_tab, B):
    """(tensor index, first element, tensor length) of this program's block."""
    pid = tl.program_id(0)
    t = tl.load(blk_tab + pid)
    return t, tl.load(blk_tab + B + pid), tl.load(numel_tab + t)


@triton.jit
def table_pointer(ptr_tab, T, k, t, dtype: tl.constexpr):
    """The k-th address of tensor t in `ptr_tab`, as a pointer to `dtype`."""
    return tl.load(ptr_tab + k * T + t).to(tl.pointer_type(dtype))
