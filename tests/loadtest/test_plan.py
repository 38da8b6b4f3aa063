"""The capacity planner (loadtest/plan/): workload files and their errors, the search, the
confirmation at N and N-1 by direct cluster simulation, the CLI, and the HTML report (rendered in
headless Chromium when it is installed)."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest

import loadtest.plan as plan_mod
import loadtest.plan.stacks as stacks_mod
from loadtest.metrics import summarize
from loadtest.plan import (
    DAYS_PER_MONTH,
    HOURS_PER_MONTH,
    STACK_BY_KEY,
    PlanError,
    StackSearch,
    Workload,
    available_stacks,
    hourly_qps,
    lengths_trace,
    load_workload,
    main,
    plan,
    slo_checks,
)
from loadtest.plan.html_report import render_html
from loadtest.simulate.cluster import ClusterConfig, run_cluster
from loadtest.simulate.replica import Workload as SimWorkload
from replica.traces import load_trace
from replica.tiers import paper_tiers
from serve_app import field_help as field_help_mod

WORKLOADS = Path(__file__).resolve().parents[2] / "loadtest" / "workloads"

# A small version of the paper's workload: about 3 replicas at 3.5 QPS on the RTX 6000 Ada profile,
# 240 requests per run, so a whole plan takes seconds.
TINY_YAML = """\
name: tiny
peak_qps: 3.5
lengths:
  trace: paper
tiers:
  - {name: premium, tbt_slo_s: 0.1, ttft_target_s: 0.5, share: 0.05}
  - {name: free, tbt_slo_s: 0.5, ttft_target_s: 0.5, share: 0.95}
gpu_profile: rtx6000ada-mistral7b
price_per_gpu_hour_usd: 2.0
search:
  max_replicas: 8
  requests_per_run: 240
  headroom_probes: 2
