"""loadtest.capacity without load: the open-loop schedule, prompt synthesis, API keys, the SSE
recorder, the statistics per step, the capacity and the report.  (Never imports locust: its gevent
patching would break the Ray tests in this process.)"""

import json
import math
import sys

import numpy as np
import pytest

from loadtest.arrivals import poisson_arrival_times
from loadtest.capacity import (
    PromptSynth,
    StreamRecorder,
    build_schedule,
    capacity_of,
    keys_from_env,
    load_samples,
    main,
    parse_floats,
    parse_keys,
    step_points,
    write_report,
)
from replica.traces import Trace, load_trace, sample_requests
from replica.tiers import paper_tiers, parse_tiers


def test_the_helpers_do_not_import_locust():
    assert "locust" not in sys.modules


# ------------------------------------------------------------------------------ keys, floats

def test_keys_in_both_formats():
    assert parse_keys("premium=K1,free=K2") == {"premium": "K1", "free": "K2"}
    assert parse_keys("K1:premium, K2:free,K3:free") == {"premium": "K1", "free": "K2"}
    with pytest.raises(ValueError, match="TIER=KEY or KEY:TIER"):
        parse_keys("justakey")
    with pytest.raises(ValueError, match="empty"):
        parse_keys("premium=")


def test_keys_from_env_prefers_loadtest_keys():
    env = {"TIERED_API_KEYS": "a:premium,b:free", "LOADTEST_KEYS": "premium=x,free=y"}
    assert keys_from_env(env) == {"premium": "x", "free": "y"}
    assert keys_from_env({"TIERED_API_KEYS": "a:premium,b:free"}) == {"premium": "a", "free": "b"}
    assert keys_from_env({}) == {}


def test_parse_floats():
    assert parse_floats("0.5, 1,1.5") == [0.5, 1.0, 1.5]
    for bad in ("", "1,x", "0", "-1", "nan"):
        with pytest.raises(ValueError):
            parse_floats(bad)


# -------------------------------------------------------------------------------- schedule

def test_schedule_steps_follow_each_other_at_their_rates():
    trace = load_trace("paper")
    sched = build_schedule([(2.0, 100.0), (5.0, 100.0)], paper_tiers(), trace, seed=7)
    assert [a.index for a in sched] == list(range(len(sched)))
    t = np.array([a.t_s for a in sched])
    assert np.all(np.diff(t) >= 0)
    first = [a for a in sched if a.step == 0]
    second = [a for a in sched if a.step == 1]
    assert all(0 <= a.t_s < 100 for a in first) and all(100 <= a.t_s < 200 for a in second)
    assert first[0].t_s == 0.0 and second[0].t_s == 100.0
    # Poisson counts: mean qps * seconds (a little more: capped gaps), sd sqrt(mean)
    assert 200 - 4 * 15 < len(first) < 210 + 4 * 15 and 500 - 4 * 23 < len(second) < 526 + 4 * 23
    assert {a.qps for a in first} == {2.0} and {a.qps for a in second} == {5.0}
    assert build_schedule([(2.0, 100.0), (5.0, 100.0)], paper_tiers(), trace, seed=7) == sched


def test_one_step_holds_the_simulators_first_requests():
    """The same draws as loadtest.simulate's Workload.build at that QPS (seed 42)."""
    trace, tiers = load_trace("paper"), paper_tiers()
    sched = build_schedule([(1.5, 60.0)], tiers, trace, seed=42)
    n = len(sched)
    prompts, outputs = sample_requests(trace, n, seed=42)
    times = poisson_arrival_times(n, 1.5, seed=42)
    idx = tiers.assign(n, seed=42)
    assert [a.prompt_tokens for a in sched] == prompts.tolist()
    assert [a.max_tokens for a in sched] == outputs.tolist()
    assert np.allclose([a.t_s for a in sched], times)
    assert [a.tier for a in sched] == [tiers.names[i] for i in idx]


