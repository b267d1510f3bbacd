"""Atomic per-epoch checkpoints of a training stage, and restoring them to resume.

A stage checkpoint is everything a stage needs to continue bit-identically
after its last finished epoch:

* the weights of both networks (student, and teacher when there is one),
  trainable and not (batch-norm statistics, quantizer ranges);
* the state of both optimizers: momentum slots and the ``iterations``
  counter, which drives the learning-rate schedule (warmup, milestones);
* the stage name, the QKD phase and the number of finished epochs;
* the random state: Python's and NumPy's global generators, TensorFlow's
  global ``tf.random.Generator`` and the generators of random layers
  (Dropout) when Keras runs them on ``tf.random.Generator``.

The data order is not stored: :func:`tfqkd.data.load` with ``initial_epoch``
derives each epoch's order from ``(seed, epoch)``.

Each checkpoint is an HDF5 file ``epoch_NNN.weights.h5`` (NNN = finished
epochs) holding numeric datasets only, with names and metadata as
attributes. It is written to a temporary file in the same directory, flushed
to disk and renamed over the final name, so a reader (or a process killed at
any moment) sees either the previous complete set of files or the new
complete file, never a half-written one::

    callback = EpochCheckpoint(run_dir / "stages" / "ss" / "checkpoints", stage="ss", phase="ss")
    model.fit(..., callbacks=[guard, guard.protect(callback)])
    ...
    state = latest_checkpoint(directory)          # after a crash
    restore(model, state)                         # model compiled, same architecture
    model.fit(..., initial_epoch=state.epoch)
"""

import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from tfqkd.compat import keras, tf
from tfqkd.errors import TfqkdError

__all__ = [
    "FORMAT",
    "CheckpointState",
    "EpochCheckpoint",
    "capture",
    "checkpoint_path",
    "clean_temporary",
    "latest_checkpoint",
    "list_checkpoints",
    "read_checkpoint",
    "restore",
    "write_checkpoint",
]

#: Value of the ``format`` attribute; refuses HDF5 files of other origin.
FORMAT = "tfqkd-stage-checkpoint"
_VERSION = 1
_NAME = re.compile(r"^epoch_(\d+)\.weights\.h5$")
_OPTIMIZERS = ("optimizer", "teacher_optimizer")


@dataclass
class CheckpointState:
    """The contents of one stage checkpoint.

    Attributes:
      epoch: number of finished epochs (``fit(initial_epoch=epoch)`` continues).
      stage: stage name (``ss``, ``cs``, ``qkd_ts``, ...).
      phase: QKD phase (``ss``, ``cs``, ``ts``).
      networks: ``{"student"|"teacher"|"model": [(name, array), ...]}`` in ``model.weights`` order.
      optimizers: ``{"optimizer"|"teacher_optimizer": [(name, array), ...]}``.
      rng: ``{key: array}`` of random-generator states.
      path: the file it was read from (None when captured in memory).
    """

    epoch: int
    stage: str
    phase: str
    networks: dict = field(default_factory=dict)
    optimizers: dict = field(default_factory=dict)
    rng: dict = field(default_factory=dict)
    path: Path = None


def checkpoint_path(directory, epoch):
    """The file of the checkpoint after ``epoch`` finished epochs."""
    return Path(directory) / f"epoch_{int(epoch):03d}.weights.h5"


# Capture ------------------------------------------------------------------------------------


def _networks(model):
    """The networks a checkpoint holds: QKD's student and teacher, or the model itself."""
    if hasattr(model, "student"):
        found = {"student": model.student}
        if getattr(model, "teacher", None) is not None:
            found["teacher"] = model.teacher
        return found
    return {"model": model}


def _optimizer_variables(optimizer):
    variables = optimizer.variables
    return list(variables() if callable(variables) else variables)


def _named(variables):
    return [(v.name, np.array(v.numpy())) for v in variables]


