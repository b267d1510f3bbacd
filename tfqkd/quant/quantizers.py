"""Fake-quantizers for weights and activations, usable inside QKeras layers.

Three schemes (docs/architecture.md), all with a straight-through estimator (STE):

* :class:`LearnedStepQuantizer` -- the QKD scheme (Kim et al. 2019, "QKD:
  Quantization-aware Knowledge Distillation"): a trainable quantization
  interval per tensor, implemented as the LSQ learned step (Esser et al. 2020,
  "Learned Step Size Quantization"): ``v_hat = s * round(clip(v/s, -Q_N, Q_P))``
  with ``d v_hat / d s = round(v/s) - v/s`` inside the range and ``-Q_N`` /
  ``Q_P`` outside, gradient scaled by ``1/sqrt(N * Q_P)``.
* :class:`AffineQuantizer` -- the thesis scheme (section 5.1.9): uniform
  affine quantization with scale and zero point from the (running-average)
  minimum and maximum of each tensor.
* :class:`Pof2Quantizer` -- the Xilinx DPU scheme (Vitis-AI ``pof2s``): 8-bit
  signed, symmetric, per tensor, scale ``2**-pos``; weights round half to
  even, activations half up.

The quantizers subclass QKeras' ``quantized_bits`` / ``quantized_relu`` so
that QKeras' tools (``print_qstats``, QTools), which recognise quantizers by
class name, read their bit widths. Their state (steps, ranges, positions)
lives in Keras weights created by the owning layer (see
:mod:`tfqkd.quant.layers`), so it is trained, checkpointed, saved in .h5 and
.keras files and mirrored by ``tf.distribute`` like any other weight.
"""

import math

import numpy as np
import qkeras

from tfqkd.compat import keras, tf
from tfqkd.errors import TfqkdError
from tfqkd.quant import kernels
from tfqkd.quant.grid import Grid

__all__ = [
    "AffineQuantizer",
    "LearnedStepQuantizer",
    "Pof2Quantizer",
    "TfqkdQuantizer",
    "get_quantizer",
    "odd_ratio",
    "odd_ratio_parts",
    "power_of_two_fake_quant",
    "quantizer_state_suffixes",
    "register_quantizer",
    "registered_quantizers",
    "round_half_up",
    "validate_bits",
]

# Running-average constant of the thesis's activation observers (PyTorch's
# MovingAverageMinMaxObserver default).
_EMA_MOMENTUM = 0.01
_LN2 = math.log(2.0)
#: How far (as a factor) a learned step may move from its initial value in training.
STEP_BAND = 16.0
# Activation range assumed when no calibration data is given (BN-ReLU outputs).
_DEFAULT_ACTIVATION_RANGE = 4.0


def validate_bits(bits, what="bits", low=1, high=16):
    """Checks a bit width and returns it as int.

    Args:
      bits: the requested bit width.
      what: name used in the error message.
      low, high: inclusive allowed range.

    Returns:
      ``int(bits)``.

    Raises:
      TfqkdError: when ``bits`` is not an integer in ``[low, high]``.
    """
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not low <= bits <= high:
        raise TfqkdError(f"{what} must be an integer in [{low}, {high}], got {bits!r}")
    return int(bits)


def round_ste(x):
    """Round half to even in the forward pass, identity gradient (STE)."""
    return x + tf.stop_gradient(tf.round(x) - x)


def round_half_up(x):
    """``floor(x + 0.5)``: the DPU's rounding for activations."""
    return tf.floor(x + 0.5)


def _round_half_up_ste(x):
    return x + tf.stop_gradient(round_half_up(x) - x)


