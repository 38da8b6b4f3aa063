"""Per-tier SLO tracking and the feedback snapshot."""

import numpy as np
import pytest

from replica.policy.state import EngineState, KVCache, Request
from replica.slo import SNAPSHOT_VERSION, SLOTracker, WindowDistribution


def _req(rid, tier, slo, arrival=0.0, prompt=100, computed=0, outputs=0):
    return Request(req_id=rid, prompt_len=prompt, arrival_s=arrival, tier=tier, tbt_slo_s=slo,
                   num_computed_tokens=computed, num_output_tokens=outputs)


def _emit(tracker, reqs, t):
    tracker.on_tokens(reqs, t)
    for r in reqs:
        r.last_token_s = t


def test_first_token_counts_as_ttft_and_later_gaps_as_tbt_per_tier():
    tr = SLOTracker({"premium": 0.1, "free": 0.5}, {"premium": 0.5, "free": 0.5})
    p, f = _req("p", "premium", 0.1, arrival=1.0), _req("f", "free", 0.5, arrival=1.0)
    _emit(tr, [p, f], 1.2)
    _emit(tr, [p], 1.25)
    _emit(tr, [p, f], 1.5)
    stats = tr.tier_stats(now=2.0)
    assert stats["premium"]["ttft_p50_s"] == pytest.approx(0.2)
    assert stats["premium"]["tbt_p99_s"] == pytest.approx(0.25, abs=0.01)
    assert stats["premium"]["tbt_misses_total"] == 1  # the 0.25 s gap
    assert stats["free"]["tbt_p50_s"] == pytest.approx(0.3) and stats["free"]["tbt_misses_total"] == 0
    assert stats["free"]["tokens_total"] == 2


def test_window_forgets_old_samples_but_keeps_miss_totals():
    tr = SLOTracker({"free": 0.5}, window_s=10.0)
    r = _req("f", "free", 0.5)
    _emit(tr, [r], 1.0)
    _emit(tr, [r], 2.0)  # a 1 s gap: a miss
    assert tr.tier_stats(now=5.0)["free"]["tbt_p99_s"] == pytest.approx(1.0)
    later = tr.tier_stats(now=100.0)["free"]
    assert later["tbt_p99_s"] is None and later["tbt_misses_total"] == 1


def test_snapshot_reports_queue_decodes_per_tier_and_kv():
    kv = KVCache(100)
    kv.num_used_blocks = 25
    waiting = [_req("w1", "free", 0.5, prompt=300), _req("w2", "free", 0.5, prompt=5000)]
    running = [
        _req("d1", "premium", 0.1, prompt=50, computed=50, outputs=1),
        _req("d2", "free", 0.5, prompt=50, computed=52, outputs=3),
        _req("p1", "free", 0.5, prompt=1000, computed=200),
    ]
    snap = SLOTracker({"premium": 0.1, "free": 0.5}).snapshot("r0", EngineState(0.0, kv, waiting, running), 0.04, now=7.0)
    assert snap["version"] == SNAPSHOT_VERSION and snap["replica_id"] == "r0" and snap["timestamp_s"] == 7.0
    assert snap["waiting_prefill_tokens"] == 300 + 5000 + 800
    assert snap["waiting_prompt_histogram"]["counts"] == [1, 1, 0, 0, 1, 0]
    assert snap["running_decodes_by_tier"] == {"premium": 1, "free": 1}
    assert snap["kv_usage"] == 0.25 and snap["mean_batch_time_s"] == 0.04


def test_snapshot_counts_a_waiting_prompts_cached_prefix_as_no_work():
    w = _req("w", "free", 0.5, prompt=5000)
    w.num_cached_tokens = 4096  # the engine's prefix cache holds it: SPF orders it as 904 tokens
    snap = SLOTracker({"free": 0.5}).snapshot("r0", EngineState(0.0, KVCache(100), [w], []), 0.04, now=1.0)
    assert snap["waiting_prefill_tokens"] == 904
    assert snap["waiting_prompt_histogram"]["counts"] == [0, 1, 0, 0, 0, 0]