def test_tiers_follow_the_mix_and_lengths_are_clamped():
    trace = load_trace("paper")
    sched = build_schedule([(20.0, 200.0)], paper_tiers(), trace, seed=1, max_prompt_tokens=1000,
                           max_output_tokens=64)
    premium = np.mean([a.tier == "premium" for a in sched])
    assert 0.03 < premium < 0.07
    assert max(a.prompt_tokens for a in sched) == 1000 and max(a.max_tokens for a in sched) == 64
    mix = parse_tiers("premium:0.1:0.5,free:0.5:0.5")
    share = np.mean([a.tier == "premium" for a in build_schedule([(20.0, 100.0)], mix, trace, seed=1)])
    assert 0.45 < share < 0.55


def test_outputs_fit_the_context():
    trace = Trace(np.array([8000, 100]), np.array([900, 5]), source="t")
    sched = build_schedule([(50.0, 1.0)], paper_tiers(), trace, max_context_tokens=8192)
    assert all(a.prompt_tokens + a.max_tokens <= 8192 and a.max_tokens >= 1 for a in sched)
    assert {(a.prompt_tokens, a.max_tokens) for a in sched} <= {(8000, 192), (100, 5)}


def test_schedule_rejects_bad_steps():
    with pytest.raises(ValueError):
        build_schedule([], paper_tiers(), load_trace("paper"))
    with pytest.raises(ValueError):
        build_schedule([(0.0, 10.0)], paper_tiers(), load_trace("paper"))


# --------------------------------------------------------------------------------- prompts

def test_prompts_have_exactly_the_target_token_count_with_the_ingress_tokenizer():
    from serve_app.tokenizer import default_tokenizer

    tok = default_tokenizer()
    synth = PromptSynth(tok, seed=3)
    for n in (1, 2, 17, 512, 1730, 7433):
        assert tok.count(synth.text(n)) == n


class _PrefixTokenizer:
    """A word tokenizer that adds one token at the start of every text (like a prepended '▁')."""

    words = ["<s>", " aa", " bb", " cc", " dd", " ee", " ff", " gg", " hh", " ii"]
    vocab_size = len(words)

    def decode(self, ids):
        return "".join(self.words[i] for i in ids)

    def encode(self, text):
        parts = [" " + w for w in text.split(" ") if w]
        return [0] + [self.words.index(p) for p in parts]


def test_prompt_synthesis_corrects_a_non_additive_tokenizer():
    synth = PromptSynth(_PrefixTokenizer(), seed=0)
    assert len(synth.words) == 9
    for n in (2, 5, 40):
        assert len(_PrefixTokenizer().encode(synth.text(n))) == n


def test_prompt_synthesis_needs_single_token_words():
    class Chars:
        vocab_size = 3

        def decode(self, ids):
            return "".join("abc"[i] for i in ids)

        def encode(self, text):
            return ["abc".index(c) for c in text]

    with pytest.raises(ValueError, match="single-token words"):
        PromptSynth(Chars())


# ------------------------------------------------------------------------------ SSE recorder

def _completion_stream(n_tokens, usage=True):
    lines = []
    for k in range(n_tokens):
        lines += [f'data: {{"id":"c","choices":[{{"index":0,"text":"t{k}","finish_reason":null}}]}}', ""]
    lines += ['data: {"id":"c","choices":[{"index":0,"text":"","finish_reason":"length"}]}', ""]
    if usage:
        lines += [f'data: {{"id":"c","choices":[],"usage":{{"prompt_tokens":3,"completion_tokens":{n_tokens},'
                  f'"total_tokens":{n_tokens + 3}}}}}', ""]
    return lines + ["data: [DONE]", ""]


def test_recorder_times_ttft_and_every_gap():
    rec = StreamRecorder(t0=10.0)
    times = iter([10.3, 10.3, 10.35, 10.35, 10.45, 10.45, 10.5, 10.5, 10.5, 10.5, 10.6, 10.6])
    for line in _completion_stream(3):
        rec.feed(line, next(times, 11.0))
    assert rec.ttft_s() == pytest.approx(0.3)
    assert rec.gaps_s() == pytest.approx([0.05, 0.1])
    assert rec.done and rec.finish_reason == "length" and rec.completion_tokens() == 3
    assert rec.check(3) is None
    assert "expected 4" in rec.check(4)


