"""YAML loading that keeps line numbers, so a validator can name the line of a bad field.

Built on PyYAML's compose step (safe constructors for scalars). Mappings come back as
`Map` (a dict that knows the line of each key), sequences as `Seq` (a list that knows
the line of each item). Duplicate keys are an error, as they are for promtool. A
validator reports each problem as a `FileError` and refuses a file with `FileErrors`.
"""

from __future__ import annotations

from dataclasses import dataclass

import yaml


class Map(dict):
    line: int = 0
    key_lines: dict

    def line_of(self, key) -> int:
        return self.key_lines.get(key, self.line)


class Seq(list):
    line: int = 0
    item_lines: list

    def line_of(self, i: int) -> int:
        return self.item_lines[i] if 0 <= i < len(self.item_lines) else self.line


class YamlError(ValueError):
    def __init__(self, line: int, message: str):
        super().__init__(message)
        self.line = line
        self.message = message


def load(text: str):
    try:
        loader = yaml.SafeLoader(text)
    except yaml.YAMLError as e:  # the reader refuses a character before any line is parsed
        raise YamlError(0, str(e)) from None
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        return _convert(loader, node)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        raise YamlError(mark.line + 1 if mark else 0, f"{e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise YamlError(0, str(e)) from None
    finally:
        loader.dispose()


def _convert(loader, node):
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)
        out = Map()
        out.line = node.start_mark.line + 1
        out.key_lines = {}
        for knode, vnode in node.value:
            key = _convert(loader, knode)
            if isinstance(key, (Map, Seq)):
                raise YamlError(knode.start_mark.line + 1, "a mapping key must be a scalar")
            if key in out:
                raise YamlError(knode.start_mark.line + 1, f"duplicate key {key!r}")
            out[key] = _convert(loader, vnode)
            out.key_lines[key] = knode.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        out = Seq()
        out.line = node.start_mark.line + 1
        out.item_lines = []
        for item in node.value:
            out.append(_convert(loader, item))
            out.item_lines.append(item.start_mark.line + 1)
        return out
    return loader.construct_object(node, deep=True)


@dataclass
class FileError:
    """One problem in a file, reported as FILE:LINE: FIELD: MESSAGE (line 0: the file as a whole)."""
    file: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.field}: {self.message}"


class FileErrors(ValueError):
    """Every problem found in the files; what failed to load loads nothing."""

    def __init__(self, errors: list[FileError]):
        self.errors = errors
        super().__init__("\n".join(map(str, errors)))