def _layer_generators(networks):
    """``{key: tf.random.Generator}`` of random layers using TF2 generators (stateful RNG mode)."""
    found = {}
    for role, network in networks.items():
        # Keyed by position among the network's layers, not by name: a model
        # rebuilt in another process may be named "dropout_3" instead of "dropout".
        layers = [m for m in network.submodules if isinstance(m, keras.layers.Layer)]
        for position, layer in enumerate(layers):
            generator = getattr(getattr(layer, "_random_generator", None), "_generator", None)
            if isinstance(generator, tf.random.Generator):
                found[f"layer/{role}/{position:04d}"] = generator
    return found


def _global_generator():
    """TensorFlow's global ``tf.random.Generator``, or None where none may be created.

    With op determinism enabled TensorFlow refuses to create one implicitly
    (its seed would be nondeterministic); then no code used it and there is
    no state to keep.
    """
    try:
        return tf.random.get_global_generator()
    except RuntimeError:
        return None


def _python_state():
    version, internal, gauss = random.getstate()
    return np.array([version, *internal], dtype=np.int64), gauss


def capture(model, *, epoch, stage, phase):
    """The in-memory checkpoint of ``model`` after ``epoch`` finished epochs.

    Args:
      model: a :class:`tfqkd.QKD` (or any Keras model) with its optimizers.
      epoch: finished epochs.
      stage: stage name.
      phase: QKD phase.

    Returns:
      a :class:`CheckpointState`.
    """
    networks = _networks(model)
    state = CheckpointState(epoch=int(epoch), stage=str(stage), phase=str(phase))
    for role, network in networks.items():
        state.networks[role] = _named(network.weights)
    for attr in _OPTIMIZERS:
        optimizer = getattr(model, attr, None)
        # An optimizer that never stepped has no slots yet (Keras builds them at
        # the first step) and nothing to restore: a fresh one is identical.
        if optimizer is None or isinstance(optimizer, str):
            continue
        variables = _optimizer_variables(optimizer)
        if getattr(optimizer, "_built", False) or len(variables) > 1:
            state.optimizers[attr] = _named(variables)
    python_state, gauss = _python_state()
    state.rng["python"] = python_state
    # [has_gauss, value]: finite numbers only, no NaN standing for "none".
    state.rng["python_gauss"] = np.array([gauss is not None, gauss or 0.0], dtype=np.float64)
    np_state = np.random.get_state()
    state.rng["numpy_keys"] = np.asarray(np_state[1], dtype=np.uint32)
    state.rng["numpy_meta"] = np.array([np_state[2], np_state[3]], dtype=np.int64)
    state.rng["numpy_gauss"] = np.array([np_state[4]], dtype=np.float64)
    generator = _global_generator()
    if generator is not None:
        state.rng["tf_global"] = np.array(generator.state.numpy())
    for key, generator in _layer_generators(networks).items():
        state.rng[key] = np.array(generator.state.numpy())
    return state


# Files --------------------------------------------------------------------------------------


def _fsync_directory(directory):
    # The rename is durable only once the directory entry is on disk (POSIX).
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _write_arrays(group, entries):
    for i, (name, value) in enumerate(entries):
        dataset = group.create_dataset(f"{i:05d}", data=value)
        dataset.attrs["name"] = name


