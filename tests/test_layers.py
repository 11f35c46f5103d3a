"""The layer map of docs/architecture.md holds for the code (issue 21).

Every import of a ``bundle`` module by another -- at the top, inside a function, relative or absolute -- is read
from the source with ``ast``. The test fails when a module is missing from the map (or the map names a module that
is gone), when an import points to a higher layer than the importer's, when the imports form a circle, or when the
map's "imports" column no longer says what the module imports.
"""

import ast
import re

import pytest

from conftest import REPO

TIERS = ("core", "model", "data", "objectives", "training", "evaluation", "serving")


def module_files() -> dict[str, tuple]:
    """``bundle.x.y`` -> (path, is a package's ``__init__``) for every module under bundle/."""
    out = {}
    for path in sorted((REPO / "bundle").rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if package else parts)] = (path, package)
    return out


def imported_modules(name: str, path, package: bool, modules) -> set[str]:
    """The bundle modules ``name`` imports anywhere in its source (``from bundle.x import y`` counts as bundle.x.y
    when that is a module, else bundle.x)."""

    def owner(dotted: str) -> str | None:
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {owner(a.name) for a in node.names if a.name.split(".")[0] == "bundle"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importer's package
                anchor = name if package else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = anchor + ("." + base if base else "")
            if base.split(".")[0] != "bundle":
                continue
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else owner(base) for a in node.names}
    return found - {name, None}


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imported_modules(name, path, package, modules) for name, (path, package) in modules.items()}


def layer_map() -> dict[str, tuple[int, set[str]]]:
    """docs/architecture.md's "Layer map" rows: ``bundle.x`` -> (layer, the modules its imports column names)."""
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = text.split("\n## Layer map\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\| `(bundle/[\w/]+\.py)` \| (\d) (\w+) \| (.*) \|$", line)
        if not m:
            continue
        path, layer, tier, imports = m.groups()
        assert TIERS[int(layer)] == tier, line
        parts = path[:-3].split("/")
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        assert name not in rows, f"{name} is listed twice in the layer map"
        named = set() if imports.strip() == "-" else {
            "bundle" if t == "bundle" else f"bundle.{t}" for t in re.findall(r"`([\w.]+)`", imports)}
        rows[name] = (int(layer), named)
    return rows


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_every_module_is_on_the_map_and_the_map_says_what_it_imports(graph):
    rows = layer_map()
    assert sorted(set(graph) - set(rows)) == [], "modules missing from docs/architecture.md's layer map"
    assert sorted(set(rows) - set(graph)) == [], "the layer map names modules that do not exist"
    stale = {m: (sorted(graph[m]), sorted(rows[m][1])) for m in graph if graph[m] != rows[m][1]}
    assert stale == {}, "the layer map's imports column is out of date: (imports, map)"


def test_no_import_points_up_the_map(graph):
    rows = layer_map()
    upward = sorted((m, rows[m][0], t, rows[t][0]) for m in graph for t in graph[m] if rows[t][0] > rows[m][0])
    assert upward == [], "imports that point to a higher layer: (module, layer, imported, its layer)"


def test_the_imports_form_no_circle(graph):
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m, path):
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                pytest.fail("import circle: " + " -> ".join(path[path.index(t):] + [t]))
            if t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_the_reader_sees_imports_inside_functions_and_relative_ones(tmp_path):
    """The reader itself: a function-local import and a package's relative import are edges."""
    modules = {"bundle.a": None, "bundle.b": None, "bundle.p": None, "bundle.p.q": None}
    src = tmp_path / "a.py"
    src.write_text("def f():\n    from bundle.b import thing\n", encoding="utf-8")
    assert imported_modules("bundle.a", src, False, modules) == {"bundle.b"}
    init = tmp_path / "__init__.py"
    init.write_text("from .q import x\nfrom . import q\n", encoding="utf-8")
    assert imported_modules("bundle.p", init, True, modules) == {"bundle.p.q"}
