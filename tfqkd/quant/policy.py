"""Per-layer bit policies: which quantizer and how many bits each layer gets.

A policy is data. It maps layers, by name (glob, or regex with a ``re:``
prefix) and by Keras layer type, to a :class:`QuantSpec` (weight, bias and
input-activation bits and the quantizer scheme), with a default. It loads from
a dict or YAML and prints as a table::

    default: {weight_bits: 4, activation_bits: 4, scheme: lsq}
    first_last_bits: 8          # optional: first and last layer at 8 bits
    integer_intermediates: true # optional: train for an exact int8 TFLite export
    target: dpu                 # optional: a hardware target (then no rules), see below
    rules:
      - {match: "head_*", weight_bits: 8, activation_bits: 8}
      - {layer_type: DepthwiseConv2D, weight_bits: 8}

Rules are tried in order and the first that matches a layer wins; a rule
that matches no layer of the model triggers a warning. Presets: ``fp32``,
``w8a8``, ``w4a4``, ``w4a8`` (QKD learned-step quantizers, Kim et al. 2019),
``thesis8`` / ``thesis4`` (the thesis's affine quantizers, section 5.1.9) and one per
registered target: ``dpu`` (the Xilinx DPU, Vitis-AI pof2s; :mod:`tfqkd.dpu`).

A hardware target is chosen explicitly, by the preset's name or by ``target: <name>`` in a
policy: :func:`tfqkd.quant.quantize` then builds the target's model (for ``dpu``: BN folded,
every tensor the DPU writes quantized). A policy that merely has the same bits and scheme as a
target (``default: {scheme: pof2}``) but no ``target`` builds the generic QKeras twin with
power-of-two quantizers, and ``quantize`` warns that it is not the DPU-exact model. A target
fixes the quantization of every layer: ``target: dpu`` alone is a complete policy, and a
``default`` given with it must be the target's (8-bit ``pof2``); rules, ``first_last_bits`` and
``integer_intermediates`` are refused.
"""

import dataclasses
import fnmatch
import re
import warnings
from pathlib import Path

import yaml

from tfqkd.errors import TfqkdError
from tfqkd.quant.layers import input_quantizer_of, weight_quantizers
from tfqkd.quant.quantizers import TfqkdQuantizer, validate_bits
from tfqkd.quant.targets import get_target, list_targets

__all__ = [
    "QUANTIZABLE_TYPES", "QuantPolicy", "QuantSpec", "Rule", "check_target_policy", "layer_specs", "list_presets",
    "lookalike_target", "resolve_policy",
]  # fmt: skip

