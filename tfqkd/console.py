"""What every command-line entry point shares: one-line usage errors, quiet known noise, exit codes.

Used by ``tfqkd`` (:mod:`tfqkd.cli`) and by each recipe's ``python -m tfqkd.recipes.NAME``.
"""

import argparse
import sys

__all__ = ["ArgumentParser", "quiet_known_noise", "run_cli"]


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {' '.join(str(message).split())}\n")


def quiet_known_noise():
    """Silences warnings the command line cannot act on (library callers keep them).

    QKeras serializes quantizers through ``keras.constraints.serialize`` (a
    UserWarning per layer), tf_keras warns on every HDF5 save, the TFLite
    converter warns about input statistics the exporter sets itself, and
    TensorFlow logs a WARNING when a saved model is reloaded without metrics.
    """
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=r".*keras\.constraints\.serialize\(\).*")
    warnings.filterwarnings("ignore", message=r".*saving your model as an HDF5 file.*")
    # The TFLite converter's note when the exporter supplies the input ranges itself.
    warnings.filterwarnings("ignore", message=r"Statistics for quantized inputs were expected.*")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)


def run_cli(fn, prog="tfqkd"):
    """Runs ``fn()`` turning user errors into one line and exit code 2.

    Args:
      fn: zero-argument callable doing the work; returns an exit code or None.
      prog: program name for the error prefix.

    Returns:
      the process exit code.
    """
    from tfqkd.errors import TfqkdError

    quiet_known_noise()
    try:
        return fn() or 0
    except TfqkdError as err:
        message = " ".join(str(err).splitlines()) or type(err).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
