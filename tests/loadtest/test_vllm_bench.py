"""`loadtest.vllm_bench overhead`: both schedulers timed on the same steps, stepped in turn."""

from __future__ import annotations

import statistics

import pytest

from loadtest import vllm_bench


class FakeEngine:
    """Stands in for an engine with requests decoding: each step appends its name to a shared
    log and times one schedule/update pair (scheduler `name` takes `cost_s` per step)."""

    def __init__(self, name: str, cost_s: float, log: list[str], steps_left: int) -> None:
        self.name, self.cost_s, self.log, self.steps_left = name, cost_s, log, steps_left
        self.times: dict[str, list[float]] = {"schedule": [], "update": []}

    def step(self) -> None:
        self.log.append(self.name)
        self.steps_left -= 1
        self.times["schedule"].append(self.cost_s * 0.75)
        self.times["update"].append(self.cost_s * 0.25)

    def has_unfinished_requests(self) -> bool:
        return self.steps_left > 0


@pytest.fixture
def fake_engines(monkeypatch):
    log: list[str] = []
    cost = {None: 1e-4, vllm_bench.SLAI: 1.2e-4}

    def decoding_engine(model_dir, cls, n, steps, log_stats=False):
        eng = FakeEngine("slai" if cls else "vllm", cost[cls], log, steps + 3)
        log.append(f"built {eng.name}")
        return f"llm-{eng.name}", eng, eng.times

    monkeypatch.setattr(vllm_bench, "_decoding_engine", decoding_engine)
    monkeypatch.setattr(vllm_bench, "_shutdown", lambda llm: log.append(f"shutdown {llm}"))
    return log


def test_the_two_engines_are_stepped_in_turn_with_the_order_reversed_every_step(fake_engines):
    per_step = vllm_bench._overhead_pair(None, {"vllm-default": None, "slai": vllm_bench.SLAI}, 8, steps=4)
    timed = [e for e in fake_engines if e in ("vllm", "slai")][:8]
    assert timed == ["vllm", "slai", "slai", "vllm", "vllm", "slai", "slai", "vllm"]
    assert per_step == {"vllm-default": [1e-4] * 4, "slai": [pytest.approx(1.2e-4)] * 4}


def test_every_engine_is_drained_before_any_is_shut_down(fake_engines):
    vllm_bench._overhead_pair(None, {"vllm-default": None, "slai": vllm_bench.SLAI}, 8, steps=4)
    first_shutdown = next(i for i, e in enumerate(fake_engines) if e.startswith("shutdown"))
    assert fake_engines[first_shutdown:] == ["shutdown llm-vllm", "shutdown llm-slai"]
    assert fake_engines[:first_shutdown].count("vllm") == fake_engines[:first_shutdown].count("slai") == 4 + 3


def test_the_ratio_is_the_median_of_the_repeats_ratios_and_the_build_order_alternates(fake_engines):
    res = vllm_bench.overhead(None, [8], steps=4, repeats=3)
    assert [e for e in fake_engines if e.startswith("built")] == ["built vllm", "built slai", "built slai",
                                                                   "built vllm", "built vllm", "built slai"]
    assert res["ratios"][8] == [1.2] * 3
    assert res["ratio"][8] == pytest.approx(statistics.median(res["ratios"][8]))
    assert res["slai"][8]["steps_timed"] == res["vllm-default"][8]["steps_timed"] == [4, 4, 4]
    assert res["slai"][8]["median_ms"] == pytest.approx(0.12)


@pytest.mark.parametrize("args, message", [
    (["overhead", "--running", "16,x"], "expected a whole number, got 'x'"),
    (["overhead", "--running", "0"], "expected a number >= 1, got 0"),
    (["overhead", "--running", ","], "expected comma-separated whole numbers"),
    (["overhead", "--steps", "0"], "expected a number >= 1, got 0"),
    (["overhead", "--repeats", "-1"], "expected a number >= 1, got -1"),
    (["burst", "--budget", "0"], "expected a number >= 1, got 0"),
])
def test_a_bad_argument_is_refused_with_its_reason(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        vllm_bench.main(args)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_every_twentieth_bench_request_is_premium():
    assert [vllm_bench.bench_tier(i) for i in range(41)].count("premium") == 3
    assert vllm_bench.bench_tier(0) == vllm_bench.bench_tier(20) == "premium"
    assert vllm_bench.bench_tier(1) == "free"