#: Keras layer types whose weights and inputs are quantized.
QUANTIZABLE_TYPES = ("Conv2D", "DepthwiseConv2D", "Dense")
#: "lsq_pof2": a learned step used as its nearest power of two, which stock QKeras, hls4ml and
#: shift-only hardware express exactly.
SCHEMES = ("lsq", "affine", "pof2", "lsq_pof2")
_SPEC_KEYS = ("weight_bits", "activation_bits", "bias_bits", "scheme", "activation_scheme")
#: Policy keys of tfqkd 0.2, still read: ``kind`` is now ``scheme``.
_OLD_SPEC_KEYS = {"kind": "scheme", "activation_kind": "activation_scheme"}


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How one layer is quantized.

    Attributes:
      weight_bits: bits of the kernel, 1-16.
      activation_bits: bits of the layer's input activations, 1-16, or None to
        leave the input in float.
      bias_bits: bits of the bias, 1-32; 32 keeps it in float (it is added to
        the int32 accumulator on integer hardware).
      scheme: quantizer family: "lsq" (QKD learned step), "affine" (thesis
        running min-max), "pof2" (DPU power-of-two), "lsq_pof2" (learned
        power-of-two steps).
      activation_scheme: the input activations' family when it differs from
        ``scheme``: one of ``SCHEMES`` ("lsq_pof2": learned power-of-two
        steps, exported exactly by ``tfqkd export --target qkeras``); None: ``scheme``.
    """

    weight_bits: int = 8
    activation_bits: int | None = 8
    bias_bits: int = 32
    scheme: str = "lsq"
    activation_scheme: str | None = None

    def __post_init__(self):
        validate_bits(self.weight_bits, "weight_bits")
        if self.activation_bits is not None:
            validate_bits(self.activation_bits, "activation_bits")
        validate_bits(self.bias_bits, "bias_bits", high=32)
        if self.scheme not in SCHEMES:
            raise TfqkdError(f"unknown quantizer scheme {self.scheme!r}; expected one of {', '.join(SCHEMES)}")
        if self.scheme == "pof2" and (self.weight_bits != 8 or self.activation_bits not in (8, None)):
            raise TfqkdError("the DPU quantizer scheme 'pof2' supports 8 bits only")
        if self.activation_scheme is not None:
            if self.activation_scheme not in SCHEMES:
                raise TfqkdError(f"unknown activation_scheme {self.activation_scheme!r}; expected one of {', '.join(SCHEMES)}")
            if self.activation_scheme == "pof2" and self.activation_bits not in (8, None):
                raise TfqkdError("activation_scheme 'pof2' (the DPU quantizer) supports 8 bits only; use 'lsq_pof2'")

    @property
    def input_scheme(self):
        """The family of the input activation quantizer."""
        return self.activation_scheme or self.scheme

    def replace(self, **changes):
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self):
        out = dataclasses.asdict(self)
        if out["activation_scheme"] is None:
            del out["activation_scheme"]  # the default: the same family as the weights
        return out

    def short(self):
        """Compact label such as ``lsq:w4a4``, ``lsq:w4a4(lsq_pof2)`` or ``lsq:w8a-`` (float input)."""
        a = "-" if self.activation_bits is None else self.activation_bits
        other = f"({self.activation_scheme})" if self.activation_scheme not in (None, self.scheme) else ""
        return f"{self.scheme}:w{self.weight_bits}a{a}{other}"


def _spec_fields(mapping):
    """A policy mapping with the old key names (``kind``, ``activation_kind``) read as the new ones."""
    return {_OLD_SPEC_KEYS.get(key, key): value for key, value in mapping.items()}


def _spec_from_mapping(mapping, base, where):
    mapping = _spec_fields(mapping)
    unknown = set(mapping) - set(_SPEC_KEYS)
    if unknown:
        raise TfqkdError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(_SPEC_KEYS)}")
    return base.replace(**mapping)


@dataclasses.dataclass(frozen=True)
class Rule:
    """A rule of a policy: layers it matches and the fields it overrides.

    Attributes:
      match: layer-name pattern, a glob (``block1_*``) or a regex prefixed
        with ``re:``; None matches every name.
      layer_type: Keras class name (``Conv2D``, ``Dense``, ...) or None.
      overrides: QuantSpec fields this rule sets; the rest come from the default.
    """

    match: str | None = None
    layer_type: str | None = None
    overrides: tuple = ()

    def __post_init__(self):
        if self.match is None and self.layer_type is None:
            raise TfqkdError("a policy rule needs 'match' (a layer-name pattern) or 'layer_type'")
        if self.match is not None and not isinstance(self.match, str):
            raise TfqkdError(f"rule 'match' must be a string pattern, got {self.match!r}")
        if self.match is not None and self.match.startswith("re:"):
            try:
                re.compile(self.match[3:])
            except re.error as err:
                raise TfqkdError(f"rule pattern {self.match!r} is not a valid regex: {err}") from None
        if self.layer_type is not None and self.layer_type not in QUANTIZABLE_TYPES:
            raise TfqkdError(
                f"rule layer_type {self.layer_type!r} is not quantizable; expected one of {', '.join(QUANTIZABLE_TYPES)}"
            )

    def matches(self, name, layer_type):
        """Whether this rule applies to a layer.

        Args:
          name: the layer's name.
          layer_type: the float layer's Keras class name.

        Returns:
          bool.
        """
        if self.layer_type is not None and layer_type != self.layer_type:
            return False
        if self.match is None:
            return True
        if self.match.startswith("re:"):
            return re.fullmatch(self.match[3:], name) is not None
        return fnmatch.fnmatchcase(name, self.match)

    def to_dict(self):
        out = {}
        if self.match is not None:
            out["match"] = self.match
        if self.layer_type is not None:
            out["layer_type"] = self.layer_type
        out.update(dict(self.overrides))
        return out


@dataclasses.dataclass(frozen=True)
class QuantPolicy:
    """A per-layer bit assignment.

    Attributes:
      default: spec of layers no rule matches, or None to leave them float.
      rules: ordered rules; the first matching rule wins.
      first_last_bits: if set, the first and last quantizable layers use this
        many weight and activation bits (the common "8-bit ends" recipe).
      name: preset or file name, for display.
      integer_intermediates: also train 8-bit quantizers on the tensors a
        full-integer runtime stores (BN and global-pool inputs, residual Adds'
        inputs and outputs), so the int8
        TFLite export reproduces the trained model exactly
        (see :func:`tfqkd.quant.quantize`).
      target: name of a hardware target (:mod:`tfqkd.quant.targets`, e.g. ``"dpu"``) whose
        own model :func:`tfqkd.quant.quantize` builds, or None for the generic QKeras twin.
        Chosen explicitly, never inferred from the specs.
    """

    default: QuantSpec | None = QuantSpec()
    rules: tuple = ()
    first_last_bits: int | None = None
    name: str = "custom"
    integer_intermediates: bool = False
    target: str | None = None

    def __post_init__(self):
        if self.first_last_bits is not None:
            validate_bits(self.first_last_bits, "first_last_bits")
        if not isinstance(self.integer_intermediates, bool):
            raise TfqkdError(f"integer_intermediates must be true or false, got {self.integer_intermediates!r}")
        if self.target is not None:
            if not isinstance(self.target, str) or not self.target:
                raise TfqkdError(f"target must be the name of a hardware target, got {self.target!r}")
            extras = [key for key, value in (("rules", self.rules), ("first_last_bits", self.first_last_bits),
                                             ("integer_intermediates", self.integer_intermediates)) if value]
            if extras:
                raise TfqkdError(
                    f"target {self.target!r} fixes the quantization of every layer; remove {', '.join(extras)}"
                )

    @property
    def is_float(self):
        return self.default is None and not self.rules and self.first_last_bits is None

    # Construction -----------------------------------------------------------
    @classmethod
    def from_dict(cls, data, name="custom"):
        """Builds a policy from a mapping (as loaded from YAML).

        Args:
          data: mapping with optional keys ``default`` (mapping of QuantSpec
            fields, or null for float), ``rules`` (list of mappings with
            ``match`` and/or ``layer_type`` plus QuantSpec fields),
            ``first_last_bits``, ``integer_intermediates``, ``target`` and ``name``.
            With ``target`` and no ``default``, the default is the target's spec.
          name: name used when ``data`` has none.

        Returns:
          QuantPolicy.

        Raises:
          TfqkdError: naming the malformed part.
        """
        if not isinstance(data, dict):
            raise TfqkdError(f"a quantization policy must be a mapping, got {type(data).__name__}")
        unknown = set(data) - {"default", "rules", "first_last_bits", "name", "integer_intermediates", "target"}
        if unknown:
            raise TfqkdError(f"policy: unknown key(s) {', '.join(sorted(unknown))}")
        target = data.get("target")
        if target is not None and "default" not in data:
            data = {**data, "default": get_target(target).spec.to_dict()}
        default = data.get("default", {})
        if default is not None:
            if not isinstance(default, dict):
                raise TfqkdError("policy 'default' must be a mapping of weight_bits/activation_bits/bias_bits/scheme")
            default = _spec_from_mapping(default, QuantSpec(), "policy default")
        rules_data = data.get("rules", []) or []
        if not isinstance(rules_data, list):
            raise TfqkdError("policy 'rules' must be a list")
        rules = []
        base = default or QuantSpec()
        for i, rule in enumerate(rules_data):
            if not isinstance(rule, dict):
                raise TfqkdError(f"policy rule {i} must be a mapping")
            rule = _spec_fields(rule)
            match, layer_type = rule.pop("match", None), rule.pop("layer_type", None)
            _spec_from_mapping(rule, base, f"policy rule {i}")  # validates the values
            rules.append(Rule(match, layer_type, tuple(sorted(rule.items()))))
        policy = cls(
            default,
            tuple(rules),
            data.get("first_last_bits"),
            str(data.get("name", name)),
            data.get("integer_intermediates", False),
            target,
        )
        if target is not None:
            check_target_policy(policy)
        return policy

    @classmethod
    def from_yaml(cls, path):
        """Loads a policy from a YAML file (``yaml.safe_load``)."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise TfqkdError(f"policy file not found: {path}") from None
        except yaml.YAMLError as err:
            first = str(err).splitlines()[0] if str(err) else "syntax error"
            raise TfqkdError(f"policy file {path} is not valid YAML: {first}") from None
        return cls.from_dict(data, name=path.stem)

    @classmethod
    def from_model(cls, model):
        """Reads back the per-layer policy a quantized model carries.

        Args:
          model: a model returned by :func:`tfqkd.quant.quantize`.

        Returns:
          QuantPolicy with one exact-name rule per quantized layer and a float default.
        """
        rules = tuple(
            Rule(match=name, overrides=tuple(sorted(spec.to_dict().items()))) for name, spec in layer_specs(model).items()
        )
        return cls(default=None, rules=rules, name=f"{model.name}-policy")

    def to_dict(self):
        out = {"name": self.name, "default": None if self.default is None else self.default.to_dict()}
        if self.first_last_bits is not None:
            out["first_last_bits"] = self.first_last_bits
        if self.integer_intermediates:
            out["integer_intermediates"] = True
        if self.target is not None:
            out["target"] = self.target
        out["rules"] = [rule.to_dict() for rule in self.rules]
        return out

    def to_yaml(self, path=None):
        """Writes (if ``path``) and returns the YAML text of this policy."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    # Resolution -----------------------------------------------------------
    def resolve(self, layers, warn=True):
        """Assigns a spec to each quantizable layer.

        Args:
          layers: ordered ``(name, layer_type)`` pairs of the float model's
            layers (topological order).
          warn: warn about rules that match no layer.

        Returns:
          dict name -> QuantSpec for the layers to quantize (float layers omitted).
        """
        quantizable = [(n, t) for n, t in layers if t in QUANTIZABLE_TYPES]
        ends = set()
        if self.first_last_bits is not None and quantizable:
            ends = {quantizable[0][0], quantizable[-1][0]}
        used = [False] * len(self.rules)
        specs = {}
        for name, layer_type in quantizable:
            spec = self.default
            for i, rule in enumerate(self.rules):
                if rule.matches(name, layer_type):
                    used[i] = True
                    spec = (self.default or QuantSpec()).replace(**dict(rule.overrides))
                    break
            if name in ends and spec is not None:
                bits = self.first_last_bits
                spec = spec.replace(weight_bits=bits, activation_bits=None if spec.activation_bits is None else bits)
            if spec is not None:
                specs[name] = spec
        if warn:
            for rule, hit in zip(self.rules, used):
                if not hit:
                    warnings.warn(f"quantization policy rule {rule.to_dict()} matches no layer", stacklevel=3)
        return specs

    def describe(self):
        """One line per part of the policy, for logs and ``print``."""
        lines = [f"policy {self.name}: default {self.default.short() if self.default else 'float'}"]
        if self.target is not None:
            lines[0] += f", target {self.target}"
        if self.first_last_bits is not None:
            lines.append(f"  first and last layer: {self.first_last_bits} bits")
        lines.extend(f"  rule {rule.to_dict()}" for rule in self.rules)
        return "\n".join(lines)


_PRESETS = {
    "fp32": QuantPolicy(default=None, name="fp32"),
    "w8a8": QuantPolicy(QuantSpec(8, 8), name="w8a8"),
    "w4a4": QuantPolicy(QuantSpec(4, 4), name="w4a4"),
    "w4a8": QuantPolicy(QuantSpec(4, 8), name="w4a8"),
    "thesis8": QuantPolicy(QuantSpec(8, 8, scheme="affine"), name="thesis8"),
    "thesis4": QuantPolicy(QuantSpec(4, 4, scheme="affine"), name="thesis4"),
}


#: ``w<bits>a<bits>`` names any uniform learned-step policy (``w3a3``, ``w2a2``, ``w8a4``).
_UNIFORM_LSQ = re.compile(r"w(\d{1,2})a(\d{1,2})")


def _target_preset(name):
    """The preset of a registered target: its spec everywhere, the target named."""
    target = get_target(name)
    return QuantPolicy(target.spec, name=target.name, target=target.name)


def list_presets():
    """Names of the built-in policies and of the registered targets (``dpu``); any ``w<b>a<b>``
    with 1-16 bits is accepted too."""
    return list(_PRESETS) + [name for name in list_targets() if name not in _PRESETS]


def check_target_policy(policy):
    """Checks that a policy naming a target is what the target computes.

    Args:
      policy: a QuantPolicy with ``target`` set.

    Returns:
      the :class:`~tfqkd.quant.targets.QuantTarget`.

    Raises:
      TfqkdError: unknown target, or a default spec other than the target's.
    """
    target = get_target(policy.target)
    if policy.default != target.spec:
        shown = policy.default.short() if policy.default is not None else "float"
        raise TfqkdError(
            f"policy {policy.name!r}: target {target.name!r} quantizes every layer as {target.spec.short()}, "
            f"but the policy's default is {shown}; leave 'default' out"
        )
    return target


def lookalike_target(policy):
    """The registered target a policy without ``target`` has the same specs as, or None.

    Such a policy builds the generic twin, not the target's model; :func:`tfqkd.quant.quantize`
    warns about it.
    """
    if policy.target is not None or policy.rules or policy.first_last_bits is not None or policy.integer_intermediates:
        return None
    return next((t for t in list_targets().values() if policy.default == t.spec), None)


def resolve_policy(policy):
    """Turns a preset name, YAML path, mapping or QuantPolicy into a QuantPolicy.

    Args:
      policy: ``"w4a4"``-style preset name, path to a ``.yaml``/``.yml`` file,
        a dict, or a QuantPolicy.

    Returns:
      QuantPolicy.

    Raises:
      TfqkdError: unknown preset, missing or malformed file or mapping.
    """
    if isinstance(policy, QuantPolicy):
        return policy
    if isinstance(policy, dict):
        return QuantPolicy.from_dict(policy)
    if isinstance(policy, (str, Path)):
        text = str(policy)
        if text in _PRESETS:
            return _PRESETS[text]
        if text in list_targets():
            return _target_preset(text)
        uniform = _UNIFORM_LSQ.fullmatch(text)
        if uniform:
            return QuantPolicy(QuantSpec(int(uniform[1]), int(uniform[2])), name=text)
        if text.endswith((".yaml", ".yml")):
            return QuantPolicy.from_yaml(text)
        raise TfqkdError(f"unknown quantization policy {text!r}; use a preset ({', '.join(list_presets())}), w<bits>a<bits> or a .yaml file")
    raise TfqkdError(f"cannot interpret {type(policy).__name__} as a quantization policy")


def layer_specs(model):
    """The per-layer QuantSpec a quantized model realises.

    Args:
      model: a model returned by :func:`tfqkd.quant.quantize` (or loaded from its file).

    Returns:
      dict layer name -> QuantSpec, in layer order.
    """
    specs = {}
    for layer in model.layers:
        pairs = weight_quantizers(layer)
        if not pairs:
            continue
        weight_q = pairs[0][2]
        bias_q = getattr(layer, "bias_quantizer_internal", None)
        qin = _input_quantizer_layer(model, layer.name)
        input_scheme = None if qin is None else qin.quantizer.scheme
        specs[layer.name] = QuantSpec(
            weight_bits=weight_q.bits,
            activation_bits=None if qin is None else qin.quantizer.bits,
            bias_bits=bias_q.bits if isinstance(bias_q, TfqkdQuantizer) else 32,
            scheme=weight_q.scheme,
            activation_scheme=None if input_scheme in (None, weight_q.scheme) else input_scheme,
        )
    return specs


def _input_quantizer_layer(model, name):
    return input_quantizer_of(model.get_layer(name))
