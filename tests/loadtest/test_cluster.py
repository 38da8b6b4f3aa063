"""The cluster simulator: N replicas behind routers in virtual time, stale feedback, the ledger."""

import json

import numpy as np
import pytest

from loadtest.metrics import summarize
from loadtest.simulate.__main__ import main as simulate_main
from loadtest.simulate.cluster import ClusterConfig, run_cluster
from loadtest.simulate.replica import Workload, run_replica
from replica.traces import load_trace
from replica.cost.profile import load_profile
from replica.policy.registry import make_policy
from replica.tiers import paper_tiers

PROFILE = "rtx6000ada-mistral7b"


@pytest.fixture(scope="module")
def trace():
    return load_trace("paper")


def _workload(trace, n=300, qps=1.5, seed=3):
    return Workload.build(trace, n, qps, paper_tiers(), seed=seed)


def test_a_one_replica_cluster_is_the_one_replica_simulator(trace):
    wl = _workload(trace, n=250, qps=1.6)
    alone = run_replica(wl, make_policy("slai-spf-dynamic"), load_profile(PROFILE), fast_forward=False)
    cluster = run_cluster(wl, ClusterConfig(num_replicas=1, router="slo"))
    np.testing.assert_array_equal(cluster.ttft_s, alone.ttft_s)
    np.testing.assert_array_equal(cluster.finish_s, alone.finish_s)
    for tier in alone.tbt_s:
        np.testing.assert_array_equal(np.sort(cluster.tbt_s[tier]), np.sort(alone.tbt_s[tier]))
    assert cluster.num_iterations == alone.num_iterations and cluster.makespan_s == alone.makespan_s


@pytest.mark.parametrize("router", ["round_robin", "pow2", "least_work", "sita", "slo"])
def test_every_request_is_served_exactly_once(trace, router):
    wl = _workload(trace, n=400, qps=4 * 1.4)
    run = run_cluster(wl, ClusterConfig(num_replicas=4, router=router, num_routers=2, feedback_delay_s=0.5))
    assert run.unfinished == 0 and np.isfinite(run.ttft_s).all() and np.isfinite(run.finish_s).all()
    assert sum(run.requests_per_replica) == len(wl) and (run.replica_of >= 0).all()
    assert np.bincount(run.replica_of, minlength=4).tolist() == run.requests_per_replica
    gaps = sum(w.sum() for w in run.tbt_weight.values())
    assert gaps == (wl.output_lens - 1).sum()  # every token after the first of every request, once


def test_the_cluster_simulator_runs_slai_plus_on_every_replica(trace):
    wl = _workload(trace, n=300, qps=3 * 1.4)
    run = run_cluster(wl, ClusterConfig(num_replicas=3, router="slo", schedulers="slai-plus"))
    assert run.unfinished == 0 and sum(run.requests_per_replica) == len(wl)
    gaps = sum(w.sum() for w in run.tbt_weight.values())
    assert gaps == (wl.output_lens - 1).sum()


def test_the_same_seed_gives_the_same_run(trace):
    wl = _workload(trace, n=300, qps=3 * 1.5)
    config = ClusterConfig(num_replicas=3, router="pow2", num_routers=2, seed=7)
    a, b = run_cluster(wl, config), run_cluster(wl, config)
    np.testing.assert_array_equal(a.ttft_s, b.ttft_s)
    np.testing.assert_array_equal(a.replica_of, b.replica_of)
    c = run_cluster(wl, config.model_copy(update={"seed": 8}))
    assert not np.array_equal(a.replica_of, c.replica_of)


def test_round_robin_over_two_routers_alternates_replicas(trace):
    run = run_cluster(_workload(trace, n=40, qps=2.0), ClusterConfig(num_replicas=4, router="round_robin", num_routers=1))
    assert run.requests_per_replica == [10, 10, 10, 10]


def _first_period_shares(trace, use_ledger):
    """Share of the busiest replica in the prompt tokens routed before any feedback exists."""
    wl = _workload(trace, n=400, qps=4 * 1.5, seed=5)
    period = 5.0
    run = run_cluster(wl, ClusterConfig(num_replicas=4, router="slo", feedback_period_s=period,
                                        feedback_delay_s=period, use_ledger=use_ledger))
    early = wl.arrival_s < period  # no snapshot delivered before 5 s
    tokens = np.bincount(run.replica_of[early], weights=wl.prompt_lens[early], minlength=4)
    return tokens.max() / tokens.sum(), summarize(run)


def test_stale_feedback_herds_requests_onto_one_replica_without_the_ledger(trace):
    share, _ = _first_period_shares(trace, use_ledger=False)
    assert share == 1.0


def test_the_ledger_spreads_requests_while_feedback_is_stale(trace):
    share_with, with_ledger = _first_period_shares(trace, use_ledger=True)
    _, without = _first_period_shares(trace, use_ledger=False)
    assert share_with <= 0.3
    assert with_ledger["ttft_p99_s"] < without["ttft_p99_s"]


def test_mixed_profiles_are_assigned_in_turn(trace):
    config = ClusterConfig(num_replicas=3, profiles=["rtx6000ada-mistral7b", "h100-mistral7b"])
    assert [config.profile_of(i) for i in range(3)] == ["rtx6000ada-mistral7b", "h100-mistral7b", "rtx6000ada-mistral7b"]
    run = run_cluster(_workload(trace, n=200, qps=3.0), config)
    assert run.unfinished == 0


def test_the_cluster_command_writes_capacity_per_pair(tmp_path, capsys):
    out = tmp_path / "res.json"
    code = simulate_main(["cluster", "--replicas", "1,2", "--requests", "120", "--qps", "1.0,2.0", "--refine", "1",
                          "--pairs", "pow2+sarathi-fcfs,pow2+slai-spf-dynamic,slo+slai-spf-dynamic",
                          "--jobs", "1", "--quiet", "--out", str(tmp_path / "out"), "--json", str(out)])
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc["replicas"] == 2
    assert set(doc["pairs"]) == {"pow2+sarathi-fcfs", "pow2+slai-spf-dynamic", "slo+slai-spf-dynamic"}
    for r in doc["pairs"].values():
        assert r["capacity_qps"] >= 0 and set(r["tbt_p99_s"]) <= {"premium", "free"}
        assert isinstance(r["ttft_p50_s"], float | None)
    assert set(doc["scaling"]) == {"1", "2"}
    assert (tmp_path / "out" / "capacity_vs_replicas.png").is_file()
    assert "slo+slai-spf-dynamic" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--pairs", "slo"], "ROUTER+SCHEDULER"),
    (["--pairs", "fastest+slai-spf-dynamic"], "unknown router"),
    (["--replicas", "0"], "positive"),
])
def test_bad_cluster_arguments_are_refused(args, message, capsys):
    argv = ["cluster", "--replicas", "2", *args] if "--replicas" not in args else ["cluster", *args]
    with pytest.raises(SystemExit):
        simulate_main(argv)
    assert message in capsys.readouterr().err


def test_the_cluster_command_takes_mixed_profiles(tmp_path):
    code = simulate_main(["cluster", "--replicas", "2", "--requests", "60", "--qps", "2.0", "--refine", "0",
                          "--profile", "rtx6000ada-mistral7b,h100-mistral7b", "--pairs", "slo+slai-spf-dynamic",
                          "--jobs", "1", "--quiet", "--out", str(tmp_path)])
    assert code == 0
    assert json.loads((tmp_path / "results.json").read_text())["setup"]["profiles"] == "rtx6000ada-mistral7b,h100-mistral7b"