class TfqkdQuantizer:
    """What every tfqkd quantizer is: the contract exporters, analyses and trainers rely on.

    * ``__call__(x, training)``: the fake-quantized tensor (with a straight-through gradient);
    * ``grid(values=None)``: the integer grid it puts values on (:class:`~tfqkd.quant.grid.Grid`):
      of its state for activations, of ``values`` for weights whose scale follows the tensor;
    * ``STATE_NAMES`` and ``variable_specs()``: which layer weights hold its state
      (``<role>_<name>``), created by :meth:`build_variables` from the owning layer's ``build``;
    * ``initialize(values)``: set that state from sample values (calibration);
    * ``get_config``/``from_config``: Keras serialization, under the name registered with
      :func:`register_quantizer` (the one registry for loading and ``custom_objects``).
    """

    #: Role-independent identifier used in policies ("lsq", "affine", "pof2", "lsq_pof2").
    scheme = None
    #: Names of the state weights any instance may create (``variable_specs`` keys).
    STATE_NAMES = ()

    def _init_common(self, bits, signed, narrow_range):
        qkeras.quantizers.BaseQuantizer.__init__(self)
        self.bits = validate_bits(bits, "bits")
        self.signed = bool(signed)
        self.keep_negative = self.signed  # read by QKeras' tools
        self.integer = 0  # read by QKeras' tools (no integer bits: scaled fraction)
        self.narrow_range = bool(narrow_range)
        self._vars = {}

    # Integer code range --------------------------------------------------
    @property
    def qmin(self):
        """Smallest integer code (``-Q_N``)."""
        if not self.signed:
            return 0
        return -(2 ** (self.bits - 1)) + (1 if self.narrow_range else 0)

    @property
    def qmax(self):
        """Largest integer code (``Q_P``)."""
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    # State -----------------------------------------------------------------
    def build_variables(self, layer, role, shape):
        """Creates this quantizer's state as weights of ``layer``.

        Args:
          layer: the Keras layer owning the quantizer.
          role: "kernel", "depthwise", "bias" or "input"; prefixes weight names.
          shape: shape of the tensor this quantizer will see (for LSQ's
            gradient scale); the batch dimension may be None.
        """
        self._numel = int(np.prod([d for d in shape if d is not None])) or 1
        for name, (initial, trainable) in self.variable_specs().items():
            kwargs = {}
            if not trainable:
                # Statistics updated in the forward pass: each replica keeps its
                # own copy and reads average them, as Keras' BatchNormalization does.
                kwargs = dict(
                    synchronization=tf.VariableSynchronization.ON_READ,
                    aggregation=tf.VariableAggregation.MEAN,
                )
            # Shape (1,), not (): QKeras' tools read a layer's second weight as
            # its bias and take len(shape[0]) of it.
            self._vars[name] = layer.add_weight(
                name=f"{role}_{name}",
                shape=(1,),
                initializer=keras.initializers.Constant(initial),
                trainable=trainable,
                constraint=self.variable_constraint(name),
                **kwargs,
            )

    def variable_constraint(self, name):
        """A projection the optimizer applies to state ``name`` after each update (None: none)."""
        return None

    def grid(self, values=None):
        """The integer grid of this quantizer (a :class:`~tfqkd.quant.grid.Grid`).

        Args:
          values: the tensor, for weight quantizers whose scale follows it
            (min-max affine, power-of-two); quantizers with a stored scale ignore it.

        Raises:
          TfqkdError: the scale follows each batch and no ``values`` were given.
        """
        raise NotImplementedError

    def state_variables(self):
        """The layer weights holding this quantizer's state."""
        return list(self._vars.values())

    def variable(self, name):
        """The layer weight backing state ``name`` (shape (1,)).

        A quantizer rebuilt from a config outside any layer (QKeras' tools and
        hls4ml call a layer's quantizer on its own) reads the trained value the
        config carries, as a constant.
        """
        if name in self._vars:
            return self._vars[name]
        standalone = getattr(self, "_standalone_state", {})
        if name in standalone:
            return tf.constant([standalone[name]], tf.float32)
        raise TfqkdError(
            f"{type(self).__qualname__} has no state '{name}': use it inside a tfqkd.quant layer (QConv2D, QDense, "
            "QDepthwiseConv2D, QActivation) or rebuild it from the config of a trained one"
        )

    # QKeras compatibility ----------------------------------------------------
    def _set_trainable_parameter(self):
        """QKeras calls this to switch ``alpha`` to auto mode; we have no alpha."""

    def __str__(self):
        flags = "" if self.signed else ",unsigned"
        return f"{self.scheme}({self.bits}{flags})"

    def get_config(self):
        config = {"bits": self.bits, "signed": self.signed, "narrow_range": self.narrow_range}
        state = self._state_values()
        if state:
            # The trained state travels with the config, so a quantizer rebuilt from it
            # outside its layer (QKeras' tools, hls4ml) computes what the layer computes.
            config["state"] = state
        return config

    def _state_values(self):
        try:
            return {name: float(variable.numpy()[0]) for name, variable in self._vars.items()}
        except (AttributeError, NotImplementedError, ValueError, TypeError):  # symbolic (inside a traced function)
            return {}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        state = config.pop("state", None) or {}
        quantizer = cls._from_settings(config)
        quantizer._standalone_state = {str(k): float(v) for k, v in state.items()}
        return quantizer

    @classmethod
    def _from_settings(cls, config):
        return cls(**config)


# Three ways to compute one quantizer, all giving the same forward bits and input gradient
# (tests/test_quant.py): in a training step on a large tensor, the compiled kernels of
# tfqkd.quant.kernels (one op each way); otherwise (inference, which converters read, or no C++
# compiler), tensors at least this large take the XLA-fused functions below and smaller ones
# (most weights) plain ops, which cost less than an XLA launch there.
_FUSE_MIN_ELEMENTS = 16384
_XLA = dict(jit_compile=True, reduce_retracing=True, autograph=False)


def odd_ratio(log_ratio, min_odd, round_down=False):
    """``log`` of the ratio ``k / 2**j`` (``k`` odd, ``j >= 0``) nearest to ``exp(log_ratio)``, or the largest not above it
    (up to 1e-6).

    ``j`` is the smallest that makes ``2**j * ratio >= min_odd``, so the ratio moves by at most
    ``2 / min_odd``. Where integer sums ``A`` are rounded onto a grid in units of ``1 / ratio``
    output steps, ``2**(j+1) * A`` is even and ``k * (2n + 1)`` odd: no reachable value comes within
    ``1 / (2k)`` of a rounding threshold ``n + 1/2``, so float32 noise (a Keras sum, XNNPACK's
    float rescale) cannot put a code on the other side, and neither can the first of TFLite's
    built-in kernels' two roundings when the accumulator unit is finer than ``1 / 2**(j+1)`` of
    the integers' (``WeightedPoint.tune`` stores weight codes times enough for that).

    Computed in float64, and as ``log(2 * (m + 1/2))`` rather than ``log(2m + 1)``: in float32,
    Grappler's rewrite of ``log(x + 1)`` as ``log1p(x)`` in a tf.function gave another last bit
    than eager execution, so predict() and the exporter read steps 1e-6 apart and moved codes.
    """
    k, j = odd_ratio_parts(log_ratio, min_odd, round_down)
    return tf.cast(tf.math.log(k) - j * _LN2, log_ratio.dtype)


