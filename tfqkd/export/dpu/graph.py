"""Deprecated alias of :mod:`tfqkd.dpu.graph` (moved there, issue 15); import from there."""

import warnings

from tfqkd.dpu.graph import *  # noqa: F401,F403  (the moved names)
from tfqkd.dpu.graph import __all__  # noqa: F401

warnings.warn("tfqkd.export.dpu.graph moved to tfqkd.dpu.graph; import from there", DeprecationWarning, stacklevel=2)
