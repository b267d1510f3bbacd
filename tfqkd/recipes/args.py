"""Command-line arguments shared by the recipes, and their resolution into a config."""

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

from tfqkd import atomic
from tfqkd.console import ArgumentParser
from tfqkd.errors import TfqkdError
from tfqkd.recipes.config import budget_config, load_config, merge, show, validate_config
from tfqkd.training.distribute import STRATEGIES

__all__ = ["RecipeStart", "recipe_parser", "resolve_config", "resolve_run_dir", "start_recipe"]

# Options that describe the experiment; --resume takes them from the run directory.
_EXPERIMENT_OPTIONS = (
    "config", "run_dir", "model", "teacher", "dataset", "quant", "seed", "batch_size", "alpha", "temperature",
    "data_dir", "teacher_model", "student_model",
)  # fmt: skip


class _RecipeParser(ArgumentParser):
    """The CLI parser, keeping the error on one line even for arguments holding newlines."""

    def error(self, message):
        super().error(" ".join(str(message).split()))


def _model_file(value):
    """argparse type of --teacher-model/--student-model: an existing .h5/.keras file."""
    if "\x00" in value or not Path(value).is_file():
        raise argparse.ArgumentTypeError(f"model file not found: {show(value)}")
    return value


def _file(value):
    """argparse type of --config: an existing file (not a directory)."""
    if "\x00" in value or not Path(value).is_file():
        kind = "is a directory" if "\x00" not in value and Path(value).is_dir() else "not found"
        raise argparse.ArgumentTypeError(f"{show(value)} {kind}; expected a YAML file")
    return value


def recipe_parser(prog, description):
    """The argument parser every recipe starts from.

    Args:
      prog: program name shown in usage and errors.
      description: one-paragraph description of the recipe.

    Returns:
      an ArgumentParser (usage errors: one line, exit code 2).
    """
    parser = _RecipeParser(prog=prog, description=description)
    parser.add_argument("--model", help="student model (see `tfqkd models`); default from the budget")
    parser.add_argument("--teacher", help="teacher model; default from the budget")
    parser.add_argument("--dataset", help="dataset (mnist5k, digits, mnist, cifar10, ...); default from the budget")
    parser.add_argument("--quant", help="policy: w8a8, w4a4, w4a8, thesis8, thesis4, dpu or a POLICY.yaml")
    parser.add_argument("--budget", choices=("quick", "thesis"), default="quick",
                        help="quick: minutes on a 2-core CPU; thesis: the thesis's epochs and learning rates")  # fmt: skip
    parser.add_argument("--config", type=_file, help="recipe YAML file (overrides --budget)")
    parser.add_argument("--run-dir", help="run directory (default runs/<recipe>-<model>-<time>)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--alpha", type=float, help="KD weight of the soft targets, in [0, 1]")
    parser.add_argument("--temperature", type=float, help="KD temperature T > 0")
    parser.add_argument("--data-dir", help="tfds data directory holding prepared datasets")
    parser.add_argument("--teacher-model", type=_model_file, help="reuse this trained float teacher (.h5/.keras) instead of training one")
    parser.add_argument("--student-model", type=_model_file, help="reuse this trained float student (.h5/.keras) instead of training one")
    parser.add_argument("--unsafe", action="store_true", help="allow model files with Lambda layers (they run code)")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue an interrupted run: finished stages are reused, the unfinished one continues "
                        "after its last checkpointed epoch (config and options come from RUN_DIR)")  # fmt: skip
    parser.add_argument("--deterministic", action="store_true",
                        help="bit-identical results for the same seed (deterministic kernels, one inter-op thread; slower)")  # fmt: skip
    parser.add_argument("--strategy", choices=STRATEGIES,
                        help="tf.distribute strategy: mirrored (local devices) or multiworker (processes, TF_CONFIG); "
                        "batch_size is the global batch")  # fmt: skip
    return parser


def resolve_config(args):
    """Builds the validated config from the budget or file and the overrides."""
    if args.config:
        base = load_config(args.config)
    else:
        base = budget_config(args.budget, args.dataset or ("mnist5k" if args.budget == "quick" else "cifar10"))
    overrides = {
        "student": args.model, "teacher": args.teacher, "dataset": args.dataset, "quant": args.quant,
        "seed": args.seed, "batch_size": args.batch_size, "alpha": args.alpha, "temperature": args.temperature,
        "data_dir": args.data_dir,
    }  # fmt: skip
    return validate_config(merge(base, overrides))


def _check_run_dir(path):
    """Refuses a run directory that cannot be created (before any data is loaded)."""
    text = str(path)
    if "\x00" in text:
        raise TfqkdError(f"run directory {show(text)} is not a valid path")
    for part in (path, *path.parents):
        if part.exists() and not part.is_dir():
            raise TfqkdError(f"run directory {show(text)}: {show(str(part))} is a file, not a directory")
    atomic.ensure_directory(path, "run directory", keep=False)  # the Run creates it when training starts
    return path