def odd_ratio_parts(log_ratio, min_odd, round_down=False):
    """``(k, j)`` of :func:`odd_ratio` (float64 tensors)."""
    log_ratio = tf.cast(log_ratio, tf.float64)
    # Rounding down from 2**j * ratio >= min_odd + 1 keeps k >= min_odd. Both comparisons forgive 1e-6 and
    # 2e-6 (float32 noise of a ratio snapped before), so a snapped ratio keeps its j and its k.
    lowest = (min_odd + 1) * (1.0 - 1e-6) if round_down else min_odd
    j = tf.maximum(tf.constant(0.0, tf.float64), tf.math.ceil(math.log2(lowest) - log_ratio / _LN2))
    scaled = tf.exp(log_ratio + j * _LN2)
    half_k = (tf.floor((scaled * (1.0 + 2e-6) - 1.0) / 2.0) if round_down else tf.floor(scaled / 2.0)) + 0.5  # k / 2
    return 2.0 * half_k, j


def _step_fake_quant(x, step, qmin, qmax):
    return tf.round(tf.clip_by_value(x / step, qmin, qmax)) * step


def _input_gradient(upstream, x, step, qmin, qmax):
    """Straight-through: ``upstream`` where ``x / step`` lies inside the code range, 0 outside (LSQ)."""
    scaled = x / step
    return upstream * tf.cast(tf.clip_by_value(scaled, qmin, qmax) == scaled, upstream.dtype)


def _step_gradient_terms(upstream, x, step, qmin, qmax):
    """``upstream * d(s * round(clip(x/s)))/ds``: the rounding error inside the range, the clipped code outside."""
    scaled = x / step
    clipped = tf.clip_by_value(scaled, qmin, qmax)
    return upstream * tf.where(clipped == scaled, tf.round(clipped) - scaled, clipped)


# One pass over the tensor each instead of four to eight: element-wise chains are
# what made a quantized step cost twice a float one (issue 16). Reductions stay
# outside: XLA's CPU reductions run on one thread.
_fused_step_fake_quant = tf.function(_step_fake_quant, **_XLA)
_fused_input_gradient = tf.function(_input_gradient, **_XLA)
_fused_step_gradient_terms = tf.function(_step_gradient_terms, **_XLA)


def _is_large(x):
    numel = x.shape.num_elements()  # None while the batch size is unknown: an activation
    return numel is None or numel >= _FUSE_MIN_ELEMENTS


def _takes_fused_kernels(x, training):
    """Training on a large float32 tensor, with the kernels built: the fused path (inference keeps stock ops)."""
    return training is True and x.dtype == tf.float32 and _is_large(x) and kernels.fake_quant_ops() is not None


def _affine_fake_quant(x, scale, zero_point, qmin, qmax):
    codes = tf.clip_by_value(round_ste(x / scale) + zero_point, qmin, qmax)
    return (codes - zero_point) * scale


def _affine_input_gradient(upstream, x, scale, zero_point, qmin, qmax):
    # What autodiff of _affine_fake_quant gives, op for op: the clip passes the gradient
    # where the rounded code lies inside [qmin, qmax].
    codes = round_ste(x / scale) + zero_point
    return tf.where((codes >= qmin) & (codes <= qmax), upstream * scale, tf.zeros_like(upstream)) / scale


def _pof2_fake_quant(x, up, down, qmin, qmax, half_up):
    # up = 2**pos, down = 2**-pos, computed outside: XLA's pow need not be exact.
    scaled = x * up
    rounded = _round_half_up_ste(scaled) if half_up else round_ste(scaled)
    return tf.clip_by_value(rounded, qmin, qmax) * down


def _pof2_input_gradient(upstream, x, up, down, qmin, qmax, half_up):
    scaled = x * up
    rounded = _round_half_up_ste(scaled) if half_up else round_ste(scaled)
    return tf.where((rounded >= qmin) & (rounded <= qmax), upstream * down, tf.zeros_like(upstream)) * up


_fused_affine_fake_quant = tf.function(_affine_fake_quant, **_XLA)
_fused_affine_input_gradient = tf.function(_affine_input_gradient, **_XLA)
_fused_pof2_fake_quant = tf.function(_pof2_fake_quant, **_XLA)
_fused_pof2_input_gradient = tf.function(_pof2_input_gradient, **_XLA)