def test_recorder_counts_the_last_token_that_carries_the_finish_reason():
    """vLLM's server (and this app's ingress) sends the finish reason on the last token's event."""
    rec = StreamRecorder(0.0)
    rec.feed('data: {"choices":[{"index":0,"text":"a","finish_reason":null}]}', 0.1)
    rec.feed('data: {"choices":[{"index":0,"text":"b","finish_reason":"stop"}]}', 0.3)
    rec.feed("data: [DONE]", 0.4)
    assert rec.gaps_s() == pytest.approx([0.2]) and rec.finish_reason == "stop" and rec.completion_tokens() == 2


def test_recorder_counts_every_token_of_a_coalesced_event_with_continuous_usage():
    """An event carrying 3 tokens (its usage says 1 -> 4): 3 arrivals at once, one gap and two 0s."""
    rec = StreamRecorder(0.0)
    rec.feed('data: {"choices":[{"index":0,"text":"a","finish_reason":null}],"usage":{"completion_tokens":1}}', 0.1)
    rec.feed('data: {"choices":[{"index":0,"text":"bcd","finish_reason":null}],"usage":{"completion_tokens":4}}', 0.3)
    rec.feed('data: {"choices":[{"index":0,"text":"e","finish_reason":"length"}],"usage":{"completion_tokens":5}}',
             0.4)
    rec.feed("data: [DONE]", 0.5)
    assert rec.gaps_s() == pytest.approx([0.2, 0.0, 0.0, 0.1]) and rec.completion_tokens() == 5


def test_recorder_failures():
    rec = StreamRecorder(0.0)
    for line in _completion_stream(2)[:-2]:  # no [DONE]
        rec.feed(line, 1.0)
    assert rec.check(2) == "stream ended without data: [DONE]"
    rec = StreamRecorder(0.0)
    rec.feed('data: {"choices":[{"index":0,"text":"a","finish_reason":null}]}', 0.1)
    rec.feed('data: {"error":{"message":"the engine aborted the request","type":"server_error"}}', 0.2)
    rec.feed("data: [DONE]", 0.3)
    assert "the engine aborted the request" in rec.check(None)
    rec = StreamRecorder(0.0)
    rec.feed("data: {not json", 0.1)
    assert "malformed" in rec.check(None)
    rec = StreamRecorder(0.0)
    rec.feed("data: [DONE]", 0.1)
    assert rec.check(None) == "no tokens" and rec.ttft_s() is None and rec.gaps_s() == []


def test_recorder_skips_chat_role_event_and_comments():
    rec = StreamRecorder(0.0)
    rec.feed(": keep-alive", 0.05)
    rec.feed('data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}', 0.1)
    rec.feed('data: {"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}', 0.4)
    rec.feed("data: [DONE]", 0.5)
    assert rec.ttft_s() == pytest.approx(0.4) and rec.check(None) is None


# ------------------------------------------------------------------------------- statistics

TIERS = [t.model_dump() for t in paper_tiers().tiers]


def _rec(i, step, tier, ttft, gaps, t_sched, ok=True, unfinished=False, lag=0.001, prompt=100):
    return {"i": i, "step": step, "qps": None, "tier": tier, "prompt_tokens": prompt, "max_tokens": len(gaps) + 1,
            "t_sched": t_sched, "t_sent": t_sched + lag, "lag_s": lag, "status": 200 if ok else 500, "ok": ok,
            "error": None if ok else ("unfinished" if unfinished else "HTTP 500"), "unfinished": unfinished,
            "ttft_s": ttft, "e2e_s": (ttft or 0) + sum(gaps), "tokens": len(gaps) + 1,
            "completion_tokens": len(gaps) + 1, "tbt_s": gaps}


def _meta(steps):
    return {"steps": steps, "tiers": TIERS, "max_gap_factor": 3.0}


