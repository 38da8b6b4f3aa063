"""The replica feedback snapshot as the router reads it, and what a policy sees of one replica.

`ReplicaFeedback` parses the dict that `replica.slo.SLOTracker.snapshot()` builds (version 1):
the replica id and timestamp are required; every other field is optional with a neutral default
(an empty queue, no decodes, no KV use, no tier samples), and unknown extra fields are ignored,
so a replica may add fields within version 1. A snapshot of another version is rejected with
`UnsupportedSnapshotVersion` (a `ValueError`), since its fields may mean something else.

`ReplicaView` is one replica as a routing policy sees it: its latest feedback (None before the
first snapshot), that feedback's age, and the router's in-flight ledger entries for it (what
this router sent since that snapshot).

Nothing here imports Ray or vLLM.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from router.ledger import InFlightLedger, LedgerEntry, PendingLoad, summarize

SUPPORTED_SNAPSHOT_VERSION = 1


class UnsupportedSnapshotVersion(ValueError):
    """A feedback snapshot of a version this router cannot read."""


class FeedbackError(ValueError):
    """A feedback snapshot that is not a valid version-1 snapshot."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class TierFeedback(_Model):
    """Per-tier quantiles over the replica's window (None: no sample in the window)."""

    ttft_p50_s: float | None = Field(None, ge=0)
    ttft_p99_s: float | None = Field(None, ge=0)
    tbt_p50_s: float | None = Field(None, ge=0)
    tbt_p99_s: float | None = Field(None, ge=0)
    tbt_miss_frac: float = Field(0.0, ge=0, le=1)
    ttft_misses_total: int = Field(0, ge=0)
    tbt_misses_total: int = Field(0, ge=0)
    tokens_total: int = Field(0, ge=0)


class PromptHistogram(_Model):
    """Counts of waiting prompts (uncomputed tokens) per bin: bin i is [edges[i], edges[i+1]),
    the last bin [edges[-1], inf), so there are as many counts as edges."""

    edges: tuple[int, ...]
    counts: tuple[int, ...]

    @model_validator(mode="after")
    def _check(self) -> PromptHistogram:
        if not self.edges:
            raise ValueError("histogram needs at least one edge")
        if len(self.counts) != len(self.edges):
            raise ValueError(f"histogram has {len(self.edges)} edges but {len(self.counts)} counts "
                             "(one count per edge, the last bin open-ended)")
        if self.edges[0] < 0 or any(b <= a for a, b in zip(self.edges, self.edges[1:])):
            raise ValueError(f"histogram edges must be non-negative and increasing, got {list(self.edges)}")
        if any(c < 0 for c in self.counts):
            raise ValueError("histogram counts must be non-negative")
        return self

    def _bins(self) -> list[tuple[float, float, int]]:
        """(lo, hi, count) per bin; the open last bin is taken as [e, 2e) (or [0, 1) when e = 0)."""
        e = self.edges
        his = list(e[1:]) + [max(2 * e[-1], e[-1] + 1)]
        return [(float(lo), float(hi), c) for lo, hi, c in zip(e, his, self.counts)]

    def tokens_at_most(self, prompt_len: int, total_tokens: int) -> float:
        """Estimated tokens of the waiting prompts no longer than `prompt_len`, given that all
        waiting prompts hold `total_tokens` tokens.

        Each bin's tokens are estimated as count * bin midpoint; the bin holding `prompt_len`
        contributes the prompts in [lo, prompt_len] assuming prompts spread uniformly over the bin
        (count * fraction, each (lo + prompt_len) / 2 tokens). The estimate is then scaled so that
        all bins together hold exactly `total_tokens`: it is exact (`total_tokens`) when every
        non-empty bin lies at or below `prompt_len`, and 0 when every one lies above it. With no
        counts at all it returns `total_tokens` (nothing known about the order: all ahead).
        """
        if total_tokens <= 0:
            return 0.0
        total_est = 0.0
        ahead_est = 0.0
        for lo, hi, count in self._bins():
            if count == 0:
                continue
            bin_tokens = count * (lo + hi) / 2
            total_est += bin_tokens
            if hi <= prompt_len + 1:  # every prompt in [lo, hi) is <= prompt_len
                ahead_est += bin_tokens
            elif lo <= prompt_len:
                frac = (prompt_len + 1 - lo) / (hi - lo)
                ahead_est += count * frac * (lo + prompt_len) / 2
        if total_est <= 0:
            return float(total_tokens)
        return min(float(total_tokens), total_tokens * ahead_est / total_est)


