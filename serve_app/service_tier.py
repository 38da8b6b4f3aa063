"""OpenAI's ``service_tier`` on this server's tiers (pure: no Ray, no HTTP).

OpenAI's request field ``service_tier`` is one of ``auto``, ``default``, ``flex``, ``priority``;
the response says which one served it.  Here a request's tier comes from its API key, and the
field lets a client ask for *cheaper* service than its key's (``ServiceTierMap`` in the app
config says which configured tier each value means):

    priority  -> the tier shed last (the strictest: premium)
    default   -> the tier shed first among two, the second shed among three or more (free)
    flex      -> the tier shed first (sheddable, lenient TBT SLO)
    auto, or no field -> the key's tier

The key's tier is the ceiling: a request is never served above it.  Asking for a tier the key
does not reach is served at the key's tier (OpenAI's behaviour for an account without Priority
processing: the request is served, the response says how).  "Above" is by shed order: a tier shed
later is better protected.

`ServiceTiers.serve(key_tier, requested)` -> `ServedTier` (the configured tier that serves the
request and the ``service_tier`` value the response carries: the requested value when it maps to
the tier served, else the first of priority, default, flex that does, else the tier's own name).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["OPENAI_SERVICE_TIERS", "ServedTier", "ServiceTiers", "default_service_tier_map"]

OPENAI_SERVICE_TIERS = ("priority", "default", "flex")  # the values naming a tier ("auto" names none)


def default_service_tier_map(shed_sequence: Sequence[str]) -> dict[str, str]:
    """The default map for tiers in shed order (first shed first): priority -> the last,
    flex -> the first, default -> the first of two (the second of three or more)."""
    if not shed_sequence:
        raise ValueError("no tiers")
    seq = list(shed_sequence)
    return {"priority": seq[-1], "default": seq[1] if len(seq) >= 3 else seq[0], "flex": seq[0]}


@dataclass(frozen=True, slots=True)
class ServedTier:
    tier: str  # the configured tier that serves the request
    service_tier: str  # the value the response's service_tier carries


class ServiceTiers:
    """``mapping``: OpenAI value -> configured tier; ``shed_sequence``: the tiers, first shed first."""

    def __init__(self, mapping: Mapping[str, str], shed_sequence: Sequence[str]) -> None:
        self.shed_sequence = list(shed_sequence)
        self._position = {name: i for i, name in enumerate(self.shed_sequence)}
        for value, tier in mapping.items():
            if value not in OPENAI_SERVICE_TIERS:
                raise ValueError(f"service tier {value!r}: expected one of {', '.join(OPENAI_SERVICE_TIERS)}")
            if tier not in self._position:
                raise ValueError(f"service tier {value!r} maps to unknown tier {tier!r}; tiers are "
                                 f"{', '.join(self.shed_sequence)}")
        self.mapping = {v: mapping[v] for v in OPENAI_SERVICE_TIERS if v in mapping}

    def serve(self, key_tier: str, requested: str | None) -> ServedTier:
        """The tier that serves a request of a ``key_tier`` key asking for ``requested``
        (None or ``auto``: the key's tier; an unmapped value: the key's tier too)."""
        if key_tier not in self._position:
            raise KeyError(f"unknown tier {key_tier!r}")
        wanted = self.mapping.get(requested or "auto", key_tier)
        served = wanted if self._position[wanted] <= self._position[key_tier] else key_tier
        return ServedTier(served, self.service_tier_of(served, requested))

    def service_tier_of(self, tier: str, requested: str | None = None) -> str:
        """The ``service_tier`` value a response served by ``tier`` carries."""
        if requested in self.mapping and self.mapping[requested] == tier:
            return requested
        return next((v for v in OPENAI_SERVICE_TIERS if self.mapping.get(v) == tier), tier)
