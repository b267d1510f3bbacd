"""Deprecated alias of :mod:`tfqkd.dpu.compat` (moved there, issue 15); import from there."""

import warnings

from tfqkd.dpu.compat import *  # noqa: F401,F403  (the moved names)
from tfqkd.dpu.compat import __all__  # noqa: F401

warnings.warn("tfqkd.export.dpu.compat moved to tfqkd.dpu.compat; import from there", DeprecationWarning, stacklevel=2)
