"""Virtual-time replica runs and the paper benchmark command."""

import json

import numpy as np
import pytest

from loadtest.simulate.__main__ import main
from loadtest.simulate.replica import Workload, run_replica
from loadtest.metrics import summarize
from replica.tiers import paper_tiers
from replica.traces import load_trace
from replica.cost.profile import load_profile
from replica.policy import make_policy


@pytest.fixture(scope="module")
def trace():
    return load_trace("paper")


@pytest.fixture(scope="module")
def rtx():
    return load_profile("rtx6000ada-mistral7b")


def _run(trace, rtx, scheduler, qps, n=600):
    return run_replica(Workload.build(trace, n, qps, paper_tiers()), make_policy(scheduler), rtx)


def test_every_request_finishes_with_its_tokens(trace, rtx):
    run = _run(trace, rtx, "slai-spf-dynamic", 1.0, n=300)
    wl = run.workload
    assert run.unfinished == 0 and np.isfinite(run.ttft_s).all() and (run.ttft_s > 0).all()
    assert sum(w.sum() for w in run.tbt_weight.values()) == int((wl.output_lens - 1).sum())
    assert (run.finish_s >= wl.arrival_s + run.ttft_s - 1e-9).all()


SLAI_PLUS_PRESETS = ["slai-plus", "slai-plus-no-aging", "slai-plus-no-budget", "slai-plus-no-offset",
                     "slai-plus-no-kv-guard", "slai-plus-no-window"]


# light load: long decode stretches; under load: short ones between prompts, with slai-plus's
# adaptive budget and offset at work (its time model learns from every iteration of a stretch)
@pytest.mark.parametrize("num_requests,qps", [(150, 0.5), (300, 1.5)])
@pytest.mark.parametrize("scheduler", ["sarathi-fcfs", "vllm", "slai-spf-dynamic", "rad", *SLAI_PLUS_PRESETS,
                                       "slai-next", "slai-next-no-srpf"])
def test_fast_forwarded_decode_stretches_change_no_result(trace, rtx, scheduler, num_requests, qps):
    wl = Workload.build(trace, num_requests, qps, paper_tiers())
    fast = summarize(run_replica(wl, make_policy(scheduler), rtx, fast_forward=True))
    slow = summarize(run_replica(wl, make_policy(scheduler), rtx, fast_forward=False))
    assert fast["iterations"] == slow["iterations"]
    for key in ("ttft_p50_s", "ttft_p99_s", "goodput_rps", "makespan_s"):
        assert fast[key] == pytest.approx(slow[key], rel=1e-9), key
    for tier in ("premium", "free"):
        for key in ("tbt_p99_s", "tbt_mean_s", "tbt_count"):
            assert fast["tiers"][tier][key] == pytest.approx(slow["tiers"][tier][key], rel=1e-9), (tier, key)
    if qps < 1.0:  # long stretches: fast-forwarding them pays (under load the gain is within timing noise)
        assert fast["sim_wall_s"] < slow["sim_wall_s"]


def test_same_seed_same_result(trace, rtx):
    a = summarize(_run(trace, rtx, "slai-spf-dynamic", 1.5, n=300))
    b = summarize(_run(trace, rtx, "slai-spf-dynamic", 1.5, n=300))
    a.pop("sim_wall_s"), b.pop("sim_wall_s")
    assert a == b


def test_slai_median_ttft_below_sarathi_fcfs_at_high_load(trace, rtx):
    slai = summarize(_run(trace, rtx, "slai-spf-dynamic", 1.8))
    sarathi = summarize(_run(trace, rtx, "sarathi-fcfs", 1.8))
    assert slai["ttft_p50_s"] < 0.8 * sarathi["ttft_p50_s"]
    assert slai["tbt_p99_s"]["premium"] <= 0.100


def test_slai_defers_free_decodes_but_keeps_premium_pace(trace, rtx):
    s = summarize(_run(trace, rtx, "slai-spf-dynamic", 1.4))
    sarathi = summarize(_run(trace, rtx, "sarathi-fcfs", 1.4))
    # free decodes wait (up to their deadline) when prefills contest the budget; premium never does
    assert s["tbt_p99_s"]["free"] > 2 * sarathi["tbt_p99_s"]["free"]
    assert s["tbt_p99_s"]["free"] <= 0.500
    assert s["tbt_p99_s"]["premium"] <= sarathi["tbt_p99_s"]["premium"]


def test_paper_command_writes_json_table_and_plots(tmp_path):
    out = tmp_path / "res"
    rc = main([
        "paper", "--requests", "120", "--qps", "0.5,3.0", "--schedulers", "sarathi-fcfs,slai-spf-dynamic",
        "--refine", "1", "--saturation-qps", "4", "--jobs", "1", "--quiet", "--out", str(out), "--json", str(tmp_path / "r.json"),
    ])
    assert rc == 0
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["profile"] == "rtx6000ada-mistral7b" and doc["requests"] == 120
    for name in ("sarathi-fcfs", "slai-spf-dynamic"):
        sched = doc["schedulers"][name]
        assert isinstance(sched["capacity_qps"], float)
        assert len(sched["points"]) >= 2
        for p in sched["points"]:
            assert {"qps", "ttft_p50_s", "ttft_p99_s", "tbt_p99_s", "slo_met"} <= set(p)
            assert set(p["tbt_p99_s"]) == {"premium", "free"}
    for f in ("summary.md", "ttft_p50_vs_qps.png", "tbt_p99_vs_qps.png", "ttft_by_prompt_len.png"):
        assert (out / f).stat().st_size > 0


