"""Divergence guard: a NaN or Inf loss stops the stage and restores the last good weights.

A learning rate that is far too high (or a bad quantizer range) makes the
loss overflow; every later step then only spreads NaN through the weights,
and a per-epoch checkpoint of that epoch would overwrite nothing but still
be a useless file that a resumed run would start from. :class:`DivergenceGuard`
watches the batch losses, and on the first non-finite one

1. stops training (``model.stop_training = True``),
2. restores the weights (and optimizer state) of the last finished epoch, or
   of the start of training if no epoch finished,
3. records a one-line message in :attr:`DivergenceGuard.diverged`.

Callbacks that write checkpoints are wrapped with :meth:`DivergenceGuard.protect`
so no checkpoint of the diverged epoch is written; :func:`check` (or
:meth:`DivergenceGuard.check`) after ``fit`` raises the message as a
:class:`~tfqkd.errors.TfqkdError`, which the command line prints as one line
with exit code 2::

    guard = DivergenceGuard(stage="ss")
    callbacks = [guard, guard.protect(keras.callbacks.ModelCheckpoint(...)), ...]
    model.fit(..., callbacks=callbacks)
    check(guard)
"""

import math

import numpy as np

from tfqkd._keras import keras
from tfqkd.errors import TfqkdError

__all__ = ["DivergenceGuard", "check"]


def _scalar(value):
    if value is None:
        return None
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return float(array.reshape(-1)[0]) if array.size == 1 else None


def _optimizers(model):
    """The built optimizers of ``model``: its own and, for QKD in ``cs``, the teacher's."""
    found = []
    for name in ("optimizer", "teacher_optimizer"):
        opt = getattr(model, name, None)
        if opt is not None and hasattr(opt, "variables") and all(opt is not o for o in found):
            found.append(opt)
    return found


def _variables(optimizer):
    variables = optimizer.variables
    return list(variables() if callable(variables) else variables)


class DivergenceGuard(keras.callbacks.Callback):
    """Stops a stage at the first NaN/Inf loss and restores the last good weights.

    Place it first in the callback list and wrap checkpoint writers with
    :meth:`protect`.

    Args:
      stage: stage name used in the message (``"ss"``, ``"cs"``, ...).
      monitor: log keys to check after every batch; missing keys are skipped
        (``teacher_loss`` exists in co-studying only).
      restore_optimizer: also restore the optimizer slots (momentum) and step
        counter, so that the model and its optimizer are consistent again.

    Attributes:
      diverged: None while training is healthy, else the one-line message.
      good_epoch: 1-based number of the epoch whose weights the snapshot holds
        (0: the start of training).
    """

    def __init__(self, stage="training", monitor=("loss", "teacher_loss"), restore_optimizer=True):
        super().__init__()
        self.stage = stage
        self.monitor = tuple(monitor)
        self.restore_optimizer = restore_optimizer
        self.diverged = None
        self.good_epoch = 0
        self._epoch = 0
        self._weights = None
        self._optimizer_state = None

    # Snapshots ----------------------------------------------------------------
    def _snapshot(self):
        self._weights = self.model.get_weights()
        self._optimizer_state = None
        if self.restore_optimizer:
            self._optimizer_state = [
                (opt, [v.numpy() for v in _variables(opt)]) for opt in _optimizers(self.model) if _variables(opt)
            ]

    def _restore(self):
        if self._weights is not None:
            self.model.set_weights(self._weights)
        for opt, values in self._optimizer_state or ():
            variables = _variables(opt)
            if len(variables) == len(values):
                for variable, value in zip(variables, values):
                    variable.assign(value)

    # Keras hooks --------------------------------------------------------------
    def on_train_begin(self, logs=None):
        self.diverged = None
        self.good_epoch = 0
        self._started = False
        self._snapshot()

    def on_epoch_begin(self, epoch, logs=None):
        if not getattr(self, "_started", True):
            # fit(initial_epoch=k): the starting weights are those of epoch k.
            self.good_epoch = epoch
            self._started = True
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.diverged is not None or not logs:
            return
        for key in self.monitor:
            if key not in logs:
                continue
            value = _scalar(logs[key])
            if value is not None and not math.isfinite(value):
                self._diverge(key, value, batch + 1)
                return

    def on_epoch_end(self, epoch, logs=None):
        if self.diverged is not None:
            return
        # The epoch's mean loss is checked too: with steps_per_execution > 1 a
        # batch-level NaN can fall between two callback calls.
        for key in self.monitor:
            value = _scalar((logs or {}).get(key))  # None for a missing key
            if value is not None and not math.isfinite(value):
                self._diverge(key, value, None)
                return
        self.good_epoch = epoch + 1
        self._snapshot()

    # Divergence ---------------------------------------------------------------
    def _diverge(self, key, value, batch):
        self.model.stop_training = True
        self._restore()
        epoch = self._epoch + 1
        where = f"epoch {epoch}" + (f", batch {batch}" if batch is not None else "")
        what = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        restored = (
            f"restored the weights of epoch {self.good_epoch}"
            if self.good_epoch > 0
            else "restored the weights from the start of the stage"
        )
        self.diverged = (
            f"training diverged in stage {self.stage} at {where}: {key} is {what}; {restored} "
            "(no checkpoint of the diverged epoch was written); lower the learning rate"
        )

    def check(self):
        """Raises the divergence message as a TfqkdError (call after ``fit``)."""
        if self.diverged is not None:
            raise TfqkdError(self.diverged)

    def protect(self, callback):
        """Wraps ``callback`` so it sees nothing from the moment training diverged.

        Use it for callbacks that write checkpoints (``ModelCheckpoint``): the
        diverged epoch's ``on_epoch_end`` never reaches them, so the last file
        on disk is the last good epoch's.

        Args:
          callback: a Keras callback.

        Returns:
          a callback forwarding every hook to ``callback`` while no divergence
          was detected.
        """
        return _Protected(self, callback)


