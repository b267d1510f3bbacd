"""Deprecated alias of :mod:`tfqkd.dpu.performance` (moved there, issue 15); import from there."""

import warnings

from tfqkd.dpu.performance import *  # noqa: F401,F403  (the moved names)
from tfqkd.dpu.performance import __all__  # noqa: F401
from tfqkd.dpu.performance import ZCU102_DDR_BYTES_PER_S  # noqa: F401

warnings.warn("tfqkd.bench.dpu_model moved to tfqkd.dpu.performance; import from there", DeprecationWarning, stacklevel=2)
