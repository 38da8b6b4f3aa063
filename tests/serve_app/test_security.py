"""Security: API keys are stored hashed, compared in constant time, never logged, and no header,
query or body field lets a key reach a tier above its own.

What tests/serve_app/test_auth.py already proves is not repeated here (the walk over a KeyStore's
attributes finds only digests; repr shows counts; error messages never echo a key; one
dict lookup and one compare_digest per request, whatever the number of keys).  This module adds:

- hashed: a pickled / cloudpickled KeyStore, the live Ingress's state and the deployment's init
  args (what Serve ships to the replica) hold no plaintext key;
- constant time: a key matches only when ``hmac.compare_digest`` of two equal-length digests says
  so (the dict lookup by digest only picks the entry; serve_app/auth.py says why the lookup leaks
  nothing useful), and the number and lengths of the comparisons do not depend on which key
  matched, whether any did, or the presented key's length;
- never logged: requests with valid, near-miss and unknown keys (also in body fields), through the
  in-process ingress with every logger at DEBUG and through a live Serve app at DEBUG, leave no
  plaintext key (nor its digest) in any log record or in any file of the Ray session;
- no tier escalation: a table of headers (x-tier, x-priority, ..., Authorization variants,
  duplicated Authorization headers), query parameters and body fields (tier, priority, user,
  vllm_xargs, extra_body, metadata, service_tier, the replica payload's own field names): a free
  key always gets ``x-tier: free``; in process the replica payload's tier, rank and TBT SLO are
  the free tier's; live, the replica's per-tier token counters (its feedback snapshot) grow only
  for the free tier, by exactly the completion tokens served.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import pickle
import secrets
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from ray import cloudpickle

from serve_app import auth
from serve_app.auth import AuthError, KeyStore, hash_key
from serve_app.config import AppConfig
from ingress_testkit import FakeReplicas, call_inprocess
from ingress_testkit import make_ingress as make_kit_ingress

MODEL = "mistral-7b-sim"
# fresh random keys each run, so a match in a log cannot be a coincidence
PREMIUM_KEY = "pk-" + secrets.token_urlsafe(24)
FREE_KEY = "fk-" + secrets.token_urlsafe(24)
KEYS = {"premium": PREMIUM_KEY, "free": FREE_KEY}
NEAR_MISSES = [FREE_KEY[:-1] + ("A" if FREE_KEY[-1] != "A" else "B"), PREMIUM_KEY.upper(), PREMIUM_KEY + "x",
               "zz-" + secrets.token_urlsafe(24)]
PLAINTEXTS = [PREMIUM_KEY, FREE_KEY, *NEAR_MISSES]
CONTEXT = 256


# ------------------------------------------------------------------------------------ hashed

def _env() -> dict[str, str]:
    return {"TIERED_API_KEYS": f"{PREMIUM_KEY}:premium,{FREE_KEY}:free"}


def _assert_no_plaintext(blob: bytes | str, what: str) -> None:
    data = blob.encode("utf-8", "surrogatepass") if isinstance(blob, str) else blob
    for key in PLAINTEXTS:
        for enc in (key.encode(), key.encode("utf-16-le"), key.encode("utf-32-le")):
            assert enc not in data, f"{what} holds a plaintext key"


def test_pickled_keystore_holds_only_digests() -> None:
    store = KeyStore.from_config(AppConfig(), environ=_env())
    for dump in (pickle.dumps(store), cloudpickle.dumps(store), pickle.dumps(store, protocol=0)):
        _assert_no_plaintext(dump, "the pickled KeyStore")
        assert hash_key(FREE_KEY).encode() in dump  # the digests are what it holds
        assert pickle.loads(dump).tier_for(f"Bearer {FREE_KEY}") == "free"


def test_ingress_state_and_deployment_args_hold_no_plaintext(monkeypatch: pytest.MonkeyPatch) -> None:
    from serve_app.app import build_app

    monkeypatch.setenv("TIERED_API_KEYS", _env()["TIERED_API_KEYS"])
    ingress, _ = make_ingress()
    _assert_no_plaintext(cloudpickle.dumps(ingress.keys), "the Ingress's KeyStore")
    _assert_no_plaintext(ingress.config.model_dump_json(), "the Ingress's config")
    _assert_no_plaintext(repr(vars(ingress)), "repr of the Ingress's attributes")
    app = build_app({"overrides": {"replicas.num_replicas": 1}})
    # what Serve ships to the ingress replica: its init args (the config dump and the replica app)
    _assert_no_plaintext(cloudpickle.dumps((app._bound_deployment.init_args, app._bound_deployment.init_kwargs)),
                         "the Ingress deployment's init args")


# ----------------------------------------------------------------------------- constant time

STORE_KEYS = [f"key-{i:02d}-{secrets.token_urlsafe(8)}" for i in range(40)]


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    calls: list[tuple[str, str]] = []
    real = hmac.compare_digest

    def counting(a, b):  # noqa: ANN001, ANN202
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    return calls


@pytest.mark.parametrize("presented", [
    STORE_KEYS[0], STORE_KEYS[19], STORE_KEYS[-1],            # a match first, in the middle, last
    "unknown", "u" * 2000, STORE_KEYS[0][:-1], STORE_KEYS[0].upper(),  # misses of any length
], ids=["first", "middle", "last", "short miss", "long miss", "prefix", "upper"])
def test_comparisons_do_not_depend_on_the_presented_key(counted: list, presented: str) -> None:
    store = KeyStore({hash_key(k): ("premium" if i % 2 else "free") for i, k in enumerate(STORE_KEYS)})
    try:
        tier = store.tier_for(f"Bearer {presented}")
    except AuthError:
        tier = None
    assert tier == ({k: ("premium" if i % 2 else "free") for i, k in enumerate(STORE_KEYS)}.get(presented))
    assert len(counted) == 1  # one comparison, hit or miss
    # equal-length hex digests on both sides: the presented key's length never reaches the compare
    assert {(len(a), len(b)) for a, b in counted} == {(64, 64)}
    assert {a for a, _ in counted} == {hashlib.sha256(presented.encode()).hexdigest()}
    assert counted[0][1] == (hash_key(presented) if presented in STORE_KEYS else auth._NO_DIGEST)


def test_compare_digest_is_the_only_way_to_match(monkeypatch: pytest.MonkeyPatch) -> None:
    store = KeyStore.from_config(AppConfig(), environ=_env())
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: False)
    for key in KEYS.values():  # the dict lookup alone never lets a key in
        with pytest.raises(AuthError):
            store.tier_for(f"Bearer {key}")
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: True)
    for tier, key in KEYS.items():
        assert store.tier_for(f"Bearer {key}") == tier
    with pytest.raises(AuthError):  # nor does a comparison alone: an unknown key has no entry
        store.tier_for("Bearer anything-at-all")


# --------------------------------------------------------------------- in-process ingress (no Ray)

def make_ingress() -> tuple[Any, FakeReplicas]:
    """The real Ingress class with a fake replica handle (`ingress_testkit`); keys from `_env`."""
    return make_kit_ingress(_env()["TIERED_API_KEYS"], max_context_tokens=CONTEXT)


def serve_inprocess(ingress: Any, body: dict[str, Any], headers: list[tuple[str, str]], *, chat: bool = False,
                    query: str = "") -> tuple[int, dict[str, str], bytes]:
    return call_inprocess(ingress, json.dumps(body).encode(), headers, chat=chat, query=query)


def _bearer(key: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {key}")]


BASE = {"model": MODEL, "prompt": "which tier am I?", "max_tokens": 3}
# (id, extra headers, body fields, query string) sent with the free key
ESCALATIONS: list[tuple[str, list[tuple[str, str]], dict[str, Any], str]] = [
    ("x-tier header", [("x-tier", "premium")], {}, ""),
    ("x-priority header", [("x-priority", "0")], {}, ""),
    ("x-user-tier header", [("x-user-tier", "premium")], {}, ""),
    ("x-api-tier header", [("x-api-tier", "premium")], {}, ""),
    ("tier header", [("tier", "premium")], {}, ""),
    ("priority header", [("priority", "high")], {}, ""),
    ("openai service tier header", [("openai-service-tier", "priority"), ("openai-organization", "premium")], {}, ""),
    ("forwarded identity headers", [("x-forwarded-user", "premium"), ("x-remote-user", "admin"),
                                    ("x-forwarded-for", "127.0.0.1")], {}, ""),
    ("serve request id and model id headers", [("x-request-id", "premium"),
                                               ("serve_multiplexed_model_id", "premium")], {}, ""),
    ("tier query params", [], {}, "tier=premium&priority=0&x-tier=premium"),
    ("tier body field", [], {"tier": "premium"}, ""),
    ("priority body field", [], {"priority": -100}, ""),
    ("user body field", [], {"user": "premium"}, ""),
    ("vllm_xargs", [], {"vllm_xargs": {"tier": "premium", "priority": -100, "tier_rank": 0}}, ""),
    ("extra_body", [], {"extra_body": {"tier": "premium", "priority": 0}}, ""),
    ("metadata", [], {"metadata": {"tier": "premium"}}, ""),
    ("service_tier", [], {"service_tier": "priority"}, ""),
    ("the payload's own fields", [], {"tier_rank": 0, "tbt_slo_s": 0.001, "request_id": "cmpl-forged",
                                      "sampling": {"tier": "premium"}, "prompt_token_ids": [1, 2]}, ""),
    ("x-tier body field", [], {"x-tier": "premium", "headers": {"x-tier": "premium"}}, ""),
    ("everything at once, streamed", [("x-tier", "premium"), ("x-priority", "0")],
     {"tier": "premium", "priority": -100, "vllm_xargs": {"tier": "premium"}, "service_tier": "priority",
      "stream": True, "stream_options": {"include_usage": True, "tier": "premium"}}, "tier=premium"),
]


def _refused_fields(body: dict[str, Any]) -> set[str]:
    """The body fields an escalation attempt sets that the server does not take: it must refuse
    the request (400 naming one), never ignore them (and never serve it above the key's tier)."""
    from serve_app.openai_api import REFUSED, CompletionRequest

    bad = {k for k, v in body.items() if k not in CompletionRequest.model_fields and not (k in REFUSED and v is None)}
    if set(body.get("stream_options") or {}) - {"include_usage"}:
        bad.add("stream_options." + next(iter(set(body["stream_options"]) - {"include_usage"})))
    return bad


def _refused_or_served_free(status: int, h: Any, content: bytes | str, body: dict[str, Any]) -> str | None:
    """None when the response is what an escalation attempt may get: a 400 naming one of the
    fields it set that the server does not take, or (none set) a 200 served as free."""
    bad = _refused_fields(body)
    if bad:
        if status != 400:
            return f"expected a 400 naming one of {sorted(bad)}, got {status}"
        err = json.loads(content)["error"]
        return None if err["param"] in bad else f"the 400 names {err['param']!r}, not one of {sorted(bad)}"
    if status != 200 or h.get("x-tier") != "free":
        return f"expected 200 as free, got {status} as {h.get('x-tier')}"
    return None


# Authorization variants with the free key (header lists replace the Bearer header): tier or 401
AUTH_VARIANTS: list[tuple[str, list[tuple[str, str]], str | None]] = [
    ("lower-case scheme", [("Authorization", f"bearer {FREE_KEY}")], "free"),
    ("upper-case scheme", [("Authorization", f"BEARER {FREE_KEY}")], "free"),
    ("spaces after the scheme", [("Authorization", f"Bearer    {FREE_KEY}")], "free"),
    ("duplicate: free then a forged premium", [("Authorization", f"Bearer {FREE_KEY}"),
                                               ("Authorization", "Bearer premium")], None),
    ("duplicate: free then a near miss", [("Authorization", f"Bearer {FREE_KEY}"),
                                          ("Authorization", f"Bearer {NEAR_MISSES[1]}")], None),
    ("duplicate: the free key twice", [("Authorization", f"Bearer {FREE_KEY}"),
                                       ("Authorization", f"Bearer {FREE_KEY}")], None),
    ("duplicate: forged first", [("Authorization", "Bearer premium"), ("Authorization", f"Bearer {FREE_KEY}")], None),
    ("two keys in one header", [("Authorization", f"Bearer {FREE_KEY}, Bearer premium")], None),
    ("key then a tier word", [("Authorization", f"Bearer {FREE_KEY} premium")], None),
    ("key with a tier suffix", [("Authorization", f"Bearer {FREE_KEY}:premium")], None),
    ("padding appended", [("Authorization", f"Bearer {FREE_KEY}==")], None),
    ("lower-case name", [("authorization", f"Bearer {FREE_KEY}")], "free"),
]
# the in-process Request is built from raw headers: whitespace h11 would refuse on the wire too
AUTH_VARIANTS_INPROCESS = AUTH_VARIANTS + [
    ("tab and spaces around", [("Authorization", f"\tBearer {FREE_KEY}  ")], "free"),
]


@pytest.fixture(scope="module")
def inprocess() -> tuple[Any, FakeReplicas]:
    return make_ingress()


@pytest.mark.parametrize("headers,body,query", [c[1:] for c in ESCALATIONS], ids=[c[0] for c in ESCALATIONS])
def test_no_escalation_inprocess_payload_is_free(inprocess, headers, body, query) -> None:
    ingress, replicas = inprocess
    replicas.payloads.clear()
    status, h, content = serve_inprocess(ingress, {**BASE, **body}, _bearer(FREE_KEY) + headers, query=query)
    problem = _refused_or_served_free(status, h, content, body)
    assert problem is None, (problem, content)
    if status == 400:
        assert not replicas.payloads  # refused before any work
        return
    free = ingress.config.tier("free")
    [p] = replicas.payloads
    assert (p.tier.name, p.tier.rank, p.tier.tbt_slo_s) == ("free", free.rank, free.tbt_slo_s)
    assert p.request_id != "cmpl-forged" and "tier" not in p.sampling.model_dump()
    assert p.prompt_token_ids != [1, 2]


@pytest.mark.parametrize("headers,tier", [c[1:] for c in AUTH_VARIANTS_INPROCESS],
                         ids=[c[0] for c in AUTH_VARIANTS_INPROCESS])
def test_authorization_variants_inprocess(inprocess, headers, tier) -> None:
    ingress, replicas = inprocess
    replicas.payloads.clear()
    status, h, content = serve_inprocess(ingress, BASE, headers)
    if tier is None:
        assert status == 401 and json.loads(content)["error"]["code"] == "invalid_api_key" and not replicas.payloads
    else:
        assert status == 200 and h["x-tier"] == tier and replicas.payloads[0].tier.name == tier


def test_no_key_in_any_log_record_inprocess(inprocess, caplog: pytest.LogCaptureFixture) -> None:
    ingress, replicas = inprocess
    caplog.set_level(logging.DEBUG)  # root and every logger
    for name in ("ray", "ray.serve", "serve_app", "uvicorn", "starlette", "fastapi"):
        caplog.set_level(logging.DEBUG, logger=name)
    bodies = [BASE, {**BASE, "stream": True}, {**BASE, "user": PREMIUM_KEY, "api_key": FREE_KEY},
              {**BASE, "max_tokens": 0}, {"model": "nope", "prompt": FREE_KEY}]
    statuses = []
    for key in PLAINTEXTS:
        for body in bodies:
            statuses.append(serve_inprocess(ingress, body, _bearer(key))[0])
    replicas.fail = True  # the failure paths log warnings: still no key
    try:
        statuses.append(serve_inprocess(ingress, BASE, _bearer(FREE_KEY))[0])
        statuses.append(serve_inprocess(ingress, {**BASE, "stream": True}, _bearer(PREMIUM_KEY))[0])
    finally:
        replicas.fail = False
    assert {200, 400, 401, 404, 500} <= set(statuses)
    assert any(r.levelno >= logging.WARNING for r in caplog.records), "the failure paths logged nothing?"
    text = "\n".join(f"{r.getMessage()} {r.args!r} {r.exc_text or ''}" for r in caplog.records) + caplog.text
    _assert_no_plaintext(text, "a log record")
    assert not any(hash_key(k) in text for k in KEYS.values())


# ------------------------------------------------------------------------------------------ live

SERVE_ENV_VARS: dict[str, str] = {}  # no keys in the environment: they come from a key file


@pytest.fixture(scope="module")
def live(local_serve, tmp_path_factory):
    """The app on a loopback Serve, keys from a file (as from a mounted Secret), DEBUG logging."""
    from ray import serve

    from serve_app.app import build_app

    key_file = tmp_path_factory.mktemp("secrets") / "api-keys"
    key_file.write_text(f"{PREMIUM_KEY} premium\n{FREE_KEY} free\n")
    overrides = {"api_keys.env": None, "api_keys.file": str(key_file), "engine.time_scale": 0.01,
                 "replicas.num_replicas": 1, "replicas.cpus_per_replica": 0, "router.feedback_period_s": 0.5}
    serve.run(build_app({"overrides": overrides, "max_context_tokens": CONTEXT}), name="sec", route_prefix="/",
              logging_config={"log_level": "DEBUG"})
    return f"http://127.0.0.1:{local_serve}", serve.get_deployment_handle("LLMReplica", app_name="sec")


def _tier_tokens(replica) -> dict[str, int]:  # noqa: ANN001
    snap = replica.record_routing_stats.remote().result(timeout_s=30)
    return {t: int(v.get("tokens_total", 0)) for t, v in snap.get("tiers", {}).items()}


def _completion_tokens(resp: httpx.Response) -> int:
    if resp.headers.get("content-type", "").startswith("text/event-stream"):
        events = [e.removeprefix("data: ") for e in resp.text.split("\n\n") if e]
        return [json.loads(e) for e in events if e != "[DONE]"][-1]["usage"]["completion_tokens"]
    return resp.json()["usage"]["completion_tokens"]


def test_no_escalation_live_tier_header_and_replica_token_counts(live) -> None:
    url, replica = live
    before = _tier_tokens(replica)
    served, failures = 0, []
    with httpx.Client(base_url=url, timeout=30) as client:
        for name, headers, body, query in ESCALATIONS:
            r = client.post("/v1/completions" + (f"?{query}" if query else ""), json={**BASE, **body},
                            headers=_bearer(FREE_KEY) + headers)
            problem = _refused_or_served_free(r.status_code, r.headers, r.text, body)
            if problem is not None:
                failures.append((name, problem, r.text[:200]))
            elif r.status_code == 200:
                served += _completion_tokens(r)
        for name, headers, tier in AUTH_VARIANTS:
            r = client.post("/v1/completions", json=BASE, headers=headers)
            if tier is None:
                if r.status_code != 401:
                    failures.append((name, r.status_code, r.headers.get("x-tier")))
            elif r.status_code != 200 or r.headers.get("x-tier") != tier:
                failures.append((name, r.status_code, r.headers.get("x-tier")))
            else:
                served += _completion_tokens(r)
        r = client.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 3, "service_tier": "priority",
                                                      "messages": [{"role": "user", "content": "premium please"}]},
                        headers=_bearer(FREE_KEY) + [("x-tier", "premium")])
        assert r.status_code == 200 and r.headers["x-tier"] == "free", r.text
        served += _completion_tokens(r)
    assert not failures, failures
    after = _tier_tokens(replica)
    assert served > 0
    assert after.get("premium", 0) == before.get("premium", 0), (before, after)  # not one premium token
    assert after["free"] - before.get("free", 0) == served, (before, after, served)
    # control: the counters do see a premium key's tokens
    r = httpx.post(f"{url}/v1/completions", json=BASE, headers=_bearer(PREMIUM_KEY), timeout=30)
    assert r.status_code == 200 and r.headers["x-tier"] == "premium"
    assert _tier_tokens(replica)["premium"] - after.get("premium", 0) == _completion_tokens(r)


