"""Benchmarks of the vLLM scheduler adapter on a real (CPU) engine with the tiny model.

  python -m loadtest.vllm_bench overhead [--running 16,64,128,256] [--steps 40] [--repeats 1] [--log-stats]
      scheduler CPU time per step (schedule() + update_from_output()) of SLAI against vLLM's own
      scheduler, with N requests decoding (two engines in this process, stepped in turn, so both
      see the same host; --repeats R for the median over R such pairs)
  python -m loadtest.vllm_bench burst [--requests 48] [--budget 64]
      median TTFT of a burst of mixed prompt lengths, SLAI against vLLM's default scheduler

Both build the tiny random-weight model (replica.tiny_model) in a temporary folder and run the
engine in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0). Needs the `cpu` (or `gpu`) extra.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from loadtest.cli_args import int_at_least, ints_at_least

SLAI = "replica.vllm_scheduler.SLAIScheduler"


def _engine(model_dir: Path, scheduler_cls: str | None, **kw):
    from vllm import LLM

    args = dict(dtype="float32", enforce_eager=True, kv_cache_memory_bytes=256 << 20, max_model_len=1024,
                enable_prefix_caching=False, seed=0)
    args.update(kw)
    return LLM(model=str(model_dir), tokenizer=str(model_dir), scheduler_cls=scheduler_cls, **args)


def _shutdown(llm) -> None:
    import gc

    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001  (best effort: the process ends soon anyway)
        pass
    del llm
    gc.collect()


def _timed(sched) -> dict[str, list[float]]:
    """Wrap the instance's schedule/update_from_output to time every call."""
    times: dict[str, list[float]] = {"schedule": [], "update": []}
    schedule, update = sched.schedule, sched.update_from_output

    def timed_schedule(*a, **k):
        t = time.perf_counter()
        out = schedule(*a, **k)
        times["schedule"].append(time.perf_counter() - t)
        return out

    def timed_update(*a, **k):
        t = time.perf_counter()
        out = update(*a, **k)
        times["update"].append(time.perf_counter() - t)
        return out

    sched.schedule, sched.update_from_output = timed_schedule, timed_update
    return times


def bench_tier(i: int) -> str:
    """The tier of the bench's i-th request: every 20th is premium (5 %, the paper's mix)."""
    return "premium" if i % 20 == 0 else "free"


def _decoding_engine(model_dir: Path, cls: str | None, n: int, steps: int, log_stats: bool = False):
    """A fresh engine with `n` requests admitted and decoding (each has room for `steps` more
    decode steps), and the timers on its scheduler.  `log_stats`: vLLM's own statistics on (the
    default of its API server; `vllm.LLM` turns them off)."""
    from vllm import SamplingParams

    llm = _engine(model_dir, cls, max_num_seqs=n, max_num_batched_tokens=max(256, n * 8),
                  disable_log_stats=not log_stats)
    eng = llm.llm_engine
    sched = eng.engine_core.engine_core.scheduler
    for i in range(n):
        eng.add_request(f"r{i}", {"prompt_token_ids": [5 + (i * 7 + j) % 1500 for j in range(8)]},
                        SamplingParams(temperature=0, max_tokens=steps + 20, ignore_eos=True,
                                       extra_args={"tier": bench_tier(i)}))
    while len(sched.running) < n:  # admit everyone (prefills) before measuring decodes
        eng.step()
    return llm, eng, _timed(sched)


def _overhead_pair(model_dir: Path, classes: dict[str, str | None], n: int, steps: int,
                   log_stats: bool = False) -> dict[str, list[float]]:
    """Per-step scheduler CPU time (schedule() + update_from_output(), seconds) of `steps` decode
    steps with `n` requests running, for each scheduler class: one engine each in this process,
    stepped in turn (one step of each, the order reversed every step), so that whatever changes
    the host's speed during the measurement changes it for both alike."""
    engines = {name: _decoding_engine(model_dir, cls, n, steps, log_stats) for name, cls in classes.items()}
    order = list(engines.values())
    for _ in range(steps):
        for _llm, eng, _times in order:
            eng.step()
        order.reverse()
    per_step = {name: [s + u for s, u in zip(times["schedule"], times["update"])]
                for name, (_llm, _eng, times) in engines.items()}
    for _llm, eng, _times in engines.values():  # drain all before shutting any down: the engines
        while eng.has_unfinished_requests():    # share this process's torch.distributed state
            eng.step()
    for llm, _eng, _times in engines.values():
        _shutdown(llm)
    return per_step


