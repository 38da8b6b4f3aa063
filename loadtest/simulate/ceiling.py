"""The throughput ceiling of a cost profile + trace + token budget, from the cost model alone.

  python -m loadtest.simulate ceiling [--profile P] [--trace T] [--requests N] [--seed S]
                                      [--budgets 512,768,1024] [--results RESULTS.json] [--json OUT]

No simulation: the GPU time one request costs when every engine iteration is full, priced by the
profile's own `iteration_time_s`, and its inverse, the most requests per second the GPU can
finish.  With the results JSON of a paper sweep (`python -m loadtest.simulate paper`), each
scheduler's capacities as a fraction of the ceiling at that scheduler's budget.

The requests are the sweep's (`Workload.build`: the same trace, --requests and --seed, so the same
prompt and output lengths); a request of prompt P and output O costs P prefill tokens and O - 1
decodes (its first output token comes with its last prefill chunk, as in `replica.sim.engine`).

Assumptions of the compute ceiling at budget B (a fluid model of a saturated chunked-prefill
engine, Sarathi / SLAI):

* Every iteration holds exactly B tokens (decodes + prefill tokens), so a request's share of the
  per-iteration cost (`base`) is its tokens / B iterations.
* Iterations have the workload's token mix: d = B x (decode tokens / all tokens) decodes and
  c = B - d prefill tokens, so each prompt is prefilled in chunks of c tokens (ceil(P / c) chunks,
  the last one partial; chunk k sees k x c tokens of prior context).  For any chunking
  sum p^2 + 2 sum p x ctx = P^2, and the profiles' prefill_sq > prefill_ctx / 2, so a smaller
  chunk costs less: chunks of the whole budget would lower the ceiling slightly.
* Decode attention is charged per decode over the request's own context (P, P + 1, ...,
  P + O - 2): that sum does not depend on how decodes are batched, so the ceiling needs no guess
  of the concurrency for it.
* No preemption, no recompute, no idle GPU, no prefix cache (every prompt token is computed).

The cost is split by term with the model's own function (no second copy of its formulas): the
request's iterations are summed into one `BatchShape`, and each term is the time that shape loses
when that term's sum is zeroed (per-token: the shape's tokens alone, less the per-iteration
cost; per-iteration: the cost of an iteration of one token extrapolated to zero tokens, times
the iterations).  This is exact for a model affine in the shape's sums, as `CostProfile` is; a
model that is not is refused.

The KV cache and the request slots (vLLM's max_num_seqs; SchedulerConfig.max_active_requests and
max_decodes) are a second bound, from Little's law in iterations: a request holds its whole
prompt's KV blocks from its first prefill chunk (the engine reserves them at admission) and one
block more every 16 tokens it decodes, and runs in ceil(P / c) + O - 1 iterations.  When
iterations hold n tokens, n / (tokens per request) requests finish per iteration, so the mean KV
in use is n x E[KV token-iterations per request] / E[tokens per request], whatever the iteration
time; the same for running requests and decodes per iteration.  Their capacities therefore cap
the tokens an iteration can hold on average (`n_kv`, `n_slots`, `n_decodes`); the bound is the
compute ceiling at the best iteration size up to min(B, those caps) (a scheduler with budget B may
run smaller iterations; above about 1,600 tokens the prefill_sq term outgrows what a larger
iteration saves in per-iteration cost on rtx6000ada-mistral7b, so the ceiling is not monotone in
B).  The whole cache is counted (the 1 % admission watermark is not kept back), so this too is an
upper bound.

The ceiling is in requests served per second; the sweep's QPS is nominal (Poisson gaps capped at
3 / QPS: requests arrive at `loadtest.arrivals.effective_qps(1)` = 1.0524 per second per QPS), so
the table also gives the ceiling in nominal QPS, and the fractions compare like with like.  A
finite run can pass at an offered load a little above what it can sustain (the paper's capacity
only looks at the median TTFT; the stable one allows 1 % of the requests waiting, plus those
running, at the last arrival), so a capacity can exceed the bound.

For a scheduler of the sweep, its budget is the most tokens one of its iterations may hold:
token_budget (SLAI, Sarathi), max_batch_tokens (RAD), max_token_budget (slai-plus),
max_prefill_tokens (vLLM-style, whose prefill-only iterations the chunked model above does not
describe: its fraction is against a ceiling it cannot reach).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from replica.cost.model import CostModel
from replica.cost.shape import BatchShape
from replica.policy.config import SchedulerConfig
from replica.policy.state import KVCache

TERMS = ("per_iteration", "per_token", "prefill_sq", "prefill_ctx", "decode_ctx")
DEFAULT_BUDGETS = (512,)


@dataclass(frozen=True)
class RequestMix:
    """Prompt and output lengths of the requests the ceiling is averaged over."""

    prompt_lens: np.ndarray
    output_lens: np.ndarray

    def __post_init__(self) -> None:
        if len(self.prompt_lens) == 0 or len(self.prompt_lens) != len(self.output_lens):
            raise ValueError("RequestMix needs equal, non-empty prompt and output lengths")
        if np.any(self.prompt_lens < 1) or np.any(self.output_lens < 1):
            raise ValueError("every request needs a prompt token and an output token")

    @property
    def decodes(self) -> np.ndarray:  # O - 1: the first output token comes with the last prefill chunk
        return np.asarray(self.output_lens, dtype=np.int64) - 1

    @property
    def prefill_share(self) -> float:
        p = int(np.sum(self.prompt_lens))
        return p / (p + int(np.sum(self.decodes)))


@dataclass(frozen=True)
class Ceiling:
    budget: float  # tokens in every iteration
    chunk_tokens: int  # prefill tokens per iteration (each prompt's chunk size)
    decodes_per_iteration: float
    gpu_ms_per_request: float
    terms_ms: dict[str, float]  # per request, by cost term (sums to gpu_ms_per_request)
    qps: float  # 1000 / gpu_ms_per_request
    iteration_ms: float  # mean iteration time at the ceiling
    iterations_per_request: float  # ceil(P / c) + O - 1, mean: iterations a request runs in
    running_at_ceiling: float  # mean requests holding KV at the ceiling (Little's law)
    kv_tokens_at_ceiling: float  # mean KV tokens in use at the ceiling
    n_kv: float  # most tokens per iteration (on average) the KV capacity allows
    n_slots: float  # ... the request slots allow
    n_decodes: float  # ... the decode cap allows


@dataclass(frozen=True)
class BudgetCeiling:
    """The compute ceiling at a budget, and the bound with the KV cache and request slots."""

    budget: int
    compute: Ceiling  # every iteration full to the budget
    bound: Ceiling  # the best iteration size up to min(budget, n_kv, n_slots, n_decodes)
    binding: str  # what limits the bound: "compute", "kv", "slots", "decodes"

    @property
    def bound_qps(self) -> float:
        return self.bound.qps


def _affine_terms(cost: CostModel, shape: BatchShape, iterations: float) -> dict[str, float]:
    """Seconds of each term for the work `shape` (a sum of iterations) spread over `iterations`
    iterations, with the cost model's own function; refuses a model that is not affine."""
    f = cost.iteration_time_s
    one, two, three = (f(BatchShape(num_prefill_tokens=k)) for k in (1, 2, 3))
    base = 2 * one - two
    total = f(shape)
    terms = {
        "per_token": f(BatchShape(num_prefill_tokens=shape.num_prefill_tokens, num_decodes=shape.num_decodes)) - base,
        "prefill_sq": total - f(_with(shape, sum_prefill_sq=0)),
        "prefill_ctx": total - f(_with(shape, sum_prefill_ctx=0)),
        "decode_ctx": total - f(_with(shape, sum_decode_ctx=0)),
    }
    tol = 1e-9 * max(total, 1e-12)
    if abs((three - two) - (two - one)) > 1e-12 * max(three, 1e-12) or abs(base + sum(terms.values()) - total) > tol:
        raise ValueError(f"{type(cost).__name__} is not affine in the batch shape's sums: the ceiling needs it to be")
    return {"per_iteration": base * iterations, **terms}


