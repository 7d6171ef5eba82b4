"""Loss-curve figures shared by the run report (one run) and ``mxlora compare`` (several).

matplotlib only (no torch), so ``mxlora compare`` stays light. The object API with the Agg
canvas: no pyplot global state, no display needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def loss_axes(width: float, height: float) -> tuple[Any, Any]:
    """A new ``(figure, axes)`` of ``width`` x ``height`` inches at 100 dpi."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def save_loss_figure(fig: Any, ax: Any, title: str, out_png: Path) -> Path:
    """Label the step/loss axes, add the legend when something was drawn, write the PNG."""
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    return out_png
