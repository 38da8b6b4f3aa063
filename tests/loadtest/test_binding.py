"""loadtest.binding: what a queue waits on, classified per iteration of a virtual-time run."""

from __future__ import annotations

from loadtest.binding import main, probe
from loadtest.simulate.sweep import SweepSetup

SMALL = dict(profile="rtx6000ada-mistral7b", requests=200)


def test_an_overloaded_engine_with_a_large_cache_waits_on_its_budget():
    r = probe(SweepSetup(**SMALL), "sarathi-fcfs", 6.0)
    assert r["queued_share"] > 0.5
    assert r["waits_on"]["budget"] > 0.9 and r["waits_on"]["kv"] < 0.1


def test_a_small_kv_cache_makes_the_queue_wait_on_kv():
    r = probe(SweepSetup(kv_blocks=1200, **SMALL), "sarathi-fcfs", 6.0)
    assert r["waits_on"]["kv"] > 0.3


def test_slai_plus_reports_its_slot_bound_iterations_and_sarathi_none():
    small = SweepSetup(kv_blocks=1200, **SMALL)
    assert probe(small, "slai-plus", 6.0)["slot_bound_share"] > 0.3
    assert probe(small, "sarathi-fcfs", 6.0)["slot_bound_share"] == 0.0


def test_the_command_prints_a_row_per_scheduler_and_qps(capsys, tmp_path):
    out = tmp_path / "b.json"
    assert main(["--scheduler", "sarathi-fcfs", "--scheduler", "slai-next", "--qps", "2,6", "--requests", "100",
                 "--profile", "rtx6000ada-mistral7b", "--json", str(out)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "QPS" not in line]
    assert len(rows) == 4 and out.exists()