def test_tbt_gaps_since_returns_the_gaps_recorded_since_a_mark_per_tier():
    tr = SLOTracker({"premium": 0.1, "free": 0.5}, window_s=10.0)
    p, f = _req("p", "premium", 0.1), _req("f", "free", 0.5)
    for t in (1.0, 1.1, 1.3, 1.6):  # premium gaps 0.1, 0.2, 0.3 at 1.1, 1.3, 1.6
        _emit(tr, [p], t)
    for t in (1.0, 2.0, 2.5):  # free gaps 1.0 at 2.0, 0.5 at 2.5
        _emit(tr, [f], t)
    got = tr.tbt_gaps_since(1.3, now=2.2, max_samples_per_tier=100)
    assert got["premium"]["gaps_s"].tolist() == pytest.approx([0.2, 0.3]) and got["premium"]["num_gaps"] == 2
    assert got["free"]["gaps_s"].tolist() == pytest.approx([1.0])  # 2.5 is after `now`
    assert got["free"]["complete"] and not got["free"]["sampled"]
    assert not tr.tbt_gaps_since(0.0, now=20.0, max_samples_per_tier=100)["free"]["complete"]  # older than the window


def test_tbt_gaps_since_strides_evenly_over_the_bound():
    tr = SLOTracker({"free": 0.5})
    r = _req("f", "free", 0.5)
    for k in range(101):
        _emit(tr, [r], k * 0.01 + k * k * 1e-5)  # gap k: 0.01 + (2k - 1) 1e-5, increasing
    got = tr.tbt_gaps_since(0.0, now=5.0, max_samples_per_tier=11)["free"]
    assert got["num_gaps"] == 100 and got["sampled"] and len(got["gaps_s"]) == 11
    assert got["gaps_s"][0] == pytest.approx(0.01 + 1e-5) and got["gaps_s"][-1] == pytest.approx(0.01 + 199e-5)
    assert list(got["gaps_s"]) == sorted(got["gaps_s"])


