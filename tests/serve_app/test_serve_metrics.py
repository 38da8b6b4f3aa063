"""The metrics layer without Ray: the definitions, the ingress's request timer, the replica
gauges from a feedback snapshot, the Grafana dashboard and docs/metrics.md against the
definitions."""

import importlib.util
import json
import re
from pathlib import Path

import pytest

from serve_app import metrics as m

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "k8s" / "grafana" / "tiered-llm-dashboard.json"
DOC = ROOT / "docs" / "metrics.md"


class FakeMetric:
    def __init__(self, spec):
        self.spec = spec
        self.calls = []  # (value, tags)

    def inc(self, value=1.0, tags=None):
        assert value > 0
        self._check(tags)
        self.calls.append((value, dict(tags or {})))

    def set(self, value, tags=None):
        self._check(tags)
        self.calls.append((value, dict(tags or {})))

    def observe(self, value, tags=None):
        self._check(tags)
        self.calls.append((value, dict(tags or {})))

    def _check(self, tags):
        assert set(tags or {}) == set(self.spec.tag_keys), (self.spec.name, tags)
        assert all(isinstance(v, str) for v in (tags or {}).values())

    def total(self, **tags):
        return sum(v for v, t in self.calls if all(t.get(k) == x for k, x in tags.items()))

    def values(self, **tags):
        return [v for v, t in self.calls if all(t.get(k) == x for k, x in tags.items())]


@pytest.fixture
def fakes():
    made = {}

    def factory(spec):
        made[spec.name] = FakeMetric(spec)
        return made[spec.name]

    return factory, made


TIERS = {"premium": (0.1, 0.5), "free": (0.5, 0.5)}


def test_the_module_imports_without_ray():
    src = Path(m.__file__).read_text()
    assert not re.search(r"^(from ray|import ray)", src, re.M), "serve_app.metrics must import Ray lazily"


def test_definitions_are_unique_prometheus_names_with_units():
    names = [s.name for s in m.METRICS]
    assert len(names) == len(set(names))
    for s in m.METRICS:
        assert re.fullmatch(r"tiered_[a-z0-9_]+", s.name), s.name
        assert s.kind in ("counter", "gauge", "histogram")
        assert (s.kind == "counter") == s.name.endswith("_total"), s.name
        if s.unit == "seconds":
            assert "_seconds" in s.name
        if s.kind == "histogram":
            b = s.boundaries
            assert b and list(b) == sorted(b) and b[0] > 0
        assert not {"deployment", "replica", "application", "route"} & set(s.tag_keys)  # Serve's own
    # the SLOs are bucket edges: "over the SLO" is exact in PromQL
    assert {0.1, 0.5} <= set(m.TBT_BOUNDARIES_S) and 0.5 in m.TTFT_BOUNDARIES_S


@pytest.mark.parametrize("status, code, reason", [
    (401, "invalid_api_key", "unauthorized"), (400, "invalid_json", "invalid"), (400, "invalid_value", "invalid"),
    (404, "model_not_found", "invalid"), (413, "request_too_large", "too_large"),
    (400, "context_length_exceeded", "context"), (429, "overloaded", "overload"), (503, None, "overload"),
])
def test_rejection_reasons(status, code, reason):
    assert m.rejection_reason(status, code) == reason
    assert reason in m.REJECTION_REASONS


def test_a_streamed_request_records_ttft_gaps_misses_tokens_and_goodput(fakes):
    factory, made = fakes
    im = m.IngressMetrics(TIERS, factory=factory)
    t = im.admitted("premium", start=100.0)
    assert made["tiered_requests_total"].calls == [(1, {"tier": "premium", "outcome": "admitted"})]
    t.tokens(1, 100.2)                       # TTFT 0.2 s: within the 0.5 s target
    assert made["tiered_ttft_seconds"].values(tier="premium") == [pytest.approx(0.2)]
    t.tokens(2, 100.25)
    t.tokens(2, 100.26)                      # no new token: nothing
    t.tokens(4, 100.45)                      # a 2-token chunk after 0.2 s: one miss, then a 0 gap
    t.tokens(5, 100.5)
    assert made["tiered_tbt_seconds"].calls == []  # buffered until FLUSH_EVERY or the end
    t.finish("completed")
    t.finish("error")                        # only the first finish counts
    gaps = made["tiered_tbt_seconds"].values(tier="premium")
    assert gaps == pytest.approx([0.05, 0.2, 0.0, 0.05])
    assert made["tiered_slo_misses_total"].total(tier="premium", kind="tbt") == 1
    assert made["tiered_slo_misses_total"].total(kind="ttft") == 0
    assert made["tiered_generated_tokens_total"].total(tier="premium") == 5
    assert made["tiered_requests_finished_total"].calls == [(1, {"tier": "premium", "status": "completed"})]
    assert made["tiered_goodput_requests_total"].calls == []  # it missed a TBT SLO


