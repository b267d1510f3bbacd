"""User-facing error type.

Every problem caused by user input (an unknown model, bits out of range, a
malformed recipe or policy, an unsafe model file) raises :class:`TfqkdError`.
It subclasses ``ValueError`` so library callers can catch the usual type; the
command line turns it into one line on stderr and exit code 2.
"""

__all__ = ["TfqkdError"]


class TfqkdError(ValueError):
    """A problem with user input, reported as one line naming the problem."""