def resolve_run_dir(args, recipe, config):
    """The run directory: ``--run-dir`` or a new timestamped one under ./runs."""
    if args.run_dir is not None:
        if not args.run_dir.strip():
            raise TfqkdError("--run-dir must not be empty")
        return _check_run_dir(Path(args.run_dir))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return _check_run_dir(Path("runs") / f"{recipe}-{config['student']}-{config['dataset']}-{stamp}")


@dataclass
class RecipeStart:
    """Everything a recipe needs to start or resume a run.

    Attributes:
      config: the validated config.
      run_dir: the run directory.
      resume: continue unfinished stages from their checkpoints.
      strategy: the ``tf.distribute`` strategy.
      runtime: the options stored as ``runtime.json``.
      teacher_model, student_model: trained float models to reuse (paths) or None.
      unsafe: allow Lambda layers in those files.
    """

    config: dict
    run_dir: Path
    resume: bool
    strategy: object
    runtime: dict
    teacher_model: str = None
    student_model: str = None
    unsafe: bool = False

    @property
    def policy(self):
        """The run's :class:`~tfqkd.quant.QuantPolicy` (resolve it before :meth:`new_run`: a bad one writes nothing)."""
        from tfqkd.quant import resolve_policy

        return resolve_policy(self.config["quant"])

    def new_run(self):
        """The :class:`~tfqkd.recipes.runner.Run` (creates the run directory, loads the data)."""
        from tfqkd.recipes.runner import Run

        return Run(self.config, self.run_dir, resume=self.resume, strategy=self.strategy, runtime=self.runtime)


def _resumed(args, recipe):
    """Config and runtime options of the run directory given to --resume."""
    given = [f"--{name.replace('_', '-')}" for name in _EXPERIMENT_OPTIONS if getattr(args, name, None) is not None]
    if given:
        raise TfqkdError(f"--resume continues RUN_DIR with its own config and options; drop {', '.join(given)}")
    if not args.resume.strip() or "\x00" in args.resume:
        raise TfqkdError(f"--resume needs a run directory, got {show(args.resume)}")
    run_dir = Path(args.resume)
    if not (run_dir / "config.yaml").is_file():
        raise TfqkdError(f"{show(args.resume)} is not a run directory (no config.yaml); nothing to resume")
    config = load_config(run_dir / "config.yaml")
    runtime = {}
    if (run_dir / "runtime.json").is_file():
        try:
            runtime = json.loads((run_dir / "runtime.json").read_text())
        except (OSError, ValueError):
            raise TfqkdError(f"{run_dir / 'runtime.json'} is unreadable; the run directory is damaged") from None
        if not isinstance(runtime, dict):
            raise TfqkdError(f"{run_dir / 'runtime.json'} is not a mapping; the run directory is damaged")
    if runtime.get("recipe", recipe) != recipe:
        raise TfqkdError(f"{show(args.resume)} is a run of recipe {runtime['recipe']!r}, not {recipe!r}")
    return config, run_dir, runtime


def start_recipe(args, recipe):
    """Resolves a recipe's arguments into a :class:`RecipeStart`.

    For a new run: the config from budget/file and overrides, and the run
    directory. With ``--resume RUN_DIR``: the config and options stored in
    RUN_DIR. Then, before TensorFlow runs anything: ``--deterministic`` and
    the ``--strategy`` (multi-worker collectives are configured at start-up).

    Args:
      args: the parsed recipe arguments.
      recipe: the recipe name ("qkd", "baseline", ...).

    Returns:
      a RecipeStart.

    Raises:
      TfqkdError: bad config, run directory or options (one line).
    """
    from tfqkd.training.distribute import enable_determinism, make_strategy

    if args.resume is not None:
        config, run_dir, stored = _resumed(args, recipe)
        deterministic = bool(args.deterministic or stored.get("deterministic"))
        strategy = args.strategy or stored.get("strategy") or "default"
        teacher_model, student_model = stored.get("teacher_model"), stored.get("student_model")
        unsafe = bool(args.unsafe or stored.get("unsafe"))
    else:
        config = resolve_config(args)
        run_dir = resolve_run_dir(args, recipe, config)
        deterministic, strategy = bool(args.deterministic), args.strategy or "default"
        teacher_model, student_model, unsafe = args.teacher_model, args.student_model, bool(args.unsafe)
    absolute = lambda path: None if path is None else str(Path(path).resolve())  # noqa: E731 - two uses
    runtime = {
        "recipe": recipe, "deterministic": deterministic, "strategy": strategy,
        "teacher_model": absolute(teacher_model), "student_model": absolute(student_model), "unsafe": unsafe,
    }  # fmt: skip
    if deterministic:
        enable_determinism(config["seed"])
    return RecipeStart(
        config=config, run_dir=run_dir, resume=args.resume is not None, strategy=make_strategy(strategy),
        runtime=runtime, teacher_model=teacher_model, student_model=student_model, unsafe=unsafe,
    )  # fmt: skip
