"""The QKD training model: self-, co- and tutor-studying as a Keras model.

Quantization-aware Knowledge Distillation (Kim et al. 2019, "QKD:
Quantization-aware Knowledge Distillation"; thesis 3.6, Algorithm 1) trains a
low-bit student in three phases, each its own ``compile``/``fit`` stage:

* ``"ss"`` self-studying: the student alone, cross-entropy only (this is
  plain training, or quantization-aware training for a quantized student;
  thesis Algorithm 2).
* ``"cs"`` co-studying: the full-precision teacher and the student are trained
  jointly online, each minimising the KD loss against the other's soft targets
  (held constant), with one optimizer per network (thesis eq. 3.12/3.13,
  Algorithm 4).
* ``"ts"`` tutor-studying: the teacher is frozen and run in inference mode;
  the student minimises the KD loss (thesis Algorithm 3). The thesis reads the
  teacher outputs from a cache indexed by sample; pass ``teacher_logits`` and
  a dataset yielding ``(x, y, idx)`` for that, or leave it out to run the
  teacher on the fly (needed when inputs are augmented).

:class:`QKD` wraps the two networks so the whole Keras machinery (``fit``,
``evaluate``, callbacks, ``tf.distribute``) works unchanged. Build it inside
``strategy.scope()`` when training distributed, like any Keras model.
"""

import numpy as np

from tfqkd.compat import keras, tf
from tfqkd.distill.losses import kd_loss, validate_kd_hparams
from tfqkd.errors import TfqkdError

__all__ = ["PHASES", "QKD", "precompute_teacher_logits"]

#: The three QKD phases (Kim et al. 2019): self-, co- and tutor-studying.
PHASES = ("ss", "cs", "ts")


def _in_graph(error):
    """Mark an error raised while Keras traces a step so it reaches the user as is.

    AutoGraph rewrites exceptions raised inside ``tf.function`` into a
    ``StagingError`` with a multi-line source trace; errors carrying
    ``ag_pass_through`` are re-raised unchanged, keeping the one-line
    :class:`TfqkdError`.
    """
    error.ag_pass_through = True
    return error


def _unpack(data):
    """Split a batch into ``(x, y, idx)``; ``idx`` is None for ``(x, y)`` batches."""
    if isinstance(data, (tuple, list)) and len(data) in (2, 3):
        x, y = data[0], data[1]
        idx = data[2] if len(data) == 3 else None
        return x, y, idx
    raise _in_graph(TfqkdError("QKD needs labelled batches: (x, y) or (x, y, sample_index)"))


def _average_loss(per_example, network):
    """The loss one replica contributes, so that the cross-replica sum is the mean.

    ``apply_gradients`` sums gradients over replicas, so each replica divides
    its summed loss by the *global* batch size, and regularization losses
    (present once per replica) by the number of replicas. Without a strategy
    both reduce to the plain batch mean plus the regularization.

    Args:
        per_example: ``[local_batch]`` per-example losses.
        network: the network whose ``losses`` (weight/activity regularizers)
            belong to this objective.

    Returns:
        ``(scaled, reported)``: the scalar to differentiate and the
        replica-local mean to log.
    """
    scaled = tf.nn.compute_average_loss(per_example)
    reported = tf.reduce_mean(per_example)
    if network.losses:
        reg = tf.add_n([tf.cast(l, tf.float32) for l in network.losses])
        scaled += tf.nn.scale_regularization_loss(reg)
        reported += reg
    return scaled, reported


def _batch_size(labels):
    """Examples in this (replica's) batch: weights the running loss means.

    Keras weights its own ``loss`` metric by batch size too, so the epoch value
    is the mean over examples even when the last batch is smaller.
    """
    return tf.shape(tf.reshape(labels, [-1]))[0]


def _cross_entropy(labels, logits):
    labels = tf.reshape(tf.cast(labels, tf.int32), [-1])
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=tf.cast(logits, tf.float32))