def _with(shape: BatchShape, **changes: int) -> BatchShape:
    return shape._replace(**changes)


def _sum_ceil_div(n: np.ndarray, bs: int) -> np.ndarray:
    """sum over x = 1..n of ceil(x / bs), elementwise."""
    q, r = n // bs, n % bs
    return bs * q * (q + 1) // 2 + r * (q + 1)


def ceiling_at(cost: CostModel, mix: RequestMix, budget: float, kv: KVCache,
               max_active_requests: int, max_decodes: int) -> Ceiling:
    """The compute ceiling when every iteration holds `budget` tokens (module docstring)."""
    if budget < 1:
        raise ValueError(f"budget must be >= 1 token, got {budget}")
    p = np.asarray(mix.prompt_lens, dtype=np.int64)
    d = mix.decodes
    n = len(p)
    chunk = max(1, int(round(budget * mix.prefill_share)))
    q, r = p // chunk, p % chunk  # q full chunks, then one of r tokens (if r > 0)
    sum_sq = q * chunk * chunk + r * r
    sum_ctx = chunk * chunk * q * (q - 1) // 2 + r * q * chunk  # chunk k at prior context k * chunk
    assert np.array_equal(sum_sq + 2 * sum_ctx, p * p)
    decode_ctx = d * p + d * (d - 1) // 2  # contexts P, P + 1, ..., P + O - 2
    shape = BatchShape(num_prefill_tokens=int(p.sum()), sum_prefill_sq=int(sum_sq.sum()),
                       sum_prefill_ctx=int(sum_ctx.sum()), num_decodes=int(d.sum()),
                       sum_decode_ctx=int(decode_ctx.sum()))
    tokens = shape.num_tokens
    terms_s = _affine_terms(cost, shape, tokens / budget)
    gpu_s = sum(terms_s.values()) / n
    tokens_per_request = tokens / n
    iteration_s = gpu_s * budget / tokens_per_request
    lifetime = -(-p // chunk) + d  # iterations from the first chunk to the last decode
    bs = kv.block_size
    # KV token-iterations: the whole prompt's blocks in each prefill iteration, then P + j tokens' blocks in decode j
    kv_iters = (-(-p // chunk)) * bs * (-(-p // bs)) + bs * (_sum_ceil_div(p + d, bs) - _sum_ceil_div(p, bs))
    kv_tokens = kv.num_blocks * bs
    mean_d = float(d.mean())
    return Ceiling(
        budget=budget,
        chunk_tokens=chunk,
        decodes_per_iteration=budget * mean_d / tokens_per_request,
        gpu_ms_per_request=1000.0 * gpu_s,
        terms_ms={k: 1000.0 * terms_s[k] / n for k in TERMS},
        qps=1.0 / gpu_s,
        iteration_ms=1000.0 * iteration_s,
        iterations_per_request=float(lifetime.mean()),
        running_at_ceiling=budget * float(lifetime.mean()) / tokens_per_request,
        kv_tokens_at_ceiling=budget * float(kv_iters.mean()) / tokens_per_request,
        n_kv=kv_tokens * tokens_per_request / float(kv_iters.mean()),
        n_slots=max_active_requests * tokens_per_request / float(lifetime.mean()),
        n_decodes=max_decodes * tokens_per_request / mean_d if mean_d > 0 else math.inf,
    )


def budget_ceiling(cost: CostModel, mix: RequestMix, budget: int, kv: KVCache,
                   max_active_requests: int = SchedulerConfig().max_active_requests,
                   max_decodes: int = SchedulerConfig().max_decodes, step: int = 16) -> BudgetCeiling:
    """The compute ceiling at `budget` and the bound with the KV cache and request slots: the
    best iteration size n <= min(budget, n_kv, n_slots, n_decodes) (the caps recomputed at the
    capped size, whose chunks are smaller), searched every `step` tokens and at the cap."""
    args = (cost, mix)
    limits = (kv, max_active_requests, max_decodes)
    compute = ceiling_at(*args, budget, *limits)
    cap, c = float(budget), compute
    for _ in range(8):  # the caps move a little with the chunk size: settle them
        new = min(float(budget), c.n_kv, c.n_slots, c.n_decodes)
        if abs(new - cap) < 0.5:
            break
        cap = new
        c = ceiling_at(*args, cap, *limits)
    cap = min(cap, c.n_kv, c.n_slots, c.n_decodes)
    sizes = [float(s) for s in range(step, int(cap) + 1, step)] + [cap]
    best = max((ceiling_at(*args, s, *limits) for s in sizes if s >= 1), key=lambda x: x.qps)
    binding = "compute"
    if cap < budget:
        binding = min((("kv", c.n_kv), ("slots", c.n_slots), ("decodes", c.n_decodes)), key=lambda kv_: kv_[1])[0]
    return BudgetCeiling(budget=budget, compute=compute, bound=best, binding=binding)


# ------------------------------------------------------------------------- schedulers' budgets

def scheduler_budget(config: SchedulerConfig) -> int:
    """The most tokens one iteration of this scheduler may hold (module docstring)."""
    return {"vllm": config.max_prefill_tokens, "rad": config.max_batch_tokens, "slai-plus": config.max_token_budget,
            "slai-next": config.max_token_budget}.get(config.kind, config.token_budget)


def scheduler_fractions(results: dict[str, Any], ceilings: dict[int, BudgetCeiling], budget_of: dict[str, int],
                        rate_per_qps: float = 1.0) -> dict[str, dict[str, Any]]:
    """Each scheduler's capacities (paper, stable, P99-TTFT-bounded if the results have it) as a
    fraction of the compute ceiling and of the bound at its budget.  Capacities are in the
    sweep's nominal QPS, whose requests arrive at `rate_per_qps` per second per QPS
    (`loadtest.arrivals.effective_qps`: capped gaps); the ceilings are in requests per second."""
    out = {}
    for name, r in results["schedulers"].items():
        bc = ceilings[budget_of[name]]
        row: dict[str, Any] = {"budget": bc.budget, "ceiling_qps": bc.compute.qps / rate_per_qps,
                               "bound_qps": bc.bound_qps / rate_per_qps}
        for key in ("capacity_qps", "stable_capacity_qps", "p99_ttft_capacity_qps"):
            if r.get(key) is None:
                continue
            row[key] = r[key]
            row[key.replace("_qps", "_of_ceiling")] = r[key] * rate_per_qps / bc.compute.qps
            row[key.replace("_qps", "_of_bound")] = r[key] * rate_per_qps / bc.bound_qps
        out[name] = row
    return out


# ---------------------------------------------------------------------------------- report

def _finite(x: Any) -> Any:
    """Strict JSON: an infinite cap (no decodes) becomes null."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _row(c: Ceiling, rate_per_qps: float) -> str:
    t = c.terms_ms
    g = c.gpu_ms_per_request
    return (f"{c.gpu_ms_per_request:8.1f} " + " ".join(f"{t[k]:7.1f} ({100 * t[k] / g:2.0f}%)" for k in TERMS)
            + f"  {c.qps:9.3f}  {c.qps / rate_per_qps:11.3f}")


def table(setup_line: str, ceilings: Sequence[BudgetCeiling], fractions: dict[str, dict[str, Any]] | None,
          results_path: str | None, kv_tokens: int, rate_per_qps: float = 1.0) -> str:
    head = ("budget  GPU-ms/req " + " ".join(f"{k:>13s}" for k in TERMS) + "  ceiling req/s  nominal QPS")
    lines = [setup_line, "",
             "Compute ceiling: every iteration full to the budget (GPU-ms per request, by cost term); req/s served, "
             f"and the sweep's nominal QPS (its capped-gap arrivals come at {rate_per_qps:.4f} req/s per QPS):", head]
    for bc in ceilings:
        lines.append(f"{bc.budget:6d}  {_row(bc.compute, rate_per_qps)}")
    lines += ["", f"At the compute ceiling (Little's law; KV cache {kv_tokens} tokens), and the bound with the "
              "KV cache and request slots:",
              "budget  chunk  decodes/iter  iter ms  running  KV tokens (% of cache)  n_kv  n_slots  n_decodes"
              "  bound req/s  nominal QPS  at size  binding"]
    for bc in ceilings:
        c = bc.compute
        lines.append(f"{bc.budget:6d}  {c.chunk_tokens:5d}  {c.decodes_per_iteration:12.1f}  {c.iteration_ms:7.1f}  "
                     f"{c.running_at_ceiling:7.1f}  {c.kv_tokens_at_ceiling:10.0f} ({100 * c.kv_tokens_at_ceiling / kv_tokens:4.0f} %)"
                     f"      {c.n_kv:5.0f}  {c.n_slots:7.0f}  {c.n_decodes:9.0f}  {bc.bound_qps:11.3f}  "
                     f"{bc.bound_qps / rate_per_qps:11.3f}  "
                     f"{bc.bound.budget:7.0f}  {bc.binding}")
    if fractions:
        lines += ["", f"Schedulers of {results_path}: capacity as a fraction of the ceiling (and of the bound) at "
                  "the scheduler's budget (nominal QPS):",
                  "scheduler               budget  ceiling  bound   capacity          stable            P99-TTFT"]
        for name, f in fractions.items():
            cells = []
            for key in ("capacity", "stable_capacity", "p99_ttft_capacity"):
                if f"{key}_qps" in f:
                    cells.append(f"{f[f'{key}_qps']:.3f} {100 * f[f'{key}_of_ceiling']:3.0f}% ({100 * f[f'{key}_of_bound']:3.0f}%)")
                else:
                    cells.append(f"{'-':17s}")
            lines.append(f"{name:22s}  {f['budget']:6d}  {f['ceiling_qps']:7.3f}  {f['bound_qps']:5.3f}   "
                         + " ".join(f"{c:17s}" for c in cells))
    return "\n".join(lines) + "\n"


def run(setup: Any, budgets: Sequence[int], results_path: str | None, json_path: str | None) -> int:
    """The `ceiling` command: `setup` is a `SweepSetup` (its trace, requests, seed, profile, KV)."""
    from loadtest.arrivals import effective_qps
    from loadtest.simulate.replica import Workload
    from loadtest.simulate.sweep import _profile, _trace
    from replica.policy.registry import scheduler_config

    results = None
    if results_path:
        results = json.loads(Path(results_path).read_text())
        theirs = results.get("setup", {})
        mismatch = {k: (theirs[k], getattr(setup, k)) for k in ("profile", "trace", "requests", "seed", "kv_blocks")
                    if k in theirs and theirs[k] != getattr(setup, k)}
        if mismatch:
            print(f"error: {results_path} was run with another setup (theirs, ours): {mismatch}; pass the same "
                  "--profile/--trace/--requests/--seed/--kv-blocks", file=sys.stderr)
            return 2
    trace = _trace(setup.trace, setup.tokenizer, setup.max_model_len)
    wl = Workload.build(trace, setup.requests, 1.0, setup.tier_mix(), seed=setup.seed)  # lengths do not depend on QPS
    mix = RequestMix(wl.prompt_lens, wl.output_lens)
    cost = _profile(setup.profile)
    kv = KVCache(setup.kv_blocks)
    budget_of: dict[str, int] = {}
    if results:
        for name in results["schedulers"]:
            budget_of[name] = scheduler_budget(scheduler_config(name, **results.get("setup", {}).get("scheduler_overrides", {})))
    all_budgets = sorted(set(budgets) | set(budget_of.values()))
    ceilings = {b: budget_ceiling(cost, mix, b, kv) for b in all_budgets}
    # the sweep's QPS is nominal: Poisson gaps capped at 3 / QPS arrive faster (a replayed trace: exactly)
    rate_per_qps = 1.0 if setup.arrivals == "replay" else effective_qps(1.0)
    fractions = scheduler_fractions(results, ceilings, budget_of, rate_per_qps) if results else None
    kv_tokens = kv.num_blocks * kv.block_size
    setup_line = (f"profile `{setup.profile}`, trace `{setup.trace}`, {setup.requests} requests (seed {setup.seed}): "
                  f"mean prompt {float(np.mean(mix.prompt_lens)):.0f}, mean output {float(np.mean(mix.output_lens)):.0f} "
                  f"tokens; {setup.kv_blocks} KV blocks")
    print(table(setup_line, [ceilings[b] for b in all_budgets], fractions, results_path, kv_tokens, rate_per_qps),
          end="")
    if json_path:
        doc = {
            "setup": {"profile": setup.profile, "trace": setup.trace, "requests": setup.requests, "seed": setup.seed,
                      "kv_blocks": setup.kv_blocks, "kv_tokens": kv_tokens,
                      "max_active_requests": SchedulerConfig().max_active_requests,
                      "max_decodes": SchedulerConfig().max_decodes},
            "requests_per_s_per_nominal_qps": rate_per_qps,
            "mean_prompt_tokens": float(np.mean(mix.prompt_lens)),
            "mean_output_tokens": float(np.mean(mix.output_lens)),
            "budgets": {str(b): {"compute": asdict(c.compute), "bound": asdict(c.bound), "binding": c.binding,
                                 "ceiling_nominal_qps": c.compute.qps / rate_per_qps,
                                 "bound_nominal_qps": c.bound_qps / rate_per_qps}
                        for b, c in ceilings.items()},
            "results": results_path,
            "schedulers": fractions,
        }
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(_finite(doc), indent=1) + "\n")
        print(f"wrote {json_path}", file=sys.stderr)
    return 0
