"""The code's shape, kept true: no function or method of normfold/ or cli/ is longer than 50
lines (issue 13: a newcomer reads a step, not a page). Length is `end_lineno - lineno + 1` of the
`def` (decorators excluded; a nested function counts for itself and inside its parent)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 50
# Functions still over the limit, with their length when they were listed. The list only shrinks:
# an entry that has grown, or has come under the limit and is still listed, fails the test too.
KNOWN_LONG: dict[str, int] = {}


def function_lengths(root: Path = ROOT) -> dict[str, tuple[int, int]]:
    """'path qualified.name' -> (length in lines, line of the def), for every function and method
    under normfold/ and cli/."""
    found: dict[str, tuple[int, int]] = {}

    def walk(node: ast.AST, path: str, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                found[f"{path} {name}"] = (child.end_lineno - child.lineno + 1, child.lineno)
                walk(child, path, name + ".")
            elif isinstance(child, ast.ClassDef):
                walk(child, path, prefix + child.name + ".")
            else:
                walk(child, path, prefix)

    for folder in ("normfold", "cli"):
        for file in sorted((root / folder).rglob("*.py")):
            path = file.relative_to(root).as_posix()
            walk(ast.parse(file.read_text(encoding="utf-8")), path, "")
    return found


def test_no_function_is_longer_than_50_lines():
    lengths = function_lengths()
    offenders = sorted(((n, line, name) for name, (n, line) in lengths.items()
                        if n > LIMIT and n > KNOWN_LONG.get(name, 0)), reverse=True)
    assert not offenders, "functions over 50 lines (split them into named steps):\n" + "\n".join(
        f"  {n:4d} lines  {name.split()[0]}:{line} {name.split()[1]}" for n, line, name in offenders)


def test_the_list_of_known_long_functions_is_current():
    lengths = function_lengths()
    stale = sorted(name for name in KNOWN_LONG if lengths.get(name, (0, 0))[0] <= LIMIT)
    assert not stale, f"now under {LIMIT} lines (or gone): remove from KNOWN_LONG: {stale}"


def test_the_measure_sees_a_long_function(tmp_path):
    (tmp_path / "normfold").mkdir()
    (tmp_path / "cli").mkdir()
    body = "".join(f"    x{i} = {i}\n" for i in range(LIMIT))
    (tmp_path / "normfold" / "m.py").write_text(
        f"class C:\n    @staticmethod\n    def long():\n{body.replace('    ', '        ')}\n"
        f"def short():\n    pass\n")
    lengths = function_lengths(tmp_path)
    assert lengths["normfold/m.py C.long"] == (LIMIT + 1, 3)  # the decorator on line 2 is not counted
    assert lengths["normfold/m.py short"] == (2, 55)


def one_line_formatters(root: Path = ROOT) -> list[str]:
    """Places outside normfold/errors.py that flatten a message themselves: a function named like
    one_line, or `" ".join(<something>.split())`. Every one-line error goes through errors.one_line,
    so that all of them escape, cut and name an empty exception the same way."""
    found = []
    for folder in ("normfold", "cli"):
        for file in sorted((root / folder).rglob("*.py")):
            path = file.relative_to(root).as_posix()
            if path == "normfold/errors.py":
                continue
            for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and "one_line" in node.name:
                    found.append(f"{path}:{node.lineno} def {node.name}")
                elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "join"
                      and len(node.args) == 1 and isinstance(node.args[0], ast.Call)
                      and isinstance(node.args[0].func, ast.Attribute) and node.args[0].func.attr == "split"
                      and not node.args[0].args):
                    found.append(f"{path}:{node.lineno} {ast.unparse(node)}")
    return found


def test_one_line_messages_have_one_formatter():
    assert not one_line_formatters(), "use normfold.errors.one_line:\n" + "\n".join(one_line_formatters())


def test_the_formatter_check_sees_a_second_formatter(tmp_path):
    (tmp_path / "normfold").mkdir()
    (tmp_path / "cli").mkdir()
    (tmp_path / "normfold" / "m.py").write_text(
        "def _one_line(e):\n    return e\n\nx = ' '.join(str(1).split())[:10]\ny = ' '.join(['a', 'b'])\n")
    assert one_line_formatters(tmp_path) == ["normfold/m.py:1 def _one_line", "normfold/m.py:4 ' '.join(str(1).split())"]