def precompute_teacher_logits(teacher, dataset, num_examples):
    """Run the teacher once over a dataset and store its logits by sample index.

    This is the thesis's teacher-output cache for tutor-studying (Algorithm 3,
    line 8). It is exact only while the training inputs are not augmented:
    with random crops/flips the student sees other inputs than the cached ones.

    Args:
        teacher: a Keras model returning logits; run with ``training=False``.
        dataset: iterable of ``(x, y, idx)`` batches, ``idx`` the integer
            sample indices in ``[0, num_examples)``.
        num_examples: number of samples ``N``; every index must occur.

    Returns:
        A float32 NumPy array ``[N, num_classes]``; row ``i`` holds the
        teacher's logits for sample ``i``.

    Raises:
        TfqkdError: if batches lack indices, indices are out of range or some
            index never occurs.
    """
    num_examples = int(num_examples)
    if num_examples < 1:
        raise TfqkdError(f"num_examples must be >= 1, got {num_examples}")

    # One traced function instead of eager calls: eager Keras calls per batch
    # are several times slower on CIFAR-sized sets.
    @tf.function(reduce_retracing=True)
    def infer(x):
        return tf.cast(teacher(x, training=False), tf.float32)

    cache = None
    seen = np.zeros(num_examples, dtype=bool)
    for batch in dataset:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 3):
            raise TfqkdError("precompute_teacher_logits needs a dataset of (x, y, sample_index) batches")
        x, _, idx = batch
        idx = np.asarray(idx).astype(np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= num_examples):
            raise TfqkdError(f"sample index out of range [0, {num_examples}): got {idx.min()}..{idx.max()}")
        logits = infer(x).numpy()
        if cache is None:
            cache = np.zeros((num_examples, logits.shape[-1]), dtype=np.float32)
        cache[idx] = logits
        seen[idx] = True
    if cache is None:
        raise TfqkdError("precompute_teacher_logits got an empty dataset")
    if not seen.all():
        raise TfqkdError(f"the dataset covered only {int(seen.sum())} of {num_examples} sample indices")
    return cache


