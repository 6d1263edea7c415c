"""The shape of the source tree: no import circle, no algorithm named outside its own file, no
module that does several things at once.

These read the source (``ast``), so they run in milliseconds and fail on the line that breaks
the rule.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "metarun"
MODULES = sorted(PACKAGE.rglob("*.py"))
ALGORITHMS = PACKAGE / "algorithms"
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The metarun modules ``path`` imports, at any depth of the file (inside functions too), as
    module names (``from metarun.x import y`` gives ``metarun.x.y`` when that is a module)."""
    known = {module_name(p) for p in MODULES}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name in known}


def graph() -> dict[str, set[str]]:
    """metarun's import graph; a package's ``__init__`` is its own node (it imports nothing here)."""
    return {module_name(path): imports(path) - {module_name(path)} for path in MODULES}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every circle found by a depth-first search (one per back edge)."""
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                found.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return found


def test_the_import_graph_of_src_has_no_circle():
    assert not cycles(graph()), cycles(graph())


def test_the_circle_check_can_fail():
    edges = graph()
    edges["metarun.tasks.types"] = edges["metarun.tasks.types"] | {"metarun.algorithms.gradient"}
    assert cycles(edges)
    assert "metarun.algorithms.vectorized" in graph()["metarun.algorithms.gradient"]  # the graph is real


def algorithm_classes() -> dict[str, Path]:
    """Every Algorithm subclass defined in an algorithm file, by name: what no other file may
    branch on (layers such as PerStepBatchNorm are modules, which the engine may know)."""
    defined = {}
    for path in ALGORITHMS.glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef):
                defined[node.name] = (path, {ast.unparse(base).split(".")[-1] for base in node.bases})
    algorithms = {"Algorithm"}
    while True:
        more = {name for name, (_, bases) in defined.items() if bases & algorithms} - algorithms
        if not more:
            break
        algorithms |= more
    return {name: defined[name][0] for name in algorithms if name in defined}


def branches_on_algorithm(source: str, names: set[str]) -> list[str]:
    """Lines that test an algorithm's type or name: ``type(algorithm)`` other than for its
    ``__name__`` in a message, ``isinstance(x, MAML)`` (any algorithm class), ``issubclass(...,
    ANIL)``, ``... is MetaSGD``, ``x in (MAML, ANIL)``, ``algorithm.__name__ == ...``."""
    lines = source.splitlines()
    found = []
    tree = ast.parse(source)
    named = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr == "__name__"}
    for node in ast.walk(tree):
        hit = False
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id == "type" and node.args and "algorithm" in ast.unparse(node.args[0]).lower():
                hit = id(node) not in named
            if node.func.id in ("isinstance", "issubclass") and len(node.args) == 2:
                hit = bool({n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)} & names)
        if isinstance(node, ast.Compare) and any(isinstance(op, ast.Is | ast.IsNot | ast.In | ast.NotIn)
                                                 for op in node.ops):
            hit = bool({n.id for n in ast.walk(node) if isinstance(n, ast.Name)} & names)
        if hit:
            found.append(lines[node.lineno - 1].strip())
    found += re.findall(r"^.*algorithm(?:\.__class__)?\.__name__\s*(?:==|!=|in)\s.*$", source, re.M)
    return found


def test_no_module_outside_an_algorithm_file_branches_on_an_algorithm():
    """The loop, the build, the batched engine, the commands and the base classes know the
    contract and the hooks, never which algorithm they run."""
    classes = algorithm_classes()
    contract = {"Algorithm", "GradientBasedAlgorithm", "MetricBasedAlgorithm"}
    offenders = {}
    for path in MODULES:
        own = {name for name, where in classes.items() if where == path}
        names = set(classes) - own - contract
        lines = branches_on_algorithm(path.read_text(), names)
        if lines:
            offenders[str(path.relative_to(SRC))] = lines
    assert not offenders, offenders


def test_the_branch_check_can_fail():
    names = set(algorithm_classes())
    assert branches_on_algorithm("if type(algorithm) not in (MAML, ANIL):\n    pass\n", names)
    assert branches_on_algorithm("x = isinstance(algo, (MetaSGD, nn.Module))\n", names)
    assert branches_on_algorithm("if algorithm.learnable is ANIL:\n    pass\n", names)
    assert branches_on_algorithm("if type(algorithm) is not GradientBasedAlgorithm:\n    pass\n", names)
    assert not branches_on_algorithm("if isinstance(module, nn.Conv2d):\n    pass\n", names)
    assert not branches_on_algorithm("log.info('%s', type(algorithm).__name__)\n", names)


def test_no_file_above_500_lines_unless_it_says_it_is_one_thing():
    """A long module states in its docstring what the one thing is (``One thing: ...``)."""
    long = {}
    for path in MODULES:
        text = path.read_text()
        if text.count("\n") > MAX_LINES and "One thing:" not in (ast.get_docstring(ast.parse(text)) or ""):
            long[str(path.relative_to(SRC))] = text.count("\n")
    assert not long, long


def test_the_batched_engine_imports_no_algorithm():
    """vectorized.py knows modules (PerStepBatchNorm is a layer) and objectives, and reads an
    algorithm only through the gradient family's hooks."""
    algorithm_modules = {module_name(path) for path in algorithm_classes().values()}
    imported = graph()["metarun.algorithms.vectorized"]
    assert not imported & algorithm_modules, imported & algorithm_modules
    assert "metarun.algorithms.maml_plus_plus" in imported  # the check sees the engine's imports


def test_the_readme_layout_lists_every_module():
    """README.md's "Layout" block has a line for every module under src/metarun/, by its path."""
    readme = (SRC.parent / "README.md").read_text()
    block = readme[readme.index("## Layout"):]
    block = block[block.index("```"):]
    block = block[:block.index("```", 3)]
    listed = {line.split()[0] for line in block.splitlines() if line.startswith("  ") and line.split()}
    missing = sorted(str(path.relative_to(PACKAGE)) for path in MODULES)
    missing = [name for name in missing if name not in listed]
    assert not missing, f"modules missing from README.md's Layout: {missing}"
