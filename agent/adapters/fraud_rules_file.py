"""Reading a fraud rules file (``fraud.rules_file``): YAML with the line of every value, and the
prefix files of its destination groups (relative paths are read next to the rules file). The
checks are the core's (``agent/core/fraud_rules.py``); this module only does the I/O."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from agent.core.errors import InvalidInput
from agent.core.fraud_rules import Node, RuleError, RuleSet, parse_rules

MAX_FILE_BYTES = 10 * 1024 * 1024


class RulesFileError(InvalidInput):
    """A rules file that cannot be used; ``errors`` lists each problem as ``FILE:LINE: key K: reason``."""

    def __init__(self, path: Path, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("\n".join(errors) if errors else f"{path}: invalid")


def load_rules(path: str | Path) -> RuleSet:
    """The rule set of ``path``; raises :class:`RulesFileError` with every problem found."""
    path = Path(path)
    source = str(path)
    try:
        text = _read_text(path)
    except ValueError as exc:
        raise RulesFileError(path, [str(exc)]) from None
    try:
        doc = _to_node(yaml.compose(text, Loader=yaml.SafeLoader))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 0
        problem = getattr(exc, "problem", None) or str(exc)
        raise RulesFileError(path, [RuleError(line, "", f"not valid YAML: {problem}").describe(source)]) from None
    except _DuplicateKey as exc:
        raise RulesFileError(path, [RuleError(exc.line, exc.key, "given twice").describe(source)]) from None

    def read_group_file(name: str) -> list[str]:
        target = Path(name)
        if not target.is_absolute():
            target = path.parent / target
        return _read_text(target).splitlines()

    result = parse_rules(doc, read_group_file)
    if isinstance(result, list):
        raise RulesFileError(path, [error.describe(source) for error in result])
    return result


def _read_text(path: Path) -> str:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise ValueError(f"{path} is larger than {MAX_FILE_BYTES // (1024 * 1024)} MB")
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text: {exc.reason}") from None
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror or exc}") from None


class _DuplicateKey(Exception):
    def __init__(self, line: int, key: str) -> None:
        super().__init__(key)
        self.line, self.key = line, key


_SCALARS = yaml.SafeLoader("")


def _to_node(node: yaml.Node | None) -> Node | None:
    if node is None:
        return None
    line = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Node] = {}
        for key_node, value_node in node.value:
            key: Any = _SCALARS.construct_object(key_node, deep=True)
            key = str(key)
            if key in out:
                raise _DuplicateKey(key_node.start_mark.line + 1, key)
            value = _to_node(value_node)
            out[key] = value if value is not None else Node(None, line)
        return Node(out, line)
    if isinstance(node, yaml.SequenceNode):
        return Node([_to_node(item) for item in node.value], line)
    return Node(_SCALARS.construct_object(node), line)
