"""Recipe configuration: YAML files shipped with the package, validated.

A recipe config holds the experiment (dataset, student, teacher, policy,
seed, batch size, KD hyperparameters) and the optimizer schedules its stages train with::

    schedules:
      teacher_baseline: {epochs: 200, lr: 0.1, milestones: [60, 120, 160], factor: 5, warmup: 2}
      ss: {epochs: 60, lr: 1.0e-6, milestones: [20, 40], factor: 5, warmup: 1}

The words, one meaning each: a *phase* is one of QKD's three ways of training (``ss``, ``cs``,
``ts``: :class:`tfqkd.QKD`'s ``train_step``); a *stage* is one ``compile``/``fit`` of a run,
saved as ``models/<stage>.h5`` (``ss``, ``ss_ts``, ``cs``, ``qkd_ts``, ``student_fp`` ...);
a *schedule* is the epochs and learning rates a stage trains with, named after the phase
or baseline it serves (several stages may share one: ``ss_ts`` and ``qkd_ts`` use ``ts``).
Files of tfqkd 0.2 call the schedules ``stages:``; they still load.

The thesis experiments (section 5.7) ship as ``configs/thesis_*.yaml``;
``configs/quick.yaml`` is the few-epoch budget for a 2-core CPU. Every value
is checked; a bad one raises :class:`~tfqkd.errors.TfqkdError` naming it.
"""

import copy
import importlib.resources
import math
from pathlib import Path

import yaml

from tfqkd.errors import TfqkdError

__all__ = ["SCHEDULES", "budget_config", "load_config", "merge", "read_yaml_file", "safe_yaml", "validate_config"]

#: The schedules of a recipe, in pipeline order.
SCHEDULES = ("teacher_baseline", "student_baseline", "ss", "cs", "ts")
STAGES = SCHEDULES  # their name in tfqkd 0.2
_SCHEDULE_KEYS = {"epochs", "lr", "milestones", "factor", "warmup"}
_TOP_KEYS = {
    "name", "dataset", "student", "teacher", "quant", "seed", "batch_size", "alpha", "temperature",
    "weight_decay", "momentum", "schedules", "teacher_cache", "eval_train_limit", "train_limit", "data_dir",
}  # fmt: skip
# Thesis pairs per dataset (section 5.7) for the "thesis" budget.
_THESIS_CONFIGS = {"cifar10": "thesis_cifar10.yaml", "cifar100": "thesis_cifar100.yaml", "mnist": "thesis_mnist.yaml"}


#: Limits of a recipe or policy file: these are small hand-written files, and
#: ``yaml.safe_load`` expands aliases, so a "billion laughs" document of a few
#: hundred bytes would otherwise become a structure of billions of nodes.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_ALIASES = 256
MAX_YAML_NODES = 100_000
MAX_YAML_DEPTH = 64