def power_of_two_fake_quant(x, pos, qmin, qmax, half_up, training=None):
    """``clip(round(x * 2**pos), qmin, qmax) * 2**-pos`` with a straight-through gradient.

    Args:
      x: the tensor.
      pos: the position (a scalar tensor, no gradient).
      qmin, qmax: the integer code range (ints).
      half_up: round half up (``floor(v + 0.5)``, the DPU's activations) instead of half to even.
      training: True in a training step: large tensors then take the fused kernels.
    """
    two = tf.constant(2.0, x.dtype)
    qmin, qmax = (tf.constant(float(v), x.dtype) for v in (qmin, qmax))
    straight_through = _fused_pof2_straight_through if _takes_fused_kernels(x, training) else _pof2_straight_through
    return straight_through(x, tf.pow(two, pos), tf.pow(two, -pos), qmin, qmax, tf.constant(bool(half_up)))


# Autodiff through an XLA function costs more than the plain ops: these state the
# straight-through gradient of the two fixed-scale schemes themselves.
@tf.custom_gradient
def _affine_straight_through(x, scale, zero_point, qmin, qmax):
    large = _is_large(x)
    fake_quant = _fused_affine_fake_quant if large else _affine_fake_quant
    input_gradient = _fused_affine_input_gradient if large else _affine_input_gradient

    def grad(upstream):
        return input_gradient(upstream, x, scale, zero_point, qmin, qmax), None, None, None, None

    return fake_quant(x, scale, zero_point, qmin, qmax), grad


@tf.custom_gradient
def _pof2_straight_through(x, up, down, qmin, qmax, half_up):
    large = _is_large(x)
    fake_quant = _fused_pof2_fake_quant if large else _pof2_fake_quant
    input_gradient = _fused_pof2_input_gradient if large else _pof2_input_gradient
    half_up = bool(tf.get_static_value(half_up))  # a constant: picks the rounding at trace time

    def grad(upstream):
        return input_gradient(upstream, x, up, down, qmin, qmax, half_up), None, None, None, None, None

    return fake_quant(x, up, down, qmin, qmax, half_up), grad


def _attributes(*constants):
    """Python values of constant tensors, for op attributes."""
    return [tf.get_static_value(c).item() for c in constants]


@tf.custom_gradient
def _fused_affine_straight_through(x, scale, zero_point, qmin, qmax):
    """:func:`_affine_straight_through` on the fused kernels (the same bits)."""
    ops = kernels.fake_quant_ops()
    low, high = _attributes(qmin, qmax)

    def grad(upstream):
        return ops.tfqkd_affine_fake_quant_grad(upstream, x, scale, zero_point, qmin=low, qmax=high), None, None, None, None

    return ops.tfqkd_affine_fake_quant(x, scale, zero_point, qmin=low, qmax=high), grad


@tf.custom_gradient
def _fused_pof2_straight_through(x, up, down, qmin, qmax, half_up):
    """:func:`_pof2_straight_through` on the fused kernels (the same bits)."""
    ops = kernels.fake_quant_ops()
    low, high, half = _attributes(qmin, qmax, half_up)

    def grad(upstream):
        grad_x = ops.tfqkd_pof2_fake_quant_grad(upstream, x, up, down, qmin=low, qmax=high, half_up=half)
        return grad_x, None, None, None, None, None

    return ops.tfqkd_pof2_fake_quant(x, up, down, qmin=low, qmax=high, half_up=half), grad


def _range(x, training):
    """``(min(x), max(x))``: in one fused pass when training on a large tensor (exact either way)."""
    if _takes_fused_kernels(x, training):
        return kernels.fake_quant_ops().tfqkd_range(x)
    return tf.reduce_min(x), tf.reduce_max(x)


@tf.custom_gradient
def _learned_step_fake_quant(x, log_step, qmin, qmax, grad_scale):
    """Fake quantization on a step ``s = exp(u)``, with the LSQ gradient taken in log space.

    Forward: ``s * round(clip(x / s, qmin, qmax))``. Backward:

    * ``x``: straight-through inside the range, zero outside (LSQ);
    * ``u``: the LSQ step gradient (Esser et al. 2020, eq. 3, scaled by
      ``grad_scale``) divided by ``s``, i.e. the relative change of ``s`` that
      plain LSQ makes under SGD, clipped to ``||dL/dx_hat|| / ||x||``: under
      SGD one update changes the step, relatively, by no more than it changes
      the tensor it quantizes.

    Why: a step trained in linear space has no floor, and at 8 bits it is so
    small (about 1e-3) that one Adam update (about the learning rate) or one
    large SGD gradient drives it negative, after which every code clips and
    the run is dead. ``s = exp(u)`` is positive by construction; Adam then
    moves ``s`` by about ``lr`` relatively per step, and the clip bounds what
    SGD can do with any learning rate. (The owning layer also keeps ``s``
    within a factor ``STEP_BAND`` of its initial step: ``log_step_bounds``.)

    ``log_step`` has the variable's shape (1,): slicing it would add a slice
    and its gradient to every step. Defined once at module level: building a
    ``tf.custom_gradient`` inside code that AutoGraph converts fails (it
    converts the decorator's own ``__init__``).
    """
    step = tf.exp(tf.clip_by_value(log_step, -30.0, 30.0))
    if _is_large(x):
        output = _fused_step_fake_quant(x, step, qmin, qmax)

        def gradient_terms(upstream):
            return (_fused_input_gradient(upstream, x, step, qmin, qmax),
                    _fused_step_gradient_terms(upstream, x, step, qmin, qmax))  # fmt: skip
    else:
        # Small tensors: the backward reuses the forward's intermediates.
        scaled = x / step
        clipped = tf.clip_by_value(scaled, qmin, qmax)
        codes = tf.round(clipped)
        inside = clipped == scaled
        output = codes * step

        def gradient_terms(upstream):
            return upstream * tf.cast(inside, upstream.dtype), upstream * tf.where(inside, codes - scaled, clipped)

    def grad(upstream):
        grad_x, step_terms = gradient_terms(upstream)
        relative = tf.reduce_sum(step_terms) * grad_scale / step
        # ||dL/dx_hat|| / ||x||; l2_loss is one pass (tf.norm two), and its factor 1/2 cancels.
        bound = tf.sqrt(tf.nn.l2_loss(upstream) / (tf.nn.l2_loss(x) + 1e-30))
        return grad_x, tf.clip_by_value(relative, -bound, bound), None, None, None

    return output, grad


