"""Input-shape checks shared by the model families.

Keras reports a too-small or wrong-rank input as a shape error deep inside some layer; these
checks turn that into a one-line :class:`~tfqkd.errors.TfqkdError` naming the model.
"""

from __future__ import annotations

from typing import Optional, Tuple

from tfqkd.errors import TfqkdError

__all__ = ["require_image_shape", "require_vector_shape"]


def require_image_shape(
    model_name: str, input_shape: Tuple[int, ...], min_size: int = 1, channels: Optional[int] = None
) -> None:
    """Checks that ``input_shape`` is ``(height, width, channels)`` and large enough.

    Args:
        model_name: Model name used in the error message.
        input_shape: Shape without the batch dimension.
        min_size: Smallest allowed height and width (the model's total downsampling factor).
        channels: Required channel count, or ``None`` for any.

    Raises:
        TfqkdError: If the shape is not rank 3, too small, or has the wrong channel count.
    """
    if len(input_shape) != 3:
        raise TfqkdError(
            f"model '{model_name}' needs an image input_shape (height, width, channels), got {input_shape}"
        )
    height, width, chans = input_shape
    if height < min_size or width < min_size:
        raise TfqkdError(
            f"model '{model_name}' needs inputs of at least {min_size}x{min_size}, got {height}x{width}"
        )
    if channels is not None and chans != channels:
        raise TfqkdError(f"model '{model_name}' needs {channels} input channel(s), got {chans}")


def require_vector_shape(model_name: str, input_shape: Tuple[int, ...]) -> None:
    """Checks that ``input_shape`` is a flat ``(features,)`` vector.

    Args:
        model_name: Model name used in the error message.
        input_shape: Shape without the batch dimension.

    Raises:
        TfqkdError: If the shape is not rank 1.
    """
    if len(input_shape) != 1:
        raise TfqkdError(f"model '{model_name}' needs a flat input_shape (features,), got {input_shape}")
