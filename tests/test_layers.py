"""The package's layers: data flows one way, so its import graph has no cycle.

Back-references are allowed only under `if TYPE_CHECKING:` (types for the checker, nothing
at run time); imports inside functions (kept lazy for start-up time) count like any other.
`model` is the leaf every layer hands data through; Jinja2 is imported only by the two
modules that render real templates.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "agent" / "bootsecrets"
#: The package's modules, and its subpackages (errors, connect) each as one node.
MODULES = sorted(
    {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    | {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
)


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and (
        (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
        or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING")
    )


def _imports(tree: ast.AST) -> list[tuple[ast.stmt, str]]:
    """(statement, module) for every import that runs, TYPE_CHECKING blocks left out."""
    found: list[tuple[ast.stmt, str]] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if _type_checking_only(node):
            continue
        if isinstance(node, ast.Import):
            found.extend((node, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "bootsecrets":
                found.extend((node, f"bootsecrets.{a.name}") for a in node.names)
            else:
                found.append((node, node.module))
        stack.extend(ast.iter_child_nodes(node))
    return found


def _tree(module: str) -> ast.Module:
    """A module's syntax tree; a subpackage's files all in one."""
    files = (
        sorted((PACKAGE / module).glob("*.py"))
        if (PACKAGE / module).is_dir()
        else [PACKAGE / f"{module}.py"]
    )
    body: list[ast.stmt] = []
    for path in files:
        body.extend(ast.parse(path.read_text(), filename=str(path)).body)
    return ast.Module(body=body, type_ignores=[])


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module in MODULES:
        graph[module] = {
            name.split(".")[1]
            for _stmt, name in _imports(_tree(module))
            if name.startswith("bootsecrets.") and name.split(".")[1] in MODULES
        } - {module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for dependency in sorted(graph[module]):
            if state.get(dependency) == "open":
                return [*path[path.index(dependency) :], dependency]
            if dependency not in state:
                cycle = visit(dependency)
                if cycle:
                    return cycle
        state[module] = "done"
        path.pop()
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module)
            if cycle:
                return cycle
    return None


def test_the_import_graph_has_no_cycle() -> None:
    cycle = find_cycle(package_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_model_and_errors_are_leaves() -> None:
    graph = package_graph()
    assert graph["model"] == set()
    assert graph["errors"] == set()


def test_the_data_flows_one_way() -> None:
    graph = package_graph()
    assert "serviceconfig" in graph["config"]
    assert {"templates", "model"} <= graph["serviceconfig"]
    assert {"serviceconfig", "envfile", "model", "templates"} <= graph["render"]
    assert graph["templates"] == {"errors", "jinja", "model"}
    assert graph["jinja"] == {"bounds", "errors", "model"}
    assert graph["bounds"] == set()
    for layer in ("config", "serviceconfig", "templates", "jinja", "bounds", "envfile", "model"):
        assert not graph[layer] & {"render", "agent", "store", "vault", "status", "cli"}


def test_the_config_imports_template_analysis_at_the_top() -> None:
    def top_level(module: str) -> set[str | None]:
        return {stmt.module for stmt in _tree(module).body if isinstance(stmt, ast.ImportFrom)}

    assert "bootsecrets.serviceconfig" in top_level("config")
    assert "bootsecrets.templates" in top_level("serviceconfig")


def test_only_the_template_modules_import_jinja2() -> None:
    importers = {
        m for m in MODULES if any(name.split(".")[0] == "jinja2" for _s, name in _imports(_tree(m)))
    }
    assert importers == {"jinja", "bounds"}


@pytest.mark.parametrize("module", MODULES)
def test_every_module_imports_on_its_own(module: str) -> None:
    """Imported first in a fresh interpreter: a cycle held together by import order would
    fail here."""
    code = (
        f"import sys, bootsecrets.{module}; print(sorted(m for m in sys.modules "
        "if m.split('.')[0] == 'jinja2')[:1])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == ("['jinja2']" if module in ("jinja", "bounds") else "[]")


# --- the drawing in docs/architecture.md ------------------------------------------------------

DOC = PACKAGE.parents[1] / "docs" / "architecture.md"
BEGIN = "<!-- import floors: written by `python tests/test_layers.py --write` -->"
END = "<!-- end of import floors -->"


def floors(graph: dict[str, set[str]]) -> dict[int, list[str]]:
    """Each module on the floor above everything it imports (leaves on floor 0)."""
    floor: dict[str, int] = {}

    def of(module: str) -> int:
        if module not in floor:
            floor[module] = 1 + max((of(d) for d in graph[module]), default=-1)
        return floor[module]

    found: dict[int, list[str]] = {}
    for module in sorted(graph):
        found.setdefault(of(module), []).append(module)
    return found


def drawing(graph: dict[str, set[str]]) -> str:
    lines = ["```"]
    for number, modules in sorted(floors(graph).items(), reverse=True):
        text = ", ".join(modules)
        while len(text) > 86:
            cut = text.rindex(", ", 0, 86)
            lines.append(
                f"floor {number:>2}: {text[: cut + 1]}"
                if not lines[-1].startswith(f"floor {number:>2}")
                else f"          {text[: cut + 1]}"
            )
            text = text[cut + 2 :]
        prefix = (
            f"floor {number:>2}: "
            if not lines[-1].startswith(f"floor {number:>2}")
            else "          "
        )
        lines.append(prefix + text)
    lines.append("```")
    return "\n".join(lines)


def documented() -> str:
    text = DOC.read_text()
    return text[text.index(BEGIN) + len(BEGIN) : text.index(END)].strip()


def test_the_architecture_doc_draws_the_import_graph_as_it_is() -> None:
    assert documented() == drawing(package_graph()), (
        "docs/architecture.md's import floors are stale: run `python tests/test_layers.py --write`"
    )


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        text = DOC.read_text()
        start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
        DOC.write_text(f"{text[:start]}\n{drawing(package_graph())}\n{text[end:]}")
    else:
        print(drawing(package_graph()))
