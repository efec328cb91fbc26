"""The code's layout (issue 35): no import cycles, function-level imports counted, and no import from a lower layer
to a higher one; the front's functions stay short."""

import ast
import importlib.util
import pathlib


ROOT = pathlib.Path(__file__).resolve().parents[1]


def _graph_tool():
    spec = importlib.util.spec_from_file_location("importgraph", ROOT / "tools" / "importgraph.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_no_import_cycles_and_no_upward_imports():
    tool = _graph_tool()
    graph = tool.edges()
    assert len(graph) > 50 and "sparsedit.editors.runs" in graph["sparsedit.editors.loop"]
    assert tool.cycles(graph) == []
    assert tool.upward(graph) == []


def test_the_tool_sees_a_cycle_and_an_upward_import():
    tool = _graph_tool()
    graph = {"sparsedit.regions": {"sparsedit.spatial"}, "sparsedit.spatial": {"sparsedit.regions"}}
    assert tool.cycles(graph) == [["sparsedit.regions", "sparsedit.spatial"]]
    assert tool.upward(graph) == [("sparsedit.regions", "sparsedit.spatial")]


def test_front_functions_are_short():
    """No function of the editors package over 60 lines (docstrings included)."""
    long = []
    for f in (ROOT / "src" / "sparsedit" / "editors").glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{f.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert long == []
