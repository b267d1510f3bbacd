"""Fused CPU kernels for quantized training, compiled from source with the system C++ compiler on first use.

Why: TensorFlow has no fused op for the learned-step (LSQ) quantizer; written with its ops it
takes about twelve passes over each activation tensor per training step, which made a tfqkd
QAT step cost more than tfmot's (whose FakeQuant ops are fused kernels). ``fake_quant.cc`` holds
the forward and the backward of each tfqkd quantizer scheme (learned step, affine, power of two),
one pass each, and a one-pass min/max for the running statistics (issue 16).

The library is built against the installed TensorFlow's headers (``tf.sysconfig``) with ``g++``
(or ``$CXX``), about 5 s, and cached under ``~/.cache/tfqkd/kernels`` (``$TFQKD_KERNEL_CACHE``)
by a hash of the source, the TensorFlow version and the flags. Without a compiler, or when the
build fails, tfqkd warns once and trains with TensorFlow's ops: the same forward bits and input
gradient, a step gradient summed in another order. ``TFQKD_FUSED_KERNELS=0`` turns them off.

Only training calls them (``training=True``): the inference graph, which the TFLite converter,
SavedModels and QKeras' tools read, keeps TensorFlow's own ops.
"""

import contextlib
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

from tfqkd.compat import tf

__all__ = ["fake_quant_ops", "tensorflow_ops_only"]

_SOURCE = Path(__file__).with_name("fake_quant.cc")
# Bit-exact with TensorFlow's ops: IEEE division and rounding, no fused multiply-add. Without
# trapping math the compiler may compute both sides of a select, so the loops vectorize.
_FLAGS = ["-shared", "-fPIC", "-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-w"]
# TensorFlow's x86 wheels require AVX themselves, so a library built with it runs wherever they do.
_X86_FLAGS = ["-mavx"]
_BUILD_SECONDS = 300

# The running statistics' min/max: no gradient flows through them. Registered by op name once,
# at import, whether or not the library ever loads.
tf.no_gradient("TfqkdRange")

_lock = threading.Lock()
_loaded = {}
_switched_off = threading.local()


def _cache_dir():
    if os.environ.get("TFQKD_KERNEL_CACHE"):
        return Path(os.environ["TFQKD_KERNEL_CACHE"])
    home_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tfqkd" / "kernels"
    try:
        home_cache.mkdir(parents=True, exist_ok=True)
        if os.access(home_cache, os.W_OK):
            return home_cache
    except OSError:
        pass
    # A read-only home (containers, CI sandboxes): this user's temporary directory instead.
    return Path(tempfile.gettempdir()) / f"tfqkd-kernels-{os.getuid() if hasattr(os, 'getuid') else 'user'}"


def _command(compiler, source, output):
    flags = list(_FLAGS)
    if platform.machine().lower() in ("x86_64", "amd64"):
        flags += _X86_FLAGS
    return [compiler, *flags, *tf.sysconfig.get_compile_flags(), str(source), "-o", str(output),
            *tf.sysconfig.get_link_flags()]  # fmt: skip


def _build(compiler, rebuild=False):
    """The path of the compiled library (built now unless cached); raises OSError/CalledProcessError/TimeoutExpired."""
    recipe = " ".join(_command(compiler, "SOURCE", "OUTPUT")) + tf.__version__ + platform.machine()
    digest = hashlib.sha256(_SOURCE.read_bytes() + recipe.encode()).hexdigest()[:16]
    library = _cache_dir() / f"{_SOURCE.stem}-{digest}.so"
    if library.exists() and not rebuild:
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    # Built beside its final name and renamed: a concurrent process never loads half a file.
    with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
        partial = Path(scratch) / library.name
        subprocess.run(_command(compiler, _SOURCE, partial), check=True, capture_output=True, text=True,
                       timeout=_BUILD_SECONDS)  # fmt: skip
        os.replace(partial, library)
    return library


def _load():
    if os.environ.get("TFQKD_FUSED_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        reason = f"no C++ compiler ({os.environ.get('CXX', 'g++')}) on PATH"
    else:
        try:
            try:
                ops = tf.load_op_library(str(_build(compiler)))
            except tf.errors.OpError:  # a cached file that does not load (damaged, other libc): built afresh once
                ops = tf.load_op_library(str(_build(compiler, rebuild=True)))
            return ops
        except subprocess.CalledProcessError as err:
            errors = [line for line in (err.stderr or "").splitlines() if "error" in line]
            reason = f"the build failed: {(errors or ['exit status ' + str(err.returncode)])[0].strip()[:200]}"
        except (OSError, subprocess.TimeoutExpired, tf.errors.OpError) as err:
            reason = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    warnings.warn(
        f"tfqkd: the fused quantizer kernels are unavailable ({reason}); quantized training uses "
        "TensorFlow's ops, which are slower. Install g++ (or set CXX) to build them; TFQKD_FUSED_KERNELS=0 silences this.",
        RuntimeWarning, stacklevel=3,
    )  # fmt: skip
    return None


@tf.autograph.experimental.do_not_convert  # called while Keras traces a layer; nothing here is graph code
def fake_quant_ops():
    """The loaded op library (``tfqkd_{learned_step,affine,pof2}_fake_quant``, their ``_grad``, ``tfqkd_range``), or None."""
    if getattr(_switched_off, "depth", 0):
        return None
    with _lock:
        if "fake_quant" not in _loaded:
            _loaded["fake_quant"] = _load()
        return _loaded["fake_quant"]


@contextlib.contextmanager
def tensorflow_ops_only():
    """Models traced inside train with TensorFlow's ops, as without the kernels (comparisons, benchmarks)."""
    _switched_off.depth = getattr(_switched_off, "depth", 0) + 1
    try:
        yield
    finally:
        _switched_off.depth -= 1
