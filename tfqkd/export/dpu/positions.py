"""Deprecated alias of :mod:`tfqkd.dpu.positions` (moved there, issue 15); import from there."""

import warnings

from tfqkd.dpu.positions import *  # noqa: F401,F403  (the moved names)
from tfqkd.dpu.positions import __all__  # noqa: F401
from tfqkd.dpu.arithmetic import SHIFT_BIAS_MAX  # noqa: F401

warnings.warn("tfqkd.export.dpu.positions moved to tfqkd.dpu.positions; import from there", DeprecationWarning, stacklevel=2)