@tf.custom_gradient
def _fused_learned_step_fake_quant(x, log_step, qmin, qmax, grad_scale):
    """:func:`_learned_step_fake_quant` on the fused CPU kernels of :mod:`tfqkd.quant.kernels`.

    The same forward bits and input gradient; the step gradient's sums are taken in the pass
    that computes the input gradient (in blocks, accumulated in double) instead of three
    reductions, and its scaling and bound in the same op instead of eight scalar ones.
    """
    ops = kernels.fake_quant_ops()
    low, high, scale = _attributes(qmin, qmax, grad_scale)
    step = tf.exp(tf.clip_by_value(log_step, -30.0, 30.0))
    output = ops.tfqkd_learned_step_fake_quant(x, step, qmin=low, qmax=high)

    def grad(upstream):
        grad_x, grad_log_step = ops.tfqkd_learned_step_fake_quant_grad(upstream, step, x, qmin=low, qmax=high,
                                                                       grad_scale=scale)  # fmt: skip
        return grad_x, grad_log_step, None, None, None

    return output, grad


@keras.saving.register_keras_serializable(package="tfqkd", name="LearnedStepQuantizer")
class LearnedStepQuantizer(TfqkdQuantizer, qkeras.quantized_bits):
    """QKD trainable interval as an LSQ learned step (Kim et al. 2019; Esser et al. 2020).

    ``v_hat = s * round(clip(v / s, qmin, qmax))``. The step is stored as its
    logarithm, the trainable layer weight ``<role>_log_step``, so it stays
    positive under any optimizer and learning rate; see
    :func:`_learned_step_fake_quant` for the gradient. It is initialised by
    :meth:`initialize` from the min-max of the weights or of one batch of
    activations (QKD Algorithm 1, line 2) or, with ``init="lsq"``, as
    ``2 * mean|v| / sqrt(Q_P)``.

    Args:
      bits: bit width, 1-16.
      signed: signed codes (weights, inputs that can be negative) or unsigned
        (post-ReLU activations).
      narrow_range: drop the most negative code (``[-7, 7]`` at 4 bits) so the
        codes are the symmetric int8 weights TFLite expects.
      initial_step: step used until :meth:`initialize` is called.
      power_of_two: use the power of two nearest the learned step (the learned
        value still moves freely, the rounding is straight-through): the grid
        stock QKeras activations (``quantized_bits``/``quantized_relu``) and
        shift-only hardware can express exactly.

    Its config carries ``parametrization: "log"``; configs of tfqkd 0.1, which
    stored the step itself, have no such key, and :func:`tfqkd.load_model`
    converts their state (:meth:`upgrade_legacy`).
    """

    scheme = "lsq"
    STATE_NAMES = ("log_step",)
    #: How the state is stored; configs without it come from tfqkd 0.1 (linear step).
    PARAMETRIZATION = "log"

    def __init__(self, bits=8, signed=True, narrow_range=False, initial_step=None, power_of_two=False):
        self._init_common(bits, signed, narrow_range)
        self.power_of_two = bool(power_of_two)
        if self.power_of_two:
            self.scheme = "lsq_pof2"  # the policy scheme that makes it
        if initial_step is None:
            initial_step = _DEFAULT_ACTIVATION_RANGE / self.qmax
        if not float(initial_step) > 0:
            raise TfqkdError(f"initial_step must be > 0, got {initial_step!r}")
        self.initial_step = float(initial_step)
        # Objects made in code are current; only a config without the key is
        # legacy: its state is the step itself, as tfqkd 0.1 trained it.
        self.legacy_linear = False
        # Set by a layer with ``midway_thresholds``: maps the log step to the one in use (see
        # odd_ratio), or returns None while the layer's graph does not show the grids it relates
        # to. Not serialized: the layer sets it again.
        self.snap = None

    @classmethod
    def _from_settings(cls, config):
        parametrization = config.pop("parametrization", "linear")
        if parametrization not in ("linear", cls.PARAMETRIZATION):
            raise TfqkdError(f"unknown learned-step parametrization {parametrization!r}")
        legacy = parametrization == "linear"
        quantizer = cls(**config)
        quantizer.legacy_linear = legacy
        return quantizer

    def variable_specs(self):
        return {"log_step": (math.log(self.initial_step), True)}

    def log_step_bounds(self):
        """``log`` of the smallest and largest step training may reach: a factor ``STEP_BAND`` either side of the initial one.

        Far below its min-max initialisation a step clips all but the
        smallest values, far above it rounds them to zero; from there no
        gradient brings it back in useful time (Adam moves ``log s`` by
        about the learning rate per update).
        """
        centre, width = math.log(self.initial_step), math.log(STEP_BAND)
        return centre - width, centre + width

    def variable_constraint(self, name):
        def keep_in_band(log_step):
            low, high = self.log_step_bounds()  # read at each update: initialize() moves the centre
            return tf.clip_by_value(log_step, low, high)

        return keep_in_band

    @property
    def log_step(self):
        """The trainable ``log(step)`` (a tf.Variable of shape (1,))."""
        return self.variable("log_step")

    @property
    def step(self):
        """The step in use: ``exp(log_step)``, or its nearest power of two (a tensor of shape (1,))."""
        if self.legacy_linear:
            return tf.maximum(self.log_step, 1e-8)  # the state is the step itself
        return tf.exp(self.effective_log_step())

    def effective_log_step(self):
        """``log`` of :attr:`step` as the quantizer computes it (power of two, snapped), not via ``log(step)``."""
        return self._effective_log_step(tf.clip_by_value(self.log_step, -30.0, 30.0))

    def _effective_log_step(self, log_step):
        if self.power_of_two:
            # log of the nearest power of two; straight-through, so log_step keeps learning.
            rounded = _LN2 * tf.round(log_step / _LN2)
            return log_step + tf.stop_gradient(rounded - log_step)
        snapped = self.snap(log_step) if self.snap is not None else None
        if snapped is None:
            return log_step
        # Straight-through as well: log_step learns, the layer computes with the snapped step.
        return log_step + tf.stop_gradient(snapped - log_step)

    def _state_values(self):
        state = super()._state_values()
        if state and self.snap is not None and not self.legacy_linear:
            # A copy rebuilt from the config outside the layer has no grids to snap to: it reads the step in
            # use. (The state is only non-empty when eager, so this reads a value too.)
            state["log_step"] = float(self.effective_log_step().numpy()[0])
        return state

    def assign_step(self, step):
        """Sets the step (a positive float)."""
        if not step > 0:
            raise TfqkdError(f"a learned step must be > 0, got {step!r}")
        self.log_step.assign([math.log(float(step))])

    def scale(self):
        return self.step

    def grid(self, values=None):
        return Grid(float(self.step.numpy()[0]), 0, self.qmin, self.qmax)

    def max(self):
        return float(self.qmax * self.initial_step)

    def min(self):
        return float(self.qmin * self.initial_step)

    def __call__(self, x, training=None):
        x = tf.convert_to_tensor(x)
        if self.legacy_linear:
            # A tfqkd 0.1 file opened by Keras' own loader computes what it computed
            # then; tfqkd.load_model converts it (upgrade_legacy).
            step = tf.cast(self.step[0], x.dtype)
            return round_ste(tf.clip_by_value(x / step, float(self.qmin), float(self.qmax))) * step
        grad_scale = 1.0 / math.sqrt(getattr(self, "_numel", 1) * self.qmax)
        constants = [tf.constant(v, x.dtype) for v in (self.qmin, self.qmax, grad_scale)]
        log_step = self._effective_log_step(tf.cast(tf.convert_to_tensor(self.log_step), x.dtype))
        fake_quant = _fused_learned_step_fake_quant if _takes_fused_kernels(x, training) else _learned_step_fake_quant
        return fake_quant(x, log_step, *constants)

    def initialize(self, values, method="minmax"):
        """Sets the step from sample values.

        Args:
          values: array of the tensor's values (weights, or one batch of activations).
          method: "minmax" (QKD: the interval spans the observed range) or "lsq"
            (``2 * mean|v| / sqrt(Q_P)``).
        """
        values = np.asarray(values, dtype=np.float64)
        if method == "minmax":
            if self.signed:
                extent = max(abs(values.max()), abs(values.min()))
                step = extent / self.qmax
            else:
                step = max(values.max(), 0.0) / self.qmax
        elif method == "lsq":
            step = 2.0 * np.abs(values).mean() / math.sqrt(self.qmax)
        else:
            raise TfqkdError(f"unknown step initialisation '{method}' (use 'minmax' or 'lsq')")
        if step > 0:
            self.initial_step = float(step)  # the centre of the step's band (log_step_bounds)
        self.assign_step(self.initial_step)

    def upgrade_legacy(self, where):
        """Converts state loaded from a tfqkd 0.1 file (the step itself) to ``log(step)``.

        Args:
          where: what to name in the error message ("layer 'x' of model.h5").

        Raises:
          TfqkdError: the stored step is not positive (that run had died in training).
        """
        if not self.legacy_linear:
            return
        step = float(self.log_step.numpy()[0])
        if not step > 0:
            raise TfqkdError(
                f"{where} has a learned step of {step:g}: the run that saved it died in training "
                "(tfqkd 0.1 let steps go negative); train it again"
            )
        self.legacy_linear = False
        self.assign_step(step)

    def get_config(self):
        config = {**super().get_config(), "initial_step": self.initial_step, "parametrization": self.PARAMETRIZATION}
        if self.power_of_two:
            config["power_of_two"] = True
        return config


