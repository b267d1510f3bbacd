"""Matplotlib for headless runs, and figures saved without half-written files.

Every PNG tfqkd writes (comparison charts, benchmark curves, histogram grids,
Pareto plots) goes through :func:`save_figure`: rendered to a temporary file
in the same directory, then renamed, so an interrupted run leaves either the
previous file or the new one.
"""

import os
from pathlib import Path

__all__ = ["pyplot", "save_figure"]


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path, dpi=100):
    """Writes ``fig`` to ``path`` atomically and closes it.

    Args:
      fig: a matplotlib Figure.
      path: destination PNG; its directory is created if needed.
      dpi: resolution.

    Returns:
      the ``Path`` written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    finally:
        pyplot().close(fig)
        if tmp.exists():
            tmp.unlink()
    return path
