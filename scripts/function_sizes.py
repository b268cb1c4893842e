"""List functions by lines of code; fail when one is over the limit.

Lines of code: the function's lines that are neither blank, nor comments, nor its docstring
(nested functions count toward their parent too). Run from the repository root::

    .venv/bin/python scripts/function_sizes.py --max 100 multimodal_fl
    .venv/bin/python scripts/function_sizes.py --top 20 multimodal_fl
"""

from __future__ import annotations

import argparse
import ast
import io
import sys
import tokenize
from pathlib import Path


def _code_lines(source: str) -> set[int]:
    """Line numbers that hold a token other than a comment or a newline."""
    lines: set[int] = set()
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
            tokenize.ENDMARKER}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in skip:
            lines.update(range(tok.start[0], tok.end[0] + 1))
    return lines


def function_sizes(path: Path) -> list[tuple[int, str, int]]:
    """``(lines of code, qualified name, first line)`` of every function in one file."""
    source = path.read_text()
    tree = ast.parse(source)
    code = _code_lines(source)
    docstrings: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Module):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                end = body[0].end_lineno or body[0].lineno
                docstrings.update(range(body[0].lineno, end + 1))
    out: list[tuple[int, str, int]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{prefix}{child.name}"
                span = range(child.lineno, (child.end_lineno or child.lineno) + 1)
                n = sum(1 for i in span if i in code and i not in docstrings)
                out.append((n, f"{path}:{child.lineno} {name}", child.lineno))
                visit(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return out


def main(argv: list[str] | None = None) -> int:
    """Print the largest functions; exit 1 when one is over ``--max``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("--max", type=int, default=None, help="fail above this many lines")
    parser.add_argument("--top", type=int, default=0, help="print the N largest")
    args = parser.parse_args(argv)
    sizes: list[tuple[int, str, int]] = []
    for root in args.paths:
        files = [root] if root.is_file() else sorted(root.rglob("*.py"))
        for f in files:
            sizes += function_sizes(f)
    sizes.sort(reverse=True)
    for n, name, _ in sizes[: args.top]:
        print(f"{n:5d}  {name}")
    over = [(n, name) for n, name, _ in sizes if args.max is not None and n > args.max]
    for n, name in over:
        print(f"function over {args.max} lines of code: {name} ({n})", file=sys.stderr)
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