@keras.saving.register_keras_serializable(package="tfqkd", name="AffineQuantizer")
class AffineQuantizer(TfqkdQuantizer, qkeras.quantized_bits):
    """The thesis's uniform affine quantizer (section 5.1.9).

    ``x_q = clip(round(x/s + z), a_q, b_q)``, ``s = (beta - alpha)/(b_q - a_q)``,
    ``z = round((beta*a_q - alpha*b_q)/(beta - alpha))``; symmetric mode uses
    ``z = 0`` and ``r = max(|alpha|, |beta|)``. Activations track ``alpha`` and
    ``beta`` as running averages of each batch's min and max during training
    (``running=True``); weights use the tensor's current min and max. The
    range always contains zero, so zero is exactly representable.

    Args:
      bits: bit width, 1-16. Signed codes are ``[-2**(b-1), 2**(b-1)-1]``
        (``[-128, 127]``, ``[-8, 7]``), unsigned ``[0, 2**b - 1]``.
      signed: signed (weights) or unsigned (activations) codes.
      symmetric: zero point fixed at 0.
      running: keep a running average of min/max (activations).
      narrow_range: drop the most negative signed code.
    """

    scheme = "affine"
    STATE_NAMES = ("min", "max")

    def __init__(self, bits=8, signed=True, symmetric=False, running=False, narrow_range=False):
        self._init_common(bits, signed, narrow_range)
        self.symmetric = bool(symmetric)
        self.running = bool(running)

    def variable_specs(self):
        if not self.running:
            return {}
        return {"min": (0.0, False), "max": (_DEFAULT_ACTIVATION_RANGE, False)}

    def _range(self, x, training):
        if not self.running:
            return tf.reduce_min(x), tf.reduce_max(x)
        lo, hi = self.variable("min"), self.variable("max")
        if training:
            batch_lo, batch_hi = _range(x, training)
            lo.assign(lo + _EMA_MOMENTUM * (tf.cast(batch_lo, lo.dtype) - lo))
            hi.assign(hi + _EMA_MOMENTUM * (tf.cast(batch_hi, hi.dtype) - hi))
        return tf.cast(lo[0], x.dtype), tf.cast(hi[0], x.dtype)

    def scale_and_zero_point(self, lo, hi):
        """Scale and zero point for the range [lo, hi] (tensors)."""
        lo, hi = tf.minimum(lo, 0.0), tf.maximum(hi, 0.0)
        qmin, qmax = float(self.qmin), float(self.qmax)
        if self.symmetric:
            r = tf.maximum(-lo, hi)
            scale = tf.maximum(2.0 * r / (qmax - qmin) if self.signed else r / qmax, 1e-12)
            return scale, tf.zeros_like(scale)
        scale = tf.maximum((hi - lo) / (qmax - qmin), 1e-12)
        zero_point = tf.clip_by_value(tf.round(qmin - lo / scale), qmin, qmax)
        return scale, zero_point

    def grid(self, values=None):
        if self.running:
            lo, hi = self.variable("min")[0], self.variable("max")[0]
        elif values is not None:
            lo, hi = tf.reduce_min(values), tf.reduce_max(values)
        else:
            raise TfqkdError(
                "an affine quantizer without running min/max has a data-dependent scale per batch, "
                "which one integer tensor cannot represent"
            )
        scale, zero = self.scale_and_zero_point(tf.cast(lo, tf.float32), tf.cast(hi, tf.float32))
        return Grid(float(scale.numpy()), int(zero.numpy()), self.qmin, self.qmax)

    def __call__(self, x, training=None):
        x = tf.convert_to_tensor(x)
        lo, hi = self._range(x, training)
        scale, zero_point = self.scale_and_zero_point(lo, hi)
        scale, zero_point = tf.stop_gradient(scale), tf.stop_gradient(zero_point)
        qmin, qmax = (tf.constant(float(v), x.dtype) for v in (self.qmin, self.qmax))
        straight_through = _fused_affine_straight_through if _takes_fused_kernels(x, training) else _affine_straight_through
        return straight_through(x, tf.cast(scale, x.dtype), tf.cast(zero_point, x.dtype), qmin, qmax)

    def initialize(self, values, method="minmax"):
        """Seeds the running min/max from sample values (no-op for weights)."""
        if self.running:
            values = np.asarray(values)
            self.variable("min").assign([float(values.min())])
            self.variable("max").assign([float(values.max())])

    def get_config(self):
        return {**super().get_config(), "symmetric": self.symmetric, "running": self.running}