def _steps(seed, n_steps=400):
    """A scripted run: per step, a random subset of requests (tiers interleaved, a tier first seen
    mid-run, some requests with their own TBT SLO) emits a token at t."""
    import random

    rng = random.Random(seed)
    specs = [("p", "premium", 0.1), ("f", "free", 0.5), ("g", "gold", 0.05), ("x", "premium", 0.02)]
    t, out = 0.0, []
    for k in range(n_steps):
        t += rng.choice([0.001, 0.01, 0.05, 0.2, 3.0])
        live = [(f"{name}{i}", tier, slo) for i in range(6) for name, tier, slo in specs
                if (tier != "gold" or k > n_steps // 3) and rng.random() < 0.6]
        rng.shuffle(live)
        out.append((t, live))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_record_tokens_is_on_tokens_then_stamping(seed):
    """The adapter's one-pass `record_tokens` records what `on_tokens` followed by stamping each
    request's last (and first) token time does: same stats, gaps, totals, and request times, with
    the tiers interleaved, a tier first seen mid-run, and windows trimmed (and their arrays cut)."""
    a = SLOTracker({"premium": 0.1, "free": 0.5}, {"premium": 0.5, "free": 2.0}, window_s=5.0)
    b = SLOTracker({"premium": 0.1, "free": 0.5}, {"premium": 0.5, "free": 2.0}, window_s=5.0)
    ra: dict[str, Request] = {}
    rb: dict[str, Request] = {}
    for k, (t, live) in enumerate(_steps(seed)):
        batch_a = [ra.setdefault(rid, _req(rid, tier, slo, arrival=t - 0.3)) for rid, tier, slo in live]
        batch_b = [rb.setdefault(rid, _req(rid, tier, slo, arrival=t - 0.3)) for rid, tier, slo in live]
        _emit(a, batch_a, t)
        for r in batch_a:
            if r.first_token_s is None:
                r.first_token_s = t
        b.record_tokens(batch_b, t)
        if k % 37 == 0:  # trims as a snapshot would (so old samples are cut from the arrays)
            assert a.tier_stats(t) == b.tier_stats(t)
    end = t + 1.0
    assert a.tier_stats(end) == b.tier_stats(end)
    ga, gb = a.tbt_gaps_since(end - 4.0, end, 10**6), b.tbt_gaps_since(end - 4.0, end, 10**6)
    assert ga.keys() == gb.keys() and all(ga[n]["gaps_s"].tolist() == gb[n]["gaps_s"].tolist() for n in ga)
    assert {rid: (r.first_token_s, r.last_token_s) for rid, r in ra.items()} == \
        {rid: (r.first_token_s, r.last_token_s) for rid, r in rb.items()}


def test_tokens_total_counts_every_token_after_the_window_arrays_are_cut():
    tr = SLOTracker({"free": 0.5}, window_s=1.0)
    reqs = [_req(f"f{i}", "free", 0.5) for i in range(10)]
    for k in range(1000):  # 10,000 tokens; the window keeps about 1 s of them
        tr.record_tokens(reqs, k * 0.01)
        if k % 100 == 99:
            tr.tier_stats(k * 0.01)
    w = tr.tiers["free"]
    assert w.tbt.dropped > 0  # the arrays' front was deleted
    stats = tr.tier_stats(10.0)["free"]
    assert stats["tokens_total"] == 10_000 and stats["ttft_misses_total"] == 0
    assert len(w.ttft) == 0 and len(w.tbt) == 1000  # first tokens at 0.0; the gaps at 9.00 to 9.99


def _numpy_window_stats(values: np.ndarray, slo: float) -> tuple:
    """What the tracker's window stats were before they were read off kept counts: numpy on the
    window's values."""
    if not len(values):
        return None, None, 0.0
    return float(np.median(values)), float(np.quantile(values, 0.99)), float((values > slo).mean())


@pytest.mark.parametrize("seed", range(6))
def test_a_window_distributions_statistics_are_numpys_to_the_last_bit(seed):
    rng = np.random.default_rng(seed)
    for n in [*range(1, 40), *rng.integers(40, 5000, 30).tolist()]:
        # ties, a wide spread of magnitudes, and values on a coarse grid (as gaps of equal steps are)
        samples = np.concatenate([rng.lognormal(-3, 1.5, n), rng.choice([0.01, 0.02, 0.5], n // 3)])
        values, counts = np.unique(samples, return_counts=True)
        d = WindowDistribution(values, np.cumsum(counts))
        assert len(d) == len(samples) and d.samples().tolist() == sorted(samples.tolist())
        assert d.median() == float(np.median(samples))
        for q in (0.99, 0.5, 0.9, 0.01, 0.0, 1.0, float(rng.random())):
            assert d.quantile(q) == float(np.quantile(samples, q)), (n, q)
        for x in (0.01, 0.02, 0.5, float(rng.lognormal(-3, 1.5)), 0.0, 1e9):
            assert d.count_above(x) == int((samples > x).sum())


@pytest.mark.parametrize("seed", range(4))
def test_window_stats_read_off_the_kept_counts_are_numpys_on_the_window(seed):
    """Through appends, trims of any size (past the whole window, and past the 4,096 samples at
    which the arrays' front is cut) and repeated values, the window stats (read off the counts
    kept between snapshots) equal numpy's on the window's values, float for float."""
    rng = np.random.default_rng(seed)
    tr = SLOTracker({"free": 0.05}, window_s=2.0)
    series = tr.tiers["free"].tbt
    t = 0.0
    for k in range(400):
        for _ in range(int(rng.choice([0, 1, 5, 40, 300]))):
            t += float(rng.choice([0.0, 1e-4, 1e-3, 0.01]))
            series.append(t, float(rng.choice([0.04, 0.05, 0.06]) if rng.random() < 0.5 else rng.lognormal(-3, 1)))
        now = t + float(rng.choice([0.0, 0.5, 1.9, 2.5, 10.0]) if rng.random() < 0.2 else 0.0)
        stats = tr.tier_stats(now)["free"]
        window = series.window()
        assert (stats["tbt_p50_s"], stats["tbt_p99_s"], stats["tbt_miss_frac"]) == _numpy_window_stats(window, 0.05)
        dist = series.distribution()
        assert dist.samples().tolist() == sorted(window.tolist())
        assert len(dist.values) == len(set(window.tolist()))  # values that left the window are not kept
    assert series.dropped > 0  # the arrays' front was cut along the way
