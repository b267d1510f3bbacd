"""Sensitivity-based mixed-precision search (seed 004: Terlizzi 2023, mixed-precision QKeras
quantization of MLPerf Tiny models; AutoQKeras as the peer).

1. **Sensitivity**: starting from a trained float model, every quantizable layer in turn goes to
   a lower bit width (weights and input activations, e.g. 4 or 2 bits) while all others stay at
   8 bits; the accuracy drop on held-out data (percentage points, against uniform 8 bits) is the
   layer's sensitivity at that width. ``mode="ptq"`` measures it right after post-training
   quantization (fast), ``mode="qat"`` after a short quantization-aware training.
2. **Allocation**: assuming drops add up, choose one bit width per layer minimising the cost
   (``"size"``: weight bits; ``"bitops"``: MACs x weight bits x activation bits; ``"latency"``:
   cycles of the precision-scalable MAC model, :mod:`tfqkd.analysis.psmac`) subject to the sum
   of drops <= the accuracy budget; ``method="knapsack"`` solves the multiple-choice knapsack
   exactly on a 0.01-point grid, ``"greedy"`` lowers the layer with the best cost saving per
   point of accuracy until the budget is spent.
3. **Verification**: the chosen policy is trained like uniform 8 bits (short QAT) and its
   accuracy checked on the held-out data; if it exceeds the budget, the budget is tightened by
   the overshoot and the allocation repeated.

The result is a :class:`tfqkd.QuantPolicy` (YAML accepted by ``quant:`` in the qkd recipe).
:func:`run_autoqkeras` runs QKeras' AutoQKeras on the same model and data for comparison.
"""

import dataclasses
import json
import math
import re
import sys
import time

import numpy as np

from tfqkd.compat import keras
from tfqkd.errors import TfqkdError

__all__ = [
    "OBJECTIVES",
    "MixedPrecisionResult",
    "allocate",
    "bits_cost",
    "evaluate_accuracy",
    "layer_costs",
    "policy_from_bits",
    "quantization_aware_training",
    "run_autoqkeras",
    "search",
    "sensitivity",
]

OBJECTIVES = ("size", "bitops", "latency")
_GRID = 0.01  # accuracy points per knapsack unit


def layer_costs(model):
    """Kernel parameters, bias parameters and MACs of each quantizable layer.

    Args:
      model: float (or quantized) Keras model with a fixed input shape.

    Returns:
      dict layer name -> {"type", "params", "bias", "macs"}, in layer order.
    """
    from tfqkd.analysis.psmac import layer_macs
    from tfqkd.quant.policy import QUANTIZABLE_TYPES

    macs = layer_macs(model)
    costs = {}
    for layer in model.layers:
        base = next((b.__name__ for b in type(layer).__mro__ if b.__name__ in QUANTIZABLE_TYPES), None)
        if base is None:
            continue
        kernel = layer.depthwise_kernel if base == "DepthwiseConv2D" else layer.kernel
        bias = getattr(layer, "bias", None)
        costs[layer.name] = {
            "type": base,
            "params": int(np.prod(kernel.shape)),
            "bias": 0 if bias is None else int(np.prod(bias.shape)),
            "macs": int(macs.get(layer.name, 0)),
        }
    if not costs:
        raise TfqkdError(f"model '{model.name}' has no quantizable (Conv2D/DepthwiseConv2D/Dense) layer")
    return costs


def bits_cost(costs, bits, objective="size", psmac=None, bias_bits=32):
    """Cost of a bit assignment.

    Args:
      costs: from :func:`layer_costs`.
      bits: dict layer -> bits (weights and activations), or dict layer -> (w, a).
      objective: "size" (bits of kernels plus biases at ``bias_bits``), "bitops"
        (sum MACs x w x a) or "latency" (PSMAC cycles).
      psmac: :class:`tfqkd.analysis.psmac.PSMACModel` for "latency" (default 16 units).
      bias_bits: bits of each bias value for "size".

    Returns:
      the cost (bits, bit-operations or cycles).
    """
    from tfqkd.analysis.psmac import PSMACModel

    if objective not in OBJECTIVES:
        raise TfqkdError(f"unknown objective {objective!r}; expected one of {', '.join(OBJECTIVES)}")
    psmac = psmac or PSMACModel()
    total = 0
    for name, cost in costs.items():
        value = bits[name]
        wb, ab = value if isinstance(value, tuple) else (value, value)
        if objective == "size":
            total += cost["params"] * wb + cost["bias"] * bias_bits
        elif objective == "bitops":
            total += cost["macs"] * wb * ab
        else:
            total += psmac.layer_cycles(cost["macs"], wb, ab)
    return total