def write_checkpoint(path, state):
    """Writes ``state`` to ``path`` atomically (temporary file, fsync, rename).

    Args:
      path: the final file name.
      state: a :class:`CheckpointState`.

    Returns:
      the path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as handle:
            handle.attrs["format"] = FORMAT
            handle.attrs["version"] = _VERSION
            handle.attrs["epoch"] = state.epoch
            handle.attrs["stage"] = state.stage
            handle.attrs["phase"] = state.phase
            handle.attrs["networks"] = json.dumps(list(state.networks))
            handle.attrs["optimizers"] = json.dumps(list(state.optimizers))
            for role, entries in state.networks.items():
                _write_arrays(handle.create_group(f"networks/{role}"), entries)
            for attr, entries in state.optimizers.items():
                _write_arrays(handle.create_group(f"optimizers/{attr}"), entries)
            rng = handle.create_group("rng")
            for key, value in state.rng.items():
                rng.create_dataset(key, data=value)
            # Written last: a file without it was never finished (belt and braces
            # next to the rename, for filesystems without atomic rename).
            handle.attrs["complete"] = 1
        with open(tmp, "rb+") as raw:
            os.fsync(raw.fileno())
        os.replace(tmp, path)
        _fsync_directory(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _read_arrays(group):
    return [(str(group[key].attrs["name"]), np.array(group[key][()])) for key in sorted(group)]


def read_checkpoint(path):
    """Reads a checkpoint file written by :func:`write_checkpoint`.

    Args:
      path: the ``epoch_NNN.weights.h5`` file.

    Returns:
      a :class:`CheckpointState`.

    Raises:
      TfqkdError: missing, truncated, corrupt or foreign file.
    """
    path = Path(path)
    try:
        with h5py.File(path, "r") as handle:
            if handle.attrs.get("format") != FORMAT:
                raise TfqkdError(f"{path} is not a tfqkd stage checkpoint")
            if int(handle.attrs.get("complete", 0)) != 1:
                raise TfqkdError(f"checkpoint {path} is incomplete")
            if int(handle.attrs["version"]) > _VERSION:
                raise TfqkdError(f"checkpoint {path} was written by a newer tfqkd (format {handle.attrs['version']})")
            state = CheckpointState(
                epoch=int(handle.attrs["epoch"]), stage=str(handle.attrs["stage"]), phase=str(handle.attrs["phase"]),
                path=path,
            )  # fmt: skip
            for role in json.loads(handle.attrs["networks"]):
                state.networks[role] = _read_arrays(handle[f"networks/{role}"])
            for attr in json.loads(handle.attrs["optimizers"]):
                state.optimizers[attr] = _read_arrays(handle[f"optimizers/{attr}"])
            for key in handle["rng"]:
                group = handle["rng"][key]
                if isinstance(group, h5py.Group):  # "layer/<role>/<name>" nests groups
                    group.visititems(
                        lambda name, obj, prefix=key: state.rng.__setitem__(f"{prefix}/{name}", np.array(obj[()]))
                        if isinstance(obj, h5py.Dataset)
                        else None
                    )
                else:
                    state.rng[key] = np.array(group[()])
            return state
    except TfqkdError:
        raise
    except FileNotFoundError:
        raise TfqkdError(f"checkpoint {path} not found") from None
    except Exception as err:  # h5py raises OSError, KeyError, ValueError, ... for damaged files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TfqkdError(f"checkpoint {path} is unreadable: {first[:160]}") from None


def list_checkpoints(directory):
    """``[(epoch, path), ...]`` of the checkpoint files in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _NAME.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def clean_temporary(directory):
    """Removes temporary files a killed writer left behind; returns how many."""
    directory = Path(directory)
    removed = 0
    if directory.is_dir():
        for path in directory.glob(".epoch_*.weights.h5.tmp-*"):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def latest_checkpoint(directory, stage=None):
    """The newest readable checkpoint in ``directory``, or None.

    Args:
      directory: the stage's checkpoint directory.
      stage: if given, checkpoints of another stage name are an error.

    Returns:
      a :class:`CheckpointState` or None.

    Raises:
      TfqkdError: the newest file is unreadable (it never should be: files are
        renamed into place complete), or belongs to another stage.
    """
    checkpoints = list_checkpoints(directory)
    if not checkpoints:
        return None
    state = read_checkpoint(checkpoints[-1][1])
    if stage is not None and state.stage != stage:
        raise TfqkdError(f"{state.path} belongs to stage {state.stage!r}, not {stage!r}")
    return state


# Restore ------------------------------------------------------------------------------------


