"""Does quantization-aware training survive the optimizers users pick? One short run per cell.

A grid of short trainings of a quantized model from scratch, as a new user
would write it (``create_model(..., quant=...)``, ``compile``, ``fit``, no
calibration data), each with its own seed and optimizer. A run is *dead*
when its training ends at chance: a final training loss at ``ln(classes)``
or a training accuracy at chance (the network stopped
learning). Test accuracy is reported too, but does not decide: after a
few hundred updates the moving statistics of BatchNormalization lag the
weights, so a live CNN can score far lower in inference mode than in
training, float or quantized alike (the ``fp32`` control shows it). With
learned steps trained in linear space, 10 of 24 short w8a8 MLP runs ended
with a loss above 1.0; the grid is the regression check for that.
"""

import math
import time

import numpy as np

from tfqkd.compat import keras
from tfqkd.models import create_model
from tfqkd.quant import model_quantizers
from tfqkd.training.guard import chance_accuracy_ceiling

__all__ = ["OPTIMIZERS", "is_dead_run", "train_run"]

#: The optimizers of the grid: a default Adam, SGD with momentum, and the thesis's SGD (lr 0.1, Nesterov).
OPTIMIZERS = {
    "adam_1e-3": lambda: keras.optimizers.Adam(1e-3),
    "sgd_0.05_m0.9": lambda: keras.optimizers.SGD(0.05, momentum=0.9),
    "sgd_0.1_nesterov": lambda: keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True),
}


def is_dead_run(train_accuracy, final_loss, num_classes):
    """Whether a finished run's training ended at chance (accuracy in [0, 1]; the recipes' guard's ceiling)."""
    at_chance = train_accuracy <= chance_accuracy_ceiling(num_classes)
    flat = not math.isfinite(final_loss) or final_loss >= 0.98 * math.log(num_classes)
    return bool(at_chance or flat)


def train_run(model_name, policy, optimizer, seed, data, *, epochs=2, batch_size=64, steps_per_epoch=None):
    """Trains one quantized model from scratch and reports how it ended.

    Args:
      model_name: a registered model.
      policy: a quantization policy (preset name, dict or YAML path).
      optimizer: a key of :data:`OPTIMIZERS`.
      seed: the random seed (weights and data order).
      data: ``(x_train, y_train, x_test, y_test)`` arrays.
      epochs, batch_size: the training budget.
      steps_per_epoch: cap on batches per epoch (None: the whole training set).

    Returns:
      dict with the run's settings, ``final_loss``, ``train_accuracy``,
      ``test_accuracy`` (0-1), ``dead``, ``step_ratio`` (min and max of
      learned step / initial step, None without learned steps) and ``seconds``.
    """
    x_train, y_train, x_test, y_test = data
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    keras.utils.set_random_seed(seed)
    start = time.perf_counter()
    model = create_model(model_name, num_classes=num_classes, input_shape=x_train.shape[1:], quant=policy)
    learned = [q for _, _, q in model_quantizers(model) if hasattr(q, "log_step")]
    initial = np.array([float(q.step.numpy()[0]) for q in learned])
    model.compile(
        optimizer=OPTIMIZERS[optimizer](),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    if steps_per_epoch is not None:
        x_train, y_train = x_train[: steps_per_epoch * batch_size], y_train[: steps_per_epoch * batch_size]
    history = model.fit(x_train, y_train, batch_size=batch_size, epochs=epochs, verbose=0).history
    test_accuracy = float(model.evaluate(x_test, y_test, batch_size=256, verbose=0)[1])
    final_loss, train_accuracy = float(history["loss"][-1]), float(history["accuracy"][-1])
    ratios = np.array([float(q.step.numpy()[0]) for q in learned]) / initial if learned else None
    return {
        "model": model_name,
        "policy": policy if isinstance(policy, str) else "custom",
        "optimizer": optimizer,
        "seed": int(seed),
        "epochs": int(epochs),
        "final_loss": round(final_loss, 4),
        "train_accuracy": round(train_accuracy, 4),
        "test_accuracy": round(test_accuracy, 4),
        "dead": is_dead_run(train_accuracy, final_loss, num_classes),
        "step_ratio": None if ratios is None else [round(float(ratios.min()), 3), round(float(ratios.max()), 3)],
        "seconds": round(time.perf_counter() - start, 1),
    }
