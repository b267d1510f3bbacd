"""Writing files so that they are never half-written.

Everything a run leaves behind (configs, results, models, charts, exported
files) is written to a hidden temporary file in the destination directory
and renamed over the destination once complete: a crash or a failed export
leaves either the previous file or nothing, never a truncated one.
The temporary name keeps the destination's suffix (``.name.tmp.h5``) because
Keras and matplotlib choose the format from it.
"""

import contextlib
import csv
import io
import os
import tempfile
from pathlib import Path

from tfqkd.errors import TfqkdError

__all__ = ["ensure_directory", "replacing", "temporary_name", "write_bytes", "write_csv", "write_text"]


def temporary_name(path):
    """The hidden temporary file a write of ``path`` goes through (``.stem.tmp.suffix``)."""
    path = Path(path)
    return path.with_name(f".{path.stem}.tmp{path.suffix}")


@contextlib.contextmanager
def replacing(path, fsync=False):
    """Yields a temporary path to write; renames it over ``path`` if the block succeeds.

    Args:
      path: the destination; its directory is created if needed.
      fsync: flush the file to disk before the rename (for files a resumed
        run must be able to trust after a power cut or SIGKILL).

    Yields:
      the temporary ``Path`` to write to. It is removed if the block raises.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as raw:
                os.fsync(raw.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path, data, *, force=True):
    """Writes ``data`` (bytes) to ``path`` atomically; returns the ``Path``.

    Args:
      path: the file.
      data: bytes.
      force: replace an existing file; False refuses with a one-line :class:`~tfqkd.errors.TfqkdError`.
    """
    if not force and Path(path).exists():
        raise TfqkdError(f"{path} exists; pass --force (force=True) to overwrite it")
    with replacing(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path, text):
    """Writes ``text`` to ``path`` atomically; returns the ``Path``."""
    with replacing(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_csv(path, rows, fieldnames=None):
    """Writes dict ``rows`` as CSV atomically; returns the ``Path``.

    Args:
      path: the file.
      rows: dicts; a missing or None value is an empty cell, keys outside ``fieldnames`` are left out.
      fieldnames: the columns; None: every key of the rows, in the order first seen.
    """
    if fieldnames is None:
        fieldnames = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=fieldnames, extrasaction="ignore")
    writer.writeheader()
    writer.writerows({key: ("" if row.get(key) is None else row.get(key)) for key in fieldnames} for row in rows)
    with replacing(path) as tmp:
        with open(tmp, "w", newline="") as handle:
            handle.write(buffer.getvalue())
    return Path(path)


def ensure_directory(path, what="output directory", keep=True):
    """Creates directory ``path`` and proves it writable, before any long work; one-line error if not.

    Permission bits do not tell (root passes every check and /proc refuses
    anyway), so this creates the directory and a probe file. When that
    fails, the directories it made are removed again and a
    :class:`~tfqkd.errors.TfqkdError` names the path and the reason.

    Args:
      path: the directory.
      what: how the error message names it ("run directory", "--out").
      keep: keep the directories made for the check (False: a validation step
        that must leave nothing behind; the writer creates them later).

    Returns:
      ``Path(path)``.
    """
    path = Path(path)
    missing = [part for part in (path, *path.parents) if not part.exists()]

    def remove_made():
        for part in missing:  # deepest first; only directories made here, and only if still empty
            with contextlib.suppress(OSError):
                part.rmdir()

    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        remove_made()
        raise TfqkdError(f"{what} {str(path)!r} cannot be written: {err.strerror or type(err).__name__}") from None
    if not keep:
        remove_made()
    return path