def test_step_points_exact_percentiles_and_slo():
    meta = _meta([[1.0, 10.0], [2.0, 10.0]])
    recs = []
    # step 0: 100 requests, TTFT 0.01..1.00; premium gaps all 0.05 except one 0.2 among 200
    for k in range(100):
        tier = "premium" if k % 10 == 0 else "free"
        gaps = [0.05] * 20 if tier == "premium" else [0.2] * 5
        recs.append(_rec(k, 0, tier, (k + 1) / 100, gaps, k * 0.1))
    recs[0]["tbt_s"] = [0.05] * 19 + [0.2]
    # step 1: median TTFT over 0.5 s
    for k in range(10):
        recs.append(_rec(100 + k, 1, "free", 0.6 + k / 100, [0.1] * 3, 10 + k))
    points = step_points([meta], [{**r, "run": 0} for r in recs])
    p0, p1 = points
    assert p0["qps"] == 1.0 and p0["requests"] == 100 and p1["qps"] == 2.0
    assert p0["ttft_p50_s"] == pytest.approx(0.50)  # inverted CDF: an observed value
    assert p0["ttft_p99_s"] == pytest.approx(0.99)
    assert p0["tiers"]["premium"]["requests"] == 10 and p0["tiers"]["premium"]["tbt_count"] == 200
    assert p0["tiers"]["premium"]["tbt_p99_s"] == pytest.approx(0.05)  # 1 of 200 gaps above: p99 holds
    assert p0["tiers"]["free"]["tbt_p99_s"] == pytest.approx(0.2)
    assert p0["slo_met"] and not p1["slo_met"]
    assert p0["arrival_rate"] == pytest.approx(10.0) and p0["lag_p99_s"] == pytest.approx(0.001)
    cap = capacity_of(points)
    assert cap["capacity_qps"] == 1.0 and cap["first_failing_qps"] == 2.0


def test_failures_count_as_infinite_ttft_and_break_stability():
    meta = _meta([[1.0, 10.0]])
    recs = [_rec(k, 0, "free", 0.1, [0.02] * 4, k * 0.5) for k in range(9)]
    recs.append(_rec(9, 0, "free", None, [], 4.6, ok=False))
    p = step_points([meta], [{**r, "run": 0} for r in recs])[0]
    assert p["failures"] == 1 and p["unfinished"] == 0
    assert p["ttft_p99_s"] == math.inf and p["ttft_p50_s"] == pytest.approx(0.1)
    assert p["slo_met"] and not p["stable"] and not p["stable_slo_met"]
    assert p["tiers"]["free"]["failures"] == 1 and p["errors"] == {"HTTP 500": 1}
    # six of ten without a first token: the median TTFT is infinite
    recs = [_rec(k, 0, "free", 0.1, [0.02], k) for k in range(4)]
    recs += [_rec(4 + k, 0, "free", None, [], 4 + k, ok=False, unfinished=True) for k in range(6)]
    p = step_points([meta], [{**r, "run": 0} for r in recs])[0]
    assert p["unfinished"] == 6 and p["failures"] == 0 and not p["slo_met"]


def test_backlog_at_the_last_arrival():
    meta = _meta([[1.0, 10.0]])
    # request 0 sent at 0 gets its first token at 9.5, after request 1 (the last) was sent at 9.0
    recs = [_rec(0, 0, "free", 9.5, [0.02], 0.0, lag=0.0), _rec(1, 0, "free", 0.1, [0.02], 9.0, lag=0.0)]
    p = step_points([meta], [{**r, "run": 0} for r in recs])[0]
    assert p["waiting_at_last_arrival"] == 1 and not p["stable"]


def test_warmup_leaves_out_early_arrivals():
    meta = _meta([[1.0, 20.0]])
    recs = [_rec(k, 0, "free", 2.0 if k < 5 else 0.1, [0.02], float(k)) for k in range(20)]
    p = step_points([meta], [{**r, "run": 0} for r in recs], warmup_s=5.0)[0]
    assert p["requests"] == 15 and p["ttft_p99_s"] == pytest.approx(0.1) and p["step_seconds"] == 15.0