def show(value, limit=80):
    """``repr`` of a user value, cut to ``limit`` characters (error messages stay one short line)."""
    try:
        text = repr(value)
    except RecursionError:  # pragma: no cover - recursive structures are refused earlier
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _GuardedLoader(yaml.SafeLoader):
    """``SafeLoader`` that counts aliases while composing the node graph."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.alias_count = getattr(self, "alias_count", 0) + 1
            if self.alias_count > MAX_YAML_ALIASES:
                raise TfqkdError(f"{self.where} uses more than {MAX_YAML_ALIASES} YAML aliases")
        return super().compose_node(parent, index)


def _expanded_size(root, where):
    """Nodes the document has once aliases are expanded (without expanding), refusing cycles."""
    sizes, active = {}, set()
    # Iterative post-order walk: deep documents must not hit Python's recursion limit.
    stack = [(root, False, 0)]
    while stack:
        node, done, depth = stack.pop()
        key = id(node)
        if done:
            active.discard(key)
            children = _children(node)
            sizes[key] = min(1 + sum(sizes[id(child)] for child in children), MAX_YAML_NODES + 1)
            continue
        if key in sizes:
            continue
        if key in active:
            raise TfqkdError(f"{where} contains a recursive YAML alias")
        if depth > MAX_YAML_DEPTH:
            raise TfqkdError(f"{where} is nested more than {MAX_YAML_DEPTH} levels deep")
        active.add(key)
        stack.append((node, True, depth))
        for child in _children(node):
            if id(child) in active:
                raise TfqkdError(f"{where} contains a recursive YAML alias")
            if id(child) not in sizes:
                stack.append((child, False, depth + 1))
    return sizes[id(root)]


def _children(node):
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def safe_yaml(text, where):
    """Parses YAML text with ``safe_load`` semantics and resource limits.

    Args:
      text: the document (str).
      where: what it is, for error messages ("recipe x.yaml").

    Returns:
      the Python data (may be any YAML type; callers check the shape).

    Raises:
      TfqkdError: syntax error, more than one document, too large, too many
        aliases, recursive aliases or too deep nesting.
    """
    if len(text) > MAX_YAML_BYTES:
        raise TfqkdError(f"{where} is larger than {MAX_YAML_BYTES // 1024} KiB; a recipe is a small YAML file")
    loader = None
    try:
        loader = _GuardedLoader(text)  # the reader already rejects control characters
        loader.where = where
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, where) > MAX_YAML_NODES:
            raise TfqkdError(f"{where} expands to more than {MAX_YAML_NODES} YAML nodes (alias bomb?)")
        return loader.construct_document(node)
    except TfqkdError:
        raise
    except yaml.YAMLError as err:
        first = " ".join(str(err).split()) if str(err) else "syntax error"
        raise TfqkdError(f"{where} is not valid YAML: {first[:200]}") from None
    except (ValueError, TypeError, OverflowError) as err:  # e.g. a timestamp like 2020-13-45
        raise TfqkdError(f"{where} has a value YAML cannot convert: {show(str(err), 120)}") from None
    except RecursionError:
        raise TfqkdError(f"{where} is nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_yaml_file(path, what):
    """Reads a small UTF-8 YAML file safely (see :func:`safe_yaml`).

    Args:
      path: file path.
      what: "recipe", "policy file", ... for error messages.

    Returns:
      the parsed data.

    Raises:
      TfqkdError: missing, a directory, unreadable, not UTF-8 text, too large or malformed.
    """
    path = Path(path)
    where = f"{what} {show(str(path))}"
    try:
        if path.is_dir():
            raise TfqkdError(f"{where} is a directory, not a YAML file")
        with open(path, "rb") as handle:
            raw = handle.read(MAX_YAML_BYTES + 1)
    except TfqkdError:
        raise
    except FileNotFoundError:
        raise TfqkdError(f"{where} not found") from None
    except (OSError, ValueError) as err:  # permissions, ELOOP, embedded NUL byte, ...
        raise TfqkdError(f"cannot read {where}: {type(err).__name__}") from None
    if len(raw) > MAX_YAML_BYTES:
        raise TfqkdError(f"{where} is larger than {MAX_YAML_BYTES // 1024} KiB; a recipe is a small YAML file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise TfqkdError(f"{where} is not a UTF-8 text file") from None
    if "\x00" in text:
        raise TfqkdError(f"{where} is not a text file (it contains NUL bytes)")
    return safe_yaml(text, where)


def _read_yaml(text, where):
    data = safe_yaml(text, where)
    if not isinstance(data, dict):
        raise TfqkdError(f"{where} must be a YAML mapping of settings, got {type(data).__name__}")
    return data


def load_config(path):
    """Reads and validates a recipe YAML file.

    Args:
      path: file path.

    Returns:
      the validated config dict.
    """
    data = read_yaml_file(path, "recipe")
    if not isinstance(data, dict):
        raise TfqkdError(f"recipe {show(str(path))} must be a YAML mapping of settings, got {type(data).__name__}")
    return validate_config(data)


def budget_config(budget, dataset):
    """The packaged config for a budget.

    Args:
      budget: "quick" (minutes on a 2-core CPU) or "thesis" (the thesis's hyperparameters).
      dataset: the dataset, which selects the thesis experiment.

    Returns:
      the config dict (not yet validated; callers merge overrides first).
    """
    if budget == "quick":
        name = "quick.yaml"
    elif budget == "thesis":
        name = _THESIS_CONFIGS.get(dataset)
        if name is None:
            raise TfqkdError(
                f"the thesis budget covers datasets {', '.join(_THESIS_CONFIGS)}; use --budget quick or --config for {dataset!r}"
            )
    else:
        raise TfqkdError(f"unknown budget {budget!r}; use quick or thesis")
    text = importlib.resources.files("tfqkd.recipes").joinpath("configs", name).read_text()
    return _read_yaml(text, f"packaged recipe {name}")


def merge(config, overrides):
    """Returns ``config`` with the non-None ``overrides`` applied (deep copy)."""
    out = copy.deepcopy(config)
    for key, value in overrides.items():
        if value is not None:
            out[key] = value
    return out


def _number(value, key, low=None, high=None, integer=False, low_open=False):
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise TfqkdError(f"{key} must be {'an integer' if integer else 'a number'}, got {show(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise TfqkdError(f"{key} must be a finite number, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise TfqkdError(f"{key} must be {'>' if low_open else '>='} {low}, got {show(value)}")
    if high is not None and value > high:
        raise TfqkdError(f"{key} must be <= {high}, got {show(value)}")
    return value


def _keys(mapping):
    return ", ".join(sorted(show(key, 40) if not isinstance(key, str) or not key.isprintable() else key for key in mapping))


def _validate_quant(quant):
    """Checks a policy (preset name, YAML path or mapping) now, before any run directory or data."""
    from tfqkd.quant.policy import QuantPolicy, list_presets

    if isinstance(quant, str):
        if quant in list_presets():
            return
        if not quant.endswith((".yaml", ".yml")):
            raise TfqkdError(
                f"unknown quantization policy {show(quant)}; use a preset ({', '.join(list_presets())}) or a .yaml file"
            )
        data, where = read_yaml_file(quant, "policy file"), f"policy file {show(quant)}"
    else:
        data, where = quant, "recipe 'quant'"
    if not isinstance(data, dict):
        raise TfqkdError(f"{where} must be a mapping (default, rules, first_last_bits, name), got {type(data).__name__}")
    if any(not isinstance(key, str) for key in data):
        raise TfqkdError(f"{where}: keys must be names, got {_keys(data)}")
    try:
        QuantPolicy.from_dict(data)
    except TfqkdError as err:
        raise TfqkdError(f"{where}: {err}") from None
    except (TypeError, ValueError, AttributeError, KeyError) as err:
        raise TfqkdError(f"{where} is malformed: {show(str(err), 120)}") from None


def validate_config(config):
    """Checks types and ranges of a recipe config.

    Args:
      config: mapping as read from YAML (after overrides).

    Returns:
      the same config with defaults filled in.

    Raises:
      TfqkdError: naming the first bad key.
    """
    from tfqkd.data import list_datasets
    from tfqkd.models import list_models, model_info

    if isinstance(config, dict) and "stages" in config:  # the schedules' name in tfqkd 0.2
        if "schedules" in config:
            raise TfqkdError("recipe: give 'schedules' (or its old name 'stages'), not both")
        config["schedules"] = config.pop("stages")

    if not isinstance(config, dict):
        raise TfqkdError(f"recipe must be a mapping of settings, got {type(config).__name__}")
    unknown = set(config) - _TOP_KEYS
    if unknown:
        raise TfqkdError(f"recipe: unknown key(s) {_keys(unknown)}; known: {', '.join(sorted(_TOP_KEYS))}")
    config = copy.deepcopy(config)
    if config.get("name") is not None and not isinstance(config["name"], str):
        raise TfqkdError(f"recipe: 'name' must be a string, got {show(config['name'])}")
    for key in ("dataset", "student", "teacher"):
        if not isinstance(config.get(key), str):
            raise TfqkdError(f"recipe: '{key}' must be a name, got {show(config.get(key))}")
    if config["dataset"] not in list_datasets():
        raise TfqkdError(f"unknown dataset {show(config['dataset'])}; known: {', '.join(list_datasets())}")
    for key in ("student", "teacher"):
        if config[key] not in list_models():
            raise TfqkdError(f"unknown {key} model {show(config[key])}; see `tfqkd models`")
        if model_info(config[key]).default_num_classes is None:
            raise TfqkdError(f"{key} model {config[key]!r} has no classification head; it cannot be distilled")
    config.setdefault("quant", "w8a8")
    if not isinstance(config["quant"], (str, dict)):
        raise TfqkdError(
            f"recipe: 'quant' must be a preset name, a policy file path or a policy mapping, got {show(config['quant'])}"
        )
    _validate_quant(config["quant"])
    config.setdefault("seed", 0)
    _number(config["seed"], "seed", low=0, high=2**32 - 1, integer=True)
    config.setdefault("batch_size", 64)
    _number(config["batch_size"], "batch_size", low=1, high=65536, integer=True)
    config.setdefault("alpha", 0.7)
    _number(config["alpha"], "alpha", low=0, high=1)
    config.setdefault("temperature", 8.0)
    _number(config["temperature"], "temperature", low=0, low_open=True, high=1e4)
    config.setdefault("weight_decay", 5e-4)
    _number(config["weight_decay"], "weight_decay", low=0, high=1)
    config.setdefault("momentum", 0.9)
    _number(config["momentum"], "momentum", low=0, high=1)
    config.setdefault("teacher_cache", "auto")
    if not isinstance(config["teacher_cache"], str) or config["teacher_cache"] not in ("auto", "on", "off"):
        raise TfqkdError(f"teacher_cache must be auto, on or off, got {show(config['teacher_cache'])}")
    for key in ("eval_train_limit", "train_limit"):
        config.setdefault(key, None)
        if config[key] is not None:
            _number(config[key], key, low=1, high=10**9, integer=True)
    if config.get("data_dir") is not None:
        if not isinstance(config["data_dir"], str) or not config["data_dir"] or "\x00" in config["data_dir"]:
            raise TfqkdError(f"data_dir must be a directory path, got {show(config['data_dir'])}")
        if Path(config["data_dir"]).exists() and not Path(config["data_dir"]).is_dir():
            raise TfqkdError(f"data_dir {show(config['data_dir'])} is not a directory")
    schedules = config.get("schedules")
    if not isinstance(schedules, dict):
        raise TfqkdError(f"recipe: 'schedules' must map schedule names to {{epochs, lr, ...}}, got {show(schedules)}")
    bad = set(schedules) - set(SCHEDULES)
    if bad:
        raise TfqkdError(f"recipe: unknown schedule(s) {_keys(bad)}; known: {', '.join(SCHEDULES)}")
    for name in SCHEDULES:
        schedule = schedules.get(name)
        if not isinstance(schedule, dict):
            raise TfqkdError(f"recipe: schedule '{name}' needs a mapping (epochs, lr, ...), got {show(schedule)}")
        unknown = set(schedule) - _SCHEDULE_KEYS
        if unknown:
            raise TfqkdError(f"recipe schedule '{name}': unknown key(s) {_keys(unknown)}; known: {', '.join(sorted(_SCHEDULE_KEYS))}")
        _number(schedule.get("epochs"), f"{name}.epochs", low=0, high=100000, integer=True)
        _number(schedule.get("lr"), f"{name}.lr", low=0, low_open=True, high=1e6)
        schedule.setdefault("milestones", [])
        if not isinstance(schedule["milestones"], list):
            raise TfqkdError(f"{name}.milestones must be a list of epochs, got {show(schedule['milestones'])}")
        for epoch in schedule["milestones"]:
            _number(epoch, f"{name}.milestones", low=0, high=100000, integer=True)
        if any(b <= a for a, b in zip(schedule["milestones"], schedule["milestones"][1:])):
            raise TfqkdError(f"{name}.milestones must be strictly increasing, got {show(schedule['milestones'])}")
        schedule.setdefault("factor", 5)
        _number(schedule["factor"], f"{name}.factor", low=0, low_open=True, high=1e6)
        schedule.setdefault("warmup", 0)
        _number(schedule["warmup"], f"{name}.warmup", low=0, high=100000, integer=True)
    return config
