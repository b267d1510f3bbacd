"""Model registry: one ``create_model(name, ...)`` for every architecture in the zoo.

Families register their builder functions with :func:`register_model`; users and recipes only
ever call :func:`create_model`, :func:`list_models` and :func:`model_info` (the timm / larq
pattern; docs/architecture.md). A builder has the signature
``fn(num_classes, input_shape, **kwargs) -> keras.Model`` and returns a functional model that
outputs logits.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Optional, Tuple

from tfqkd.errors import TfqkdError

__all__ = ["ModelInfo", "register_model", "register_variant", "create_model", "list_models", "model_info"]

Builder = Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """Registration metadata of one model.

    Attributes:
        name: Registry name, e.g. ``"densenet21"``.
        family: Family name, e.g. ``"densenet"``, ``"mlp"``, ``"mlperf_tiny"``, ``"mobilenet"``.
        default_input_shape: Input shape without the batch dimension.
        default_num_classes: Default number of output logits, or ``None`` for models without
            classes (the MLPerf Tiny autoencoder).
        description: One line describing the model and its source.
        builder: The registered builder function.
    """

    name: str
    family: str
    default_input_shape: Tuple[int, ...]
    default_num_classes: Optional[int]
    description: str
    builder: Builder = dataclasses.field(repr=False, compare=False)

    def to_dict(self) -> dict:
        """Returns the metadata without the builder, ready for JSON/YAML."""
        return {
            "name": self.name,
            "family": self.family,
            "default_input_shape": list(self.default_input_shape),
            "default_num_classes": self.default_num_classes,
            "description": self.description,
        }


_REGISTRY: dict[str, ModelInfo] = {}


def _check_num_classes(name: str, num_classes: Any) -> int:
    # bool is an int subclass; True classes is never what the user meant.
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise TfqkdError(f"num_classes for model '{name}' must be an integer >= 2, got {num_classes!r}")
    return num_classes


def _check_input_shape(name: str, input_shape: Any) -> Tuple[int, ...]:
    if not isinstance(input_shape, (tuple, list)) or not input_shape or not all(
        isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in input_shape
    ):
        raise TfqkdError(
            f"input_shape for model '{name}' must be a non-empty tuple of positive integers "
            f"(no batch dimension), got {input_shape!r}"
        )
    return tuple(input_shape)


def register_model(
    name: str,
    *,
    family: str,
    default_input_shape: Tuple[int, ...],
    default_num_classes: Optional[int],
    description: str,
) -> Callable[[Builder], Builder]:
    """Decorator registering a model builder under ``name``.

    Args:
        name: Registry name; must be unique.
        family: Family the model belongs to (used by ``list_models(family=...)``).
        default_input_shape: Input shape used when ``create_model`` gets none.
        default_num_classes: Class count used when ``create_model`` gets none; ``None`` for
            models that have no classification head.
        description: One-line description (shown by ``tfqkd models``).

    Returns:
        A decorator that registers the builder and returns it unchanged.

    Raises:
        TfqkdError: If a different builder is already registered under ``name``.
    """
    shape = _check_input_shape(name, default_input_shape)
    if default_num_classes is not None:
        _check_num_classes(name, default_num_classes)

    def decorator(fn: Builder) -> Builder:
        existing = _REGISTRY.get(name)
        # Re-importing a module (importlib.reload, notebooks) re-registers the same function;
        # only a genuinely different builder is a clash.
        if existing is not None and (
            existing.builder.__module__,
            existing.builder.__qualname__,
        ) != (fn.__module__, fn.__qualname__):
            raise TfqkdError(f"model name '{name}' is already registered by {existing.builder.__module__}")
        _REGISTRY[name] = ModelInfo(
            name=name,
            family=family,
            default_input_shape=shape,
            default_num_classes=default_num_classes,
            description=description,
            builder=fn,
        )
        return fn

    return decorator


def register_variant(name: str, builder: Builder, **info: Any) -> Builder:
    """Registers ``builder``, one of the closures a module makes in a loop over its variants.

    Each closure gets the qualified name ``build_<name>``: a distinct one per model lets the
    registry tell a module reload (same name) from a clash.

    Args:
        name: Registry name.
        builder: ``builder(num_classes, input_shape, ...)``.
        **info: The other arguments of :func:`register_model`.

    Returns:
        ``builder``.
    """
    builder.__qualname__ = f"build_{name}"
    return register_model(name, **info)(builder)


def list_models(family: Optional[str] = None) -> list[str]:
    """Lists registered model names, sorted.

    Args:
        family: If given, only models of this family.

    Returns:
        Sorted list of model names.

    Raises:
        TfqkdError: If ``family`` is given but no model belongs to it.
    """
    if family is None:
        return sorted(_REGISTRY)
    names = sorted(n for n, info in _REGISTRY.items() if info.family == family)
    if not names:
        families = sorted({info.family for info in _REGISTRY.values()})
        raise TfqkdError(f"unknown model family '{family}'; known families: {', '.join(families)}")
    return names


def model_info(name: str) -> ModelInfo:
    """Returns the registration metadata of a model.

    Args:
        name: Registry name.

    Returns:
        The :class:`ModelInfo` of the model.

    Raises:
        TfqkdError: If no model of that name is registered (the message lists the known ones).
    """
    info = _REGISTRY.get(name) if isinstance(name, str) else None
    if info is None:
        raise TfqkdError(f"unknown model '{name}'; known models: {', '.join(sorted(_REGISTRY))}")
    return info


def _check_kwargs(info: ModelInfo, kwargs: dict) -> None:
    # An unknown keyword would otherwise surface as a TypeError deep in the builder.
    params = inspect.signature(info.builder).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [p for p in params if p not in ("num_classes", "input_shape")]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        options = ", ".join(accepted) if accepted else "none"
        raise TfqkdError(
            f"model '{info.name}' got unknown option(s) {', '.join(unknown)}; accepted options: {options}"
        )


def create_model(
    name: str,
    *,
    num_classes: Optional[int] = None,
    input_shape: Optional[Tuple[int, ...]] = None,
    quant: Any = None,
    **kwargs: Any,
):
    """Builds a registered model.

    Args:
        name: Registry name (see :func:`list_models`).
        num_classes: Number of output logits; defaults to the registered value. Models without
            classes (``fc_autoencoder``) only accept ``None``.
        input_shape: Input shape without the batch dimension; defaults to the registered value.
        quant: If not ``None``, a quantization policy (preset name, dict or policy object) and
            the model is returned wrapped by ``tfqkd.quant.quantize(model, quant)``.
        **kwargs: Family-specific options (e.g. ``stem="imagenet"`` for DenseNet,
            ``width_multiplier`` for MobileNet).

    Returns:
        A ``keras.Model`` outputting logits (no softmax), quantized if ``quant`` was given.

    Raises:
        TfqkdError: Unknown model name, bad ``num_classes``/``input_shape`` or unknown option.
    """
    info = model_info(name)
    if info.default_num_classes is None:
        if num_classes is not None:
            raise TfqkdError(f"model '{name}' has no classification head; pass num_classes=None")
    else:
        num_classes = _check_num_classes(
            name, info.default_num_classes if num_classes is None else num_classes
        )
    shape = _check_input_shape(name, info.default_input_shape if input_shape is None else input_shape)
    _check_kwargs(info, kwargs)
    model = info.builder(num_classes, shape, **kwargs)
    if quant is not None:
        # Imported lazily: tfqkd.quant depends on QKeras, which model building does not need.
        from tfqkd.quant import quantize

        model = quantize(model, quant)
    return model
