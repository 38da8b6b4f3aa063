"""The decision-time benchmark runs on the shipped trace and reports every policy it was asked for."""

from __future__ import annotations

import json

from loadtest.router_decision_time import load_requests, main
from replica.traces import MOONCAKE_TRACE_PATH


def test_requests_come_from_the_trace_loader_with_its_block_size():
    rows, block = load_requests(MOONCAKE_TRACE_PATH, 10)
    assert len(rows) == 10 and block == 512
    assert all(len(h) == -(-p // 512) for p, h in rows)


def test_a_small_run_writes_percentiles_per_policy_and_replica_count(tmp_path, capsys):
    out = tmp_path / "t.json"
    assert main(["--requests", "40", "--replicas", "4", "--rounds", "1", "--warmup", "10",
                 "--policies", "slo", "pow2", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [(r["policy"], r["replicas"]) for r in doc["results"]] == [("slo", 4), ("pow2", 4)]
    assert all(r["rank_us"]["p99"] > 0 and r["decisions"] == 40 for r in doc["results"])


def test_infinite_cache_hit_rate_counts_leading_blocks_seen_before():
    from loadtest.prefix_reuse import infinite_cache_hit_rate, reuse_distances

    hashes = [(1, 2), (1, 2, 3), (1, 4)]
    # second: blocks 1, 2 seen (1024 tokens of 1100); third: block 1 (512 of 600)
    assert infinite_cache_hit_rate(hashes, [1024, 1100, 600], 512) == (0 + 1024 + 512) / (1024 + 1100 + 600)
    assert list(reuse_distances(hashes)) == [1]  # the third shares only the first block: not a turn