def _assign(variables, entries, what):
    if len(variables) != len(entries):
        raise TfqkdError(f"checkpoint {what} holds {len(entries)} arrays, the model has {len(variables)}")
    for variable, (name, value) in zip(variables, entries):
        if variable.name.endswith("_log_step:0") and not name.endswith("_log_step:0"):
            raise TfqkdError(
                f"checkpoint {what} holds {name}, a learned step as tfqkd 0.1 stored it; this version stores "
                "log-steps: start the stage over (run without --resume)"
            )
        if tuple(variable.shape) != value.shape:
            raise TfqkdError(f"checkpoint {what}: {name} has shape {value.shape}, the model's {variable.name} {tuple(variable.shape)}")
        variable.assign(value)


def _restore_optimizer(optimizer, network, entries, what):
    # Keras builds an optimizer's slots lazily at the first step, from the
    # network's trainable variables in order (iterations first, then one slot
    # per variable); building it the same way here gives the same list. The
    # match is by position: slot names carry the name scope and the layer
    # names of the process that wrote them ("dense_4"), which need not repeat.
    optimizer.build(network.trainable_variables)
    _assign(_optimizer_variables(optimizer), entries, f"{what} (optimizer)")


def restore(model, state):
    """Loads a checkpoint into ``model`` (weights, optimizers, random state).

    Args:
      model: the compiled model of the same stage (same architecture and optimizers).
      state: a :class:`CheckpointState`.

    Raises:
      TfqkdError: the checkpoint does not match the model.
    """
    where = state.path or f"of stage {state.stage}"
    networks = _networks(model)
    if set(networks) != set(state.networks):
        raise TfqkdError(f"checkpoint {where} holds networks {sorted(state.networks)}, the stage has {sorted(networks)}")
    for role, network in networks.items():
        _assign(network.weights, state.networks[role], f"{where} ({role})")
    owners = {"optimizer": networks.get("student", networks.get("model")), "teacher_optimizer": networks.get("teacher")}
    for attr, entries in state.optimizers.items():
        optimizer = getattr(model, attr, None)
        if optimizer is None or owners.get(attr) is None:
            raise TfqkdError(f"checkpoint {where} holds a {attr} the stage does not have")
        _restore_optimizer(optimizer, owners[attr], entries, where)
    rng = state.rng
    if "python" in rng:
        values = [int(v) for v in rng["python"]]
        has_gauss, gauss = (float(v) for v in rng["python_gauss"])
        random.setstate((values[0], tuple(values[1:]), gauss if has_gauss else None))
    if "numpy_keys" in rng:
        pos, has_gauss = (int(v) for v in rng["numpy_meta"])
        np.random.set_state(("MT19937", rng["numpy_keys"], pos, has_gauss, float(rng["numpy_gauss"][0])))
    if "tf_global" in rng and _global_generator() is not None:
        _global_generator().reset(rng["tf_global"])
    for key, generator in _layer_generators(networks).items():
        if key in rng:
            generator.reset(rng[key])


# Callback -----------------------------------------------------------------------------------


class EpochCheckpoint(keras.callbacks.Callback):
    """Writes a stage checkpoint atomically at the end of every epoch.

    Wrap it with :meth:`tfqkd.training.DivergenceGuard.protect` so a diverged
    epoch is never written.

    Args:
      directory: the stage's checkpoint directory.
      stage: stage name stored in the file.
      phase: QKD phase stored in the file.
      keep: how many of the newest checkpoints to keep (>= 1); older ones are
        deleted after a new one is in place, bounding disk use on long runs.
      write: False on non-chief workers of a multi-worker run: they take part
        in reading the (possibly all-reduced) variables but write nothing.
    """

    def __init__(self, directory, *, stage, phase, keep=2, write=True):
        super().__init__()
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise TfqkdError(f"keep must be an integer >= 1, got {keep!r}")
        self.directory = Path(directory)
        self.stage = stage
        self.phase = phase
        self.keep = keep
        self.write = write

    def on_epoch_end(self, epoch, logs=None):
        state = capture(self.model, epoch=epoch + 1, stage=self.stage, phase=self.phase)
        if not self.write:
            return
        write_checkpoint(checkpoint_path(self.directory, epoch + 1), state)
        for _, path in list_checkpoints(self.directory)[: -self.keep]:
            path.unlink(missing_ok=True)
