"""YAML documents with positions: the reader under the image config and the bootstrap.

A document is composed (libyaml's parser when PyYAML has it), never constructed: no tag
reaches a Python constructor. Any explicit tag (`!!int`, `!!python/name:...`, `!custom`) is
refused, naming the field, because the config and the bootstrap are plain data. Scalars are
converted here, by the schema's request (`string()`, `seconds()`, `boolean()`), and a
conversion that fails says what was expected, never what was found.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from pathlib import Path
from typing import TypeVar

import yaml

from bootsecrets.errors import ConfigError
from bootsecrets.fsio import read_regular_file
from bootsecrets.fsread import FileRefused

MAX_DOCUMENT_BYTES = 1024 * 1024

_E = TypeVar("_E", bound=enum.Enum)

#: libyaml's parser when PyYAML has it (its wheels do): ~10x faster than the pure-Python one,
#: the same nodes and line marks, and composing builds no Python objects from tags either way.
_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_STR = "tag:yaml.org,2002:str"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_BOOL = "tag:yaml.org,2002:bool"
_KINDS = {
    _STR: "a string",
    _INT: "an integer",
    _FLOAT: "a number",
    _BOOL: "a boolean",
    "tag:yaml.org,2002:null": "nothing (null)",
}
#: YAML 1.1 booleans, as PyYAML's resolver recognises them.
_TRUE = frozenset({"yes", "true", "on"})
#: A plain decimal number of seconds (what the schema documents): no YAML 1.1 sexagesimal,
#: octal or hex forms, no exponent, so no conversion can be slow or fail oddly.
_DECIMAL = re.compile(r"[+-]?(?:[0-9]{1,15}(?:\.[0-9]{0,15})?|\.[0-9]{1,15})\Z")


@dataclasses.dataclass(frozen=True)
class Node:
    """A YAML node with where it is: file, field path, line, and the error type to raise."""

    source: str
    node: yaml.Node
    field: str
    error_type: type[ConfigError] = ConfigError

    @property
    def line(self) -> int:
        return int(self.node.start_mark.line) + 1

    def error(self, problem: str) -> ConfigError:
        return self.error_type(self.source, self.line, self.field, problem)

    def child(self, node: yaml.Node, key: str) -> Node:
        field = f"{self.field}.{key}" if self.field else key
        return dataclasses.replace(self, node=node, field=field)

    def at(self, node: yaml.Node) -> Node:
        """The same field, reported at another node's line (a key's, say)."""
        return dataclasses.replace(self, node=node)

    def kind(self) -> str:
        if isinstance(self.node, yaml.MappingNode):
            return "a mapping"
        if isinstance(self.node, yaml.SequenceNode):
            return "a list"
        return _KINDS.get(str(self.node.tag), "a value of another type")

    def mapping(
        self, required: frozenset[str] = frozenset(), optional: frozenset[str] | None = None
    ) -> dict[str, Node]:
        """Children by key; unknown, duplicate and missing keys are errors."""
        if not isinstance(self.node, yaml.MappingNode):
            raise self.error(f"expected a mapping, got {self.kind()}")
        children: dict[str, Node] = {}
        for key_node, value_node in self.node.value:
            if not (isinstance(key_node, yaml.ScalarNode) and key_node.tag == _STR):
                raise self.at(key_node).error("keys must be strings")
            key = str(key_node.value)
            child = self.child(value_node, key)
            if key in children:
                raise child.at(key_node).error("duplicate key")
            if optional is not None and key not in required and key not in optional:
                raise child.at(key_node).error("unknown key")
            children[key] = child
        missing = sorted(required - children.keys())
        if missing:
            raise self.child(self.node, missing[0]).error("missing required field")
        return children

    def sequence(self) -> list[Node]:
        if not isinstance(self.node, yaml.SequenceNode):
            raise self.error(f"expected a list, got {self.kind()}")
        return [
            dataclasses.replace(self, node=node, field=f"{self.field}[{i}]")
            for i, node in enumerate(self.node.value)
        ]

    def _scalar(self, tags: tuple[str, ...], what: str) -> str:
        if isinstance(self.node, yaml.ScalarNode) and self.node.tag in tags:
            return str(self.node.value)
        raise self.error(f"expected {what}, got {self.kind()}")

    def text(self, what: str = "a string") -> str:
        """A string scalar, possibly empty."""
        return self._scalar((_STR,), what)

    def string(self) -> str:
        value = self.text()
        if not value:
            raise self.error("must not be empty")
        return value

    def matching(self, pattern: re.Pattern[str], what: str) -> str:
        value = self.string()
        if not pattern.match(value):
            raise self.error(f"must be {what}")
        return value

    def choice(self, enum_type: type[_E]) -> _E:
        value = self.string()
        for member in enum_type:
            if member.value == value:
                return member
        allowed = ", ".join(str(m.value) for m in enum_type)
        raise self.error(f"must be one of: {allowed}")

    def boolean(self) -> bool:
        return self._scalar((_BOOL,), "true or false").lower() in _TRUE

    def seconds(self, maximum: float = 86400, *, positive: bool = False) -> float:
        text = self._scalar((_INT, _FLOAT), "a number of seconds")
        if not _DECIMAL.match(text):
            raise self.error("must be a plain decimal number of seconds")
        value = float(text)
        if not 0 <= value <= maximum:
            raise self.error(f"must be between 0 and {maximum:g} seconds")
        if positive and value == 0:
            raise self.error("must be more than 0 seconds")
        return value


def parse_document(data: bytes, source: str, error_type: type[ConfigError] = ConfigError) -> Node:
    """Compose one YAML document; refuse what is not plain data."""
    if len(data) > MAX_DOCUMENT_BYTES:
        raise error_type(source, None, "", "larger than 1 MiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise error_type(source, line, "", "not valid UTF-8") from None
    if "\x00" in text:
        raise error_type(source, text[: text.index("\x00")].count("\n") + 1, "", "contains NUL")
    try:
        tagged = _explicit_tags(text)
        node = yaml.compose(text, Loader=_LOADER)
    except yaml.MarkedYAMLError as err:
        # Only the problem and its position: the YAML library's snippet would echo the line.
        mark = err.problem_mark or err.context_mark
        where = int(mark.line) + 1 if mark is not None else None
        raise error_type(source, where, "", f"invalid YAML: {err.problem or err.context}") from None
    except yaml.YAMLError:
        raise error_type(source, None, "", "invalid YAML") from None
    if node is None:
        raise error_type(source, None, "", "empty file, expected a mapping")
    document = Node(source, node, "", error_type)
    if tagged:
        raise _tag_error(document, tagged)
    return document


def read_document(
    path: Path,
    error_type: type[ConfigError] = ConfigError,
    *,
    follow_symlinks: bool = True,
) -> Node:
    """A regular file only (a FIFO or a device is refused without blocking), bounded."""
    source = str(path)
    try:
        data = read_regular_file(path, MAX_DOCUMENT_BYTES, follow_symlinks=follow_symlinks)
    except FileRefused as err:
        raise error_type(source, None, "", err.reason) from None
    return parse_document(data, source, error_type)


def _explicit_tags(text: str) -> list[int]:
    """Positions (character index) of every node with an explicit tag, from the parser's
    events: a composed node no longer tells an explicit `!!str` from a resolved one."""
    found = []
    for event in yaml.parse(text, Loader=_LOADER):
        if getattr(event, "tag", None) is not None and event.start_mark is not None:
            found.append(int(event.start_mark.index))
    return found


def _tag_error(document: Node, positions: list[int]) -> ConfigError:
    """The error for the first explicitly tagged node, naming its field. The walk visits each
    node once, so anchors and aliases cannot make it expensive."""
    wanted = min(positions)
    seen: set[int] = set()
    todo = [document]
    while todo:
        here = todo.pop()
        if id(here.node) in seen:
            continue
        seen.add(id(here.node))
        if int(here.node.start_mark.index) == wanted:
            break
        if isinstance(here.node, yaml.MappingNode):
            for key_node, value_node in here.node.value:
                key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
                todo.append(here.child(value_node, key))
                todo.append(here.child(key_node, key))
        elif isinstance(here.node, yaml.SequenceNode):
            todo.extend(
                dataclasses.replace(here, node=node, field=f"{here.field}[{i}]")
                for i, node in enumerate(here.node.value)
            )
    else:
        here = document
    return here.error("explicit YAML tags (`!!type`, `!name`) are not allowed: plain values only")