"""


def _write(tmp_path: Path, text: str, name: str = "w.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory):
    path = _write(tmp_path_factory.mktemp("plan"), TINY_YAML)
    workload = load_workload(path)
    stacks = [STACK_BY_KEY["default"], STACK_BY_KEY["slai"]]
    return workload, plan(workload, stacks, jobs=2, progress=False)


# -------------------------------------------------------------------------------- workload files

GOOD = "peak_qps: 2\nprice_per_gpu_hour_usd: 1\n"

BAD_WORKLOADS = [
    # (file text, substrings the error must contain: the line and the field)
    ("peak_qps: 2\nprice_per_gpu_hour_usd: [1\n", ["line 3", "malformed YAML"]),
    ("peak_qps: 2\npeak_qps: 3\nprice_per_gpu_hour_usd: 1\n", ["line 2", "duplicate key 'peak_qps'"]),
    ("peek_qps: 2\nprice_per_gpu_hour_usd: 1\n", ["line 1", "peek_qps: unknown field"]),
    ("price_per_gpu_hour_usd: 1\npeak_qps: -2\n", ["line 2", "peak_qps: Input should be greater than 0", "-2"]),
    ("peak_qps: 2\n", ["price_per_gpu_hour_usd: Field required"]),
    ("peak_qps: 2\ndiurnal_qps: [[0, 1], [12, 3]]\nprice_per_gpu_hour_usd: 1\n",
     ["line 1", "peak_qps: give exactly one of peak_qps and diurnal_qps"]),
    ("price_per_gpu_hour_usd: 1\ndiurnal_qps:\n  - [0, 1]\n  - [12, 3]\n  - [6, 2]\n",
     ["line 5", "diurnal_qps.2.0: hours must increase"]),
    ("price_per_gpu_hour_usd: 1\ndiurnal_qps:\n  - [0, 1]\n  - [25, 3]\n", ["line 4", "diurnal_qps.1.0: hour must be in"]),
    (GOOD + "tiers:\n  - {name: a, tbt_slo_s: 0.1, share: 0.5}\n  - {name: b, tbt_slo_s: 0.5, share: 0.4}\n",
     ["line 3", "tiers: tier shares sum to 0.9"]),
    (GOOD + "tiers:\n  - {name: a, tbt_slo_s: 0.1, share: 0.5}\n  - {name: b, tbt_slo_s: -1, share: 0.5}\n",
     ["line 5", "tiers.1.tbt_slo_s: Input should be greater than 0"]),
    (GOOD + "lengths:\n  prompt: {distribution: lognormal, mean_tokens: 500}\n"
            "  output: {distribution: uniform, min_tokens: 1, max_tokens: 9}\n",
     ["line 4", "lengths.prompt.sigma: Field required"]),
    (GOOD + "lengths:\n  prompt: {distribution: normal, mean_tokens: 500}\n"
            "  output: {distribution: uniform, min_tokens: 1, max_tokens: 9}\n",
     ["line 4", "lengths.prompt:", "'normal'"]),
    (GOOD + "lengths:\n  prompt: {distribution: lognormal, mean_tokens: 500, sigma: 1}\n"
            "  output:\n    distribution: uniform\n    min_tokens: 10\n    max_tokens: 9\n",
     ["line 8", "lengths.output.max_tokens: must be >= min_tokens"]),
    (GOOD + "lengths:\n  prompt: {distribution: lognormal, mean_tokens: 500, sigma: 1}\n",
     ["line 3", "lengths.output: parametric lengths need both"]),  # the line of lengths:
    (GOOD + "lengths:\n  trace: no-such-trace.csv\n", ["line 4", "lengths.trace:", "no such file"]),
    (GOOD + "gpu_profile: tpu-v9\n", ["line 3", "gpu_profile: unknown cost profile 'tpu-v9'"]),
    (GOOD + "search:\n  max_replicas: 0\n", ["line 4", "search.max_replicas: Input should be greater than or equal to 1"]),
    (GOOD + "search:\n  max_replica: 4\n", ["line 4", "search.max_replica: unknown field"]),
    ("", ["empty workload file"]),
    ("- peak_qps: 2\n", ["line 1", "a workload is a mapping"]),
]


@pytest.mark.parametrize("text,expected", BAD_WORKLOADS, ids=[f"bad{i}" for i in range(len(BAD_WORKLOADS))])
def test_bad_workload_file_names_the_file_line_and_field(tmp_path, text, expected):
    path = _write(tmp_path, text)
    with pytest.raises(PlanError) as e:
        load_workload(path)
    msg = str(e.value)
    assert msg.startswith(str(path)), msg
    for part in expected:
        assert part in msg, f"{part!r} not in {msg!r}"


def test_a_bad_trace_row_names_the_trace_file_and_its_line(tmp_path):
    (tmp_path / "t.csv").write_text("num_prefill_tokens,num_decode_tokens\n10,5\n12,oops\n")
    path = _write(tmp_path, GOOD + "lengths:\n  trace: t.csv\n")  # relative to the YAML's folder
    with pytest.raises(PlanError) as e:
        load_workload(path)
    assert f"{path}, line 4: lengths.trace:" in str(e.value)
    assert f"{tmp_path / 't.csv'}, line 3" in str(e.value) and "not an integer" in str(e.value)


def test_shipped_example_workloads_load():
    files = sorted(WORKLOADS.glob("*.yaml"))
    assert {"paper-10qps-rtx6000ada.yaml", "paper-10qps-h100.yaml"} <= {f.name for f in files}
    loaded = [load_workload(f) for f in files]
    assert any(w.diurnal_qps is not None and w.lengths.trace is None for w in loaded)
    paper = load_workload(WORKLOADS / "paper-10qps-rtx6000ada.yaml")
    assert paper.peak == 10 and paper.tier_mix() == paper_tiers()


def test_help_explains_every_workload_field_and_the_stacks(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out

    def leaves(model, prefix=""):
        for name, f in model.model_fields.items():
            yield prefix + name
            for m in field_help_mod._models_in(f.annotation):
                sub = f"{prefix}{name}[]." if f.annotation is not None and "list" in str(f.annotation) else f"{prefix}{name}."
                yield from leaves(m, sub)

    for path in leaves(Workload):
        assert re.search(rf"^  {re.escape(path)}  \(", out, re.M), path
    for model in (Workload, plan_mod.Lengths, plan_mod.SearchSettings, plan_mod.LognormalTokens):
        for f in model.model_fields.values():
            if f.description:
                assert " ".join(f.description.split()[:4]) in " ".join(out.split())
    assert "pow2 + scheduler sarathi-fcfs" in out and "vLLM V1's default scheduler" in out
    assert "--html" in out and "--stacks" in out and "--requests" in out and "--jobs" in out


# ------------------------------------------------------------------------------------ the pieces

def test_hourly_qps_takes_each_hours_maximum_and_wraps_at_midnight():
    q = hourly_qps([(0, 2), (12, 10), (18, 4)])
    assert len(q) == 24
    assert q[0] == pytest.approx(2 + 8 / 12)  # rising: the hour's end
    assert q[11] == q[12] == 10  # the peak hour on both sides of the point
    assert q[23] == pytest.approx(2 + 2 / 6)  # 18 h -> 24 h falls from 4 to 2: the hour's start
    assert max(q) == 10
    assert hourly_qps([(5, 3)]) == [3] * 24
    assert hourly_qps([(6.5, 4), (7, 1)])[6] == 4  # a point inside the hour counts


def test_parametric_lengths_follow_their_distributions_and_the_seed():
    w = Workload.model_validate({
        "peak_qps": 1, "price_per_gpu_hour_usd": 1,
        "lengths": {"prompt": {"distribution": "lognormal", "mean_tokens": 700, "sigma": 0.8, "max_tokens": 10**6},
                    "output": {"distribution": "uniform", "min_tokens": 20, "max_tokens": 60}}})
    a = lengths_trace(w.lengths, 20_000, seed=1)
    b = lengths_trace(w.lengths, 20_000, seed=1)
    c = lengths_trace(w.lengths, 20_000, seed=2)
    np.testing.assert_array_equal(a.prompt_lens, b.prompt_lens)
    assert not np.array_equal(a.prompt_lens, c.prompt_lens)
    assert np.mean(a.prompt_lens) == pytest.approx(700, rel=0.03)
    assert np.std(np.log(a.prompt_lens)) == pytest.approx(0.8, rel=0.03)
    assert a.output_lens.min() == 20 and a.output_lens.max() == 60


def test_slai_plus_is_planned_only_when_the_registry_has_it(monkeypatch):
    monkeypatch.setattr(stacks_mod, "available_schedulers", lambda: ["sarathi-fcfs", "slai-spf-dynamic"])
    assert [s.key for s in available_stacks()] == ["default", "slai"]
    monkeypatch.setattr(stacks_mod, "available_schedulers",
                        lambda: ["sarathi-fcfs", "slai-spf-dynamic", "slai-plus"])
    assert [s.key for s in available_stacks()] == ["default", "slai", "slai-plus"]
    d = STACK_BY_KEY["default"]
    assert (d.router, d.scheduler) == ("pow2", "sarathi-fcfs")


def _summary(ttft_p50=(0.2, 0.3), tbt_p99=(0.05, 0.3), stable=True, waiting=0):
    tiers = {name: {"ttft_p50_s": t, "tbt_p99_s": b} for name, t, b in zip(("premium", "free"), ttft_p50, tbt_p99)}
    return {"tiers": tiers, "requests": 1000, "waiting_at_last_arrival": waiting, "stable": stable}


@pytest.mark.parametrize("summary,failed", [
    (_summary(), []),
    (_summary(tbt_p99=(0.11, 0.3)), [("premium", "tbt_p99_s")]),
    (_summary(tbt_p99=(0.05, 0.51)), [("free", "tbt_p99_s")]),
    (_summary(ttft_p50=(0.6, 0.3)), [("premium", "ttft_p50_s")]),  # per tier, not only overall
    (_summary(stable=False, waiting=40), [(None, "backlog")]),
    (_summary(tbt_p99=(float("nan"), 0.3)), []),  # no premium gaps in the run: nothing to check
])
def test_slo_checks_fail_exactly_the_limits_exceeded(summary, failed):
    checks = slo_checks(summary, paper_tiers())
    assert [(c["tier"], c["metric"]) for c in checks if not c["ok"]] == failed
    assert len(checks) == 5


# --------------------------------------------------------------- the search, on a synthetic oracle

def _drive(search: StackSearch, met) -> list[tuple[int, float]]:
    """Run `search.steps()` with `met(replicas, qps)` as the simulator; returns the probes."""
    probes = []
    gen = search.steps()
    try:
        batch = next(gen)
        while True:
            probes += batch
            batch = gen.send([{"replicas": n, "qps": q, "met": bool(met(n, q))} for n, q in batch])
    except StopIteration:
        return probes


def _workload(**search) -> Workload:
    return Workload.model_validate({"peak_qps": 10, "price_per_gpu_hour_usd": 1,
                                    "search": {"headroom_probes": 3, **search}})


@pytest.mark.parametrize("guess", [1, 3, 6, 7, 8, 20, 40])
def test_search_finds_the_fewest_replicas_from_any_guess_and_simulates_n_minus_1(guess):
    per_replica_qps = 1.45  # 10 QPS needs 7 replicas
    s = StackSearch(STACK_BY_KEY["default"], _workload(max_replicas=40), guess)
    probes = _drive(s, lambda n, q: n * per_replica_qps >= q)
    r = s.result
    assert r["replicas"] == 7 and r["confirmed"]
    assert r["at_n"]["replicas"] == 7 and r["at_n"]["met"] and r["at_n_minus_1"]["replicas"] == 6
    assert not r["at_n_minus_1"]["met"]
    assert len(probes) == len(set(probes))  # nothing simulated twice
    # headroom: 7 replicas hold 10.15 QPS; probed between 10 and 10 x 7/6
    h = r["headroom"]
    assert h["max_qps_met"] <= 10.15 < h["first_qps_missed"] <= 10 * 7 / 6 + 1e-6
    assert h["headroom_fraction"] == pytest.approx(h["max_qps_met"] / 10 - 1)


def test_search_from_a_good_guess_needs_few_runs():
    s = StackSearch(STACK_BY_KEY["slai"], _workload(headroom_probes=0), 7)
    probes = _drive(s, lambda n, q: n * 1.45 >= q)
    assert sorted(probes) == [(6, 10.0), (7, 10.0)]


def test_search_reports_infeasible_beyond_max_replicas():
    s = StackSearch(STACK_BY_KEY["default"], _workload(max_replicas=5), 2)
    _drive(s, lambda n, q: n * 1.45 >= q)
    assert s.result["feasible"] is False and s.result["replicas"] is None


def test_search_answers_above_a_larger_count_that_missed():
    # not monotone: 4 replicas pass, 5 miss, 6 and more pass; starting at 5 the search sees 5 miss
    # and 4 pass -> 6, the smallest count above every miss it saw
    s = StackSearch(STACK_BY_KEY["default"], _workload(headroom_probes=0), 5)
    _drive(s, lambda n, q: n == 4 or n >= 6)
    r = s.result
    assert r["replicas"] == 6
    assert r["at_n"]["met"] and not r["at_n_minus_1"]["met"] and r["confirmed"]


@pytest.mark.parametrize("min_replicas", [1, 2])
def test_diurnal_search_gives_each_hour_the_fewest_replicas_that_hold_its_load(min_replicas):
    curve = [[0, 1], [7, 0.5], [12, 10], [19, 6]]
    w = Workload.model_validate({"diurnal_qps": curve, "price_per_gpu_hour_usd": 1,
                                 "search": {"headroom_probes": 0, "min_replicas": min_replicas}})
    s = StackSearch(STACK_BY_KEY["default"], w, 7)
    probes = _drive(s, lambda n, q: n * 1.45 >= q)
    qps = hourly_qps(curve)
    assert [h["qps"] for h in s.result["hourly"]] == qps
    assert [h["replicas"] for h in s.result["hourly"]] == [max(min_replicas, math.ceil(q / 1.45 - 1e-9)) for q in qps]
    levels = len({q for q in qps if q < 10})
    assert len(probes) <= 2 + 6 * math.ceil(math.log2(levels + 1))  # bisection per replica count, not per hour


# ---------------------------------------------------------------- the planner, with the simulator

def test_reported_replicas_meet_slos_and_one_fewer_misses(tiny_plan):
    workload, result = tiny_plan
    tiers = workload.tier_mix()
    trace = load_trace("paper")
    for key, r in result["stacks"].items():
        n = r["replicas"]
        assert n is not None and n >= 2, (key, n)
        assert r["confirmed"] and r["at_n"]["replicas"] == n and r["at_n_minus_1"]["replicas"] == n - 1
        # confirm independently: a direct cluster simulation at N and at N-1, checked here
        for replicas, expect in ((n, True), (n - 1, False)):
            wl = SimWorkload.build(trace, 240, workload.peak, tiers, seed=workload.search.seed)
            run = run_cluster(wl, ClusterConfig(num_replicas=replicas, schedulers=r["scheduler"],
                                                profiles=(workload.gpu_profile,), router=r["router"],
                                                seed=workload.search.seed))
            s = summarize(run)
            meets = s["stable"] and all(
                s["tiers"][t.name]["tbt_p99_s"] <= t.tbt_slo_s and s["tiers"][t.name]["ttft_p50_s"] <= t.ttft_target_s
                for t in tiers.tiers)
            assert meets is expect, (key, replicas, s["tiers"], s["stable"])


def test_plan_result_prices_the_replicas_and_names_the_binding_slo(tiny_plan):
    workload, result = tiny_plan
    assert result["requests_per_run"] == 240
    for r in result["stacks"].values():
        assert r["gpu_hours_per_month"] == pytest.approx(r["replicas"] * HOURS_PER_MONTH)
        assert r["cost_per_month_usd"] == pytest.approx(r["gpu_hours_per_month"] * 2.0)
        closest = r["binding"]["closest_at_n"]
        assert closest["ratio"] == max(c["ratio"] for c in r["at_n"]["checks"] if c["metric"] != "backlog")
        assert r["binding"]["failed_at_n_minus_1"] and all(not c["ok"] for c in r["binding"]["failed_at_n_minus_1"])
        h = r["headroom"]
        assert h["max_qps_met"] >= result["peak_qps"]
        assert any(p["replicas"] == r["replicas"] and p["qps"] == h["max_qps_met"] and p["met"] for p in r["points"]) \
            or h["max_qps_met"] == result["peak_qps"]
    s = result["savings_vs_default"]
    best = result["stacks"][s["best"]]
    assert best["replicas"] == min(r["replicas"] for r in result["stacks"].values())
    assert s["replicas"] == result["stacks"]["default"]["replicas"] - best["replicas"]


def test_cli_prints_the_table_and_writes_strict_json_and_a_self_contained_html(tmp_path, capsys):
    path = _write(tmp_path, TINY_YAML.replace("requests_per_run: 240", "requests_per_run: 120")
                  .replace("headroom_probes: 2", "headroom_probes: 1"))
    out_json, out_html = tmp_path / "out" / "plan.json", tmp_path / "out" / "plan.html"
    assert main([str(path), "--stacks", "slai", "--jobs", "1", "--quiet",
                 "--json", str(out_json), "--html", str(out_html)]) == 0
    printed = capsys.readouterr().out
    assert "| our router + SLAI | slo + slai-spf-dynamic |" in printed
    doc = json.loads(out_json.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    r = doc["stacks"]["slai"]
    assert r["at_n"]["met"] and (r["replicas"] == 1 or not r["at_n_minus_1"]["met"])
    assert doc["requests_per_run"] == 120 and list(doc["stacks"]) == ["slai"]
    page = out_html.read_text()
    assert 'id="plan-table"' in page and page.count('src="data:image/png;base64,') == 3
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page) and "<script" not in page
    assert "<link" not in page


def test_cli_reports_a_bad_workload_without_a_traceback(tmp_path, capsys):
    path = _write(tmp_path, "peak_qps: two\nprice_per_gpu_hour_usd: 1\n")
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}, line 1: peak_qps:") and "Traceback" not in err


def test_diurnal_plan_prices_the_replicas_each_hour_needs(tmp_path):
    path = _write(tmp_path, """\
        diurnal_qps: [[0, 0.5], [10, 3], [20, 1.5]]
        lengths:
          prompt: {distribution: lognormal, mean_tokens: 1500, sigma: 0.8, max_tokens: 6000}
          output: {distribution: uniform, min_tokens: 50, max_tokens: 400}
        gpu_profile: rtx6000ada-mistral7b
        price_per_gpu_hour_usd: 1.5
        search: {requests_per_run: 150, headroom_probes: 0, max_replicas: 6}
        """)
    result = plan(load_workload(path), [STACK_BY_KEY["default"]], jobs=1, progress=False)
    r = result["stacks"]["default"]
    hours = r["hourly"]
    assert [h["qps"] for h in hours] == result["hourly_qps"] and len(hours) == 24
    peak_hours = [h for h in hours if h["qps"] == result["peak_qps"]]
    assert peak_hours and all(h["replicas"] == r["replicas"] for h in peak_hours)
    by_qps = sorted(hours, key=lambda h: h["qps"])
    assert all(a["replicas"] <= b["replicas"] for a, b in zip(by_qps, by_qps[1:]))  # more load, never fewer
    assert r["gpu_hours_per_month"] == pytest.approx(DAYS_PER_MONTH * sum(h["replicas"] for h in hours))
    assert r["gpu_hours_per_month"] <= r["static_gpu_hours_per_month"]
    assert r["cost_per_month_usd"] == pytest.approx(1.5 * r["gpu_hours_per_month"])
    assert 'id="plot-hourly"' in render_html(result)


# ----------------------------------------------------------------------- the report, in a browser

def _chromium() -> str | None:
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


_IMAGE_PROBE = """<script>
window.addEventListener('load', () => {
  const out = document.createElement('pre'); out.id = 'image-probe';
  out.textContent = Array.from(document.images).map(i => i.id + '=' + i.naturalWidth + 'x' + i.naturalHeight).join(' ');
  document.body.appendChild(out);
});
</script>"""


@pytest.mark.skipif(_chromium() is None, reason="headless Chromium is not installed (Debian: apt-get install chromium)")
def test_html_report_renders_in_headless_chromium_with_its_table_and_decoded_images(tiny_plan, tmp_path):
    _, result = tiny_plan
    page = render_html(result)
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", _IMAGE_PROBE + "</body>"))  # the report itself has no script
    flags = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    dom = subprocess.run([*flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    assert 'id="plan-table"' in dom
    for r in result["stacks"].values():
        assert r["label"] in dom and f"<td class=\"num\">{r['replicas']}</td>" in dom
    sizes = dict(kv.split("=") for kv in re.search(r'id="image-probe">([^<]*)<', dom).group(1).split())
    assert set(sizes) == {"plot-capacity", "plot-slos", "plot-savings"}
    for ident, size in sizes.items():
        w, h = (int(x) for x in size.split("x"))
        assert w > 300 and h > 200, (ident, size)
    # and what a person sees: a screenshot of the report is not blank
    report = tmp_path / "report.html"
    report.write_text(page)
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1280,2400", report.as_uri()],
                   capture_output=True, timeout=120)
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[0] >= 2000 and pixels[..., :3].std() > 0.05


def test_the_docs_field_reference_is_the_help_output():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "planner.md").read_text()
    assert "\n".join(plan_mod.field_help()) in doc, "regenerate the reference: python -m loadtest.plan --help"


def test_a_plan_point_on_a_prefix_trace_replays_it_in_order_with_prefix_caching():
    from loadtest.plan.search import PlanSetup, run_plan_point

    w = Workload.model_validate({"peak_qps": 2, "price_per_gpu_hour_usd": 1, "gpu_profile": "h100-mistral7b",
                                 "lengths": {"trace": "mooncake"}, "search": {"requests_per_run": 60}})
    assert w.lengths.describe() == "trace mooncake"
    out = run_plan_point(PlanSetup(w, 60), "default#2", 2.0)
    assert out["requests"] == 60 and out["unfinished"] == 0
