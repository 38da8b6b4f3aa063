"""Per-key limits at the ingress (pure: no Ray): concurrency, requests per minute, tokens per
minute, and OpenAI's ``x-ratelimit-*`` headers.

Each authenticated key (by its key id, never the key) has the limits of its tier
(``tiers[].key_limits``) with its own overrides (``api_keys.limits``), `serve_app.config.KeyLimits`:

* ``max_concurrent``: requests of the key in flight at this ingress;
* ``requests_per_minute``: a token bucket of that many requests, refilled continuously (a key may
  burst to the limit, then gets one request every 60 / limit seconds);
* ``tokens_per_minute``: a token bucket of that many tokens; a request is charged its prompt
  tokens plus ``max_tokens`` when it is admitted (so a key cannot start more work than its rate
  allows), and the completion tokens it did not produce are refunded when it ends.

With k ingress replicas (``ingress.num_replicas``, or autoscaling), each enforces its share
ceil(limit / k) of every limit (`serve_app.admission.ingress_share`): a concurrency limit of that
many, buckets of that capacity refilled at that rate.  A request larger than this ingress's
tokens bucket (but within the key's whole limit) waits for a full bucket and overdraws it.  The
proxy spreads a key's requests over the ingresses by their load, not by key, so a key gets up to
k * ceil(limit / k) (< limit + k) together, and may be refused at its share on one ingress while
another still has room (as few as ceil(limit / k) when all its requests reach one ingress).
`KeyLimiter.set_ingress_replicas` follows the count (`serve_app.admission`).

A refusal is a 429 with OpenAI's error JSON (type ``requests`` or ``tokens``, code
``rate_limit_exceeded``) and ``Retry-After``: when the limit lets the request in again.
`KeyLimiter.headers` gives the headers OpenAI sends with every response for the limits a key
has: ``x-ratelimit-limit-requests``, ``-remaining-requests``, ``-reset-requests`` (the time until
the bucket is full again, e.g. ``1s``, ``6m0s``) and the same for ``tokens``; with k ingresses the
limit is the key's whole limit and the remaining this ingress's remaining times k (at most the
limit): an estimate under even spreading.

State is kept only for keys the key store authenticated, so it is bounded by the configured keys.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from serve_app.admission import ingress_share
from serve_app.config import KeyLimits

__all__ = ["KeyLimiter", "LimitRefusal", "TokenBucket", "format_reset"]


class TokenBucket:
    """``capacity`` units refilled at ``capacity`` per minute, starting full.  ``max_amount``
    (default ``capacity``): the most one take may ask for; more than ``capacity`` waits for a full
    bucket and leaves it in debt (a shared bucket: `KeyLimiter`)."""

    __slots__ = ("capacity", "level", "max_amount", "rate_per_s", "updated_s")

    def __init__(self, capacity: int, now_s: float, max_amount: int | None = None) -> None:
        self.capacity = float(capacity)
        self.rate_per_s = capacity / 60.0
        self.level = float(capacity)
        self.updated_s = now_s
        self.max_amount = float(capacity if max_amount is None else max(capacity, max_amount))

    def resize(self, capacity: int, now_s: float) -> None:
        """A new capacity (and rate), the level scaled with it."""
        self.refill(now_s)
        ratio = capacity / self.capacity
        self.level *= ratio
        self.max_amount = max(self.max_amount, float(capacity))
        self.capacity = float(capacity)
        self.rate_per_s = capacity / 60.0

    def refill(self, now_s: float) -> None:
        if now_s > self.updated_s:
            self.level = min(self.capacity, self.level + (now_s - self.updated_s) * self.rate_per_s)
            self.updated_s = now_s

    def wait_s(self, amount: float, now_s: float) -> float:
        """Seconds until ``amount`` may be taken (inf if it is over ``max_amount``)."""
        self.refill(now_s)
        if amount > self.max_amount:
            return math.inf
        return max(0.0, (min(amount, self.capacity) - self.level) / self.rate_per_s)

    def take(self, amount: float) -> None:
        self.level -= amount

    def give_back(self, amount: float, now_s: float) -> None:
        self.refill(now_s)
        self.level = min(self.capacity, self.level + amount)

    def reset_s(self, now_s: float) -> float:
        """Seconds until the bucket is full again."""
        self.refill(now_s)
        return (self.capacity - self.level) / self.rate_per_s


@dataclass(frozen=True)
class LimitRefusal:
    """A request a key's limit refuses: ``kind`` (``concurrency``, ``requests`` or ``tokens``),
    the message, and when to retry (seconds; None: never with this request, e.g. it asks for more
    tokens than the per-minute limit)."""

    kind: str
    message: str
    retry_after_s: float | None


class _KeyState:
    __slots__ = ("in_flight", "requests", "tokens")

    def __init__(self, limits: KeyLimits, now_s: float, ingress_replicas: int) -> None:
        self.in_flight = 0
        rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
        k = ingress_replicas
        self.requests = TokenBucket(ingress_share(rpm, k), now_s, rpm) if rpm is not None else None
        self.tokens = TokenBucket(ingress_share(tpm, k), now_s, tpm) if tpm is not None else None


class KeyLimiter:
    """The limits of every key: `acquire` a request slot at admission, `charge` its tokens once
    the prompt is tokenized, `release` it when it ends (with the tokens to refund).
    ``ingress_replicas``: how many ingress replicas share each limit (module docstring)."""

    def __init__(self, tier_limits: Mapping[str, KeyLimits], key_limits: Mapping[str, KeyLimits] | None = None,
                 clock: Callable[[], float] = time.monotonic, ingress_replicas: int = 1) -> None:
        self.tier_limits = dict(tier_limits)
        self.key_limits = dict(key_limits or {})
        self.clock = clock
        self.ingress_replicas = max(1, int(ingress_replicas))
        self._state: dict[str, _KeyState] = {}
        self._limits: dict[str, KeyLimits] = {}

    def set_ingress_replicas(self, ingress_replicas: int) -> None:
        """``ingress_replicas`` share the limits now: every key's buckets take the new share, their
        levels scaled with it (the slots held stay held)."""
        k = max(1, int(ingress_replicas))
        if k == self.ingress_replicas:
            return
        self.ingress_replicas = k
        now = self.clock()
        for key_id, st in self._state.items():
            lim = self._limits[key_id]
            for bucket, limit in ((st.requests, lim.requests_per_minute), (st.tokens, lim.tokens_per_minute)):
                if bucket is not None and limit is not None:
                    bucket.resize(ingress_share(limit, k), now)

    def _share_note(self, limit: int) -> str:
        k = self.ingress_replicas
        return "" if k == 1 else f" ({ingress_share(limit, k)} of it at each of {k} ingress replicas)"

    def limits(self, key_id: str, tier: str) -> KeyLimits:
        lim = self._limits.get(key_id)
        if lim is None:
            lim = self._limits[key_id] = self.tier_limits.get(tier, KeyLimits()).merged(self.key_limits.get(key_id))
        return lim

    def _key(self, key_id: str, tier: str) -> tuple[KeyLimits, _KeyState]:
        lim = self.limits(key_id, tier)
        st = self._state.get(key_id)
        if st is None:
            st = self._state[key_id] = _KeyState(lim, self.clock(), self.ingress_replicas)
        return lim, st

    def in_flight(self, key_id: str) -> int:
        st = self._state.get(key_id)
        return st.in_flight if st is not None else 0

    def total_in_flight(self) -> int:
        """Request slots held, all keys."""
        return sum(st.in_flight for st in self._state.values())

    def acquire(self, key_id: str, tier: str) -> LimitRefusal | None:
        """Take a request slot (concurrency, one request of the per-minute rate), or say why not."""
        lim, st = self._key(key_id, tier)
        now = self.clock()
        if lim.max_concurrent is not None and st.in_flight >= ingress_share(lim.max_concurrent, self.ingress_replicas):
            return LimitRefusal("concurrency", f"Rate limit reached for concurrent requests: limit "
                                f"{lim.max_concurrent} in flight for this API key"
                                f"{self._share_note(lim.max_concurrent)}. Retry when one finishes.", 1.0)
        if st.requests is not None:
            wait = st.requests.wait_s(1.0, now)
            if wait > 0:
                return LimitRefusal("requests", f"Rate limit reached for requests per minute (RPM): limit "
                                    f"{lim.requests_per_minute}{self._share_note(lim.requests_per_minute)}. "
                                    f"Please try again in {format_reset(wait)}.", wait)
            st.requests.take(1.0)
        st.in_flight += 1
        return None

    def charge(self, key_id: str, tier: str, tokens: int) -> LimitRefusal | None:
        """Charge an acquired request ``tokens`` (prompt + max_tokens) of the per-minute rate."""
        lim, st = self._key(key_id, tier)
        if st.tokens is None:
            return None
        wait = st.tokens.wait_s(float(tokens), self.clock())
        if wait > 0:
            limit = lim.tokens_per_minute
            if math.isinf(wait):
                return LimitRefusal("tokens", f"Request too large for tokens per minute (TPM): limit {limit}, "
                                    f"requested {tokens} (prompt + max_tokens). Reduce max_tokens or the prompt.",
                                    None)
            return LimitRefusal("tokens", f"Rate limit reached for tokens per minute (TPM): limit {limit}"
                                f"{self._share_note(limit)}, requested {tokens}. Please try again in "
                                f"{format_reset(wait)}.", wait)
        st.tokens.take(float(tokens))
        return None

    def release(self, key_id: str, refund_tokens: int = 0) -> None:
        """An acquired request ended; ``refund_tokens``: charged tokens it did not use."""
        st = self._state.get(key_id)
        if st is None:
            return
        st.in_flight = max(0, st.in_flight - 1)
        if refund_tokens > 0 and st.tokens is not None:
            st.tokens.give_back(float(refund_tokens), self.clock())

    def headers(self, key_id: str, tier: str) -> dict[str, str]:
        """OpenAI's ``x-ratelimit-*`` headers for the limits the key has."""
        lim, st = self._key(key_id, tier)
        now = self.clock()
        out: dict[str, str] = {}
        for kind, limit, bucket in (("requests", lim.requests_per_minute, st.requests),
                                    ("tokens", lim.tokens_per_minute, st.tokens)):
            if limit is None or bucket is None:
                continue
            bucket.refill(now)
            out[f"x-ratelimit-limit-{kind}"] = str(limit)
            remaining = math.floor(bucket.level * self.ingress_replicas)  # this ingress's share, scaled to the key
            out[f"x-ratelimit-remaining-{kind}"] = str(min(limit, max(0, remaining)))
            out[f"x-ratelimit-reset-{kind}"] = format_reset(bucket.reset_s(now))
        return out


def format_reset(seconds: float) -> str:
    """A duration the way OpenAI's reset headers write it: ``0s``, ``1.5s``, ``6m0s``, ``1h2m3s``."""
    if seconds < 60:
        return f"{math.ceil(seconds * 10) / 10:g}s"
    total = math.ceil(seconds)
    h, rest = divmod(total, 3600)
    m, s = divmod(rest, 60)
    return (f"{h}h" if h else "") + f"{m}m{s}s"