def overhead(model_dir: Path, running: list[int], steps: int, repeats: int = 1, log_stats: bool = False) -> dict:
    """Each repeat measures both schedulers at every N on the same steps (`_overhead_pair`; which
    engine is built and stepped first alternates between repeats).  A scheduler's ``median_ms``
    is the median over its repeats of the per-step median; ``ratio`` the median of the repeats'
    ratios of the per-step medians (each in ``ratios``)."""
    names = {"vllm-default": None, "slai": SLAI}
    runs: dict[str, dict[int, list[list[float]]]] = {name: {n: [] for n in running} for name in names}
    for rep in range(repeats):
        for n in running:
            classes = names if rep % 2 == 0 else dict(reversed(names.items()))
            for name, per_step in _overhead_pair(model_dir, classes, n, steps, log_stats).items():
                runs[name][n].append(per_step)
    results: dict = {}
    for name in names:
        results[name] = {n: {"median_ms": statistics.median(statistics.median(r) for r in runs[name][n]) * 1e3,
                             "mean_ms": statistics.fmean(x for r in runs[name][n] for x in r) * 1e3,
                             "steps_timed": [len(r) for r in runs[name][n]]}
                         for n in running}
        if repeats > 1:
            for n in running:
                results[name][n]["repeat_medians_ms"] = [round(statistics.median(r) * 1e3, 4) for r in runs[name][n]]
    ratios = {n: [statistics.median(s) / statistics.median(v) for s, v in zip(runs["slai"][n], runs["vllm-default"][n])]
              for n in running}
    results["ratio"] = {n: statistics.median(r) for n, r in ratios.items()}
    results["ratios"] = {n: [round(x, 4) for x in r] for n, r in ratios.items()}
    results["log_stats"] = log_stats
    return results


def burst(model_dir: Path, num_requests: int, budget: int, seed: int = 0) -> dict:
    from vllm import SamplingParams

    rng = random.Random(seed)
    prompts = [rng.choice([16, 32, 64, 128, 256, 512, 768]) for _ in range(num_requests)]
    results = {}
    for name, cls in (("vllm-default", None), ("slai", SLAI)):
        llm = _engine(model_dir, cls, max_num_seqs=64, max_num_batched_tokens=budget)
        eng = llm.llm_engine
        # warm the engine and (for SLAI) its batch-time mean on a few short requests
        for i in range(4):
            eng.add_request(f"w{i}", {"prompt_token_ids": [5] * 16}, SamplingParams(max_tokens=8, ignore_eos=True))
        while eng.has_unfinished_requests():
            eng.step()
        t0 = time.perf_counter()
        first: dict[str, float] = {}
        for i, n in enumerate(prompts):
            eng.add_request(f"b{i}", {"prompt_token_ids": [5 + (i * 13 + j) % 1500 for j in range(n)]},
                            SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                                           extra_args={"tier": bench_tier(i)}))
        while eng.has_unfinished_requests():
            for o in eng.step():
                if o.request_id not in first and o.outputs and o.outputs[0].token_ids:
                    first[o.request_id] = time.perf_counter() - t0
        ttft = sorted(first.values())
        results[name] = {"ttft_p50_s": statistics.median(ttft), "ttft_mean_s": statistics.fmean(ttft),
                         "ttft_max_s": ttft[-1], "requests": len(ttft)}
        _shutdown(llm)
    results["ttft_p50_change"] = results["slai"]["ttft_p50_s"] / results["vllm-default"]["ttft_p50_s"] - 1
    results["prompt_lens"] = prompts
    return results


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # keep stdout for the JSON result
    ap = argparse.ArgumentParser(prog="python -m loadtest.vllm_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    o = sub.add_parser("overhead")
    o.add_argument("--running", type=ints_at_least(1), default=[16, 64, 128, 256],
                   help="comma-separated numbers of requests decoding (default 16,64,128,256)")
    o.add_argument("--steps", type=int_at_least(1), default=40)
    o.add_argument("--repeats", type=int_at_least(1), default=1,
                   help="measure both schedulers this many times per N, each time on fresh engines (medians reported)")
    o.add_argument("--log-stats", action="store_true",
                   help="vLLM's own statistics on, as its API server runs (vllm.LLM's default is off)")
    b = sub.add_parser("burst")
    b.add_argument("--requests", type=int_at_least(1), default=48)
    b.add_argument("--budget", type=int_at_least(1), default=64)
    a = ap.parse_args(argv)
    from replica.tiny_model import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(Path(tmp) / "tiny")
        if a.cmd == "overhead":
            res = overhead(model_dir, a.running, a.steps, a.repeats, a.log_stats)
        else:
            res = burst(model_dir, a.requests, a.budget)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
