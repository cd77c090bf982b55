"""Textual's `@work`, given no description, makes one from `repr()` of every argument, on the UI
thread, each time the worker starts: a 70,000-order selection cost ~16 ms, a batch's items
more, and a workspace's repr carries its consents. Every worker that takes arguments names
itself instead."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _workers_without_description() -> list[str]:
    missing = []
    for path in sorted((ROOT / "console").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            arguments = [a.arg for a in (*node.args.posonlyargs, *node.args.args,
                                         *node.args.kwonlyargs) if a.arg != "self"]
            for decorator in node.decorator_list:
                if (isinstance(decorator, ast.Call) and isinstance(decorator.func, ast.Name)
                        and decorator.func.id == "work" and arguments
                        and not any(k.arg == "description" for k in decorator.keywords)):
                    missing.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    return missing


def test_every_worker_that_takes_arguments_names_itself() -> None:
    assert _workers_without_description() == []

