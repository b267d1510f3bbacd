"""Timing training steps from inside ``fit``, for the training-cost benchmarks."""

import time

from tfqkd.compat import keras

__all__ = ["StepTimer"]


class StepTimer(keras.callbacks.Callback):
    """Wall and process-CPU time of each training batch; the first batch of each ``fit`` call (tracing) is left out."""

    def __init__(self):
        super().__init__()
        self.times, self.cpu_times, self._t0, self._c0, self._first = [], [], None, None, True

    def on_train_begin(self, logs=None):
        self._first = True

    def on_train_batch_begin(self, batch, logs=None):
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, batch, logs=None):
        # This callback does not declare _supports_tf_logs, so Keras converts
        # the logs to NumPy before calling it: the step has finished here.
        elapsed, cpu = time.perf_counter() - self._t0, time.process_time() - self._c0
        if not self._first:
            self.times.append(elapsed)
            self.cpu_times.append(cpu)
        self._first = False
