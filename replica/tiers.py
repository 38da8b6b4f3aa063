"""Service tiers: per-tier TBT SLO, TTFT target, traffic share and scheduling rank.

The paper (arXiv:2508.01002, "Evaluation") draws each request's tier at random: 5 % paying users
("premium", TBT SLO 100 ms) and 95 % free users (TBT SLO 500 ms); ``paper_tiers()`` is that mix.
Rank 0 is the strictest tier, scheduled first by tier-first ordering.

``parse_tiers`` reads a mix from a YAML/JSON file (a list of tier objects, or ``{"tiers": [...]}``)
or from a compact string ``"premium:0.1:0.05,free:0.5:0.95"``
(``name:tbt_slo_s:share[:ttft_target_s]`` per tier).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from replica.contract import DEFAULT_TTFT_TARGET_S, TierFacts
from replica.seeds import stream_rng

__all__ = ["DEFAULT_TTFT_TARGET_S", "SHARE_TOLERANCE", "TierError", "TierMix", "TierSpec", "paper_tiers",
           "parse_tiers"]

SHARE_TOLERANCE = 1e-6
_FILE_SUFFIXES = (".yaml", ".yml", ".json")


class TierError(ValueError):
    """A tier specification (string or file) is invalid; the message names the offending part."""


class TierSpec(BaseModel):
    """One service tier.  ``rank`` may be left out; ``TierMix`` then ranks tiers by ``tbt_slo_s``."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str = Field(min_length=1)
    tbt_slo_s: float = Field(gt=0)
    ttft_target_s: float = Field(default=DEFAULT_TTFT_TARGET_S, gt=0)
    share: float = Field(gt=0, le=1)
    rank: int | None = Field(default=None, ge=0)

    def facts(self) -> TierFacts:
        """This tier as a request carries it (`replica.contract.TierFacts`); needs a rank (every
        tier of a `TierMix` has one)."""
        if self.rank is None:
            raise ValueError(f"tier {self.name!r} has no rank yet (ranks are assigned by TierMix)")
        return TierFacts(name=self.name, tbt_slo_s=self.tbt_slo_s, ttft_target_s=self.ttft_target_s, rank=self.rank)

    @field_validator("name")
    @classmethod
    def _strip_name(cls, name: str) -> str:
        if not name.strip():
            raise ValueError("tier name must not be blank")
        return name.strip()


class TierMix(BaseModel):
    """The tiers of a deployment.  Names are unique, shares sum to 1 (within ``SHARE_TOLERANCE``),
    and every tier has a unique rank: either all ranks are given, or none is and tiers are ranked
    by ``tbt_slo_s`` (strictest = rank 0; ties keep list order)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tiers: list[TierSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> TierMix:
        names = [t.name for t in self.tiers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate tier name(s): {', '.join(dupes)}")
        total = sum(t.share for t in self.tiers)
        if abs(total - 1.0) > SHARE_TOLERANCE:
            raise ValueError(f"tier shares sum to {total:.9g}, expected 1 (within {SHARE_TOLERANCE:g})")
        given = [t.rank for t in self.tiers if t.rank is not None]
        if given and len(given) != len(self.tiers):
            raise ValueError("give a rank for every tier or for none")
        if len(set(given)) != len(given):
            raise ValueError(f"tier ranks must be unique, got {given}")
        if not given:
            order = sorted(range(len(self.tiers)), key=lambda i: self.tiers[i].tbt_slo_s)
            ranks = {i: r for r, i in enumerate(order)}
            object.__setattr__(self, "tiers", [t.model_copy(update={"rank": ranks[i]})
                                               for i, t in enumerate(self.tiers)])
        return self

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tiers]

    @property
    def shares(self) -> np.ndarray:
        """Traffic shares in tier order, normalised to sum to exactly 1."""
        s = np.array([t.share for t in self.tiers])
        return s / s.sum()

    @property
    def strictest(self) -> TierSpec:
        """The tier with rank 0 (the lowest rank)."""
        return min(self.tiers, key=lambda t: t.rank if t.rank is not None else 0)

    def index(self, name: str) -> int:
        """Position of tier ``name`` in ``tiers``; ``KeyError`` naming the known tiers otherwise."""
        for i, t in enumerate(self.tiers):
            if t.name == name:
                return i
        raise KeyError(f"unknown tier {name!r}; tiers are {', '.join(self.names)}")

    def by_name(self, name: str) -> TierSpec:
        return self.tiers[self.index(name)]

    def assign(self, n: int, seed: int | None) -> np.ndarray:
        """Tier indices (int64, into ``tiers``) for ``n`` requests, drawn independently with
        probabilities ``shares``; the same seed gives the same assignment, from the seed's own
        "tiers" stream (`replica.seeds`), independent of the arrival gaps drawn with that seed."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        rng = stream_rng(seed, "tiers")
        return rng.choice(len(self.tiers), size=n, p=self.shares).astype(np.int64)


def paper_tiers() -> TierMix:
    """The paper's mix: premium (TBT 100 ms, 5 %, rank 0) and free (TBT 500 ms, 95 %, rank 1)."""
    return TierMix(tiers=[
        TierSpec(name="premium", tbt_slo_s=0.100, share=0.05, rank=0),
        TierSpec(name="free", tbt_slo_s=0.500, share=0.95, rank=1),
    ])


# --------------------------------------------------------------------------------------- parsing