def test_paper_command_rejects_unknown_scheduler(capsys):
    with pytest.raises(SystemExit) as e:
        main(["paper", "--schedulers", "nope"])
    assert e.value.code == 2
    assert "unknown scheduler" in capsys.readouterr().err


def test_run_command_reads_a_sharegpt_json_with_a_tokenizer_file(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["hello world how are you", "fine thanks"], trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    convs = [
        {"id": str(i), "conversations": [{"from": "human", "value": "hello world " * (5 + i)},
                                         {"from": "gpt", "value": "fine thanks " * (3 + i)}]}
        for i in range(20)
    ]
    (tmp_path / "sg.json").write_text(json.dumps(convs))
    rc = main(["run", "--scheduler", "slai-spf-dynamic", "--qps", "2", "--requests", "20",
               "--trace", str(tmp_path / "sg.json"), "--tokenizer", str(tmp_path / "tokenizer.json")])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["requests"] == 20 and out["unfinished"] == 0


def test_bad_trace_stops_the_command_naming_file_and_line(tmp_path, capsys):
    bad = tmp_path / "t.csv"
    bad.write_text("num_prefill_tokens,num_decode_tokens\n10,5\n12,x\n")
    with pytest.raises(SystemExit) as e:
        main(["run", "--scheduler", "vllm", "--qps", "1", "--trace", str(bad)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "t.csv" in err and "line 3" in err


def test_bad_profile_stops_the_command_naming_the_file(tmp_path, capsys):
    bad = tmp_path / "p.json"
    bad.write_text('{"name": "x",\n "gpu": }')
    with pytest.raises(SystemExit) as e:
        main(["run", "--scheduler", "vllm", "--qps", "1", "--profile", str(bad)])
    assert e.value.code == 2
    assert "p.json" in capsys.readouterr().err


def test_prefix_trace_workload_keeps_the_trace_order_and_its_hashes():
    from replica.traces import load_trace as _load

    mc = _load("mooncake")
    wl = Workload.build(mc, 50, 2.0, paper_tiers())
    assert list(wl.prompt_lens) == list(mc.prompt_lens[:50])
    assert wl.prefix_hashes == mc.prefix_hashes[:50] and wl.hash_block_tokens == 512


def test_replayed_arrivals_keep_the_recorded_gaps_scaled_to_the_qps():
    from replica.traces import load_trace as _load

    mc = _load("mooncake")
    wl = Workload.build(mc, 200, 1.0, paper_tiers(), arrivals="replay")
    rec = mc.arrival_s[:200] - mc.arrival_s[0]
    assert wl.arrival_s[-1] == pytest.approx(199.0)  # mean rate 1 QPS
    assert wl.arrival_s == pytest.approx(rec * 199.0 / rec[-1])


def test_replay_needs_a_trace_with_timestamps(trace):
    with pytest.raises(ValueError, match="no timestamps"):
        Workload.build(trace, 10, 1.0, paper_tiers(), arrivals="replay")


def test_simulate_run_on_the_mooncake_trace_reports_the_prefix_cache_hit_rate(capsys):
    from loadtest.simulate.__main__ import main

    assert main(["run", "--trace", "mooncake", "--profile", "h100-mistral7b", "--scheduler", "slai-spf-dynamic",
                 "--qps", "1", "--requests", "150"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert 0 < out["prefix_cache_hit_rate"] < 1
    assert main(["run", "--trace", "mooncake", "--profile", "h100-mistral7b", "--scheduler", "slai-spf-dynamic",
                 "--qps", "1", "--requests", "150", "--no-prefix-caching"]) == 0
    assert "prefix_cache_hit_rate" not in json.loads(capsys.readouterr().out)


def test_cluster_router_option_reaches_the_routers_and_a_bad_one_stops_the_command(tmp_path, capsys):
    from loadtest.simulate.__main__ import main

    args = ["cluster", "--replicas", "2", "--trace", "mooncake", "--profile", "h100-mistral7b", "--pairs",
            "slo+slai-spf-dynamic", "--qps", "0.5", "--requests", "30", "--refine", "0", "--jobs", "1", "--quiet",
            "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as err:
        main([*args, "--router-option", "prefix_guard_share=3"])
    assert err.value.code == 2 and "prefix_guard_share" in capsys.readouterr().err
    assert main([*args, "--router-option", "prefix_guard_share=1.0"]) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["setup"]["router_options"] == [["prefix_guard_share", 1.0]]
    # every run reports its prefix-cache hit rate (the pair's own field is at capacity, which a
    # 60-request run with two premium requests may not reach)
    assert all(pt["prefix_cache_hit_rate"] > 0 for pt in doc["pairs"]["slo+slai-spf-dynamic"]["points"])
