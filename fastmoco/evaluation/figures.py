"""Figures without a display: matplotlib's Agg canvas, to PNG bytes or to an RGB array.

`Figure` + `FigureCanvasAgg` (not pyplot): nothing global changes (no backend switch, no open-figure
registry), so a training process or a notebook that imports fastmoco keeps its own matplotlib state.
"""
from __future__ import annotations

import io

import numpy as np

DPI = 100


def new_figure(width_in: float, height_in: float):
    """A matplotlib Figure on its own Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def rgb_array(fig) -> np.ndarray:
    """(H, W, 3) uint8 of the drawn figure (what TensorBoard's add_image takes as HWC)."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
