"""Every figure the README quotes next to a results file is in that file."""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# A results file named in a paragraph, and a decimal figure quoted as a percentage or a ratio
# ("97.5%", "0.268x"). Figures of a range ("1.4-1.7x") are derived, not read, and are skipped.
_CITED = re.compile(r"(?:benchmarks/results/)?([\w.-]+\.json)")
RESULTS = ROOT / "benchmarks" / "results"
_FIGURE = re.compile(r"(?<![\d.\-])(\d+\.\d+)(%|x\b)")


def _paragraphs(text):
    """README paragraphs and list items (a bullet's continuation lines belong to it).

    A table row is a block of its own with the paragraph before the table appended: that
    paragraph names the file the table's figures come from.
    """
    blocks, current, previous = [], [], ""

    def flush():
        nonlocal current, previous
        if current:
            previous = " ".join(current)
            blocks.append(previous)
        current = []

    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("|"):
            flush()
            blocks.append(f"{stripped} {previous}")
        elif not stripped:
            flush()
        elif stripped.startswith(("- ", "* ")):
            flush()
            current = [stripped]
        else:
            current.append(stripped)
    flush()
    return blocks


def _numbers(node):
    if isinstance(node, bool):
        return
    if isinstance(node, (int, float)):
        yield float(node)
    elif isinstance(node, dict):
        for value in node.values():
            yield from _numbers(value)
    elif isinstance(node, list):
        for value in node:
            yield from _numbers(value)


def _matches(figure, values):
    decimals = len(figure.split(".")[1])
    target = float(figure)
    return any(round(v, decimals) == target or round(100 * v, decimals) == target for v in values)


def test_readme_figures_next_to_a_results_file_are_in_it():
    text = (ROOT / "README.md").read_text()
    checked, missing = 0, []
    for block in _paragraphs(text):
        named = _CITED.findall(block)
        for name in named:
            if f"benchmarks/results/{name}" in block:
                assert (RESULTS / name).is_file(), f"README cites benchmarks/results/{name}, which is not committed"
        files = sorted({name for name in named if (RESULTS / name).is_file()})
        if not files:
            continue
        values = []
        for name in files:
            values += list(_numbers(json.loads((RESULTS / name).read_text())))
        for figure, _ in _FIGURE.findall(block):
            checked += 1
            if not _matches(figure, values):
                missing.append(f"{figure} (cites {', '.join(files)})")
    assert checked >= 5, "the README quotes fewer figures than expected; is the parser still right?"
    assert missing == [], missing
