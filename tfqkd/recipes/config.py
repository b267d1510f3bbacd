"""Recipe configuration: YAML files shipped with the package, validated.

A recipe config holds the experiment (dataset, student, teacher, policy,
seed, batch size, KD hyperparameters) and one schedule per training stage::

    stages:
      teacher_baseline: {epochs: 200, lr: 0.1, milestones: [60, 120, 160], factor: 5, warmup: 2}
      ss: {epochs: 60, lr: 1.0e-6, milestones: [20, 40], factor: 5, warmup: 1}

The thesis experiments (section 5.7) ship as ``configs/thesis_*.yaml``;
``configs/quick.yaml`` is the few-epoch budget for a 2-core CPU. Every value
is checked; a bad one raises :class:`~tfqkd.errors.TfqkdError` naming it.
"""

import copy
import importlib.resources
from pathlib import Path

import yaml

from tfqkd.errors import TfqkdError

__all__ = ["STAGES", "budget_config", "load_config", "merge", "validate_config"]

#: Training stages a recipe may schedule, in pipeline order.
STAGES = ("teacher_baseline", "student_baseline", "ss", "cs", "ts")
_STAGE_KEYS = {"epochs", "lr", "milestones", "factor", "warmup"}
_TOP_KEYS = {
    "name", "dataset", "student", "teacher", "quant", "seed", "batch_size", "alpha", "temperature",
    "weight_decay", "momentum", "stages", "teacher_cache", "eval_train_limit", "train_limit", "data_dir",
}  # fmt: skip
# Thesis pairs per dataset (section 5.7) for the "thesis" budget.
_THESIS_CONFIGS = {"cifar10": "thesis_cifar10.yaml", "cifar100": "thesis_cifar100.yaml", "mnist": "thesis_mnist.yaml"}


def _read_yaml(text, where):
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        first = str(err).splitlines()[0] if str(err) else "syntax error"
        raise TfqkdError(f"{where} is not valid YAML: {first}") from None
    if not isinstance(data, dict):
        raise TfqkdError(f"{where} must be a YAML mapping, got {type(data).__name__}")
    return data


def load_config(path):
    """Reads and validates a recipe YAML file.

    Args:
      path: file path.

    Returns:
      the validated config dict.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except (FileNotFoundError, IsADirectoryError, PermissionError) as err:
        raise TfqkdError(f"cannot read recipe {path}: {type(err).__name__}") from None
    except UnicodeDecodeError:
        raise TfqkdError(f"recipe {path} is not a text file") from None
    return validate_config(_read_yaml(text, f"recipe {path}"))


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
        raise TfqkdError(f"{key} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise TfqkdError(f"{key} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise TfqkdError(f"{key} must be <= {high}, got {value!r}")
    return value


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
    from tfqkd.models import list_models

    unknown = set(config) - _TOP_KEYS
    if unknown:
        raise TfqkdError(f"recipe: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
    config = copy.deepcopy(config)
    for key in ("dataset", "student", "teacher"):
        if not isinstance(config.get(key), str):
            raise TfqkdError(f"recipe: '{key}' must be a name, got {config.get(key)!r}")
    if config["dataset"] not in list_datasets():
        raise TfqkdError(f"unknown dataset {config['dataset']!r}; known: {', '.join(list_datasets())}")
    for key in ("student", "teacher"):
        if config[key] not in list_models():
            raise TfqkdError(f"unknown {key} model {config[key]!r}; see `tfqkd models`")
    config.setdefault("quant", "w8a8")
    if not isinstance(config["quant"], (str, dict)):
        raise TfqkdError("recipe: 'quant' must be a preset name, a policy file path or a policy mapping")
    config.setdefault("seed", 0)
    _number(config["seed"], "seed", low=0, integer=True)
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
    if config["teacher_cache"] not in ("auto", "on", "off"):
        raise TfqkdError(f"teacher_cache must be auto, on or off, got {config['teacher_cache']!r}")
    for key in ("eval_train_limit", "train_limit"):
        config.setdefault(key, None)
        if config[key] is not None:
            _number(config[key], key, low=1, integer=True)
    stages = config.get("stages")
    if not isinstance(stages, dict):
        raise TfqkdError("recipe: 'stages' must map stage names to schedules")
    bad = set(stages) - set(STAGES)
    if bad:
        raise TfqkdError(f"recipe: unknown stage(s) {', '.join(sorted(map(str, bad)))}; known: {', '.join(STAGES)}")
    for stage in STAGES:
        schedule = stages.get(stage)
        if not isinstance(schedule, dict):
            raise TfqkdError(f"recipe: stage '{stage}' needs a schedule mapping")
        unknown = set(schedule) - _STAGE_KEYS
        if unknown:
            raise TfqkdError(f"recipe stage '{stage}': unknown key(s) {', '.join(sorted(map(str, unknown)))}")
        _number(schedule.get("epochs"), f"{stage}.epochs", low=0, high=100000, integer=True)
        _number(schedule.get("lr"), f"{stage}.lr", low=0, low_open=True, high=1e6)
        schedule.setdefault("milestones", [])
        if not isinstance(schedule["milestones"], list):
            raise TfqkdError(f"{stage}.milestones must be a list of epochs")
        for epoch in schedule["milestones"]:
            _number(epoch, f"{stage}.milestones", low=0, integer=True)
        schedule.setdefault("factor", 5)
        _number(schedule["factor"], f"{stage}.factor", low=0, low_open=True)
        schedule.setdefault("warmup", 0)
        _number(schedule["warmup"], f"{stage}.warmup", low=0, integer=True)
    return config