def parse_tiers(text: str | os.PathLike[str]) -> TierMix:
    """A ``TierMix`` from a YAML/JSON file path or a compact ``name:tbt_slo_s:share[:ttft_target_s]``
    list (comma-separated).  A string is taken as a path if it names an existing file or ends in
    .yaml/.yml/.json; a string starting with ``{`` or ``[`` is inline JSON (``TierMix.model_dump_json()``
    output, or a list of tier objects).  Errors are ``TierError`` naming the offending part (and
    file and line)."""
    if isinstance(text, str) and text.lstrip().startswith(("{", "[")):
        return _parse_inline_json(text)
    if isinstance(text, os.PathLike) or Path(text).is_file() or text.lower().endswith(_FILE_SUFFIXES):
        return _parse_file(Path(text))
    return _parse_compact(text)


def _parse_compact(text: str) -> TierMix:
    parts = [p.strip() for p in text.split(",")]
    if not text.strip():
        raise TierError("empty tier specification; expected e.g. 'premium:0.1:0.05,free:0.5:0.95'")
    specs: list[TierSpec] = []
    for k, part in enumerate(parts, start=1):
        where = f"tier {k} {part!r}"
        fields = [f.strip() for f in part.split(":")]
        if len(fields) not in (3, 4):
            raise TierError(f"{where}: expected name:tbt_slo_s:share[:ttft_target_s], "
                            f"got {len(fields)} field(s)")
        keys = ("name", "tbt_slo_s", "share", "ttft_target_s")
        spec = _validate_spec(dict(zip(keys, fields)), where)
        _check_new_name(spec, specs, where)
        specs.append(spec)
    return _validate_mix(specs, f"tiers {text!r}")


def _parse_inline_json(text: str) -> TierMix:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise TierError(f"inline tier JSON, column {e.colno}: malformed JSON: {e.msg}") from e
    try:
        return TierMix.model_validate({"tiers": data} if isinstance(data, list) else data)
    except ValidationError as e:
        raise TierError(f"inline tier JSON: {_format_error(e.errors()[0])}") from e


def _parse_file(path: Path) -> TierMix:
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as e:
        raise TierError(f"{path}: cannot read tier file: {e.strerror or e}") from e
    try:
        data = json.loads(raw) if path.suffix.lower() == ".json" else yaml.safe_load(raw)
    except json.JSONDecodeError as e:
        raise TierError(f"{path}, line {e.lineno}, column {e.colno}: malformed JSON: {e.msg}") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}" if mark is not None else str(path)
        raise TierError(f"{where}: malformed YAML: {getattr(e, 'problem', None) or e}") from e

    root = _yaml_root(raw)
    items, prefix = data, ()
    if isinstance(data, dict):
        extra = sorted(set(data) - {"tiers"})
        if extra or "tiers" not in data:
            raise TierError(f"{path}: expected a list of tiers or a mapping with only 'tiers' "
                            f"(found keys {sorted(data)})")
        items, prefix = data["tiers"], ("tiers",)
    if not isinstance(items, list) or not items:
        raise TierError(f"{_where(path, root, prefix)}: expected a non-empty list of tiers")
    specs: list[TierSpec] = []
    for i, item in enumerate(items):
        label = f"{_where(path, root, (*prefix, i))}: tier {i}"
        if not isinstance(item, dict):
            raise TierError(f"{label}: expected a mapping, got {type(item).__name__}")
        try:
            spec = TierSpec.model_validate(item)
        except ValidationError as e:
            err = e.errors()[0]
            loc = (*prefix, i, *err["loc"])
            raise TierError(f"{_where(path, root, loc)}: tier {i} ({item.get('name', '?')}): "
                            f"{_format_error(err)}") from e
        _check_new_name(spec, specs, label)
        specs.append(spec)
    return _validate_mix(specs, _where(path, root, prefix))


def _validate_spec(values: dict[str, Any], where: str) -> TierSpec:
    try:
        return TierSpec.model_validate(values)
    except ValidationError as e:
        raise TierError(f"{where}: {_format_error(e.errors()[0])}") from e


def _check_new_name(spec: TierSpec, earlier: list[TierSpec], where: str) -> None:
    if any(s.name == spec.name for s in earlier):
        raise TierError(f"{where}: duplicate tier name {spec.name!r}")


def _validate_mix(specs: list[TierSpec], where: str) -> TierMix:
    try:
        return TierMix(tiers=specs)
    except ValidationError as e:
        raise TierError(f"{where}: {_format_error(e.errors()[0])}") from e


def _format_error(err: Any) -> str:
    field = ".".join(str(p) for p in err["loc"])
    msg = str(err["msg"]).removeprefix("Value error, ")
    if not field:
        return msg
    return f"{field}: {msg}" if err["type"] == "missing" else f"{field}: {msg} (got {err['input']!r})"


# YAML line lookup: walk the composed node tree along a validation-error location.

def _yaml_root(raw: str) -> yaml.Node | None:
    try:
        return yaml.compose(raw, Loader=yaml.SafeLoader)
    except yaml.YAMLError:  # e.g. JSON that PyYAML cannot read; lines are then left out
        return None


def _where(path: Path, root: yaml.Node | None, loc: tuple[Any, ...]) -> str:
    node = root
    for key in loc:
        child = None
        if isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            child = node.value[key]
        elif isinstance(node, yaml.MappingNode):
            child = next((v for k, v in node.value if k.value == str(key)), None)
        if child is None:
            break
        node = child
    return f"{path}, line {node.start_mark.line + 1}" if node is not None else str(path)
