"""Divergence guard: a NaN or Inf loss, or a dead run, stops the stage and restores the last good weights.

A learning rate that is far too high (or a bad quantizer range) makes the
loss overflow; every later step then only spreads NaN through the weights,
and a per-epoch checkpoint of that epoch would overwrite nothing but still
be a useless file that a resumed run would start from. :class:`DivergenceGuard`
watches the batch losses, and on the first non-finite one

1. stops training (``model.stop_training = True``),
2. restores the weights (and optimizer state) of the last finished epoch, or
   of the start of training if no epoch finished,
3. records a one-line message in :attr:`DivergenceGuard.diverged`.

Given ``num_classes`` it also stops a *dead* run: one whose loss is finite but
flat and whose accuracy is at chance through an epoch (a quantizer that
rounds everything to zero, a learning rate that killed every ReLU). Such a
run would otherwise train on for hours and checkpoint a model that predicts
one class. :class:`DeadRunAlarm` is the same check as a callback for a
user's own ``fit``.

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
import sys

import numpy as np

from tfqkd.compat import keras
from tfqkd.errors import TfqkdError

__all__ = ["DeadRunAlarm", "DivergenceGuard", "chance_accuracy_ceiling", "check", "is_dead_epoch"]

# The second part of an epoch counts as flat when its mean loss is above this
# fraction of the first part's (a dead run: 2.310 -> 2.303; a slow but live one
# improves by several percent).
_FLAT_LOSS = 0.99
# Share of an epoch's batches that form its "first part".
_EARLY_SHARE = 0.25


def chance_accuracy_ceiling(num_classes):
    """Top-1 accuracy (0-1) below which a classifier is at chance (1/C plus class imbalance)."""
    chance = 1.0 / num_classes
    return min(1.5 * chance, chance + 0.1)


def is_dead_epoch(num_classes, accuracy=None, early_loss=None, late_loss=None):
    """Whether one epoch's training statistics are those of a dead run.

    Dead: the loss of the epoch's later batches is not below that of its first
    quarter (flat), and the training accuracy is at chance or, when no
    accuracy is logged, the loss sits at ``ln(num_classes)`` (a cross-entropy
    of uniform predictions).

    Args:
      num_classes: number of classes (>= 2).
      accuracy: the epoch's training accuracy in [0, 1], or None.
      early_loss, late_loss: mean loss of the epoch's first quarter and of the rest.

    Returns:
      bool.
    """
    if early_loss is None or late_loss is None or not (math.isfinite(early_loss) and math.isfinite(late_loss)):
        return False
    if late_loss < _FLAT_LOSS * early_loss:
        return False
    if accuracy is not None:
        return accuracy <= chance_accuracy_ceiling(num_classes)
    return abs(late_loss - math.log(num_classes)) <= 0.02 * math.log(num_classes)


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
      num_classes: when given, also stop a dead run (:func:`is_dead_epoch`).
      patience: dead epochs in a row that stop the stage.

    Attributes:
      diverged: None while training is healthy, else the one-line message.
      good_epoch: 1-based number of the epoch whose weights the snapshot holds
        (0: the start of training).
    """

    def __init__(self, stage="training", monitor=("loss", "teacher_loss"), restore_optimizer=True, num_classes=None,
                 patience=1):  # fmt: skip
        super().__init__()
        if num_classes is not None and (isinstance(num_classes, bool) or not int(num_classes) >= 2):
            raise TfqkdError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        self.stage = stage
        self.monitor = tuple(monitor)
        self.restore_optimizer = restore_optimizer
        self.num_classes = None if num_classes is None else int(num_classes)
        self.patience = max(1, int(patience))
        self._dead_epochs = 0
        self._running_loss = []
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
        self._running_loss = []

    def on_train_batch_end(self, batch, logs=None):
        if self.diverged is not None or not logs:
            return
        if self.num_classes is not None:
            self._running_loss.append(_scalar(logs.get("loss")))  # Keras logs the epoch's running mean
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
        if self.num_classes is not None and self._dead(logs or {}):
            self._dead_epochs += 1
            if self._dead_epochs >= self.patience:
                self._stop_dead(logs or {})
            return  # a dead epoch is never the one to restore
        self._dead_epochs = 0
        self.good_epoch = epoch + 1
        self._snapshot()

    # Dead runs ----------------------------------------------------------------
    def _early_and_late_loss(self):
        """Mean loss of the epoch's first quarter and of the rest, from the running means."""
        means = self._running_loss
        if len(means) < 4 or any(m is None for m in means):
            return None, None
        early = max(1, int(len(means) * _EARLY_SHARE))
        total = len(means)
        late = (means[-1] * total - means[early - 1] * early) / (total - early)
        return means[early - 1], late

    def _dead(self, logs):
        early, late = self._early_and_late_loss()
        self._last_losses = (early, late)
        return is_dead_epoch(self.num_classes, _scalar(logs.get("accuracy")), early, late)

    def _stop_dead(self, logs):
        self.model.stop_training = True
        self._restore()
        accuracy = _scalar(logs.get("accuracy"))
        said = f"training accuracy {100 * accuracy:.1f}% (chance {100 / self.num_classes:.1f}%), " if accuracy is not None else ""
        restored = (
            f"restored the weights of epoch {self.good_epoch}"
            if self.good_epoch > 0
            else "restored the weights from the start of the stage"
        )
        epochs = f"epochs {self._epoch + 2 - self.patience}-{self._epoch + 1}" if self.patience > 1 else f"epoch {self._epoch + 1}"
        self.diverged = (
            f"training is dead in stage {self.stage}: in {epochs} the {said}loss flat at {self._last_losses[1]:.3f} "
            f"(ln {self.num_classes} = {math.log(self.num_classes):.3f}); {restored}; lower the learning rate "
            "or raise the bits"
        )

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


class DeadRunAlarm(DivergenceGuard):
    """Stops a ``fit`` that trains a dead network, or one whose loss became NaN/Inf, and says why.

    For your own training loops::

        alarm = tfqkd.training.DeadRunAlarm(num_classes=10)
        model.fit(x, y, epochs=20, callbacks=[alarm])
        alarm.check()   # raises TfqkdError with the one-line reason, if it stopped the run

    A run is dead when through an epoch its loss stays flat and its training
    accuracy stays at chance (with no ``accuracy`` metric: its loss stays at
    ``ln(num_classes)``). The alarm then stops training, restores the weights
    of the last live epoch and prints the reason on stderr.

    Args:
      num_classes: number of classes.
      patience: dead epochs in a row that stop training.
      stage: name used in the message.
      verbose: print the message when it stops training.
    """

    def __init__(self, num_classes, patience=1, stage="training", verbose=True):
        super().__init__(stage=stage, num_classes=num_classes, patience=patience)
        self.verbose = verbose

    def on_train_end(self, logs=None):
        if self.diverged is not None and self.verbose:
            print(f"tfqkd: {self.diverged}", file=sys.stderr, flush=True)
