"""Which student of a recipe's run directory the commands read: one answer for export, bench and analyze.

A run directory keeps each finished stage as ``models/<stage>.h5``. The qkd
recipe also writes ``student_best.h5``: the quantized student it stands
behind, QKD unless a distillation phase left it worse than plain SS on the
training images (``tfqkd.recipes.qkd``).
"""

from pathlib import Path

__all__ = ["QUANTIZED_STUDENTS", "quantized_student"]

#: Quantized student stages, the one to use first.
QUANTIZED_STUDENTS = ("student_best", "student_qkd", "student_ss_ts", "student_ss", "student_cs", "student_ptq", "student_qat")


def quantized_student(run_dir):
    """The quantized student file of ``run_dir`` (``models/<stage>.h5``), or None."""
    for stem in QUANTIZED_STUDENTS:
        candidate = Path(run_dir) / "models" / f"{stem}.h5"
        if candidate.is_file():
            return candidate
    return None
