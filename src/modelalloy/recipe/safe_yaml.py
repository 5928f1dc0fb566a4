"""A YAML loader with limits: what a recipe can plausibly need, and no more.

PyYAML's SafeLoader runs no code, but it still trusts the size of what it builds: nine
levels of nine aliases each ("billion laughs") expand to 10⁹ nodes in whatever walks the
result, and 20,000 nested brackets end in a RecursionError. :class:`LimitedSafeLoader`
refuses, as a ``yaml.YAMLError`` with the line, a document

- nested deeper than :data:`MAX_DEPTH`;
- with more than :data:`MAX_ALIASES` aliases (``*name``);
- that would have more than :data:`MAX_NODES` nodes once every alias is expanded, or an
  alias inside its own anchor (an endless structure);
- with a NUL byte in a string (``"\\0"``): no path or name can hold one.

Callers also cap the text itself (:data:`MAX_BYTES`).
"""

from __future__ import annotations

import yaml

MAX_BYTES = 4 << 20  # a recipe is a few KB; the largest real ones (many slices) ~100 KB
MAX_DEPTH = 64
MAX_ALIASES = 1000
MAX_NODES = 200_000


def _refuse(problem: str, node_or_event: object) -> yaml.YAMLError:
    mark = getattr(node_or_event, "start_mark", None)
    return yaml.composer.ComposerError(None, None, problem, mark)


class LimitedSafeLoader(yaml.SafeLoader):
    """SafeLoader with depth, alias and expanded-size limits (see the module docstring)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise _refuse(f"more than {MAX_ALIASES} aliases; a recipe needs far fewer",
                              self.peek_event())
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _refuse(f"nested more than {MAX_DEPTH} levels deep; a recipe needs far "
                              "fewer", self.peek_event())
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_scalar(self, node: yaml.ScalarNode) -> object:
        value = super().construct_scalar(node)
        if isinstance(value, str) and "\0" in value:
            raise _refuse("a NUL byte in a string; no path or name can hold one", node)
        return value

    def get_single_node(self) -> yaml.Node | None:
        node = super().get_single_node()
        if node is not None:
            _check_expanded_size(node)
        return node

    def get_node(self) -> yaml.Node | None:  # each document of ``load_all``
        node = super().get_node()
        if node is not None:
            _check_expanded_size(node)
        return node


def _check_expanded_size(root: yaml.Node) -> None:
    """Count the nodes of the document with every alias expanded (each shared node is
    counted once per use, computed once): refuse past MAX_NODES or on a cycle."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise _refuse("an alias refers to its own anchor (an endless structure)", node)
        active.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        active.discard(key)
        if total > MAX_NODES:
            raise _refuse(f"expands to more than {MAX_NODES} values through its aliases "
                          "(an alias bomb?)", node)
        sizes[key] = total
        return total

    size(root)