def test_goodput_and_ttft_miss_and_batched_flush(fakes):
    factory, made = fakes
    im = m.IngressMetrics(TIERS, factory=factory)
    ok = im.admitted("free", start=0.0)
    for i in range(1, 2 * m.FLUSH_EVERY + 2):
        ok.tokens(i, 0.1 + 0.01 * i)
        if i == m.FLUSH_EVERY + 1:  # one batch flushed on the way
            assert len(made["tiered_tbt_seconds"].calls) == m.FLUSH_EVERY
            assert made["tiered_generated_tokens_total"].total() == m.FLUSH_EVERY + 1
    ok.finish("completed")
    assert len(made["tiered_tbt_seconds"].calls) == 2 * m.FLUSH_EVERY
    assert made["tiered_generated_tokens_total"].total(tier="free") == 2 * m.FLUSH_EVERY + 1
    assert made["tiered_goodput_requests_total"].total(tier="free") == 1
    late = im.admitted("free", start=0.0)
    late.tokens(1, 0.9)                      # TTFT over the 0.5 s target
    late.finish("cancelled")
    assert made["tiered_slo_misses_total"].total(tier="free", kind="ttft") == 1
    assert made["tiered_goodput_requests_total"].total() == 1
    assert made["tiered_requests_finished_total"].total(status="cancelled") == 1


def test_rejections_and_unknown_tiers(fakes):
    factory, made = fakes
    im = m.IngressMetrics(TIERS, factory=factory)
    im.rejected(None, 401, "invalid_api_key")
    im.rejected("free", 400, "context_length_exceeded")
    im.rejected("free", 429, "overloaded")
    req = made["tiered_requests_total"]
    assert req.total(tier="unknown", outcome="rejected") == 1
    assert req.total(tier="free", outcome="rejected") == 1 and req.total(tier="free", outcome="shed") == 1
    rej = made["tiered_request_rejections_total"]
    assert rej.total(tier="unknown", reason="unauthorized") == 1
    assert rej.total(reason="context") == 1 and rej.total(reason="overload") == 1
    t = im.admitted("gold", start=0.0)       # a tier without SLOs: timed, never a miss
    t.tokens(1, 100.0)
    t.tokens(2, 200.0)
    t.finish("completed")
    assert made["tiered_slo_misses_total"].calls == []


def test_a_broken_metric_never_fails_the_request(fakes):
    factory, made = fakes
    im = m.IngressMetrics(TIERS, factory=factory)

    def boom(*a, **k):
        raise RuntimeError("exporter down")

    for metric in made.values():
        metric.inc = metric.observe = boom
    im._tiers.clear()  # rebuild the bound observers on the broken metrics
    im.rejected("free", 400, "invalid_value")
    t = im.admitted("free", start=0.0)
    for i in range(1, 3 * m.FLUSH_EVERY):
        t.tokens(i, 0.01 * i)
    t.finish("completed")
    assert im._failures > 0


def test_without_a_recorder_the_timer_is_inert():
    t = m.RequestTimer(None, 0.0)
    for i in range(1, 100):
        t.tokens(i)
    t.finish("completed")
    assert len(t.gaps) == 0 and t.n == 99


def test_metrics_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("TIERED_METRICS", "0")
    assert m.IngressMetrics.create(TIERS) is None and m.ReplicaMetrics.create() is None


def _snapshot(**over):
    snap = {"version": 1, "replica_id": "r", "num_waiting": 3, "num_running": 5, "waiting_prefill_tokens": 4096,
            "running_decodes_by_tier": {"premium": 1, "free": 3}, "kv_usage": 0.25, "mean_batch_time_s": 0.042,
            "tiers": {"premium": {"ttft_misses_total": 0, "tbt_misses_total": 2},
                      "free": {"ttft_misses_total": 1, "tbt_misses_total": 0}}}
    snap.update(over)
    return snap


