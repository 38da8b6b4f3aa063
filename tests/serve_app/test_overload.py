"""Overload on a real loopback Ray Serve: about twice the cluster's capacity for a bounded time,
through HTTP, with 2 simulated replicas.  Every request must be answered (tokens, or a 429 with
Retry-After and the OpenAI error JSON), with no 5xx; the free tier is shed, not premium, and
premium keeps its SLOs (median TTFT <= its 0.5 s target, P99 TBT within 100 ms).

Scale.  The replicas run the simulated RTX 6000 Ada at ``time_scale`` TIME_SCALE (wall seconds
per simulated GPU second) and every tier's SLO and target is scaled by the same factor, so the
scheduler, the router and admission make exactly the decisions of the unscaled system; measured
times are divided by TIME_SCALE before they are compared with the paper's SLOs.  TIME_SCALE is
above 1 (slower than the GPU) so that twice the capacity is about 10 requests/s on the wall clock,
which a 2-core machine serves without its own CPU jitter dominating the token timings.

Capacity.  The workload: prompts uniform in [200, 1800] tokens, 16..48 output tokens, 25 %
premium.  The virtual-time simulator (`python -m loadtest.simulate run --scheduler
slai-spf-dynamic --trace <that trace> --tiers premium:0.1:0.25,free:0.5:0.75`) puts one replica's
stable capacity at 10 requests/s unscaled (SLOs met and the backlog bounded; at 11/s the backlog
grows): prefill-bound, ~10.6k prompt tokens/s over a 1000-token mean prompt.  2 replicas at scale
TIME_SCALE: 20 / TIME_SCALE requests/s; OVERLOAD times that is offered.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from collections import Counter

import pytest

ray = pytest.importorskip("ray")
httpx = pytest.importorskip("httpx")
from ray import serve  # noqa: E402

from serve_app.app import build_app  # noqa: E402

KEYS = {"premium": "overload-premium-key-1", "free": "overload-free-key-2"}
SERVE_ENV_VARS = {"TIERED_API_KEYS": ",".join(f"{k}:{t}" for t, k in KEYS.items()), "TIERED_METRICS": "0"}
MODEL = "sim-overload"

TIME_SCALE = 4.0
REPLICAS = 2
CAPACITY_QPS = REPLICAS * 10.0 / TIME_SCALE  # wall-clock requests/s (see the module docstring)
OVERLOAD = 2.0
DURATION_S = 25.0
PREMIUM_SHARE = 0.25
PREMIUM_TBT_SLO_S, PREMIUM_TTFT_TARGET_S = 0.1, 0.5


@pytest.fixture(scope="module")
def base_url(local_serve):
    s = TIME_SCALE
    tiers = [{"name": "premium", "tbt_slo_s": 0.1 * s, "ttft_target_s": 0.5 * s, "rank": 0, "shed_order": 1},
             {"name": "free", "tbt_slo_s": 0.5 * s, "ttft_target_s": 0.5 * s, "rank": 1, "shed_order": 0}]
    serve.run(build_app({"overrides": {"tiers": tiers, "model_name": MODEL, "engine.time_scale": s,
                                       "replicas.num_replicas": REPLICAS, "replicas.cpus_per_replica": 0}}),
              name="overload", route_prefix="/")
    return f"http://127.0.0.1:{local_serve}"


async def _one(client: httpx.AsyncClient, url: str, tier: str, prompt_len: int, max_tokens: int) -> dict:
    body = {"model": MODEL, "prompt": [1 + i % 200 for i in range(prompt_len)], "max_tokens": max_tokens,
            "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    rec: dict = {"tier": tier, "prompt_len": prompt_len, "max_tokens": max_tokens, "tokens": 0, "times": []}
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body,
                                 headers={"Authorization": f"Bearer {KEYS[tier]}"}) as r:
            rec["status"] = r.status_code
            rec["retry_after"] = r.headers.get("retry-after")
            if r.status_code != 200:
                rec["body"] = json.loads(await r.aread())
                return rec
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data: "):])
                if "error" in event:
                    rec["stream_error"] = event["error"]
                    continue
                if event["choices"] and (event["choices"][0].get("text")
                                         or event["choices"][0].get("delta", {}).get("content")):
                    # the event's tokens (coalesced by the replica) arrive together
                    k = event["usage"]["completion_tokens"] - rec["tokens"]
                    rec["times"] += [time.perf_counter() - t0] * k
                    rec["tokens"] += k
            rec["done"] = True
    except Exception as e:  # noqa: BLE001 - recorded, asserted on below
        rec["exception"] = repr(e)
    return rec


async def _offer(url: str, qps: float, duration_s: float, seed: int = 7) -> tuple[list[dict], float]:
    rng = random.Random(seed)
    t, arrivals = 0.0, []
    while True:
        t += rng.expovariate(qps)
        if t >= duration_s:
            break
        tier = "premium" if rng.random() < PREMIUM_SHARE else "free"
        arrivals.append((t, tier, rng.randint(200, 1800), rng.randint(16, 48)))
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=200)
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), limits=limits) as client:
        start = time.perf_counter()

        async def at(when, *args):
            await asyncio.sleep(max(0.0, start + when - time.perf_counter()))
            return await _one(client, url, *args)

        recs = await asyncio.gather(*(at(when, *args) for when, *args in arrivals))
    return list(recs), len(arrivals) / duration_s


def _p(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def _reason(rec: dict) -> str:
    msg = rec["body"]["error"]["message"]
    for key, reason in (("queueing delay", "queue"), ("in flight", "in_flight"), ("between tokens", "tbt"),
                        ("KV cache", "kv"), ("backpressure", "backpressure")):
        if key in msg:
            return reason
    return "other"


def test_the_ingress_polls_every_replica(base_url):
    ingress = serve.get_deployment_handle("Ingress", "overload")
    snaps = ingress.poll_feedback_once.remote(5.0).result(timeout_s=30)
    assert sorted(len(s.replica_id) > 0 for s in snaps) == [True] * REPLICAS
    assert len({s.replica_id for s in snaps}) == REPLICAS


def test_twice_the_capacity_sheds_free_and_holds_premium(base_url):
    # warm up: a few requests so that the replicas have reported at least once
    asyncio.run(_offer(base_url, 2.0, 2.0, seed=1))
    time.sleep(2.0)
    recs, offered = asyncio.run(_offer(base_url, OVERLOAD * CAPACITY_QPS, DURATION_S))

    summary: dict = {"offered_qps": round(offered, 2), "capacity_qps": CAPACITY_QPS, "requests": len(recs)}
    for tier in ("premium", "free"):
        mine = [r for r in recs if r["tier"] == tier]
        ok = [r for r in mine if r.get("status") == 200]
        ttft = [r["times"][0] / TIME_SCALE for r in ok if r["times"]]
        gaps = [(b - a) / TIME_SCALE for r in ok for a, b in zip(r["times"], r["times"][1:])]
        summary[tier] = {"requests": len(mine), "admitted": len(ok),
                         "shed": sum(1 for r in mine if r.get("status") == 429),
                         "shed_reasons": dict(sorted(Counter(_reason(r) for r in mine
                                                             if r.get("status") == 429).items())),
                         "ttft_p50_s": round(statistics.median(ttft), 3) if ttft else None,
                         "ttft_p90_s": round(_p(ttft, 0.90), 3) if ttft else None,
                         "ttft_p99_s": round(_p(ttft, 0.99), 3) if ttft else None,
                         "tbt_p99_s": round(_p(gaps, 0.99), 4) if gaps else None, "tbt_gaps": len(gaps)}
    print("\noverload:", json.dumps(summary))

    # every request answered: its tokens, or a 429 with Retry-After and the OpenAI error JSON
    for r in recs:
        assert "exception" not in r, r
        assert r["status"] in (200, 429), r
        if r["status"] == 200:
            assert r.get("done") and "stream_error" not in r and r["tokens"] == r["max_tokens"], r
        else:
            assert r["retry_after"] is not None and int(r["retry_after"]) >= 1, r
            err = r["body"]["error"]
            assert err["code"] == "overloaded" and err["type"] == "server_overloaded" and err["message"], r
    prem, free = summary["premium"], summary["free"]
    # the free tier is shed, premium (nearly) never
    assert free["shed"] > prem["shed"] and free["shed"] >= 0.2 * free["requests"], summary
    assert prem["shed"] <= 0.05 * prem["requests"], summary
    # the cluster still serves about its capacity (shedding is not blanket refusal)
    served = prem["admitted"] + free["admitted"]
    assert served >= 0.6 * CAPACITY_QPS * DURATION_S, summary
    # premium's SLOs hold (times scaled back to the simulated GPU's)
    assert prem["ttft_p50_s"] <= PREMIUM_TTFT_TARGET_S, summary
    assert prem["tbt_p99_s"] <= PREMIUM_TBT_SLO_S, summary
    # and no premium request starves behind a growing backlog: under shortest-prompt-first the
    # median TTFT stays low even without admission, but the queue grows for the whole overload
    # and long prompts wait (without admission this run's premium P99 TTFT is ~10 s; with it
    # 1-2 s: SPF still lets shorter prompts pass the longest ones at full utilization)
    assert prem["ttft_p99_s"] <= 8 * PREMIUM_TTFT_TARGET_S, summary