class ReplicaFeedback(_Model):
    """One replica's feedback snapshot (version 1 of `replica.slo.SLOTracker.snapshot()`)."""

    version: int
    replica_id: str
    timestamp_s: float
    num_waiting: int = Field(0, ge=0)
    num_running: int = Field(0, ge=0)
    waiting_prefill_tokens: int = Field(0, ge=0)
    waiting_prompt_histogram: PromptHistogram | None = None
    running_decodes_by_tier: dict[str, int] = Field(default_factory=dict)
    kv_usage: float = Field(0.0, ge=0)
    mean_batch_time_s: float | None = Field(None, ge=0)
    tiers: dict[str, TierFeedback] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> ReplicaFeedback:
        if self.version != SUPPORTED_SNAPSHOT_VERSION:
            raise ValueError(f"snapshot version {self.version} (this router reads {SUPPORTED_SNAPSHOT_VERSION})")
        if not math.isfinite(self.timestamp_s):
            raise ValueError("timestamp_s must be finite")
        if any(n < 0 for n in self.running_decodes_by_tier.values()):
            raise ValueError("running_decodes_by_tier counts must be non-negative")
        return self

    @classmethod
    def from_snapshot(cls, snapshot: Mapping[str, Any]) -> ReplicaFeedback:
        """Parse a snapshot dict. Raises `UnsupportedSnapshotVersion` for another version and
        `FeedbackError` (both `ValueError`s) for anything else that is not a valid snapshot."""
        if not isinstance(snapshot, Mapping):
            raise FeedbackError(f"a feedback snapshot is a mapping, got {type(snapshot).__name__}")
        version = snapshot.get("version")
        if version is None:
            raise FeedbackError("feedback snapshot has no 'version' field")
        if version != SUPPORTED_SNAPSHOT_VERSION or isinstance(version, bool):
            raise UnsupportedSnapshotVersion(
                f"feedback snapshot version {version!r} from replica {snapshot.get('replica_id')!r} "
                f"is not supported: this router reads version {SUPPORTED_SNAPSHOT_VERSION}"
            )
        try:
            return cls.model_validate(dict(snapshot))
        except ValidationError as err:
            raise FeedbackError(
                f"invalid feedback snapshot from replica {snapshot.get('replica_id')!r}: {err}"
            ) from err

    # --- derived quantities policies use ---
    @property
    def total_running_decodes(self) -> int:
        return sum(self.running_decodes_by_tier.values())

    def tier(self, name: str) -> TierFeedback | None:
        return self.tiers.get(name)

    def waiting_tokens_at_most(self, prompt_len: int) -> float:
        """Waiting prefill tokens of prompts no longer than `prompt_len` (all of them when the
        snapshot has no histogram)."""
        if self.waiting_prompt_histogram is None:
            return float(self.waiting_prefill_tokens)
        return self.waiting_prompt_histogram.tokens_at_most(prompt_len, self.waiting_prefill_tokens)


@dataclass(frozen=True, slots=True)
class ReplicaView:
    """One replica as a routing policy sees it."""

    replica_id: str
    feedback: ReplicaFeedback | None = None
    feedback_age_s: float | None = None  # None when there is no feedback yet
    in_flight: tuple[LedgerEntry, ...] = field(default_factory=tuple)

    @property
    def pending(self) -> PendingLoad:
        """What this router sent that the feedback does not show yet."""
        return summarize(self.in_flight)


def build_views(
    replica_ids: Iterable[str],
    feedback: Mapping[str, ReplicaFeedback | None],
    ledger: InFlightLedger | None,
    now_s: float,
) -> list[ReplicaView]:
    """Views for `replica_ids` from the latest feedback per replica and the router's ledger."""
    views = []
    for rid in replica_ids:
        fb = feedback.get(rid)
        age = None if fb is None else max(0.0, now_s - fb.timestamp_s)
        entries = ledger.entries(rid) if ledger is not None else ()
        views.append(ReplicaView(rid, fb, age, entries))
    return views


def usable_feedback(view: ReplicaView, max_age_s: float | None) -> ReplicaFeedback | None:
    """The view's feedback, or None if there is none or it is older than `max_age_s` (None: any age)."""
    if view.feedback is None:
        return None
    if max_age_s is not None and view.feedback_age_s is not None and view.feedback_age_s > max_age_s:
        return None
    return view.feedback