def test_capacity_needs_every_lower_point_to_pass():
    pts = [{"qps": 1.0, "slo_met": True, "stable_slo_met": True}, {"qps": 2.0, "slo_met": False, "stable_slo_met": False},
           {"qps": 3.0, "slo_met": True, "stable_slo_met": False}]
    assert capacity_of(pts) == {"capacity_qps": 1.0, "first_failing_qps": 2.0, "stable_capacity_qps": 1.0,
                                "stable_first_failing_qps": 2.0, "p99_ttft_capacity_qps": 0.0,
                                "p99_ttft_first_failing_qps": 1.0, "p99_ttft_bound_s": 10.0}  # no P99 TTFT: fails


# ----------------------------------------------------------------------------------- report

def _write_samples(path, meta, recs):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        f.write(json.dumps({"meta": meta}) + "\n")
        for r in recs:
            f.write(json.dumps(r) + "\n")


def test_report_files_and_strict_json(tmp_path):
    for q, ttft in ((0.5, 0.1), (1.0, 0.3), (1.5, 0.9)):
        recs = [_rec(k, 0, "premium" if k % 4 == 0 else "free", ttft, [0.03] * 5, float(k)) for k in range(12)]
        recs.append(_rec(12, 0, "free", None, [], 12.0, ok=False, unfinished=True))
        _write_samples(tmp_path / "steps" / f"qps-{q:g}" / "samples.jsonl", _meta([[q, 20.0]]), recs)
    assert main(["--from-samples", str(tmp_path)]) == 0
    text = (tmp_path / "capacity.json").read_text()
    report = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert report["capacity"]["capacity_qps"] == 1.0 and report["capacity"]["first_failing_qps"] == 1.5
    assert report["capacity"]["stable_capacity_qps"] == 0.0  # one unfinished request per step
    assert [p["qps"] for p in report["points"]] == [0.5, 1.0, 1.5]
    assert report["points"][0]["ttft_p99_s"] is None  # infinite: an unfinished request
    md = (tmp_path / "capacity.md").read_text()
    assert "**1.000 QPS**" in md and "| 1.500 | 13 |" in md and "**no**" in md
    assert "| inf |" in md  # the unfinished request's TTFT (P99), not "-"
    for png in ("ttft_vs_qps.png", "tbt_p99_vs_qps.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_load_samples_errors(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_text('{"i": 0}\n')
    with pytest.raises(ValueError, match="before the meta"):
        load_samples(p)
    p.write_text('{"meta": {}}\nnot json\n')
    with pytest.raises(ValueError, match="line 2"):
        load_samples(p)


def test_write_report_with_no_points(tmp_path):
    report = write_report(tmp_path, [], label="empty")
    assert report["capacity"]["capacity_qps"] == 0.0 and (tmp_path / "capacity.md").is_file()


# ------------------------------------------------------------------------- P99-TTFT capacity

def _p(qps, p99, stable=True):
    return {"qps": qps, "slo_met": True, "stable_slo_met": stable, "ttft_p99_s": p99}


def test_p99_ttft_capacity_excludes_a_stable_point_over_the_bound():
    pts = [_p(1.0, 2.0), _p(2.0, 12.0), _p(3.0, 30.0)]  # all stable; P99 TTFT 12 s at 2 QPS
    cap = capacity_of(pts, p99_ttft_bound_s=10.0)
    assert cap["stable_capacity_qps"] == 3.0
    assert cap["p99_ttft_capacity_qps"] == 1.0 and cap["p99_ttft_first_failing_qps"] == 2.0


def test_p99_ttft_capacity_is_at_most_the_stable_capacity():
    pts = [_p(1.0, 1.0), _p(2.0, 1.5, stable=False), _p(3.0, 2.0)]  # P99 within the bound, 2 QPS unstable
    cap = capacity_of(pts, p99_ttft_bound_s=10.0)
    assert cap["p99_ttft_capacity_qps"] == cap["stable_capacity_qps"] == 1.0


def test_p99_ttft_bound_is_configurable():
    pts = [_p(1.0, 2.0), _p(2.0, 12.0)]
    assert capacity_of(pts, p99_ttft_bound_s=15.0)["p99_ttft_capacity_qps"] == 2.0
    assert capacity_of(pts, p99_ttft_bound_s=1.0)["p99_ttft_capacity_qps"] == 0.0
