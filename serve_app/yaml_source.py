"""Reading YAML config files with errors that name the file, the line and the field.

Shared by the app config (`serve_app.config`) and the capacity planner's workload files
(`loadtest.plan`):

* `UniqueKeyLoader`: a SafeLoader that rejects duplicate keys (PyYAML keeps the last silently);
* `FieldError`: raised inside a pydantic model validator to point the error at a field below
  the model (``loc``), which the loaders append to pydantic's location;
* `yaml_line`: ``path, line N`` of the deepest key (or list item) along a location;
* `echo_ok`: whether a bad input value is short and plain enough to quote back in the message;
* `read_yaml`: a file's data and node tree (for the lines), or `YAMLReadError` naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

__all__ = ["FieldError", "UniqueKeyLoader", "YAMLReadError", "echo_ok", "read_yaml", "yaml_line"]


class FieldError(ValueError):
    """Raised inside a model validator to point the error at a field below the model."""

    def __init__(self, loc: tuple[str | int, ...], msg: str) -> None:
        self.loc = loc
        super().__init__(msg)


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys in a mapping (PyYAML keeps the last silently)."""


def _construct_mapping(loader: UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark,
                f"duplicate key {key!r} (first at line {seen[key].start_mark.line + 1})", key_node.start_mark)
        seen[key] = key_node
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def yaml_line(path: Path, root: yaml.Node | None, loc: tuple) -> str:
    """``path, line N``: the line of the deepest key (or list item) along ``loc`` found in the YAML."""
    node, mark = root, root
    for key in loc:
        if isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = mark = node.value[key]
        elif isinstance(node, yaml.MappingNode):
            pair = next(((k, v) for k, v in node.value if k.value == str(key)), None)
            if pair is None:
                break
            mark, node = pair
        else:
            break
    return f"{path}, line {mark.start_mark.line + 1}" if mark is not None else str(path)


def echo_ok(value: Any) -> bool:
    """A bad value worth quoting back: None, a number or bool, or a string of at most 200 characters."""
    return value is None or isinstance(value, bool | int | float) or (isinstance(value, str) and len(value) <= 200)


class YAMLReadError(ValueError):
    """A YAML file that cannot be read or parsed; the message names the file (and line, column)."""


def read_yaml(path: Path, what: str) -> tuple[Any, yaml.Node | None]:
    """(data, node tree) of the YAML file ``path`` (duplicate keys refused); `YAMLReadError`
    ("PATH: cannot read WHAT: ..." or "PATH, line L, column C: malformed YAML: ...") otherwise."""
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise YAMLReadError(f"{path}: cannot read {what}: {getattr(e, 'strerror', None) or e}") from None
    try:
        data = yaml.load(raw, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
        root = yaml.compose(raw, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(path)
        raise YAMLReadError(f"{where}: malformed YAML: {getattr(e, 'problem', None) or e}") from None
    return data, root
