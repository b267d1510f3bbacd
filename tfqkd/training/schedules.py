"""Learning-rate schedule of the thesis: per-batch linear warmup, then step decay.

Thesis 3.6 / 5.1.3 / 5.7: the learning rate rises linearly, stepped every
batch, over the first ``warmup_epochs`` epochs, then is divided by ``factor``
at each milestone epoch (DenseNet baselines: lr 0.1, warmup 2, ÷5 at
60/120/160), as PyTorch's ``MultiStepLR(gamma=1/factor)`` stepped per epoch.
"""

import numbers

from tfqkd.compat import keras, tf
from tfqkd.errors import TfqkdError

__all__ = ["WarmupMultiStep"]


def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@keras.saving.register_keras_serializable(package="tfqkd")
class WarmupMultiStep(keras.optimizers.schedules.LearningRateSchedule):
    """Linear per-batch warmup followed by division at milestone epochs.

    With ``W = round(warmup_epochs * steps_per_epoch)`` warmup steps, epoch
    ``e = step // steps_per_epoch`` and ``n`` the number of milestones ``<= e``::

        lr(step) = base_lr * min(1, (step + 1) / W) / factor ** n

    so the first batch uses ``base_lr / W`` and batch ``W - 1`` the full rate;
    with ``W = 0`` there is no warmup. The optimizer's ``iterations`` counter
    (starting at 0) is the step.

    Args:
        base_lr: peak learning rate > 0.
        steps_per_epoch: batches per epoch, an integer >= 1.
        warmup_epochs: warmup length in epochs (>= 0; fractions allowed).
        milestones: increasing epochs (>= 0) at which the rate is divided.
        factor: divisor applied at each milestone, > 0 (thesis: 5 or 2).
        name: optional name.

    Raises:
        TfqkdError: for out-of-range or non-increasing arguments.

    References:
        Goyal et al. 2017 (linear warmup); thesis 3.6 and 5.1.3.
    """

    def __init__(self, base_lr, steps_per_epoch, warmup_epochs=0, milestones=(), factor=10.0, name=None):
        super().__init__()
        if not _is_number(base_lr) or not base_lr > 0:
            raise TfqkdError(f"base_lr must be > 0, got {base_lr!r}")
        integral = isinstance(steps_per_epoch, numbers.Integral) and not isinstance(steps_per_epoch, bool)
        if not integral or steps_per_epoch < 1:
            raise TfqkdError(f"steps_per_epoch must be an integer >= 1, got {steps_per_epoch!r}")
        if not _is_number(warmup_epochs) or warmup_epochs < 0:
            raise TfqkdError(f"warmup_epochs must be >= 0, got {warmup_epochs!r}")
        milestones = tuple(milestones)
        if any(not _is_number(m) or m < 0 for m in milestones):
            raise TfqkdError(f"milestones must be epochs >= 0, got {list(milestones)}")
        if any(b <= a for a, b in zip(milestones, milestones[1:])):
            raise TfqkdError(f"milestones must be strictly increasing, got {list(milestones)}")
        if not _is_number(factor) or not factor > 0:
            raise TfqkdError(f"factor must be > 0, got {factor!r}")
        self.base_lr = float(base_lr)
        self.steps_per_epoch = int(steps_per_epoch)
        self.warmup_epochs = warmup_epochs
        self.milestones = milestones
        self.factor = float(factor)
        self.name = name
        self.warmup_steps = int(round(warmup_epochs * steps_per_epoch))

    def __call__(self, step):
        """Learning rate (float32 scalar tensor) for optimizer step ``step``."""
        with tf.name_scope(self.name or "WarmupMultiStep"):
            step = tf.cast(step, tf.float32)
            lr = tf.constant(self.base_lr, tf.float32)
            if self.warmup_steps > 0:
                lr *= tf.minimum(1.0, (step + 1.0) / float(self.warmup_steps))
            if self.milestones:
                epoch = tf.floor(step / float(self.steps_per_epoch))
                passed = tf.add_n([tf.cast(epoch >= float(m), tf.float32) for m in self.milestones])
                lr /= tf.pow(tf.constant(self.factor, tf.float32), passed)
            return lr

    def get_config(self):
        """Serializable config for ``from_config``."""
        return {
            "base_lr": self.base_lr,
            "steps_per_epoch": self.steps_per_epoch,
            "warmup_epochs": self.warmup_epochs,
            "milestones": list(self.milestones),
            "factor": self.factor,
            "name": self.name,
        }

    @classmethod
    def from_config(cls, config):
        """Rebuild from :meth:`get_config`."""
        return cls(**config)
