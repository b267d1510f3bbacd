"""Knowledge-distillation loss (Hinton et al. 2015; thesis eq. 3.5 / 5.1).

The loss a network minimises when it learns from another network's softened
outputs::

    L_KD = alpha * T^2 * KL(softmax(t / T) || softmax(s / T))
           + (1 - alpha) * CE(softmax(s), y)

with ``s`` the learner's logits, ``t`` the tutor's logits and ``y`` the sparse
integer labels. The KL term is summed over classes and averaged over the batch
(PyTorch's ``reduction="batchmean"``, which the thesis used). The ``T^2``
factor keeps the soft-target gradients on the same scale as the hard-target
ones when ``T`` changes (Hinton et al. 2015, section 2).

The same function serves both directions of QKD's co-studying phase (Kim et
al. 2019, "QKD: Quantization-aware Knowledge Distillation"): the student
minimises ``kd_loss(student, teacher, y)`` and the teacher minimises
``kd_loss(teacher, student, y)``; in both the tutor's logits are constants.
"""

from tfqkd.compat import tf
from tfqkd.errors import TfqkdError

__all__ = ["kd_loss", "validate_kd_hparams"]


def validate_kd_hparams(alpha, temperature):
    """Check the distillation hyperparameters.

    Args:
        alpha: weight of the soft-target term, a number in [0, 1].
        temperature: softmax temperature ``T``, a number > 0.

    Returns:
        ``(alpha, temperature)`` as Python floats.

    Raises:
        TfqkdError: if either value is not a number or is out of range.
    """
    try:
        alpha_f = float(alpha)
        temperature_f = float(temperature)
    except (TypeError, ValueError):
        raise TfqkdError(
            f"alpha and temperature must be numbers, got alpha={alpha!r}, temperature={temperature!r}"
        ) from None
    # `not (a <= x <= b)` also rejects NaN.
    if not 0.0 <= alpha_f <= 1.0:
        raise TfqkdError(f"alpha must be in [0, 1], got {alpha!r}")
    if not temperature_f > 0.0:
        raise TfqkdError(f"temperature must be > 0, got {temperature!r}")
    return alpha_f, temperature_f


def kd_loss(student_logits, teacher_logits, labels, *, alpha, temperature, per_example=False):
    """Hinton-style distillation loss of a learner against a tutor.

    Args:
        student_logits: ``[batch, classes]`` logits of the network being trained.
        teacher_logits: ``[batch, classes]`` logits of the tutor. They are
            wrapped in ``tf.stop_gradient``: no gradient ever reaches the tutor
            through this loss (thesis 3.6.2: each network's soft targets are a
            constant for the other).
        labels: ``[batch]`` (or ``[batch, 1]``) integer class ids.
        alpha: weight of the soft-target term in [0, 1]; ``alpha=0`` is plain
            sparse categorical cross-entropy.
        temperature: softmax temperature ``T`` > 0.
        per_example: if True return the ``[batch]`` vector of per-example
            losses instead of their mean. Its mean equals the default result;
            distributed training sums it and divides by the *global* batch size
            (``tf.nn.compute_average_loss``).

    Returns:
        A float32 scalar (the batch mean) or a ``[batch]`` float32 vector.

    Raises:
        TfqkdError: if ``alpha`` or ``temperature`` is out of range.

    References:
        Hinton, Vinyals, Dean 2015, "Distilling the Knowledge in a Neural
        Network"; Kim et al. 2019, "QKD"; thesis eq. 3.5 and 5.1.
    """
    alpha, temperature = validate_kd_hparams(alpha, temperature)
    # Softmax, log and KL in float32 even under mixed precision: float16
    # log-probabilities at T=8..20 lose most of the soft-target signal.
    student_logits = tf.cast(student_logits, tf.float32)
    teacher_logits = tf.stop_gradient(tf.cast(teacher_logits, tf.float32))
    labels = tf.reshape(tf.cast(labels, tf.int32), [-1])

    hard = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=student_logits)
    if alpha == 0.0:
        # Skip the soft term entirely so alpha=0 is exactly cross-entropy.
        per_ex = hard
    else:
        log_p_student = tf.nn.log_softmax(student_logits / temperature, axis=-1)
        log_p_teacher = tf.nn.log_softmax(teacher_logits / temperature, axis=-1)
        # KL(p_t || p_s) = sum_c p_t (log p_t - log p_s); written with
        # log-softmax of both so an underflowing p_t contributes exactly 0.
        kl = tf.reduce_sum(tf.exp(log_p_teacher) * (log_p_teacher - log_p_student), axis=-1)
        per_ex = alpha * temperature * temperature * kl + (1.0 - alpha) * hard
    if per_example:
        return per_ex
    return tf.reduce_mean(per_ex)
