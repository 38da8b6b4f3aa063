"""`python -m loadtest.stream_path`: the gap arithmetic, the plan, the process kinds, and one short
real run against the app on loopback (one variant of the default config at engine.time_scale=0.05,
N in {2, 4}, 20 output tokens; ~35 s here)."""

import json
import math
import os

import numpy as np
import pytest

from loadtest.capacity import session_pids
from loadtest.engine_gaps import merge_tier_gaps, ray_access
from loadtest.stream_path import (GapSamples, StreamTokens, Variant, cpu_delta, main, make_keys, parse_streams,
                                  parse_variants, process_kind, stream_specs, tier_plan)


# ------------------------------------------------------------------------------------------ pure

def test_an_event_with_k_tokens_is_one_gap_and_k_minus_1_zero_gaps():
    stream, gaps = StreamTokens(), GapSamples()
    for t_s, completion_tokens in [(1.0, 1), (1.1, 4), (1.1, 4), (1.3, 5), (1.35, 7)]:  # (1.1, 4) again: usage only
        gaps.add_event(*stream.advance(t_s, completion_tokens))
    assert stream.tokens == 7
    assert sorted(gaps.values().tolist()) == pytest.approx([0, 0, 0, 0.05, 0.1, 0.2])  # 7 tokens: 6 gaps
    assert len(gaps) == 6 and gaps.zero_gaps == 3
    assert gaps.quantile_s(0.5) == 0.0 and gaps.quantile_s(0.99) == pytest.approx(0.2)


def test_a_first_event_with_several_tokens_has_no_gap_but_its_zeros():
    stream, gaps = StreamTokens(), GapSamples()
    gap_s, k = stream.advance(2.0, 3)
    assert (gap_s, k) == (None, 3)
    gaps.add_event(gap_s, k)
    assert gaps.values().tolist() == [0.0, 0.0]
    assert StreamTokens().advance(1.0, 0) == (None, 0) and GapSamples().quantile_s(0.5) is None


def test_engine_gaps_merge_over_replicas():
    r1 = {"tiers": {"free": {"gaps_s": np.array([0.01, 0.02]), "num_gaps": 2, "sampled": False, "complete": True}}}
    r2 = {"tiers": {"free": {"gaps_s": np.array([0.03, 0.5]), "num_gaps": 9, "sampled": True, "complete": True},
                    "premium": {"gaps_s": np.array([]), "num_gaps": 0, "sampled": False, "complete": False}}}
    m = merge_tier_gaps([r1, r2])
    assert m["free"]["num_gaps"] == 11 and m["free"]["sampled"] and m["free"]["complete"]
    assert m["free"]["gap_p50_s"] == pytest.approx(0.02) and m["free"]["gap_p99_s"] == pytest.approx(0.5)
    assert m["premium"]["gap_p50_s"] is None and not m["premium"]["complete"]


def test_the_launchers_ray_access_line():
    log = ("serve_app: Ray token authentication is on; this cluster's token is in /tmp/a/auth_token (removed on "
           "exit): Ray's CLI needs it, e.g. RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=/tmp/a/auth_token ray status "
           "--address 127.0.0.1:45973; Ray's logs: /tmp/x\n")
    assert ray_access(log) == ("/tmp/a/auth_token", "127.0.0.1:45973")
    assert ray_access("nothing here") is None


def test_tiers_per_stream_and_keys():
    assert tier_plan(128, ("premium", "free"), 16).count("premium") == 8
    assert tier_plan(8, ("premium", "free"), 16) == ["premium"] + ["free"] * 7
    assert tier_plan(1, ("premium", "free"), 16) == ["premium"]
    keys = make_keys(("premium", "free"), [8, 128], 16, streams_per_key=2)
    assert len(keys["premium"]) == 4 and len(keys["free"]) == 60
    specs = stream_specs(128, ("premium", "free"), 16, keys, 2, 200)
    assert len({s.key for s in specs}) == 64 and all(s.key in keys[s.tier] for s in specs)
    assert specs[-1].first_max_tokens == 200 and specs[0].first_max_tokens == 2  # staggered first requests


def test_cli_input_is_checked():
    assert parse_variants(["today=streaming.coalesce=false, ingress.num_replicas=1", "new="], []) == [
        Variant("today", ("streaming.coalesce=false", "ingress.num_replicas=1")), Variant("new")]
    for bad in (["x"], ["a b=c=1"], ["x=novalue"], ["x=", "x="]):
        with pytest.raises(ValueError):
            parse_variants(bad, [])
    with pytest.raises(ValueError, match="no --variant named"):
        parse_variants(["x="], ["y=/tmp"])
    with pytest.raises(ValueError, match="not a checkout"):
        parse_variants(["x="], ["x=/"])
    with pytest.raises(ValueError):
        parse_streams("8,0")
    with pytest.raises(SystemExit):
        main(["--measure-s", "100"])  # longer than the replicas' SLO window