@keras.saving.register_keras_serializable(package="tfqkd", name="Pof2Quantizer")
class Pof2Quantizer(TfqkdQuantizer, qkeras.quantized_bits):
    """The Xilinx DPU's power-of-two quantizer (Vitis-AI ``pof2s``).

    ``q = clip(round(x * 2**pos), -128, 127)``, ``x_hat = q * 2**-pos``. Weights
    and biases round half to even (``rounding="even"``), activations and
    inputs half up (``rounding="half_up"``, ``floor(x + 0.5)``). The position
    of a weight tensor follows its current maximum magnitude; an activation's
    position follows a running average of its batch maxima and is stored as
    the layer weight ``<role>_pos`` that the DPU exporter writes out.

    Args:
      bits: bit width (the DPU uses 8).
      rounding: "even" or "half_up".
      running: keep a running maximum for the position (activations).
    """

    scheme = "pof2"
    STATE_NAMES = ("absmax",)

    def __init__(self, bits=8, signed=True, narrow_range=False, rounding="even", running=False):
        if rounding not in ("even", "half_up"):
            raise TfqkdError(f"rounding must be 'even' or 'half_up', got {rounding!r}")
        self._init_common(bits, True, narrow_range)
        self.rounding = rounding
        self.running = bool(running)

    def variable_specs(self):
        if not self.running:
            return {}
        return {"absmax": (_DEFAULT_ACTIVATION_RANGE, False)}

    def position_for(self, absmax):
        """Largest ``pos`` with ``absmax * 2**pos <= qmax`` (tensor)."""
        absmax = tf.maximum(tf.cast(absmax, tf.float32), 1e-12)
        return tf.floor(tf.math.log(self.qmax / absmax) / math.log(2.0))

    def _absmax(self, x, training):
        if not self.running:
            return tf.reduce_max(tf.abs(x))
        absmax = self.variable("absmax")
        if training:
            low, high = _range(x, training)
            batch = tf.cast(tf.maximum(-low, high), absmax.dtype)  # max |x|, without a pass for |x|
            absmax.assign(absmax + _EMA_MOMENTUM * (batch - absmax))
        return absmax[0]

    def grid(self, values=None):
        if self.running:
            absmax = self.variable("absmax")[0]
        elif values is not None:
            absmax = tf.reduce_max(tf.abs(values))
        else:
            raise TfqkdError(
                "a power-of-two quantizer without a running maximum has a data-dependent scale per batch, "
                "which one integer tensor cannot represent"
            )
        pos = float(self.position_for(absmax).numpy())
        return Grid(2.0**-pos, 0, self.qmin, self.qmax, "half_even" if self.rounding == "even" else "half_up")

    def __call__(self, x, training=None):
        x = tf.convert_to_tensor(x)
        pos = tf.stop_gradient(tf.cast(self.position_for(self._absmax(x, training)), x.dtype))
        return power_of_two_fake_quant(x, pos, self.qmin, self.qmax, half_up=self.rounding == "half_up", training=training)

    def initialize(self, values, method="minmax"):
        """Seeds the running maximum from sample values (no-op for weights)."""
        if self.running:
            self.variable("absmax").assign([float(np.abs(np.asarray(values)).max())])

    def get_config(self):
        return {**super().get_config(), "rounding": self.rounding, "running": self.running}


