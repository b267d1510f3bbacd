"""Every figure the README quotes next to a results file is in that file."""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# A results file named in a paragraph, and a decimal figure quoted as a percentage or a ratio
# ("97.5%", "0.268x"). Figures of a range ("1.4-1.7x") are derived, not read, and are skipped.
_CITED = re.compile(r"benchmarks/results/([\w.-]+\.json)")
_FIGURE = re.compile(r"(?<![\d.\-])(\d+\.\d+)(%|x\b)")


def _paragraphs(text):
    """README paragraphs and list items (a bullet's continuation lines belong to it)."""
    blocks, current = [], []
    for line in text.splitlines():
        starts_item = line.lstrip().startswith(("- ", "* ", "| "))
        if not line.strip() or starts_item:
            if current:
                blocks.append(" ".join(current))
            current = [line.strip()] if line.strip() else []
        else:
            current.append(line.strip())
    if current:
        blocks.append(" ".join(current))
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
        files = _CITED.findall(block)
        if not files:
            continue
        values = []
        for name in files:
            path = ROOT / "benchmarks" / "results" / name
            assert path.is_file(), f"README cites {name}, which is not committed"
            values += list(_numbers(json.loads(path.read_text())))
        for figure, _ in _FIGURE.findall(block):
            checked += 1
            if not _matches(figure, values):
                missing.append(f"{figure} (cites {', '.join(files)})")
    assert checked >= 5, "the README quotes fewer figures than expected; is the parser still right?"
    assert missing == [], missing
