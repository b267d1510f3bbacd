"""The package's import structure (issue 15): no import cycles, no module importing a layer above it.

The graph is read from the source (``ast``), not from ``sys.modules``: an edge ``a -> b`` is an
``import`` / ``from ... import`` in module ``a`` that names module ``b`` of tfqkd
(``from tfqkd.x import y`` names ``tfqkd.x.y`` when that is a module, else ``tfqkd.x``). Imports
at module level (including class bodies and ``try`` / ``if`` blocks) run when the module is
imported; imports inside functions run when the function does, and are counted separately.
"""

import ast
import importlib
import sys
import warnings
from pathlib import Path

import pytest

import tfqkd

ROOT = Path(tfqkd.__file__).parent

#: Layers that sit below the exporters and tools: they never import what is above them.
LOWER = ("tfqkd.models", "tfqkd.quant", "tfqkd.distill", "tfqkd.training", "tfqkd.data", "tfqkd.dpu")
UPPER = ("tfqkd.export", "tfqkd.bench", "tfqkd.analysis", "tfqkd.recipes", "tfqkd.cli")

#: Old homes of moved modules, kept as DeprecationWarning aliases: ``alias -> (new home, a name)``.
ALIASES = {
    "tfqkd.quant.dpu": ("tfqkd.dpu", "quantize_for_dpu"),
    "tfqkd.export.dpu.graph": ("tfqkd.dpu.graph", "graph_from_dpu_model"),
    "tfqkd.export.dpu.positions": ("tfqkd.dpu.positions", "solve_positions"),
    "tfqkd.export.dpu.compat": ("tfqkd.dpu.compat", "check_model"),
    "tfqkd.export.dpu.emulator": ("tfqkd.dpu.emulator", "DPUEmulator"),
    "tfqkd.bench.dpu_model": ("tfqkd.dpu.performance", "estimate"),
}


#: Packages whose code imports no tfqkd module inside a function.
NO_FUNCTION_LEVEL_IMPORTS = ("tfqkd.dpu", "tfqkd.quant", "tfqkd.export.dpu")


def _modules():
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            modules[".".join(parts[:-1])] = (path, True)
        else:
            modules[".".join(parts)] = (path, False)
    return modules


MODULES = _modules()


class _Imports(ast.NodeVisitor):
    """Collects ``(target module, inside a function, line)`` of one module's tfqkd imports."""

    def __init__(self, name, is_package):
        self.package = name.split(".") if is_package else name.split(".")[:-1]
        self.found = []
        self._depth = 0

    def _function(self, node):
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_If(self, node):
        if isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            return  # never runs
        self.generic_visit(node)

    def _add(self, target, node):
        if target in MODULES:
            self.found.append((target, self._depth > 0, node.lineno))

    def visit_Import(self, node):
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node):
        base = node.module or ""
        if node.level:
            package = self.package[: len(self.package) - (node.level - 1)]
            base = ".".join(package + ([base] if base else []))
        for alias in node.names:
            candidate = f"{base}.{alias.name}"
            self._add(candidate if candidate in MODULES else base, node)


def _imports():
    table = {}
    for name, (path, is_package) in MODULES.items():
        visitor = _Imports(name, is_package)
        visitor.visit(ast.parse(path.read_text(), str(path)))
        table[name] = [item for item in visitor.found if item[0] != name]
    return table


IMPORTS = _imports()


def _graph(inside_functions):
    return {name: {t for t, local, _ in found if inside_functions or not local} for name, found in IMPORTS.items()}


def _cycles(graph):
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []
    counter = 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(component)
    return components


def _within(name, packages):
    return any(name == p or name.startswith(p + ".") for p in packages)


def test_the_walk_sees_the_package():
    assert {"tfqkd", "tfqkd.quant.transform", "tfqkd.dpu.transform", "tfqkd.export.dpu"} <= set(MODULES)
    assert {"tfqkd.quant.layers", "tfqkd.graph"} <= _graph(False)["tfqkd.dpu.transform"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_no_import_cycle_at_module_level():
    assert _cycles(_graph(inside_functions=False)) == []


def test_no_cycle_through_imports_inside_functions_either():
    assert _cycles(_graph(inside_functions=True)) == []


def test_lower_layers_do_not_import_upper_layers():
    """models/quant/distill/training/data/dpu never import export, bench, analysis, recipes or cli;
    quant does not import the DPU, which builds on it (it reaches it through the target registry)."""
    offending = []
    for name, found in IMPORTS.items():
        if name in ALIASES:
            continue
        for target, local, line in found:
            where = f"{name}:{line} -> {target}{' (inside a function)' if local else ''}"
            if _within(name, LOWER) and _within(target, UPPER):
                offending.append(where)
            if _within(name, ("tfqkd.quant",)) and _within(target, ("tfqkd.dpu",)):
                offending.append(where)
    assert offending == []


def test_shared_plumbing_sits_below_every_package():
    """The top-level helper modules (graph, atomic, errors, compat, console) import no package of tfqkd."""
    plumbing = ("tfqkd.graph", "tfqkd.atomic", "tfqkd.errors", "tfqkd.compat", "tfqkd.console")
    packages = (*LOWER, *UPPER)
    offending = [
        f"{name}:{line} -> {target}"
        for name in plumbing
        for target, _, line in IMPORTS[name]
        if _within(target, packages)
    ]
    assert offending == []


def test_only_the_command_line_imports_the_command_line():
    """Recipes and the subcommands' modules share :mod:`tfqkd.console`; ``tfqkd.cli`` sits on top of them."""
    offending = [
        f"{name}:{line} -> {target}"
        for name, found in IMPORTS.items()
        for target, _, line in found
        if target == "tfqkd.cli" and name != "tfqkd.cli"
    ]
    assert offending == []


def test_no_imports_inside_functions_in_the_dpu_and_quant_packages():
    local = [
        f"{name}:{line} -> {target}"
        for name, found in IMPORTS.items()
        if _within(name, NO_FUNCTION_LEVEL_IMPORTS)
        for target, is_local, line in found
        if is_local
    ]
    assert local == []


def test_nothing_in_the_package_uses_a_deprecated_alias():
    users = [f"{name} -> {t}" for name, found in IMPORTS.items() for t, _, _ in found if t in ALIASES and name not in ALIASES]
    assert users == []


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_old_import_paths_still_work_and_warn(alias):
    home, name = ALIASES[alias]
    sys.modules.pop(alias, None)
    with pytest.warns(DeprecationWarning, match=f"{alias} moved to {home}"):
        module = importlib.import_module(alias)
    assert getattr(module, name) is getattr(importlib.import_module(home), name)


def test_names_moved_out_of_export_dpu_still_resolve_with_a_warning():
    import tfqkd.dpu
    import tfqkd.export.dpu

    with pytest.warns(DeprecationWarning, match="tfqkd.export.dpu.check_model moved to tfqkd.dpu.check_model"):
        assert tfqkd.export.dpu.check_model is tfqkd.dpu.check_model
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tfqkd.export.dpu.to_dpu is tfqkd.export.to_dpu
    with pytest.raises(AttributeError):
        tfqkd.export.dpu.no_such_name  # noqa: B018
