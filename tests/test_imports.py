"""The package's layering (nern/cli.py's docstring): every module imports only its own layer or below, only
`__main__` imports the CLI, and no module imports another module's private (`_name`) functions; and its size
rule: no function over 60 lines, no class over 150 (docs/ARCHITECTURE.md, Conventions).

Read from the source with `ast`, so a function-level (lazy) import counts as much as a top-level one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nern"

LAYERS: dict[str, int] = {
    **dict.fromkeys(("__init__", "errors", "artifacts", "config"), 1),
    **dict.fromkeys(("models", "data", "layers", "embedding", "predictor", "reconstruct", "sampling", "losses", "chain",
                     "permutation", "feature_maps", "smoothness", "checkpoint", "evaluate", "measure", "tracking",
                     "journal", "plots", "codec", "nnc", "qat", "pruning", "table_format", "grid", "symmetry", "loop",
                     "optim"), 2),
    **dict.fromkeys(("fit_setup", "method", "predictor_file"), 3),
    **dict.fromkeys(("fit", "pretrain", "original_qat"), 4),
    **dict.fromkeys(("runs", "network_files"), 5),
    **dict.fromkeys(("compress", "importance"), 6),
    "tables": 7,
    "cli": 8,
    "__main__": 9,
}
MAX_FUNCTION_LINES = 60
MAX_CLASS_LINES = 150


def nern_imports(source: str) -> list[tuple[str, list[str], int]]:
    """(imported nern module, names taken from it, line) for every import statement in `source`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name.split(".")[1], [], node.lineno) for alias in node.names
                      if alias.name.startswith("nern.")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "nern":  # `from nern import fit, data`
                found += [(alias.name, [], node.lineno) for alias in node.names]
            elif node.module.startswith("nern."):
                found.append((node.module.split(".")[1], [alias.name for alias in node.names], node.lineno))
    return found


def violations(module: str, source: str) -> list[str]:
    """What `module` (a name in LAYERS) does against the layering, one line each."""
    problems = []
    for target, names, line in nern_imports(source):
        if target not in LAYERS:
            problems.append(f"{module}:{line} imports nern.{target}, which has no layer in LAYERS")
        elif target == "cli" and module != "__main__":
            problems.append(f"{module}:{line} imports nern.cli (only __main__ may)")
        elif LAYERS[target] > LAYERS[module]:
            problems.append(f"{module}:{line} imports nern.{target} from a higher layer "
                            f"({LAYERS[target]} > {LAYERS[module]})")
        problems += [f"{module}:{line} imports the private nern.{target}.{name}" for name in names
                     if name.startswith("_") and not name.startswith("__")]
    return problems


def test_every_module_has_a_layer():
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    assert modules - set(LAYERS) == set(), "place each new module in LAYERS (and nern/cli.py's docstring)"
    assert set(LAYERS) - modules == set(), "LAYERS names a module that no longer exists"


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*.py")), ids=lambda p: p.stem)
def test_imports_point_down_the_layers(path):
    assert violations(path.stem, path.read_text()) == []


@pytest.mark.parametrize("source, needle", [
    ("from nern.compress import run_compress", "higher layer"),
    ("def f():\n    from nern.tables import to_markdown", "higher layer"),
    ("from nern import importance", "higher layer"),
    ("import nern.cli", "nern.cli"),
    ("from nern.plots import _pyplot", "private"),
    ("from nern.nowhere import x", "no layer"),
])
def test_the_check_catches_upward_cli_and_private_imports(source, needle):
    """The checker itself: each of these in a method module (layer 2) is a violation."""
    found = violations("codec", source)
    assert len(found) == 1 and needle in found[0], found


def test_allowed_imports_pass_the_check():
    source = "from nern.errors import NernError\nfrom nern import config\nimport nern.models\nimport numpy\n"
    assert violations("codec", source) == []


# -- size ---------------------------------------------------------------------------------------------------


def oversized(source: str, where: str = "") -> list[str]:
    """Every function longer than MAX_FUNCTION_LINES and class longer than MAX_CLASS_LINES in `source`, nested
    ones included, measured from its `def`/`class` line to its last line (decorators not counted)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        limit = (MAX_FUNCTION_LINES if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                 else MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else None)
        if limit is not None and node.end_lineno - node.lineno + 1 > limit:
            kind = "class" if isinstance(node, ast.ClassDef) else "function"
            found.append(f"{where}:{node.lineno} {kind} {node.name} has {node.end_lineno - node.lineno + 1} lines "
                         f"(at most {limit})")
    return found


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*.py")), ids=lambda p: p.stem)
def test_no_function_over_60_lines_and_no_class_over_150(path):
    assert oversized(path.read_text(), path.stem) == []


def _body(lines: int, indent: str = "    ") -> str:
    return "".join(f"{indent}x = {i}\n" for i in range(lines))


@pytest.mark.parametrize("source, expected", [
    ("def f():\n" + _body(59), []),  # 60 lines: allowed
    ("def f():\n" + _body(60), ["f has 61 lines"]),
    ("async def f():\n" + _body(60), ["f has 61 lines"]),
    ("class A:\n    def f(self):\n" + _body(30, " " * 8) + "    def g(self):\n" + _body(30, " " * 8), []),
    ("class A:\n" + "".join(f"    def f{i}(self):\n" + _body(9, " " * 8) for i in range(16)), ["A has 161 lines"]),
    ("def outer():\n    def inner():\n" + _body(61, " " * 8), ["outer has 63 lines", "inner has 62 lines"]),
])
def test_the_size_check_catches_long_functions_and_classes(source, expected):
    """The checker itself: it fails on one line too many, for methods, nested and async functions too."""
    found = oversized(source)
    assert len(found) == len(expected) and all(e in f for e, f in zip(expected, found)), found