def policy_from_bits(bits, name="mixed", scheme="lsq", default_bits=8):
    """A QuantPolicy with one exact-name rule per layer.

    Args:
      bits: dict layer name -> bits (weights and input activations) or (weight, activation).
      name: policy name.
      scheme: quantizer scheme of every layer ("lsq", "affine").
      default_bits: bits of layers not listed.

    Returns:
      :class:`tfqkd.QuantPolicy`; ``policy.to_yaml(path)`` writes a file the qkd recipe takes.
    """
    from tfqkd.quant.policy import QuantPolicy

    rules = []
    for layer, value in bits.items():
        wb, ab = value if isinstance(value, tuple) else (value, value)
        # A plain name is a glob; escape glob metacharacters by using an anchored regex.
        match = layer if not re.search(r"[*?\[\]]", layer) else "re:" + re.escape(layer)
        rules.append({"match": match, "weight_bits": int(wb), "activation_bits": int(ab)})
    data = {
        "name": name,
        "default": {"weight_bits": default_bits, "activation_bits": default_bits, "scheme": scheme},
        "rules": rules,
    }
    return QuantPolicy.from_dict(data)


def evaluate_accuracy(model, x, y, batch_size=256):
    """Top-1 accuracy in percent of a logits (or probabilities) model."""
    logits = model.predict(x, batch_size=batch_size, verbose=0)
    return 100.0 * float(np.mean(np.argmax(logits, axis=-1) == np.asarray(y).reshape(-1)))


