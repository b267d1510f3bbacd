"""Old name of :mod:`tfqkd.compat` (kept for code written against tfqkd 0.1 and 0.2)."""

from tfqkd.compat import *  # noqa: F401,F403
from tfqkd.compat import __all__  # noqa: F401
