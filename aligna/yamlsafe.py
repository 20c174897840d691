"""YAML that cannot hurt: PyYAML's safe loader, plus refusals of duplicate keys, integers
too long to convert quickly, and anchors/aliases that expand past `MAX_NODES` values (a
442-byte "billion laughs" file otherwise builds a value that prints as hundreds of MB).
Every problem is one short `YAMLProblem` line naming where it is."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import yaml

MAX_NODES = 100_000  # values in a YAML document once its aliases are expanded


class YAMLProblem(ValueError):
    """A YAML text that is malformed or refused; one line, with the line number where known."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys, integers too long to convert quickly and
    documents whose anchors and aliases expand to more than MAX_NODES values."""

    def compose_document(self) -> yaml.Node:
        node = super().compose_document()
        _count_values(node, {}, set())
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` may be overridden
                continue
            key, line = self.construct_object(key_node, deep=deep), key_node.start_mark.line + 1
            try:
                if key in lines:
                    raise YAMLProblem(
                        f"line {line}: duplicate key {_quoted(key)} (first on line {lines[key]})"
                    )
                lines[key] = line
            except TypeError:  # unhashable: the base class refuses it
                break
        return super().construct_mapping(node, deep)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        """PyYAML's constructors raise KeyError, IndexError, TypeError... for some explicitly
        tagged values (`!!bool maybe`, `!!int ''`, `!!set [a]`): each becomes a YAMLProblem
        naming the line. A collection is filled after its construction returns (PyYAML queues
        the rest of its constructor), so that rest is wrapped to name the line too."""
        queued = len(self.state_generators)
        with _naming(node):
            data = super().construct_object(node, deep)
        self.state_generators[queued:] = [_filling(g, node) for g in self.state_generators[queued:]]
        return data

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        if len(node.value) > 100:  # 1:2:3:... (base 60) of 1 MiB would take hours
            raise YAMLProblem(f"line {node.start_mark.line + 1}: an integer of {len(node.value)} characters")
        return super().construct_yaml_int(node)


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


def _count_values(node: yaml.Node, sizes: dict[int, int], open_: set[int]) -> int:
    """Values in `node` with every alias expanded (memoized by node, so a few hundred bytes
    of nested aliases cost little to count); raises past MAX_NODES or on a cycle."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_:
        raise YAMLProblem(f"line {node.start_mark.line + 1}: an alias inside its own anchor (a cycle)")
    open_.add(id(node))
    children = node.value if isinstance(node, yaml.SequenceNode) else []
    if isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    total = 1
    for child in children:
        total += _count_values(child, sizes, open_)
        if total > MAX_NODES:
            raise YAMLProblem(
                f"line {node.start_mark.line + 1}: anchors and aliases expand to over {MAX_NODES} values"
            )
    open_.discard(id(node))
    sizes[id(node)] = total
    return total


def load_yaml(text: str) -> Any:
    """Parse YAML with `_Loader`; every problem becomes a one-line YAMLProblem."""
    try:
        return yaml.load(text, Loader=_Loader)
    except YAMLProblem:
        raise
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise YAMLProblem(f"not valid YAML: {_one_line(e.problem or e.context or '')}{at}") from None
    except yaml.YAMLError as e:
        raise YAMLProblem(f"not valid YAML: {_one_line(str(e))}") from None
    except RecursionError:
        raise YAMLProblem("not valid YAML: nested too deeply") from None
    except (ValueError, KeyError, IndexError, AttributeError, TypeError) as e:  # a constructor's, outside
        raise YAMLProblem(f"not valid YAML: {type(e).__name__}: {_one_line(str(e))}") from None  # construct_object


@contextmanager
def _naming(node: yaml.Node) -> Iterator[None]:
    """A constructor's own exception becomes a YAMLProblem naming the node's line."""
    try:
        yield
    except (YAMLProblem, yaml.YAMLError, RecursionError):
        raise
    except (ValueError, KeyError, IndexError, AttributeError, TypeError) as e:
        raise YAMLProblem(_unreadable(node, e)) from None


def _filling(generator: Iterator[Any], node: yaml.Node) -> Iterator[Any]:
    with _naming(node):
        yield from generator


def _unreadable(node: yaml.Node, error: Exception) -> str:
    tag = node.tag.replace("tag:yaml.org,2002:", "!!")
    what = f"{_quoted(node.value)} is not a valid {tag}" if isinstance(node, yaml.ScalarNode) else f"not a valid {tag}"
    why = f" ({_one_line(str(error))})" if isinstance(error, ValueError) and str(error) else ""
    return f"line {node.start_mark.line + 1}: {what}{why}"


def _quoted(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
