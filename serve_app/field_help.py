"""A field reference rendered from pydantic models: one entry per field (nested models, list items,
mapping values and the variants of a tagged union included) with its type, default, numeric
constraints and ``Field`` description.

Shared by the launcher's ``python -m serve_app --help`` (the app config, `serve_app.config.AppConfig`)
and the capacity planner's ``python -m loadtest.plan --help`` (its workload files).  Two path styles:
``list_item=".N"`` and ``mapping_key=".KEY"`` give dotted override paths as the launcher takes them
(``tiers.N.tbt_slo_s``, ``api_keys.limits.KEY.max_concurrent``); the defaults (``[]``) give the
planner's ``tiers[].name``.  A union of models tagged by a ``Literal`` field (``backend: sim`` /
``backend: vllm``) is listed once per variant, under a heading ``PATH as {TAG: VALUE, ...}:``.
"""

from __future__ import annotations

import textwrap
import types
import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel

__all__ = ["field_help"]

WIDTH = 100
_LIMITS = ("gt", "ge", "lt", "le", "min_length", "max_length")


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return " | ".join(dict.fromkeys(_type_name(a) for a in args))
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    return getattr(annotation, "__name__", str(annotation))


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in typing.get_args(annotation) for m in _models_in(a)]


def _container(annotation: Any) -> Any:
    """list or dict when the field holds models in one (through Optional and Annotated), else None."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _container(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        found = [c for a in typing.get_args(annotation) if (c := _container(a)) is not None]
        return found[0] if found else None
    return origin if origin in (list, dict) else None


def _union_tag(models: list[type[BaseModel]]) -> str | None:
    """The field that tells the models of a union apart: one ``Literal`` field all of them have."""
    for name in models[0].model_fields:
        if all(name in m.model_fields and typing.get_origin(m.model_fields[name].annotation) is Literal
               for m in models):
            return name
    return None


def _flow(value: Any) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=1 << 30).strip()


def _factory_default(f: Any, tag: str | None) -> str:
    """The default a ``default_factory`` makes, in YAML flow style (models: their fields that differ
    from the fields' own defaults, plus a union's tag; "" when none does)."""
    value = f.default_factory()
    if isinstance(value, BaseModel):
        dumped = value.model_dump(mode="json", exclude_defaults=True)
        if tag is not None:
            dumped = {tag: getattr(value, tag), **dumped}
        return _flow(dumped) if dumped else ""
    if isinstance(value, list) and value and isinstance(value[0], BaseModel):
        return _flow([v.model_dump(mode="json", exclude_defaults=True) for v in value])
    return _flow(value)


def field_help(model: type[BaseModel], prefix: str = "", *, list_item: str = "[]", mapping_key: str = "[]",
               factory_defaults: bool = False) -> list[str]:
    """One line per field (``  PATH  (TYPE, DEFAULT; CONSTRAINTS)``), its description wrapped below
    it, from the models' own types, defaults, constraints and ``Field`` descriptions.

    ``list_item`` / ``mapping_key``: what follows a list's / a mapping's path before its items'
    fields (``tiers[].name`` or, with ``".N"``, ``tiers.N.name``).  ``factory_defaults``: show what
    a ``default_factory`` makes (else ``default: see the description``)."""
    lines = []
    for name, f in model.model_fields.items():
        path = prefix + name
        models = _models_in(f.annotation)
        tag = _union_tag(models) if len(models) > 1 else None
        default = "required" if f.is_required() else (
            "optional" if f.default is None else f"default {f.default!r}")
        desc = f.description or ""
        if f.default_factory is not None:
            if factory_defaults:
                made = _factory_default(f, tag)
                if not made:
                    default = "defaults below"
                elif len(made) <= 40:
                    default = f"default {made}"
                else:
                    default = "default below"
                    desc = f"{desc}{'. ' if desc else ''}Default: {made}"
            else:
                default = "default: see the description"
        limits = [f"{attr} {getattr(m, attr)}" for m in f.metadata for attr in _LIMITS if hasattr(m, attr)]
        extra = f"; {', '.join(limits)}" if limits else ""
        lines.append(f"  {path}  ({_type_name(f.annotation)}, {default}{extra})")
        if desc:
            lines.append(textwrap.fill(desc, width=WIDTH, initial_indent=" " * 6, subsequent_indent=" " * 6))
        container = _container(f.annotation)
        sub = path + {list: list_item, dict: mapping_key}.get(container, "") + "."
        for m in models:
            if tag is not None:
                lines.append(f"  {path} as {{{tag}: {typing.get_args(m.model_fields[tag].annotation)[0]}, ...}}:")
            lines += field_help(m, sub, list_item=list_item, mapping_key=mapping_key,
                                factory_defaults=factory_defaults)
    return lines
