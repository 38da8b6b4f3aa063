"""Per-key limits (`serve_app.ratelimit`): concurrency, requests and tokens per minute, OpenAI's
``x-ratelimit-*`` headers.  A fake clock: every time here is exact."""

from __future__ import annotations

import pytest

from serve_app.config import KeyLimits
from serve_app.ratelimit import KeyLimiter, format_reset


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def limiter(tier_limits: dict, key_limits: dict | None = None) -> tuple[KeyLimiter, Clock]:
    clock = Clock()
    return KeyLimiter({t: KeyLimits(**v) for t, v in tier_limits.items()},
                      {k: KeyLimits(**v) for k, v in (key_limits or {}).items()}, clock=clock), clock


def test_a_key_holds_at_most_its_concurrency_limit_and_gets_it_back_when_one_ends():
    lim, _ = limiter({"free": {"max_concurrent": 2}})
    assert lim.acquire("k1", "free") is None and lim.acquire("k1", "free") is None
    refusal = lim.acquire("k1", "free")
    assert refusal is not None and refusal.kind == "concurrency"
    assert lim.acquire("k2", "free") is None  # another key of the tier is not affected
    lim.release("k1")
    assert lim.acquire("k1", "free") is None


def test_requests_per_minute_is_a_bucket_that_refills_continuously():
    lim, clock = limiter({"free": {"requests_per_minute": 3}})
    for _ in range(3):
        assert lim.acquire("k", "free") is None
        lim.release("k")
    refusal = lim.acquire("k", "free")
    assert refusal.kind == "requests" and refusal.retry_after_s == pytest.approx(20.0)
    clock.t += 20.0  # one request's worth refilled
    assert lim.acquire("k", "free") is None


def test_tokens_are_charged_at_admission_and_the_unused_completion_refunded():
    lim, clock = limiter({"free": {"tokens_per_minute": 1000}})
    assert lim.acquire("k", "free") is None
    assert lim.charge("k", "free", 600) is None  # prompt 100 + max_tokens 500
    lim.release("k", refund_tokens=400)  # produced 100 of 500
    assert lim.headers("k", "free")["x-ratelimit-remaining-tokens"] == "800"
    assert lim.acquire("k", "free") is None
    refusal = lim.charge("k", "free", 900)
    assert refusal.kind == "tokens" and refusal.retry_after_s == pytest.approx(6.0)  # 100 more at 1000/min
    too_big = lim.charge("k", "free", 1001)
    assert too_big.kind == "tokens" and too_big.retry_after_s is None and "too large" in too_big.message


def test_per_key_overrides_replace_the_tiers_limits_field_by_field():
    lim, _ = limiter({"free": {"max_concurrent": 1, "requests_per_minute": 60}},
                     {"vip": {"max_concurrent": 5}})
    assert lim.limits("vip", "free") == KeyLimits(max_concurrent=5, requests_per_minute=60)
    assert lim.limits("other", "free") == KeyLimits(max_concurrent=1, requests_per_minute=60)


def test_headers_are_openais_for_the_limits_a_key_has():
    lim, clock = limiter({"free": {"requests_per_minute": 60, "tokens_per_minute": 6000}, "premium": {}})
    assert lim.acquire("k", "free") is None and lim.charge("k", "free", 3000) is None
    h = lim.headers("k", "free")
    assert h == {"x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "59",
                 "x-ratelimit-reset-requests": "1s", "x-ratelimit-limit-tokens": "6000",
                 "x-ratelimit-remaining-tokens": "3000", "x-ratelimit-reset-tokens": "30s"}
    assert lim.headers("p", "premium") == {}  # no limits, nothing to report


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (0.45, "0.5s"), (1, "1s"), (59.99, "60s"), (360, "6m0s"),
                                           (3723, "1h2m3s")])
def test_reset_durations_are_written_as_openai_writes_them(seconds, text):
    assert format_reset(seconds) == text


# --- several ingress replicas share each key's limits ------------------------------------------------

def shared(tier_limits: dict, k: int) -> tuple[KeyLimiter, Clock]:
    clock = Clock()
    return KeyLimiter({t: KeyLimits(**v) for t, v in tier_limits.items()}, clock=clock, ingress_replicas=k), clock


def _acquired(lim: KeyLimiter, n: int) -> int:
    """Requests of key k admitted out of ``n`` offered at once (none released)."""
    return sum(lim.acquire("k", "free") is None for _ in range(n))


# (limits, ingress replicas, requests this ingress admits at once: its share, rounded up)
SHARED = [
    ({"max_concurrent": 4}, 1, 4),
    ({"max_concurrent": 4}, 2, 2),
    ({"max_concurrent": 5}, 2, 3),
    ({"max_concurrent": 1}, 3, 1),  # never below one: a key may hold up to k requests together
    ({"requests_per_minute": 60}, 3, 20),
    ({"requests_per_minute": 10, "max_concurrent": 8}, 4, 2),
]


@pytest.mark.parametrize("limits,k,admitted", SHARED)
def test_each_ingress_enforces_its_share_of_a_key_s_limits(limits, k, admitted):
    lim, _ = shared({"free": limits}, k)
    assert _acquired(lim, 100) == admitted
    refusal = lim.acquire("k", "free")
    assert refusal is not None and (k == 1 or f"at each of {k} ingress replicas" in refusal.message)


def test_a_shared_bucket_refills_at_its_share_of_the_rate():
    lim, clock = shared({"free": {"requests_per_minute": 60}}, 2)  # 30 a minute here: one every 2 s
    assert _acquired(lim, 100) == 30
    assert lim.acquire("k", "free").retry_after_s == pytest.approx(2.0)
    clock.t += 2.0
    assert _acquired(lim, 100) == 1


def test_a_request_larger_than_this_ingress_s_share_waits_for_a_full_bucket_then_overdraws_it():
    lim, clock = shared({"free": {"tokens_per_minute": 1000}}, 2)  # 500 here, 1000 for the key
    assert lim.acquire("k", "free") is None
    assert lim.charge("k", "free", 800) is None  # within the key's limit: the full bucket goes into debt
    refusal = lim.charge("k", "free", 100)
    assert refusal.kind == "tokens" and refusal.retry_after_s == pytest.approx(48.0)  # 300 + 100 at 500/min
    clock.t += 60.0  # the debt of 300 repaid, 200 of 500 back
    assert lim.charge("k", "free", 800).retry_after_s == pytest.approx(36.0)
    clock.t += 36.0
    assert lim.charge("k", "free", 800) is None  # full again
    too_big = lim.charge("k", "free", 1001)  # over the key's whole limit: never
    assert too_big.retry_after_s is None and "too large" in too_big.message


def test_the_share_follows_the_count_and_the_headers_speak_for_the_key():
    lim, clock = shared({"free": {"requests_per_minute": 60, "max_concurrent": 4}}, 1)
    assert _acquired(lim, 10) == 4  # concurrency binds
    for _ in range(4):
        lim.release("k")
    assert lim.headers("k", "free")["x-ratelimit-remaining-requests"] == "56"
    lim.set_ingress_replicas(2)  # a second ingress came: this one's bucket halves, level with it
    assert lim.headers("k", "free") == {"x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "56",
                                        "x-ratelimit-reset-requests": "4s"}
    assert _acquired(lim, 10) == 2  # its share of the concurrency: 2
    lim.set_ingress_replicas(1)
    assert _acquired(lim, 10) == 2  # 4 again, 2 held
