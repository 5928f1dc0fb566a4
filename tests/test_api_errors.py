"""Library errors speak the API (``force=True``), the command line its flags (``--force``):
no message of the library layers names a flag, and the CLI renders the arguments as flags."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from modelalloy.commands._console import cli_message, flag_names
from modelalloy.errors import ModelAlloyError, OutputError

SRC = Path(__file__).resolve().parents[1] / "src" / "modelalloy"
# Every layer below the commands (docs/architecture.md): an API caller meets their messages.
LIBRARY = ["errors.py", "extras.py", "threads.py", "continual.py", "api.py", "io", "methods",
           "kernels", "recipe", "plan", "stats", "engine", "lora", "bundle", "moe",
           "inspection", "multistage", "eval", "bench", "twin", "search", "distill",
           "optimize"]
FLAG = re.compile(r"(?<![\w-])--[a-z]")
# a string that is one flag alone is a command line's argument, not a message (a script's own
# argparse options, ``git status --porcelain``)
ARGUMENT = re.compile(r"--[a-z][\w-]*(=\S*)?")


def _messages(tree: ast.AST):
    """(line, text) of every string that is not a docstring; an f-string's fields read {}."""
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                       ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    parts = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            parts.update(id(v) for v in node.values)
            yield node.lineno, "".join(v.value if isinstance(v, ast.Constant) else "{}"
                                       for v in node.values)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                and id(node) not in docstrings and id(node) not in parts):
            yield node.lineno, node.value


def test_library_messages_name_no_flags():
    found = []
    for entry in LIBRARY:
        path = SRC / entry
        for file in [path] if path.is_file() else sorted(path.rglob("*.py")):
            for line, text in _messages(ast.parse(file.read_text())):
                # a command to run (`modelalloy stats MODEL --kind gram`) is fine
                if FLAG.search(re.sub(r"`[^`]*`", "", text)) and not ARGUMENT.fullmatch(text):
                    found.append(f"{file.relative_to(SRC)}:{line}: {text[:80]!r}")
    assert not found, "library messages naming CLI flags:\n" + "\n".join(found)


@pytest.mark.parametrize(("message", "options", "line"), [
    ("out: already exists; pass force=True to replace it", ("force",),
     "out: already exists; pass --force to replace it"),
    ("memory_budget='0.33GB' is too small; use at least 0.41GB", ("memory_budget",),
     "--memory-budget 0.33GB is too small; use at least 0.41GB"),
    ("give exactly one of rank=R and energy=E", ("rank", "energy"),
     "give exactly one of --rank R and --energy E"),
    ("device='cuda': no CUDA; use device='cpu'", ("device",),
     "--device cuda: no CUDA; use --device cpu"),
    # a one-item list of a repeatable flag
    ("give a suite objective, objectives=['suite:tiny-vision'] (or suite:tiny-lm)",
     ("objectives",), "give a suite objective, --objectives suite:tiny-vision (or suite:tiny-lm)"),
    ("budget=0: must be at least 1", ("budget",), "--budget 0: must be at least 1"),
    # only the arguments the error names are rewritten (recipe parameters stay as they are)
    ("density=0.5: too high; pass force=True", ("force",),
     "density=0.5: too high; pass --force"),
])
def test_cli_renders_the_arguments_as_flags(message, options, line):
    error = ModelAlloyError(message, options=options)
    assert str(error) == message
    assert cli_message(error) == line


def test_a_command_renames_an_argument_to_its_flag():
    with pytest.raises(OutputError) as caught, flag_names(out="out_path"):
        raise OutputError("r.yaml: give out=PATH for it", options=("out",))
    assert cli_message(caught.value) == "r.yaml: give --out-path PATH for it"
    assert isinstance(caught.value, OutputError)


def test_the_optimize_command_names_its_repeated_objective_flag():
    with pytest.raises(ModelAlloyError) as caught, flag_names(objectives="objective"):
        raise ModelAlloyError("give at least one objective, e.g. "
                              "objectives=['suite:tiny-vision']", options=("objectives",))
    assert cli_message(caught.value) == ("give at least one objective, e.g. --objective "
                                         "suite:tiny-vision")