class _Protected(keras.callbacks.Callback):
    """Forwards every hook to ``inner`` until ``guard`` has recorded a divergence."""

    def __init__(self, guard, inner):
        super().__init__()
        self.guard = guard
        self.inner = inner
        self._supports_tf_logs = getattr(inner, "_supports_tf_logs", False)

    def set_model(self, model):
        super().set_model(model)
        self.inner.set_model(model)

    def set_params(self, params):
        super().set_params(params)
        self.inner.set_params(params)

    def _implements_train_batch_hooks(self):
        return self.inner._implements_train_batch_hooks()

    def _implements_test_batch_hooks(self):
        return self.inner._implements_test_batch_hooks()

    def _implements_predict_batch_hooks(self):
        return self.inner._implements_predict_batch_hooks()

    def __getattr__(self, name):
        # Attributes other code reads from the wrapped callback (e.g. ``filepath``).
        if name in ("guard", "inner"):
            raise AttributeError(name)
        return getattr(self.inner, name)


def _forward(hook):
    def method(self, *args, **kwargs):
        if self.guard.diverged is None:
            return getattr(self.inner, hook)(*args, **kwargs)
        return None

    method.__name__ = hook
    return method


for _hook in (
    "on_batch_begin", "on_batch_end", "on_epoch_begin", "on_epoch_end",
    "on_train_batch_begin", "on_train_batch_end", "on_test_batch_begin", "on_test_batch_end",
    "on_predict_batch_begin", "on_predict_batch_end", "on_train_begin", "on_train_end",
    "on_test_begin", "on_test_end", "on_predict_begin", "on_predict_end",
):  # fmt: skip
    setattr(_Protected, _hook, _forward(_hook))
del _hook


def check(guard):
    """Raises :class:`~tfqkd.errors.TfqkdError` if ``guard`` saw training diverge.

    Args:
      guard: the :class:`DivergenceGuard` passed to ``fit``.

    Raises:
      TfqkdError: "training diverged in stage X at epoch E, batch B: loss is nan; ...".
    """
    guard.check()
