"""How the LayerNorm kernels (`kernels/layernorm.py`) are launched: configs, grids, tuning keys.

A config is (rows per tile, warps, software-pipelining stages, persistent programs per SM);
`candidate_configs` lists what `TUNER` (`kernels/tuner.py`) times per shape on the GPU, and
`default_config` is the untimed choice (the interpreter, FASTMOCO_TUNE=0).
"""
import functools
from dataclasses import dataclass

import torch
import triton

from .tuner import Tuner


@dataclass(frozen=True)
class LayerNormConfig:
    """How a LayerNorm kernel is launched (block_rows * next_pow2(C) elements per tile)."""
    block_rows: int
    num_warps: int
    num_stages: int = 1  # row tiles in flight per program (1: no software pipelining)
    programs_per_sm: int = 0  # 0: one tile per program (forward only); else a persistent grid

    def __str__(self) -> str:
        grid = f"{self.programs_per_sm}/SM" if self.programs_per_sm else "tile/program"
        return f"rows {self.block_rows}, warps {self.num_warps}, stages {self.num_stages}, {grid}"


# (elements per tile, warps) candidates: 4 to 16 elements per thread; a tile holds whole rows.
_TILE_WARPS = ((1024, 4), (2048, 4), (2048, 8), (4096, 8))
_DEFAULT_TILE = 2048  # the defaults are the configs measured on an H100 in bench/RESULTS.md
_DEFAULT_BWD_PROGRAMS_PER_SM = 8
_PIPELINED_STAGES = 3
TUNER = Tuner("layernorm")


def block_c(C: int) -> int:
    """BLOCK_C: the width padded to a power of two (one tile holds whole rows)."""
    return triton.next_power_of_2(C)


def _tile_shapes(C: int) -> list[tuple[int, int]]:
    """(block_rows, num_warps) options for width C."""
    padded = block_c(C)
    shapes = sorted({(tile // padded, warps) for tile, warps in _TILE_WARPS if tile >= padded})
    return shapes or [(1, 8 if padded <= 8192 else 16)]


@functools.cache  # this and candidate_configs run on every call: built once per width
def default_config(C: int, backward: bool) -> LayerNormConfig:
    padded = block_c(C)
    block_rows = max(1, _DEFAULT_TILE // padded)
    num_warps = 8 if padded * block_rows >= 4096 or padded >= 2048 else 4
    return LayerNormConfig(block_rows, num_warps, 1, _DEFAULT_BWD_PROGRAMS_PER_SM if backward else 0)


@functools.cache
def candidate_configs(C: int, backward: bool) -> tuple[LayerNormConfig, ...]:
    """What the tuner tries for width C: the default, pipelined persistent grids, and (forward)
    one tile per program. The program count changes only the grid, not the compiled kernel: the
    backward tries several, since the registers its accumulators take (two fp32 tiles) decide how
    many programs an SM holds at once."""
    configs = [default_config(C, backward)]
    for rows, warps in _tile_shapes(C):
        if backward:
            configs += [LayerNormConfig(rows, warps, stages, programs)
                        for stages in (1, _PIPELINED_STAGES) for programs in (2, 4, 8, 16)]
        else:
            configs += [LayerNormConfig(rows, warps)]
            configs += [LayerNormConfig(rows, warps, _PIPELINED_STAGES, programs) for programs in (4, 8)]
    return tuple(dict.fromkeys(configs))


def tuned_configs() -> dict:
    """What the tuner chose so far: {(direction, C, rows bucket, dtypes, flag): (config, ms)}."""
    return dict(TUNER.chosen)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def grid_rows(M: int, config: LayerNormConfig, device: torch.device) -> tuple[int, int]:
    """(programs, rows_per_program) for M rows. The interpreter counts as one SM."""
    if config.programs_per_sm == 0:
        return triton.cdiv(M, config.block_rows), config.block_rows
    sms = 1
    if device.type == "cuda":
        sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    rows_per_program = triton.cdiv(triton.cdiv(max(M, 1), config.programs_per_sm * sms), config.block_rows)
    rows_per_program *= config.block_rows
    return triton.cdiv(M, rows_per_program), rows_per_program


def tune_key(direction: str, t: torch.Tensor, flag: bool, *others: torch.Tensor) -> tuple:
    M, C = t.shape
    return (direction, t.device.index, C, triton.next_power_of_2(max(M, 1)), t.dtype,
            *(o.dtype for o in others), flag)