_REGISTRY = {
    keras.saving.get_registered_name(cls): cls for cls in (LearnedStepQuantizer, AffineQuantizer, Pof2Quantizer)
}


def register_quantizer(cls):
    """Registers a tfqkd quantizer class for deserialization and QKeras' tools.

    QKeras' print_qstats and QTools identify quantizers by class name. tfqkd
    quantizers compute what ``quantized_bits`` computes with a (learned or
    calibrated) scale, so they present that name to those tools. Serialized
    configs keep the registered name (``"tfqkd>LearnedStepQuantizer"``), which
    :func:`get_quantizer` resolves; the tfqkd layers call it before QKeras does.

    Args:
      cls: a TfqkdQuantizer subclass decorated with ``register_keras_serializable``.

    Returns:
      ``cls`` (usable as a decorator below ``register_keras_serializable``).
    """
    _REGISTRY[keras.saving.get_registered_name(cls)] = cls
    cls.__name__ = "quantized_bits"
    return cls


for _cls in list(_REGISTRY.values()):
    register_quantizer(_cls)


def registered_quantizers():
    """``{registered name: class}`` of every tfqkd quantizer: the one registry for loading and tools."""
    return dict(_REGISTRY)


def quantizer_state_suffixes():
    """Weight-name suffixes of quantizer state (``_log_step``, ``_min``, ``_pos``, ...), from the registry.

    Used to keep quantizer state out of weight decay and out of parameter counts.
    """
    names = {name for cls in _REGISTRY.values() for name in cls.STATE_NAMES}
    return tuple(sorted(f"_{name}" for name in names))


def get_quantizer(identifier):
    """Deserializes a quantizer: tfqkd's by registered name, anything else via QKeras.

    Args:
      identifier: a quantizer object, a serialized dict, a QKeras string such
        as ``"quantized_bits(4,0,1)"``, or None.

    Returns:
      the quantizer object (or None).
    """
    if isinstance(identifier, dict):
        cls = _REGISTRY.get(identifier.get("registered_name")) or _REGISTRY.get(identifier.get("class_name"))
        if cls is not None:
            return cls.from_config(dict(identifier.get("config") or {}))
    return qkeras.quantizers.get_quantizer(identifier)
