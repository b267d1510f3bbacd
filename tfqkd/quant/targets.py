"""Quantization targets: hardware whose arithmetic replaces the generic quantized twin.

A policy names its target explicitly (``QuantPolicy.target``, the YAML key ``target``); it is
never inferred from the bit widths or the quantizer scheme. Without a target, :func:`quantize`
builds the generic QKeras twin for any policy. With one, the target's own builder makes the
model, because the target fixes more than per-layer quantizers (the DPU folds BatchNormalization
and quantizes every tensor it writes, :mod:`tfqkd.dpu`).

A target quantizes every quantizable layer the same way (its ``spec``); a policy naming it may
not add rules, first/last-layer bits or integer intermediates (:func:`check_target_policy`).

Targets register themselves when their package is imported (``tfqkd.dpu`` registers ``dpu``;
``import tfqkd`` imports it). This module imports nothing of tfqkd but the error type, so every
layer may use it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from tfqkd.errors import TfqkdError

__all__ = ["QuantTarget", "get_target", "list_targets", "register_target"]


@dataclasses.dataclass(frozen=True)
class QuantTarget:
    """A hardware target of :func:`tfqkd.quant.quantize`.

    Attributes:
      name: the name policies use (``target: dpu``).
      spec: the :class:`~tfqkd.quant.policy.QuantSpec` it applies to every quantizable layer.
      build: ``build(float_model, calibration_data) -> keras.Model``, the target's training model.
      custom_objects: ``() -> dict`` of what loading a saved model of this target needs.
      description: one line for listings.
    """

    name: str
    spec: Any
    build: Callable
    custom_objects: Callable = dict
    description: str = ""


_TARGETS = {}


def register_target(target):
    """Registers a target under its name (re-registering the same name replaces it).

    Args:
      target: a :class:`QuantTarget`.

    Returns:
      ``target``.
    """
    if not isinstance(target, QuantTarget):
        raise TypeError(f"register_target() takes a QuantTarget, got {type(target).__name__}")
    _TARGETS[target.name] = target
    return target


def get_target(name):
    """The registered target called ``name``.

    Raises:
      TfqkdError: unknown target, naming the known ones.
    """
    try:
        return _TARGETS[name]
    except (KeyError, TypeError):
        known = ", ".join(sorted(_TARGETS)) or "none registered"
        raise TfqkdError(f"unknown quantization target {name!r}; known: {known}") from None


def list_targets():
    """The registered targets, by name."""
    return dict(_TARGETS)