def test_replica_gauges_follow_the_snapshot(fakes):
    factory, made = fakes
    rm = m.ReplicaMetrics(factory=factory)
    assert rm.due(0.0)
    rm.update(_snapshot())
    assert not rm.due(60.0)
    assert made["tiered_replica_waiting_prefill_tokens"].calls == [(4096.0, {})]
    assert made["tiered_replica_waiting_requests"].calls[-1][0] == 3
    assert made["tiered_replica_running_requests"].calls[-1][0] == 5
    assert made["tiered_replica_kv_usage_ratio"].calls[-1][0] == 0.25
    assert made["tiered_replica_mean_batch_time_seconds"].calls[-1][0] == pytest.approx(0.042)
    dec = made["tiered_replica_running_decodes"]
    assert dec.values(tier="premium") == [1] and dec.values(tier="free") == [3]
    misses = made["tiered_engine_slo_misses_total"]
    assert misses.total(tier="premium", kind="tbt") == 2 and misses.total(tier="free", kind="ttft") == 1
    # the next snapshot: counters grow by the difference; a tier gone idle goes to 0 decodes
    rm.update(_snapshot(running_decodes_by_tier={"premium": 2}, mean_batch_time_s=None,
                        tiers={"premium": {"ttft_misses_total": 0, "tbt_misses_total": 5}}))
    assert dec.values(tier="free")[-1] == 0 and dec.values(tier="premium")[-1] == 2
    assert misses.total(tier="premium", kind="tbt") == 5 and misses.total(kind="ttft") == 1
    assert made["tiered_replica_mean_batch_time_seconds"].calls[-1][0] == 0.0


# --------------------------------------------------------------------------- vLLM's own metrics

# vLLM's own series from the vllm replicas (engine.log_engine_metrics: vLLM's RayPrometheusStatLogger,
# replica/vllm_backend.py; docs/metrics.md) that the dashboard and the docs may use: vLLM's name -> kind.
VLLM_SERIES = {
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:prompt_tokens": "counter",
    "vllm:generation_tokens": "counter",
}
VLLM_ROW = "vLLM engine"  # the dashboard row (title prefix) of the vLLM panels
VLLM_SELECTOR = 'model_name=~"$vllm_model"'


def vllm_exported(name: str) -> str:
    """Ray's name for a vLLM metric: the Ray wrapper makes it an OpenTelemetry name (":" -> "_"),
    Ray's exporter prefixes ``ray_`` and adds ``_total`` to counters."""
    base = "ray_" + re.sub(r"[^a-zA-Z0-9_]", "_", name)
    return base + "_total" if VLLM_SERIES[name] == "counter" else base


def vllm_series_names() -> set[str]:
    """The Prometheus series of `VLLM_SERIES` (histograms: _bucket, _count, _sum)."""
    out = set()
    for name, kind in VLLM_SERIES.items():
        base = vllm_exported(name)
        out |= {base + s for s in ("_bucket", "_count", "_sum")} if kind == "histogram" else {base}
    return out