def test_no_key_in_any_file_of_the_ray_session(live) -> None:
    import ray

    url, _ = live
    statuses = set()
    with httpx.Client(base_url=url, timeout=30) as client:
        for key in PLAINTEXTS:
            for body in (BASE, {**BASE, "stream": True}, {**BASE, "user": PREMIUM_KEY, "api_key": FREE_KEY},
                         {**BASE, "max_tokens": -1}, {"model": "nope", "prompt": "x"}):
                statuses.add(client.post("/v1/completions", json=body, headers=_bearer(key)).status_code)
            statuses.add(client.get("/v1/models", headers=_bearer(key)).status_code)
            statuses.add(client.post("/v1/completions", content=b"{broken", headers=_bearer(key)).status_code)
    assert {200, 400, 401, 404} <= statuses, statuses
    time.sleep(1.5)  # let the actors' log handlers and the log monitor write
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    files = [p for p in session.rglob("*") if p.is_file() and not p.is_symlink()]
    serve_logs = [p for p in files if p.parent.name == "serve" and p.suffix == ".log"]
    assert serve_logs and any(b"/v1/completions" in p.read_bytes() for p in serve_logs), \
        "no Serve access log line for the requests: the scan would prove nothing"
    digests = [hash_key(k).encode() for k in KEYS.values()]
    scanned = 0
    for p in files:
        try:
            data = p.read_bytes()
        except OSError:
            continue
        scanned += len(data)
        _assert_no_plaintext(data, str(p.relative_to(session)))
        assert not any(d in data for d in digests), f"{p}: holds a key's digest"
    assert scanned > 10_000
