"""YAML documents as node trees that remember their lines.

PyYAML's composer keeps a mark on every node; libmesh decodes from those nodes instead of from
plain dicts, so every value it reports on can name its file and line. Scalars resolve as
Kubernetes resolves them, except that timestamps stay strings (Kubernetes reads them as
strings too, and a label such as ``date: 2024-01-01`` must not become a date).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import yaml
from yaml.constructor import SafeConstructor

from ._source import Location

__all__ = [
    "Document",
    "UnreadableValue",
    "YAMLSyntaxError",
    "construct",
    "location_of",
    "parse_documents",
]

_TIMESTAMP = "tag:yaml.org,2002:timestamp"


_RESOLVERS = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _TIMESTAMP]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


class _Loader(yaml.SafeLoader):
    yaml_implicit_resolvers = _RESOLVERS


# libyaml's parser when PyYAML was built with it: the same nodes and marks, several times
# faster. Its syntax errors are terser, so a file it cannot read is read again by the Python one.
class _FastLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    yaml_implicit_resolvers = _RESOLVERS


@dataclass(frozen=True, slots=True)
class Document:
    node: yaml.Node
    index: int  # 1-based position in its file
    location: Location


@dataclass(frozen=True, slots=True)
class YAMLSyntaxError:
    message: str
    location: Location
    index: int  # the document that could not be read


def location_of(node: yaml.Node, file: str) -> Location:
    mark = node.start_mark
    return Location(file, mark.line + 1, mark.column + 1)


def parse_documents(text: str, file: str) -> list[Document | YAMLSyntaxError]:
    """Each document of a YAML stream; a syntax error ends the stream with its place."""
    documents = list(_parse(text, file, _FastLoader))
    if documents and isinstance(documents[-1], YAMLSyntaxError) and yaml.__with_libyaml__:
        return list(_parse(text, file, _Loader))
    return documents


def _parse(
    text: str, file: str, loader_class: type[yaml.SafeLoader]
) -> Iterator[Document | YAMLSyntaxError]:
    index = 0  # the document being read, 1-based
    try:
        loader = loader_class(text)
    except yaml.reader.ReaderError as exc:
        yield YAMLSyntaxError(_reader_problem(exc), _position(text, file, exc.position), 1)
        return
    try:
        while True:
            index += 1
            if not loader.check_node():
                break
            node = loader.get_node()
            if node is None or (isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null")):
                continue  # an empty document, as between two '---' lines
            yield Document(node, index, location_of(node, file))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = Location(file, mark.line + 1, mark.column + 1) if mark else Location(file)
        problem = exc.problem or str(exc)
        if exc.context:
            problem = f"{problem} ({exc.context})"
        yield YAMLSyntaxError(f"this is not valid YAML: {problem}", where, index)
    except yaml.reader.ReaderError as exc:
        yield YAMLSyntaxError(_reader_problem(exc), _position(text, file, exc.position), index)
    except yaml.YAMLError as exc:
        yield YAMLSyntaxError(f"this is not valid YAML: {exc}", Location(file), index)
    finally:
        loader.dispose()


def _reader_problem(exc: yaml.reader.ReaderError) -> str:
    return f"this is not valid YAML: character {exc.character:#06x} is not allowed in YAML text"


def _position(text: str, file: str, offset: int) -> Location:
    before = text[:offset]
    return Location(file, before.count("\n") + 1, offset - (before.rfind("\n") + 1) + 1)


class _Constructor(SafeConstructor):
    pass


_Constructor.yaml_constructors = dict(SafeConstructor.yaml_constructors)


class UnreadableValue(ValueError):
    """A value YAML cannot build, such as ``!!int abc`` or a tag no one defines."""


def construct(node: yaml.Node) -> Any:
    """The plain Python value of a node (scalars, and whole subtrees for free-form fields)."""
    try:
        return _Constructor().construct_object(node, deep=True)
    except yaml.constructor.ConstructorError as exc:
        raise UnreadableValue(f"this value cannot be read: {exc.problem}") from exc
    except (ValueError, KeyError, AttributeError, TypeError, IndexError) as exc:
        # (PyYAML's own constructors fail so on e.g. ``!!float ''`` or ``!!int ''``)
        tag = node.tag.rpartition(":")[2] if node.tag else "?"
        raise UnreadableValue(
            f"this value cannot be read as its tag !!{tag} says ({type(exc).__name__})"
        ) from exc


def flatten_merge_keys(node: yaml.MappingNode, file: str) -> YAMLSyntaxError | None:
    """Apply YAML merge keys (``<<: *anchor``) in place, as PyYAML's own loader would.

    Returns the problem when a merge key does not name mappings (``<<: 1``)."""
    try:
        _Constructor().flatten_mapping(node)
    except yaml.constructor.ConstructorError as exc:
        mark = exc.problem_mark or node.start_mark
        where = Location(file, mark.line + 1, mark.column + 1)
        return YAMLSyntaxError(f"a merge key ('<<') {exc.problem}", where, 0)
    return None