def test_process_kinds_from_rays_titles():
    assert process_kind(["ray::ProxyActor.receive_asgi_messages"], 5, 1) == "proxy"
    assert process_kind(["/usr/sbin/haproxy", "-f", "/tmp/hap-1/haproxy.cfg"], 5, 1) == "proxy"
    assert process_kind(["ray::ServeReplica:default:Ingress.handle_request_with_reject", ""], 5, 1) == "ingress"
    assert process_kind(["ray::ServeReplica:default:LLMReplica"], 5, 1) == "replicas"
    assert process_kind(["ray::ServeController.listen_for_change"], 5, 1) == "controller"
    assert process_kind(["ray::IDLE"], 5, 1) == "ray_daemons"
    assert process_kind(["python", "-m", "serve_app"], 1, 1) == "ray_daemons"
    before = {(5, 1.0): ("proxy", 2.0), (6, 1.0): ("replicas", 1.0)}
    after = {(5, 1.0): ("proxy", 2.5), (7, 3.0): ("replicas", 0.25)}  # 6 gone, 7 new
    seconds, counts, gone = cpu_delta(before, after)
    assert seconds["proxy"] == pytest.approx(0.5) and seconds["replicas"] == pytest.approx(0.25) and gone == 1
    assert counts["proxy"] == 1 and counts["replicas"] == 1


# ------------------------------------------------------------------------------------------- live

@pytest.mark.timeout(180)
def test_a_short_real_run_reports_every_number(tmp_path):
    pytest.importorskip("ray")
    out = tmp_path / "out"
    rc = main(["--variant", "default=", "--serve-arg", "engine.time_scale=0.05", "--streams", "2,4",
               "--output-tokens", "20", "--warmup-s", "1", "--measure-s", "3", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "stream_path.json").read_text())
    assert (out / "stream_path.md").read_text().count("| default |") == 4  # both tables, both N
    [variant] = report["variants"]
    assert variant.get("engine_gaps_unavailable") is None
    assert [p["streams"] for p in variant["points"]] == [2, 4]
    for p in variant["points"]:
        assert p["streams_by_tier"] == {"premium": 1, "free": p["streams"] - 1}
        assert p["tokens_per_s"] > 0 and p["tokens"] > 0 and 2.5 < p["window_s"] < 4
        assert p["requests_failed"] == 0 and p["requests_ok"] > 0 and not p["errors"], p["errors"]
        assert p["events_without_usage"] == 0
        assert p["processes"]["proxy"] >= 1 and p["processes"]["ingress"] >= 1 and p["processes"]["replicas"] == 3
        cpu = p["cpu_s_per_1k_tokens"]
        for kind in ("proxy", "ingress", "replicas", "serve", "controller", "ray_daemons", "client", "total", "probe"):
            assert cpu[kind] is not None and math.isfinite(cpu[kind]), kind
        for kind in ("proxy", "ingress", "replicas", "client"):
            assert cpu[kind] > 0, kind
        assert cpu["serve"] == pytest.approx(cpu["proxy"] + cpu["ingress"] + cpu["replicas"])
        assert cpu["total"] > cpu["serve"]
        assert 0 < p["machine_busy_frac"] <= 1 and 0 <= p["machine_other_busy_frac"] <= p["machine_busy_frac"]
        assert p["engine"]["replicas"] == 3 and not p["engine"]["errors"]
        assert p["engines_idle_after"]["num_unfinished"] == 0
        assert sum(t["tokens"] for t in p["tiers"].values()) == p["tokens"]
        for tier, t in p["tiers"].items():  # both tiers had streams
            assert t["tokens"] > 0 and t["requests_ok"] > 0 and t["requests_failed"] == 0, tier
            for k in ("client_gap_p50_s", "client_gap_p99_s", "engine_gap_p50_s", "engine_gap_p99_s", "ttft_p50_s"):
                assert t[k] is not None and t[k] >= 0, (tier, k)
            assert t["client_gap_p99_s"] > 0 and t["engine_gap_p99_s"] > 0
            assert t["client_gaps"] > 0 and t["engine_gaps"] > 0 and t["engine_gaps_complete"]
            assert t["client_gap_p50_s"] <= t["client_gap_p99_s"] and t["engine_gap_p50_s"] <= t["engine_gap_p99_s"]
    # it stopped what it started: the app's session and the engine-gaps driver
    assert session_pids(variant["launcher_pid"]) == []
    assert not os.path.exists(f"/proc/{variant['engine_gaps_pid']}")
