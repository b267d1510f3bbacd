"""SGD with PyTorch semantics: Nesterov momentum and coupled (L2) weight decay.

The thesis trained every model with ``torch.optim.SGD(momentum=0.9,
nesterov=True, weight_decay=5e-4)`` (thesis 5.1.2, 5.7). Keras' SGD differs in
two ways that change the trajectory:

* Keras' ``weight_decay`` is *decoupled* (``w -= lr * wd * w`` applied apart
  from the gradient, Loshchilov & Hutter). PyTorch adds ``wd * w`` to the
  gradient *before* momentum, so the decay is accumulated in the momentum
  buffer (classic L2 regularization).
* Keras keeps ``lr`` inside its velocity (``v = m*v - lr*g``); PyTorch keeps
  an lr-free buffer and multiplies by the *current* lr at each step. The two
  agree for a constant lr but not across warmup or milestone changes.

:class:`TorchSGD` reproduces PyTorch's update exactly::

    g  = grad + wd * w                  (unless the variable is excluded)
    b  = momentum * b + g               (b = g on the first step)
    d  = g + momentum * b   if nesterov else b
    w  = w - lr * d
"""

import numbers

from tfqkd.compat import keras, tf
from tfqkd.errors import TfqkdError

__all__ = ["TorchSGD", "make_sgd"]


@keras.saving.register_keras_serializable(package="tfqkd")
class TorchSGD(keras.optimizers.SGD):
    """SGD with PyTorch's coupled weight decay and lr-free momentum buffer.

    Args:
        learning_rate: float or ``LearningRateSchedule`` (e.g.
            :class:`tfqkd.training.WarmupMultiStep`).
        momentum: momentum factor in [0, 1).
        nesterov: Nesterov momentum (needs ``momentum > 0``, as in PyTorch).
        weight_decay: L2 coefficient added to the gradient (``g + wd * w``);
            0 disables it. Not Keras' decoupled decay.
        exclude: substrings of variable names exempt from weight decay, e.g.
            ``("_step",)`` for learned quantizer step sizes, whose decay would
            shrink the quantization range.
        name: optimizer name.
        **kwargs: other ``keras.optimizers.Optimizer`` options (``clipnorm``,
            ``jit_compile``, ...). Keras' own ``weight_decay`` is not used.

    Raises:
        TfqkdError: for negative weight decay, momentum outside [0, 1) or
            Nesterov without momentum.

    References:
        PyTorch ``torch.optim.SGD`` documentation (update rule with
        ``dampening=0``); Sutskever et al. 2013 for Nesterov momentum; thesis
        5.1.2.
    """

    def __init__(
        self,
        learning_rate=0.1,
        momentum=0.9,
        nesterov=True,
        weight_decay=5e-4,
        exclude=(),
        name="TorchSGD",
        **kwargs,
    ):
        weight_decay = 0.0 if weight_decay is None else weight_decay
        if not isinstance(weight_decay, numbers.Real) or weight_decay < 0:
            raise TfqkdError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
        if not isinstance(momentum, numbers.Real) or not 0.0 <= momentum < 1.0:
            raise TfqkdError(f"momentum must be in [0, 1), got {momentum!r}")
        if nesterov and momentum == 0:
            raise TfqkdError("nesterov=True needs momentum > 0")
        if isinstance(exclude, str):
            exclude = (exclude,)
        # Keras' own (decoupled) weight decay stays off: passing None keeps
        # Optimizer._apply_weight_decay a no-op.
        super().__init__(
            learning_rate=learning_rate, momentum=float(momentum), nesterov=bool(nesterov), name=name, **kwargs
        )
        self.coupled_weight_decay = float(weight_decay)
        self.exclude = tuple(str(e) for e in exclude)

    def _decays(self, variable):
        """Whether ``variable`` gets weight decay (a trace-time Python decision)."""
        if self.coupled_weight_decay == 0.0:
            return False
        name = variable.name
        return not any(sub in name for sub in self.exclude)

    def update_step(self, gradient, variable):
        """Apply one PyTorch-SGD step to ``variable``."""
        if isinstance(gradient, tf.IndexedSlices):
            # Weight decay touches every row, so a sparse update would be
            # wrong; embeddings are rare in the CNNs this library trains.
            gradient = tf.convert_to_tensor(gradient)
        dtype = variable.dtype
        lr = tf.cast(self.learning_rate, dtype)
        if self._decays(variable):
            gradient = gradient + tf.cast(self.coupled_weight_decay, dtype) * variable
        if self.momentum == 0.0:
            variable.assign_sub(lr * gradient)
            return
        momentum = tf.cast(self.momentum, dtype)
        buf = self.momentums[self._index_dict[self._var_key(variable)]]
        # Buffers start at zero, so the first step gives b = g like PyTorch's clone.
        buf.assign(momentum * buf + gradient)
        direction = gradient + momentum * buf if self.nesterov else buf
        variable.assign_sub(lr * direction)

    def get_config(self):
        """Serializable config; ``weight_decay`` is the coupled (L2) coefficient."""
        config = super().get_config()
        config["weight_decay"] = self.coupled_weight_decay
        config["exclude"] = list(self.exclude)
        return config


def make_sgd(learning_rate, momentum=0.9, nesterov=True, weight_decay=5e-4, exclude=(), **kwargs):
    """The thesis optimizer: SGD, Nesterov momentum 0.9, L2 weight decay 5e-4.

    Args:
        learning_rate: float > 0 or a ``LearningRateSchedule``.
        momentum: momentum factor (thesis: 0.9).
        nesterov: Nesterov momentum (thesis: True).
        weight_decay: coupled L2 coefficient (thesis: 5e-4).
        exclude: variable-name substrings exempt from weight decay.
        **kwargs: passed to :class:`TorchSGD`.

    Returns:
        A :class:`TorchSGD`.

    Raises:
        TfqkdError: for a non-positive or non-numeric learning rate, or the
            errors of :class:`TorchSGD`.
    """
    if isinstance(learning_rate, keras.optimizers.schedules.LearningRateSchedule):
        pass
    elif isinstance(learning_rate, numbers.Real) and not isinstance(learning_rate, bool):
        if not learning_rate > 0:
            raise TfqkdError(f"learning rate must be > 0, got {learning_rate!r}")
        learning_rate = float(learning_rate)
    else:
        raise TfqkdError(f"learning rate must be a number or a LearningRateSchedule, got {learning_rate!r}")
    return TorchSGD(
        learning_rate=learning_rate,
        momentum=momentum,
        nesterov=nesterov,
        weight_decay=weight_decay,
        exclude=exclude,
        **kwargs,
    )
