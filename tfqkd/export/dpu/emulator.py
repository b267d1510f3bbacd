"""Deprecated alias of :mod:`tfqkd.dpu.emulator` (moved there, issue 15); import from there."""

import warnings

from tfqkd.dpu.emulator import *  # noqa: F401,F403  (the moved names)
from tfqkd.dpu.emulator import __all__  # noqa: F401

warnings.warn("tfqkd.export.dpu.emulator moved to tfqkd.dpu.emulator; import from there", DeprecationWarning, stacklevel=2)