def quantization_aware_training(qmodel, x, y, epochs=1, learning_rate=0.01, batch_size=64, seed=0):
    """Short QAT (self-studying, thesis Algorithm 2) with the thesis SGD; trains ``qmodel`` in place.

    Args:
      qmodel: quantized model (from :func:`tfqkd.quantize`).
      x, y: training arrays.
      epochs: epochs (0 leaves the model as is).
      learning_rate: SGD learning rate (Nesterov momentum 0.9, weight decay 5e-4 except on
        quantizer steps).
      batch_size: batch size.
      seed: shuffling seed.

    Returns:
      ``qmodel``.
    """
    from tfqkd.training import make_sgd

    if epochs <= 0:
        return qmodel
    keras.utils.set_random_seed(seed)
    qmodel.compile(
        optimizer=make_sgd(learning_rate, exclude=("_step", "_min", "_max", "_pos", "absmax")),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    qmodel.fit(x, y, epochs=epochs, batch_size=batch_size, shuffle=True, verbose=0)
    return qmodel


def _uniform(costs, bits):
    return {name: bits for name in costs}


def sensitivity(
    float_model, x_val, y_val, calibration, candidate_bits=(4, 2), base_bits=8, mode="ptq",
    train=None, qat_epochs=1, learning_rate=0.01,
):  # fmt: skip
    """Per-layer accuracy drop when one layer goes to lower bits, the others staying at 8.

    Args:
      float_model: trained float model.
      x_val, y_val: held-out data the drops are measured on.
      calibration: one batch of inputs for the quantization ranges.
      candidate_bits: lower bit widths to try per layer.
      base_bits: bits of all other layers (and of the reference).
      mode: "ptq" (evaluate right after quantization) or "qat" (after ``qat_epochs`` of QAT
        on ``train``).
      train: ``(x, y)`` for "qat".
      qat_epochs, learning_rate: QAT schedule for "qat".

    Returns:
      dict with ``base_accuracy`` (uniform ``base_bits``), ``accuracy`` {layer: {bits: acc}}
      and ``drops`` {layer: {bits: points}} (negative drops kept as measured).
    """
    from tfqkd.quant import quantize

    if mode not in ("ptq", "qat"):
        raise TfqkdError(f"sensitivity mode must be 'ptq' or 'qat', got {mode!r}")
    if mode == "qat" and train is None:
        raise TfqkdError("sensitivity mode 'qat' needs train=(x, y)")
    costs = layer_costs(float_model)

    def measure(bits):
        qmodel = quantize(float_model, policy_from_bits(bits), calibration)
        if mode == "qat":
            quantization_aware_training(qmodel, *train, epochs=qat_epochs, learning_rate=learning_rate)
        return evaluate_accuracy(qmodel, x_val, y_val)

    base = measure(_uniform(costs, base_bits))
    accuracy, drops = {}, {}
    for name in costs:
        accuracy[name], drops[name] = {}, {}
        for bits in candidate_bits:
            assignment = _uniform(costs, base_bits)
            assignment[name] = bits
            acc = measure(assignment)
            accuracy[name][bits] = acc
            drops[name][bits] = base - acc
    return {"base_bits": base_bits, "base_accuracy": base, "mode": mode, "accuracy": accuracy, "drops": drops}


def _choices(costs, drops, candidate_bits, base_bits, objective, psmac):
    """Per layer: list of (bits, drop >= 0, cost)."""
    options = {}
    for name in costs:
        layer_options = []
        for bits in sorted(set(candidate_bits) | {base_bits}, reverse=True):
            drop = 0.0 if bits == base_bits else drops.get(name, {}).get(bits)
            if drop is None:
                continue
            cost = bits_cost({name: costs[name]}, {name: bits}, objective, psmac)
            layer_options.append((bits, max(float(drop), 0.0), cost))
        options[name] = layer_options
    return options


def allocate(costs, drops, budget, candidate_bits=(8, 4, 2), base_bits=8, objective="size", method="knapsack", psmac=None):
    """Chooses per-layer bits minimising the cost with the summed drop within the budget.

    Args:
      costs: from :func:`layer_costs`.
      drops: {layer: {bits: accuracy drop in points}} (from :func:`sensitivity`); a layer's
        ``base_bits`` option has drop 0, negative drops count as 0.
      budget: allowed total drop in points (>= 0).
      candidate_bits: bit widths allowed.
      base_bits: the reference width (always allowed).
      objective: "size", "bitops" or "latency" (see :func:`bits_cost`).
      method: "knapsack" (exact on a 0.01-point grid) or "greedy".
      psmac: PSMACModel for "latency".

    Returns:
      dict layer -> bits.
    """
    if not budget >= 0:
        raise TfqkdError(f"the accuracy budget must be >= 0 points, got {budget!r}")
    if method not in ("knapsack", "greedy"):
        raise TfqkdError(f"unknown allocation method {method!r}; expected 'knapsack' or 'greedy'")
    options = _choices(costs, drops, candidate_bits, base_bits, objective, psmac)
    names = list(costs)
    if method == "greedy":
        bits = {n: base_bits for n in names}
        index = {n: 0 for n in names}  # position in options (sorted widest first)
        spent = 0.0
        while True:
            best = None
            for n in names:
                current = options[n][index[n]]
                for j in range(index[n] + 1, len(options[n])):
                    cand = options[n][j]
                    extra = max(cand[1] - current[1], 0.0)
                    saving = current[2] - cand[2]
                    if saving <= 0 or spent + extra > budget + 1e-9:
                        continue
                    score = saving / (extra + 1e-6)
                    if best is None or score > best[0]:
                        best = (score, n, j, extra)
            if best is None:
                return bits
            _, n, j, extra = best
            index[n], bits[n], spent = j, options[n][j][0], spent + extra
    # Multiple-choice knapsack: minimise cost with sum of integer drop units <= capacity.
    capacity = int(math.floor(budget / _GRID + 1e-9))
    inf = float("inf")
    table = [0.0] * (capacity + 1)  # table[u]: min cost of the layers so far using at most u units
    choice = []
    for n in names:
        new = [inf] * (capacity + 1)
        pick = [None] * (capacity + 1)
        for u in range(capacity + 1):
            for k, (_, drop, cost) in enumerate(options[n]):
                units = int(math.ceil(drop / _GRID - 1e-9))
                if units <= u and table[u - units] + cost < new[u]:
                    new[u], pick[u] = table[u - units] + cost, (k, units)
        table = new
        choice.append(pick)
    bits, u = {}, capacity
    for n, pick in zip(reversed(names), reversed(choice)):
        k, units = pick[u]
        bits[n] = options[n][k][0]
        u -= units
    return {n: bits[n] for n in names}


@dataclasses.dataclass
class MixedPrecisionResult:
    """Outcome of :func:`search`.

    Attributes:
      bits: chosen bits per layer.
      policy: the :class:`tfqkd.QuantPolicy`.
      model: the trained quantized model of the chosen policy.
      val_accuracy: its held-out accuracy (points).
      reference_val_accuracy: uniform 8-bit model's held-out accuracy after the same QAT.
      estimated_drop: summed sensitivity of the chosen bits.
      cost, reference_cost: objective of the policy and of uniform 8 bits.
      sensitivity: the table from :func:`sensitivity`.
      rounds: allocation rounds (more than one if verification tightened the budget).
      search_seconds: wall time of sensitivity + allocation + verification.
    """

    bits: dict
    policy: object
    model: object
    val_accuracy: float
    reference_val_accuracy: float
    reference_model: object
    estimated_drop: float
    cost: float
    reference_cost: float
    objective: str
    sensitivity: dict
    rounds: list
    search_seconds: float

    def to_dict(self):
        """JSON-ready summary (no models)."""
        return {
            "bits": self.bits,
            "policy": self.policy.to_dict(),
            "val_accuracy": self.val_accuracy,
            "reference_val_accuracy": self.reference_val_accuracy,
            "estimated_drop": self.estimated_drop,
            "objective": self.objective,
            "cost": self.cost,
            "reference_cost": self.reference_cost,
            "cost_ratio": self.cost / self.reference_cost,
            "sensitivity": json.loads(json.dumps(self.sensitivity)),
            "rounds": self.rounds,
            "search_seconds": self.search_seconds,
        }


def search(
    float_model, train, val, calibration, budget=0.5, objective="size", method="knapsack",
    candidate_bits=(8, 4, 2), mode="ptq", qat_epochs=2, learning_rate=0.01, max_rounds=3, psmac=None,
    reference_model=None, sensitivity_epochs=1,
):  # fmt: skip
    """Sensitivity-based mixed-precision search with verification (seed 004).

    Args:
      float_model: trained float model.
      train: ``(x, y)`` for QAT of the verified policies.
      val: ``(x, y)`` held-out data for sensitivity and verification (not the test set).
      calibration: one batch of inputs for the quantization ranges.
      budget: allowed accuracy drop in points against uniform 8 bits.
      objective: "size", "bitops" or "latency".
      method: "knapsack" or "greedy".
      candidate_bits: allowed bit widths (8 is the reference).
      mode: sensitivity after "ptq" or "qat" (``sensitivity_epochs`` of QAT per probe).
      qat_epochs, learning_rate: QAT of reference and candidate policies.
      max_rounds: allocation/verification rounds.
      psmac: PSMACModel for "latency".
      reference_model: an already QAT-trained uniform 8-bit model (else trained here).
      sensitivity_epochs: QAT epochs of each sensitivity probe in mode "qat".

    Returns:
      :class:`MixedPrecisionResult`.
    """
    from tfqkd.quant import quantize

    start = time.time()
    costs = layer_costs(float_model)
    lower = tuple(b for b in candidate_bits if b < 8)
    if not lower:
        raise TfqkdError("candidate_bits needs at least one width below 8")
    table = sensitivity(
        float_model, *val, calibration, candidate_bits=lower, mode=mode, train=train,
        qat_epochs=sensitivity_epochs, learning_rate=learning_rate,
    )  # fmt: skip
    if reference_model is None:
        reference_model = quantize(float_model, policy_from_bits(_uniform(costs, 8), name="uniform8"), calibration)
        quantization_aware_training(reference_model, *train, epochs=qat_epochs, learning_rate=learning_rate)
    reference = evaluate_accuracy(reference_model, *val)
    ref_cost = bits_cost(costs, _uniform(costs, 8), objective, psmac)
    effective, rounds, best = budget, [], None
    for _ in range(max_rounds):
        bits = allocate(costs, table["drops"], effective, candidate_bits, 8, objective, method, psmac)
        estimated = sum(max(table["drops"][n].get(b, 0.0), 0.0) for n, b in bits.items() if b != 8)
        policy = policy_from_bits(bits, name=f"mixed-{objective}")
        qmodel = quantize(float_model, policy, calibration)
        quantization_aware_training(qmodel, *train, epochs=qat_epochs, learning_rate=learning_rate)
        acc = evaluate_accuracy(qmodel, *val)
        cost = bits_cost(costs, bits, objective, psmac)
        rounds.append({"budget": effective, "bits": bits, "estimated_drop": estimated, "val_accuracy": acc, "cost": cost})
        if best is None or (reference - acc <= budget and (reference - best[3] > budget or cost < best[4])):
            best = (bits, policy, qmodel, acc, cost, estimated)
        overshoot = (reference - acc) - budget
        if overshoot <= 0 or all(b == 8 for b in bits.values()):
            break
        effective = max(effective - overshoot - _GRID, 0.0)
    bits, policy, qmodel, acc, cost, estimated = best
    return MixedPrecisionResult(
        bits=bits, policy=policy, model=qmodel, val_accuracy=acc, reference_val_accuracy=reference,
        reference_model=reference_model, estimated_drop=estimated, cost=cost, reference_cost=ref_cost,
        objective=objective, sensitivity=table, rounds=rounds, search_seconds=time.time() - start,
    )  # fmt: skip


# AutoQKeras ---------------------------------------------------------------------------------


def _import_autoqkeras():
    """Imports AutoQKeras under tfqkd's Keras 2 setup; returns (AutoQKeras, notes).

    Two incompatibilities are worked around (both recorded in ``notes``):

    * keras-tuner >= 1.4 imports ``keras`` and, finding Keras 3 installed, rejects tf_keras
      models ("Expected ... a valid Keras Model instance"). It is imported with ``keras``
      temporarily aliased to ``tf_keras`` so it takes its ``tf.keras`` (Keras 2) path.
    * QKeras' ``model_quantize`` rebuilds models from JSON whose layers still carry
      ``"module": "keras.layers"``; tf_keras then looks ``QDense`` up in ``keras.layers`` and
      fails ("Could not locate class 'QDense'"). The module keys of Q-layers are dropped.
    """
    import tf_keras

    notes = []
    if "keras_tuner" in sys.modules:
        from keras_tuner.src.backend import config

        if config.multi_backend():
            raise TfqkdError(
                "keras_tuner was already imported with Keras 3; AutoQKeras needs it imported through "
                "tfqkd.analysis.mixed_precision first"
            )
    else:
        saved = sys.modules.get("keras")
        sys.modules["keras"] = tf_keras
        try:
            import keras_tuner  # noqa: F401
        finally:
            if saved is not None:
                sys.modules["keras"] = saved
            else:
                sys.modules.pop("keras", None)
        notes.append("keras_tuner imported with `keras` aliased to tf_keras (else it rejects Keras 2 models)")
    import qkeras.utils as qutils
    from qkeras.autoqkeras import AutoQKeras

    if not getattr(qutils.quantized_model_from_json, "_tfqkd_patched", False):
        original = qutils.quantized_model_from_json

        def patched(json_string, custom_objects=None):
            config = json.loads(json_string)
            for layer in config.get("config", {}).get("layers", []):
                if str(layer.get("class_name", "")).startswith("Q"):
                    layer.pop("module", None)
                    layer.pop("registered_name", None)
            return original(json.dumps(config), custom_objects)

        patched._tfqkd_patched = True
        qutils.quantized_model_from_json = patched
    notes.append("qkeras.utils.quantized_model_from_json patched to drop 'module' keys of Q-layers")
    return AutoQKeras, notes


def _quantizer_bits(quantizer):
    bits = getattr(quantizer, "bits", None)
    if bits is None and isinstance(quantizer, str):
        found = re.search(r"\((\d+)", quantizer)
        bits = int(found.group(1)) if found else None
    return None if bits is None else int(bits)


def run_autoqkeras(
    float_model, train, val, output_dir, max_trials=8, epochs=2, bit_choices=(8, 4, 2), batch_size=64,
    learning_rate=0.01, seed=0, goal_delta=8.0,
):  # fmt: skip
    """Runs AutoQKeras (QKeras' tuner) on the same model and data, for comparison.

    Args:
      float_model: trained float model (its weights are transferred to every trial).
      train, val: ``(x, y)`` training and held-out arrays (trials are scored on ``val``).
      output_dir: keras-tuner directory.
      max_trials: trials of the random search.
      epochs: training epochs per trial (use the QAT epochs of :func:`search`).
      bit_choices: kernel bit widths offered per layer.
      batch_size, learning_rate, seed: training settings.
      goal_delta: AutoQKeras "bits" goal: accuracy forgiven per halving of the bits (percent).

    Returns:
      dict: ``ok`` True with ``model``, per-layer ``bits`` (kernel), ``search_seconds`` and
      ``notes``; or ``ok`` False with ``error`` (the exact message), ``traceback`` and
      ``tried`` (the workarounds applied).
    """
    import traceback

    tried = []
    start = time.time()
    try:
        AutoQKeras, notes = _import_autoqkeras()
        tried.extend(notes)
        model = keras.models.clone_model(float_model)
        model.set_weights(float_model.get_weights())
        # AutoQKeras reuses the compiled optimizer object for every trial's new model; Keras 2's
        # optimizers refuse variables they were not built with ("The optimizer cannot recognize
        # variable kernel:0"), the legacy SGD (same Nesterov momentum) does not.
        model.compile(
            optimizer=keras.optimizers.legacy.SGD(learning_rate, momentum=0.9, nesterov=True),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["acc"],
        )
        tried.append("compiled with keras.optimizers.legacy.SGD (the new optimizer is reused across trials and fails)")
        quantization_config = {
            "kernel": {f"quantized_bits({b},0,1)": b for b in bit_choices},
            "bias": {"quantized_bits(8,0,1)": 8},
            "activation": {f"quantized_relu({b})": b for b in bit_choices},
            "linear": {f"quantized_bits({b},0,1)": b for b in bit_choices},
        }
        # Without a limit entry AutoQKeras leaves a layer class out of the search (empty space).
        top = max(bit_choices)
        limit = {cls: [top, top, top] for cls in ("Dense", "Conv2D", "DepthwiseConv2D")}
        limit["Activation"] = [top]
        goal = {
            "type": "bits",
            "params": {
                "delta_p": goal_delta, "delta_n": goal_delta, "rate": 2.0, "stress": 1.0,
                "input_bits": 8, "output_bits": 8, "ref_bits": 8,
                "config": {"default": ["parameters", "activations"]},
            },
        }  # fmt: skip
        auto = AutoQKeras(
            model, metrics=["acc"], custom_objects={}, output_dir=str(output_dir), goal=goal,
            quantization_config=quantization_config, limit=limit, mode="random", seed=seed, max_trials=max_trials,
            transfer_weights=True, learning_rate_optimizer=False, tune_filters="none",
            tune_filters_exceptions="", distribution_strategy=None, overwrite=True,
        )  # fmt: skip
        auto.fit(*train, validation_data=val, batch_size=batch_size, epochs=epochs, verbose=0)
        best = auto.get_best_model()
        bits = {}
        for layer in best.layers:
            quantizer = getattr(layer, "kernel_quantizer_internal", None) or getattr(
                layer, "depthwise_quantizer_internal", None
            )
            if quantizer is not None:
                bits[layer.name] = _quantizer_bits(quantizer)
        return {"ok": True, "model": best, "bits": bits, "search_seconds": time.time() - start, "notes": tried}
    except Exception as err:  # noqa: BLE001 - the comparison records any failure verbatim
        return {
            "ok": False,
            "error": f"{type(err).__name__}: {err}".splitlines()[0][:500],
            "traceback": traceback.format_exc()[-3000:],
            "tried": tried,
            "search_seconds": time.time() - start,
        }
