"""Matplotlib for headless runs, and figures saved without half-written files.

Every PNG tfqkd writes (comparison charts, benchmark curves, histogram grids,
Pareto plots) goes through :func:`save_figure`, which writes it atomically
(:mod:`tfqkd.atomic`).
"""

from pathlib import Path

from tfqkd.atomic import replacing

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
    try:
        with replacing(path) as tmp:
            fig.savefig(tmp, dpi=dpi)
    finally:
        pyplot().close(fig)
    return Path(path)