def test_the_vllm_series_are_the_ones_vllms_ray_stat_logger_defines():
    """`VLLM_SERIES` against vLLM's source (read, not imported): vLLM's Prometheus logger defines each
    with that kind, and the Ray stat logger the backend plugs in is that logger on Ray's metric classes
    with names sanitized the way `vllm_exported` assumes (the live names: test_vllm_replica_e2e)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        pytest.skip("vLLM is not installed (install the cpu or gpu extra)")
    root = Path(spec.origin).parent / "v1" / "metrics"
    wrappers, loggers = (root / "ray_wrappers.py").read_text(), (root / "loggers.py").read_text()
    assert re.search(r"^class RayPrometheusStatLogger\(PrometheusStatLogger\):", wrappers, re.M)
    for kind in ("Gauge", "Counter", "Histogram"):
        assert re.search(rf"^    _{kind.lower()}_cls = Ray{kind}Wrapper$", wrappers, re.M), kind
    assert 're.sub(r"[^a-zA-Z0-9_]", "_", name)' in wrappers
    defined = {name: kind for kind, name in
               re.findall(r'self\._(gauge|counter|histogram)_cls\(\s*name="(vllm:\w+)"', loggers)}
    assert len(defined) > len(VLLM_SERIES)
    for name, kind in VLLM_SERIES.items():
        assert defined.get(name) == kind, (name, kind, defined.get(name))
    backend = (ROOT / "replica" / "vllm_backend.py").read_text()
    assert "from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger" in backend


# --------------------------------------------------------------------------- dashboard and docs

def _dashboard_panels(dash):
    for p in dash["panels"]:
        yield p
        yield from p.get("panels", [])


def test_the_grafana_dashboard_queries_only_defined_metrics():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["title"] and dash["uid"] and isinstance(dash["schemaVersion"], int)
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    defined, vllm_defined = m.exported_series_names(), vllm_series_names()
    assert not defined & vllm_defined
    assert set(re.findall(r"\b(ray_\w+)", variables["vllm_model"]["query"]["query"])) <= vllm_defined
    used: set[str] = set()
    vllm_used: set[str] = set()
    ids = []
    graphs = [p for p in _dashboard_panels(dash) if p["type"] != "row"]
    assert len(graphs) >= 8
    row = ""
    our_titles = []  # of the panels of our metrics
    for p in _dashboard_panels(dash):
        ids.append(p["id"])
        assert {"x", "y", "w", "h"} <= set(p["gridPos"])
        if p["type"] == "row":
            row = p["title"]
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            expr = t["expr"]
            names = set(re.findall(r"\b(ray_[A-Za-z0-9_]+)", expr))
            assert names, f"{p['title']}: no metric in {expr!r}"
            if row.startswith(VLLM_ROW):  # vLLM's series only, of the picked vLLM models
                assert names <= vllm_defined, f"{p['title']}: not a known vLLM series: {names - vllm_defined}"
                assert expr.count(VLLM_SELECTOR) == len(re.findall(r"\bray_\w+\{", expr)) >= 1, expr
                vllm_used |= names
            else:
                assert names <= defined, f"{p['title']}: undefined {names - defined}"
                used |= names
            assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
            if "histogram_quantile" in expr:
                assert re.search(r"rate\(ray_\w+_bucket\{", expr) and "le" in expr
        if not row.startswith(VLLM_ROW):
            our_titles.append(p["title"].lower())
    assert len(ids) == len(set(ids))
    titles = " ".join(our_titles)
    for words in ("ttft", "tbt", "miss", "outcome", "prefill", "kv", "batch"):
        assert words in titles, words
    unused = {s.name for s in m.METRICS if not any(u.startswith(s.exported) for u in used)}
    assert not unused, f"metrics on no panel: {unused}"
    vllm_unused = {n for n in VLLM_SERIES if not any(u.startswith(vllm_exported(n)) for u in vllm_used)}
    assert not vllm_unused, f"vLLM series on no panel: {vllm_unused}"


def test_docs_metrics_md_lists_every_metric_with_its_labels():
    text = DOC.read_text()
    for s in m.METRICS:
        row = next((line for line in text.splitlines() if f"`{s.exported}`" in line and line.startswith("|")), None)
        assert row, f"{s.exported} missing from docs/metrics.md"
        assert s.kind in row and s.unit in row
        for k in s.tag_keys:
            assert f"`{k}`" in row, (s.name, k)
    for name, kind in VLLM_SERIES.items():
        row = next((line for line in text.splitlines() if f"`{vllm_exported(name)}`" in line
                    and line.startswith("|")), None)
        assert row and kind in row and f"`{name}`" in row, f"{name} missing from docs/metrics.md's vLLM table"


def test_per_key_tokens_are_opt_in_and_bounded_in_cardinality(fakes):
    factory, made = fakes
    off = m.IngressMetrics(TIERS, factory=factory)
    off.key_usage("aaaaaaaaaaaa", 10, 5)
    assert "tiered_key_tokens_total" not in made  # off by default: not even defined
    on = m.IngressMetrics(TIERS, factory=factory, per_key_max_keys=2)
    for key in ("k1", "k2", "k3", "k4", "k1"):
        on.key_usage(key, 100, 10)
    keys = made["tiered_key_tokens_total"]
    assert {t["key"] for _, t in keys.calls} == {"k1", "k2", "other"}
    assert keys.total(key="k1", kind="prompt") == 200 and keys.total(key="other", kind="completion") == 20