@keras.saving.register_keras_serializable(package="tfqkd")
class QKD(keras.Model):
    """Student/teacher pair trained by one QKD phase (Kim et al. 2019; thesis Algorithm 1).

    ``call`` returns the student's logits, so ``predict``/``evaluate`` of the
    wrapper are those of the student. ``train_step`` implements the phase:

    * ``ss``: student loss = CE(student, y) (the teacher, if given, is unused
      and unchanged).
    * ``cs``: student loss = ``kd_loss(student, teacher)``, teacher loss =
      ``kd_loss(teacher, student)``; one forward pass of each network in
      training mode, both gradients from that pass, then each network updated
      by its own optimizer.
    * ``ts``: student loss = ``kd_loss(student, teacher)`` with the teacher in
      inference mode (``training=False``: batch-norm statistics and weights
      stay bit-identical) or read from ``teacher_logits`` by sample index.

    Each network's regularization losses are added to its own objective.
    Under a ``tf.distribute`` strategy every replica's loss is the sum of its
    per-example losses over the global batch size, so the summed gradients
    equal the single-device ones.

    Logged metrics: ``loss`` and ``accuracy`` (student); ``teacher_loss`` and
    ``teacher_accuracy`` in ``cs``; ``teacher_accuracy`` in ``ts`` (of the
    teacher's or the cached logits). ``evaluate`` reports the student's
    cross-entropy as ``loss`` and, in ``cs``/``ts`` with a teacher model, the
    teacher's cross-entropy and accuracy.

    Args:
        student: Keras model returning logits ``[batch, classes]``.
        teacher: Keras model returning logits; required for ``cs``, and for
            ``ts`` unless ``teacher_logits`` is given.
        phase: ``"ss"``, ``"cs"`` or ``"ts"``.
        alpha: soft-target weight of the KD loss in [0, 1] (thesis: 0.7).
        temperature: KD softmax temperature > 0 (thesis: 8 on CIFAR, 20 on MNIST).
        teacher_logits: optional ``[N, classes]`` cache from
            :func:`precompute_teacher_logits`, used in ``ts`` for batches that
            carry sample indices ``(x, y, idx)``.
        **kwargs: passed to ``keras.Model`` (e.g. ``name``).

    Raises:
        TfqkdError: for an unknown phase, a missing teacher, out-of-range
            ``alpha``/``temperature`` or a malformed ``teacher_logits``.
    """

    #: Exposed on the class too, so ``QKD.precompute_teacher_logits(...)`` works.
    precompute_teacher_logits = staticmethod(precompute_teacher_logits)

    def __init__(self, student, teacher=None, *, phase, alpha=0.7, temperature=8.0, teacher_logits=None, **kwargs):
        super().__init__(**kwargs)
        if phase not in PHASES:
            raise TfqkdError(f"unknown QKD phase {phase!r}; expected one of {', '.join(PHASES)}")
        if not isinstance(student, keras.layers.Layer):
            raise TfqkdError(f"student must be a Keras model, got {type(student).__name__}")
        if teacher is not None and not isinstance(teacher, keras.layers.Layer):
            raise TfqkdError(f"teacher must be a Keras model, got {type(teacher).__name__}")
        if teacher is not None and teacher is student:
            raise TfqkdError("teacher and student must be two different models")
        self.alpha, self.temperature = validate_kd_hparams(alpha, temperature)
        if phase == "cs":
            if teacher is None:
                raise TfqkdError("phase 'cs' (co-studying) trains a teacher: pass teacher=")
            if not teacher.trainable:
                raise TfqkdError("phase 'cs' trains the teacher, but teacher.trainable is False")
        if phase == "ts" and teacher is None and teacher_logits is None:
            raise TfqkdError("phase 'ts' (tutor-studying) needs teacher= or teacher_logits=")
        if teacher_logits is not None and phase != "ts":
            raise TfqkdError(f"teacher_logits is a tutor-studying cache; phase {phase!r} does not use it")

        self.phase = phase
        self.student = student
        self.teacher = teacher
        self.teacher_optimizer = None
        if teacher_logits is not None:
            cache = np.asarray(teacher_logits, dtype=np.float32)
            if cache.ndim != 2:
                raise TfqkdError(f"teacher_logits must be [num_examples, num_classes], got shape {cache.shape}")
            # A plain tensor, not a tf.Variable: the cache is data, and must
            # not end up in checkpoints or the model's weights.
            self._teacher_logits = tf.constant(cache)
        else:
            self._teacher_logits = None

        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.accuracy_tracker = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        self._teacher_in_play = phase != "ss"
        if self._teacher_in_play:
            self.teacher_loss_tracker = keras.metrics.Mean(name="teacher_loss")
            self.teacher_accuracy_tracker = keras.metrics.SparseCategoricalAccuracy(name="teacher_accuracy")

    @property
    def metrics(self):
        """Metrics Keras resets at each epoch and before ``evaluate``."""
        metrics = [self.loss_tracker, self.accuracy_tracker]
        if self._teacher_in_play:
            metrics += [self.teacher_loss_tracker, self.teacher_accuracy_tracker]
        return metrics

    def compile(self, optimizer, teacher_optimizer=None, **kwargs):
        """Configure training.

        Args:
            optimizer: the student's optimizer (instance or Keras identifier).
            teacher_optimizer: the teacher's optimizer; required in ``cs`` and
                rejected elsewhere (no other phase updates the teacher).
            **kwargs: other ``keras.Model.compile`` options (``run_eagerly``,
                ``steps_per_execution``, ``jit_compile``). ``loss`` and
                ``metrics`` are not accepted: QKD defines both.

        Raises:
            TfqkdError: for a missing/superfluous teacher optimizer, one
                optimizer shared by both networks, or a ``loss``/``metrics``.
        """
        for key in ("loss", "metrics", "weighted_metrics", "loss_weights"):
            if kwargs.get(key) is not None:
                raise TfqkdError(f"QKD.compile does not take {key}=: the phase defines the loss and metrics")
        if self.phase == "cs" and teacher_optimizer is None:
            raise TfqkdError("phase 'cs' updates the teacher: pass teacher_optimizer= to compile")
        if self.phase != "cs" and teacher_optimizer is not None:
            raise TfqkdError(f"phase {self.phase!r} does not train the teacher; drop teacher_optimizer=")
        if teacher_optimizer is not None and teacher_optimizer is optimizer and not isinstance(optimizer, str):
            # A Keras optimizer builds its slots for the first variable list it
            # sees; sharing one between two networks fails or mixes momenta.
            raise TfqkdError("student and teacher need two optimizer instances, got the same object twice")
        super().compile(optimizer=optimizer, **kwargs)
        # The step returns metric results, which are already global (synchronized
        # metric variables); Keras' default "auto" would sum each replica's copy.
        self.distribute_reduction_method = "first"
        if teacher_optimizer is not None:
            # Same treatment Keras gives the student's optimizer: built in the
            # strategy scope, wrapped in a LossScaleOptimizer under mixed_float16.
            with self.distribute_strategy.scope():
                self.teacher_optimizer = self._get_optimizer(teacher_optimizer)

    def call(self, inputs, training=None):
        """Return the student's logits."""
        return self.student(inputs, training=training)

    # -- training ---------------------------------------------------------

    def _kd(self, learner_logits, tutor_logits, labels):
        return kd_loss(
            learner_logits, tutor_logits, labels, alpha=self.alpha, temperature=self.temperature, per_example=True
        )

    def _teacher_targets(self, x, idx):
        """Teacher logits for tutor-studying: from the cache when possible."""
        if self._teacher_logits is not None and idx is not None:
            return tf.gather(self._teacher_logits, tf.reshape(tf.cast(idx, tf.int64), [-1]))
        if self.teacher is None:
            raise _in_graph(
                TfqkdError("teacher_logits needs batches (x, y, sample_index); got (x, y) and no teacher model")
            )
        return self.teacher(x, training=False)

    def train_step(self, data):
        """One optimisation step of the configured phase; returns the logged metrics."""
        x, y, idx = _unpack(data)
        if self.phase == "cs":
            return self._train_step_cs(x, y)
        if self.phase == "ts":
            # Outside the tape: the frozen teacher needs no gradient bookkeeping.
            teacher_logits = tf.stop_gradient(self._teacher_targets(x, idx))
        with tf.GradientTape() as tape:
            student_logits = self(x, training=True)
            if self.phase == "ss":
                per_example = _cross_entropy(y, student_logits)
            else:
                per_example = self._kd(student_logits, teacher_logits, y)
            loss, reported = _average_loss(per_example, self.student)
        self.optimizer.minimize(loss, self.student.trainable_variables, tape=tape)
        self.loss_tracker.update_state(reported, sample_weight=_batch_size(y))
        self.accuracy_tracker.update_state(y, student_logits)
        logs = {"loss": self.loss_tracker.result(), "accuracy": self.accuracy_tracker.result()}
        if self.phase == "ts":
            self.teacher_accuracy_tracker.update_state(y, teacher_logits)
            logs["teacher_accuracy"] = self.teacher_accuracy_tracker.result()
        return logs

    def _train_step_cs(self, x, y):
        # Persistent: two gradients (student, teacher) from one forward pass.
        with tf.GradientTape(persistent=True) as tape:
            student_logits = self(x, training=True)
            teacher_logits = self.teacher(x, training=True)
            # kd_loss stops the gradient through its tutor argument, so each
            # network sees the other's soft targets as constants (thesis 3.6.2).
            student_loss, student_reported = _average_loss(self._kd(student_logits, teacher_logits, y), self.student)
            teacher_loss, teacher_reported = _average_loss(self._kd(teacher_logits, student_logits, y), self.teacher)
        # Both gradients first, then both updates: each network's step is taken
        # from the same pre-update state, as in the thesis's Algorithm 4.
        student_grads = self.optimizer.compute_gradients(student_loss, self.student.trainable_variables, tape=tape)
        teacher_grads = self.teacher_optimizer.compute_gradients(
            teacher_loss, self.teacher.trainable_variables, tape=tape
        )
        del tape
        self.optimizer.apply_gradients(student_grads)
        self.teacher_optimizer.apply_gradients(teacher_grads)
        self.loss_tracker.update_state(student_reported, sample_weight=_batch_size(y))
        self.accuracy_tracker.update_state(y, student_logits)
        self.teacher_loss_tracker.update_state(teacher_reported, sample_weight=_batch_size(y))
        self.teacher_accuracy_tracker.update_state(y, teacher_logits)
        return {m.name: m.result() for m in self.metrics}

    def test_step(self, data):
        """Evaluate the student (and the teacher model, in ``cs``/``ts``) in inference mode."""
        x, y, _ = _unpack(data)
        student_logits = self(x, training=False)
        _, reported = _average_loss(_cross_entropy(y, student_logits), self.student)
        self.loss_tracker.update_state(reported, sample_weight=_batch_size(y))
        self.accuracy_tracker.update_state(y, student_logits)
        logs = {"loss": self.loss_tracker.result(), "accuracy": self.accuracy_tracker.result()}
        if self._teacher_in_play and self.teacher is not None:
            teacher_logits = self.teacher(x, training=False)
            _, teacher_reported = _average_loss(_cross_entropy(y, teacher_logits), self.teacher)
            self.teacher_loss_tracker.update_state(teacher_reported, sample_weight=_batch_size(y))
            self.teacher_accuracy_tracker.update_state(y, teacher_logits)
            logs["teacher_loss"] = self.teacher_loss_tracker.result()
            logs["teacher_accuracy"] = self.teacher_accuracy_tracker.result()
        return logs

    # -- serialization ----------------------------------------------------

    def get_config(self):
        """Phase hyperparameters and the serialized networks (not the logits cache)."""
        return {
            "phase": self.phase,
            "alpha": self.alpha,
            "temperature": self.temperature,
            "student": keras.saving.serialize_keras_object(self.student),
            "teacher": None if self.teacher is None else keras.saving.serialize_keras_object(self.teacher),
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        """Rebuild from :meth:`get_config` (custom layers need ``custom_objects``)."""
        config = dict(config)
        student = keras.saving.deserialize_keras_object(config.pop("student"), custom_objects=custom_objects)
        teacher_cfg = config.pop("teacher", None)
        teacher = None
        if teacher_cfg is not None:
            teacher = keras.saving.deserialize_keras_object(teacher_cfg, custom_objects=custom_objects)
        return cls(student, teacher, **config)
