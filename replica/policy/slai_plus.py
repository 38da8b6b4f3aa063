"""slai-plus: SLAI without its known weak spots (issue 9), each fix switchable for the ablation.

The results, misses included, are in docs/BENCHMARKS.md section 9.

The faithful SLAI (`replica.policy.slai`) stays as the paper describes it. slai-plus runs the
same iteration (critical decodes, started prefills, new prefills, the other decodes) and changes
five things, each behind a `SchedulerConfig` flag:

* ``aging`` (bounded waiting): shortest-prompt-first never ages, so under load a long prompt can
  wait without bound.  Here a waiting request that has waited ``max_wait_ttft_multiple`` times its
  tier's TTFT target (4 x 0.5 s = 2 s for the paper's tiers) is overdue: overdue requests are
  admitted first, oldest first, then the others shortest first.  Waiting is then bounded by that
  deadline plus the drain time of the requests overdue before it.  Safe for the strict tier: it
  changes only the order of admissions, never the critical decodes that run first.

* ``adaptive_budget`` (the token budget from measured state, tile-aligned): a fixed 512-token
  budget leaves throughput unused when prompts queue, because each iteration pays a fixed cost
  (weights read, launches) that larger iterations amortise.  When the prefill backlog (uncomputed
  tokens of started prefills and waiting prompts) exceeds what the base budget takes, the budget
  is the largest multiple of ``tile_tokens`` (RAD's tiling principle: no padded GEMM tile), up to
  ``max_token_budget``, whose predicted iteration time is at most (1 - ``slo_margin``) of the
  strictest TBT SLO among the running requests; never below the base budget.  The prediction
  comes from `BatchTimeModel`, a least-squares fit of the measured iteration times (this engine's,
  not a cost table).  Why the strict tier is safe: a request of that tier is critical in every
  iteration once the offset below exceeds its SLO, so its gap between tokens is one iteration,
  which the budget keeps within (1 - margin) of its SLO.

* ``adaptive_offset`` (Theta from measured state): SLAI makes a decode critical Theta x mean
  batch time before its deadline, Theta = 5 or 10.  The worst case is known exactly: a decode
  that becomes critical waits for the running iteration to end, then runs in the next one, so it
  is late by at most two iterations.  Here LST = end of its batch + (1 - margin) x TBT SLO - 2 x
  T_hi, with T_hi the longest recent iteration: every tier gets exactly the slack its SLO leaves
  (the free tier more than SLAI's 5 mean batches when iterations are short, the strict tier none
  when iterations are long) and misses only if an iteration outlasts T_hi by more than the
  margin.  Under KV pressure (use >= ``theta_kv_threshold`` with ``dynamic_theta``) the offset is
  scaled by theta_high / theta_low, as SLAI's dynamic switch does, so decodes finish and free KV.

* ``kv_guard`` (the slot guard): deferring decodes to their deadlines makes every request live
  longer, and by Little's law holds more KV blocks and request slots; once those run out, long
  prompts (whose whole prompt must fit) and then every prompt wait for admission, and the paper's
  capacity criterion is met only because the long prompts starve.  When KV use or the running
  requests reach ``kv_guard_threshold`` (0.8) of the cache or of ``max_active_requests``, every
  decode is critical (requests finish as fast as Sarathi's do) and the budget stays at the base
  (longer iterations would hold every request longer: RAD's slot-bound rule).  0.8 was picked on
  the synthetic trace (0.7, 0.8 and 0.9 measured alike there), not on the paper's.

* ``recent_batch_time``: SLAI's running mean of batch time never forgets, so after a load change
  its offset is wrong for a long time.  Here every batch-time statistic (T_hi, the mean used when
  ``adaptive_offset`` is off, the time model's fit) covers the last ``batch_time_window`` batches
  (the model: exponentially weighted, 4 windows of memory).

Everything is measured by the engine that runs the policy (the simulator or vLLM), through
`on_batches_end`; nothing reads a cost profile.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from operator import attrgetter
from typing import Final

import numpy as np
from mypy_extensions import mypyc_attr

from replica.policy.base import order_waiting
from replica.policy.config import SchedulerConfig
from replica.policy.plan import BatchPlan
from replica.policy.slai import SLAIPolicy
from replica.policy.state import INF, EngineState, Request

_arrival = attrgetter("arrival_s")


@mypyc_attr(allow_interpreted_subclasses=True)  # a fixed model in tests; others may live outside
class BatchTimeModel:
    """Iteration time ~ c0 + c1 * tokens + c2 * decode context (Ktokens) + c3 * sum of squared
    prefill chunks (Mtokens^2) + c4 * sum of chunk x its prior context (Mtokens^2): the terms of
    `replica.cost.profile`, fitted by least squares over this engine's measured iterations, each
    weighted 1/time (relative errors), with exponential forgetting ``forgetting`` per sample (1 =
    every sample weighs the same).  On the H100 probe (replica/cost/data/h100_torch_probe.csv, the
    135 grid shapes timed as vLLM runs them) this form fits with 3.6 % mean error, and under-
    predicts one batch of 100 of 256+ tokens by more than 10 %; without the two prefill terms 6
    (docs/BENCHMARKS.md section 9)."""

    MIN_SAMPLES: Final = 32
    NUM_TERMS: Final = 5

    def __init__(self, forgetting: float = 1.0) -> None:
        if not 0.0 < forgetting <= 1.0:
            raise ValueError(f"forgetting must be in (0, 1], got {forgetting}")
        self.forgetting = forgetting
        self.num_samples = 0
        k = self.NUM_TERMS
        # The normal equations X'WX and X'Wy as plain floats (the upper triangle of the symmetric
        # X'WX, row by row): one sample is 20 multiply-adds, which numpy's per-call overhead made
        # the policy's main cost.  Each entry gets the same operations, in the same order, as
        # whole-array numpy updates would give it, so the fit is the same to the last bit.
        self._pairs = [(i, j) for i in range(k) for j in range(i, k)]
        self._xtx_upper = [0.0] * len(self._pairs)
        self._xty_list = [0.0] * k
        self._coef: np.ndarray | None = None
        self._dirty = 0

    @staticmethod
    def terms(tokens: float, decode_ctx: float, prefill_sq: float = 0.0, prefill_ctx: float = 0.0) -> np.ndarray:
        return np.array((1.0, tokens, decode_ctx / 1e3, prefill_sq / 1e6, prefill_ctx / 1e6))

    @property
    def _xtx(self) -> np.ndarray:
        k = self.NUM_TERMS
        m = np.zeros((k, k))
        for (i, j), v in zip(self._pairs, self._xtx_upper):
            m[i, j] = m[j, i] = v
        return m

    @property
    def _xty(self) -> np.ndarray:
        return np.array(self._xty_list)

    def add_terms(self, x: Sequence[float] | np.ndarray, duration_s: float, repeats: int = 1) -> None:
        """One measured iteration (``repeats`` equal ones) with terms ``x`` (`terms`, or any five
        numbers)."""
        if duration_s <= 0:
            return
        w = 1.0 / duration_s  # relative error: weight 1/y on both sides
        xw = [float(v) * w for v in x]
        outer = [xw[i] * xw[j] for i, j in self._pairs]
        lam = self.forgetting
        xtx, xty = self._xtx_upper, self._xty_list
        for _ in range(repeats):
            xtx[:] = [a * lam + b for a, b in zip(xtx, outer)]
            xty[:] = [a * lam + b for a, b in zip(xty, xw)]  # (y * w) * x * w = x * w since y * w = 1
        self.num_samples += repeats
        self._dirty += repeats

    def add(self, tokens: float, decode_ctx: float, duration_s: float, prefill_sq: float = 0.0,
            prefill_ctx: float = 0.0) -> None:
        self.add_terms(self.terms(tokens, decode_ctx, prefill_sq, prefill_ctx), duration_s)

    @property
    def coefficients(self) -> np.ndarray | None:
        """The five coefficients (seconds per unit term), or None while the fit is not usable (too
        few samples, a term the samples never varied, a per-token cost <= 0, or any negative
        coefficient)."""
        if self.num_samples < self.MIN_SAMPLES:
            return None
        if self._dirty >= 8 or self._coef is None:
            self._dirty = 0
            coef, _, rank, _ = np.linalg.lstsq(self._xtx, self._xty, rcond=1e-10)
            self._coef = coef if rank == self.NUM_TERMS else None  # a term the data never varied
        c = self._coef
        if c is None or c[1] <= 0 or (c < -1e-12).any():
            return None
        return c

    def predict_s(self, tokens: float, decode_ctx: float, prefill_sq: float = 0.0,
                  prefill_ctx: float = 0.0) -> float | None:
        c = self.coefficients
        return None if c is None else float(self.terms(tokens, decode_ctx, prefill_sq, prefill_ctx) @ c)


class _RecentTimes:
    """Batch durations over the last ``window`` batches (None: all of them): max and mean."""

    def __init__(self, window: int | None) -> None:
        self.window = window
        self._times: deque[float] = deque()
        self._maxq: deque[float] = deque()  # non-increasing: the window's max at the front
        self._sum = 0.0
        self._all_max = 0.0
        self._count = 0

    def add(self, t: float) -> None:
        self._count += 1
        if self.window is None:
            self._sum += t
            self._all_max = max(self._all_max, t)
            return
        self._times.append(t)
        self._sum += t
        while self._maxq and self._maxq[-1] < t:
            self._maxq.pop()
        self._maxq.append(t)
        if len(self._times) > self.window:
            old = self._times.popleft()
            self._sum -= old
            if self._maxq[0] == old:
                self._maxq.popleft()

    @property
    def max_s(self) -> float:
        if self.window is None:
            return self._all_max
        return self._maxq[0] if self._maxq else 0.0

    @property
    def mean_s(self) -> float:
        n = self._count if self.window is None else len(self._times)
        return self._sum / n if n else 0.0


def running_load(state: EngineState, decodes_only: bool) -> tuple[float, int, int, int, int]:
    """One pass over the running requests for a budget decision: the strictest TBT SLO (among all
    of them, or only among the decodes with ``decodes_only``; INF if none), the work they bring
    (decodes 1 token, prefills their uncomputed tokens), the decodes' context, the number of
    decodes, and the longest prior context of a started prefill."""
    slo = INF
    work = ctx = n_dec = chunk_ctx = 0
    for r in state.running:
        left = r.prompt_len + r.num_output_tokens - r.num_computed_tokens
        work += left
        if r.num_output_tokens and left == 1:
            ctx += r.num_computed_tokens
            n_dec += 1
            if r.tbt_slo_s < slo:
                slo = r.tbt_slo_s
        else:
            if not decodes_only and r.tbt_slo_s < slo:
                slo = r.tbt_slo_s
            if r.num_computed_tokens > chunk_ctx:
                chunk_ctx = r.num_computed_tokens
    return slo, work, ctx, n_dec, chunk_ctx


def fits_in(state: EngineState, work: int, base: int) -> bool:
    """Whether ``work`` plus the waiting prompts' uncached tokens fit in ``base`` tokens (then a
    larger budget changes nothing)."""
    if work > base:
        return False
    for r in state.waiting:
        work += r.num_tokens - r.num_cached_tokens
        if work > base:
            return False
    return True


class SLAIPlusPolicy(SLAIPolicy):
    """SLAI with bounded waiting, an adaptive tile-aligned budget, an offset from the measured
    worst case, and recent batch-time statistics (see the module docstring)."""

    def __init__(self, config: SchedulerConfig) -> None:
        super().__init__(config)
        window = config.batch_time_window if config.recent_batch_time else None
        self.recent = _RecentTimes(window)
        self.time_model = BatchTimeModel(1.0 - 1.0 / (4 * window) if window else 1.0)
        self.strictest_slo_s = INF  # the strictest TBT SLO of any request seen running
        self.last_budget = config.token_budget
        self._order: Sequence[Request] | None = None
        self._slot_bound = False

    # --- admission order: overdue first --------------------------------------------------------
    def schedule(self, state: EngineState) -> BatchPlan:
        self._slot_bound = self.slot_bound(state)
        self._order = self._waiting_order(state)
        try:
            return super().schedule(state)
        finally:
            self._order = None

    def waiting_order(self, state: EngineState) -> Sequence[Request]:
        return self._order if self._order is not None else self._waiting_order(state)

    def slot_bound(self, state: EngineState) -> bool:
        """Whether what holds requests in the engine (KV blocks or request slots) is nearly used
        up: at ``kv_guard_threshold`` of the KV cache or of ``max_active_requests``."""
        cfg = self.config
        return cfg.kv_guard and (state.kv.usage >= cfg.kv_guard_threshold
                                 or len(state.running) >= cfg.kv_guard_threshold * cfg.max_active_requests)

    def decodes_all_critical(self, state: EngineState) -> bool:
        """Slot guard: when slot-bound every decode runs (requests finish sooner and free their
        KV and slot) instead of waiting for its deadline."""
        return self._slot_bound

    def _waiting_order(self, state: EngineState) -> Sequence[Request]:
        assert self.order is not None  # set in SLAIPolicy.__init__
        ordered = order_waiting(state, self.order)
        if not self.config.aging or not ordered:
            return ordered
        now = state.now_s
        k = self.config.max_wait_ttft_multiple
        overdue = [r for r in state.waiting if now - r.arrival_s >= k * r.ttft_target_s]
        if not overdue:
            return ordered
        overdue.sort(key=_arrival)
        late = set(map(id, overdue))
        return overdue + [r for r in ordered if id(r) not in late]

    # --- the budget ----------------------------------------------------------------------------
    def token_budget_for(self, state: EngineState) -> int:
        cfg = self.config
        base = cfg.token_budget
        self.last_budget = base
        if not cfg.adaptive_budget or cfg.max_token_budget <= base or self._slot_bound:
            return base  # slot-bound: longer iterations would hold every request (and its KV) longer
        slo, work, ctx, n_dec, chunk_ctx = running_load(state, decodes_only=False)
        if fits_in(state, work, base):
            return base
        if slo == INF:  # nothing running: the strictest SLO seen (a prefill's next token will be one)
            slo = self.strictest_slo_s
        if slo == INF:
            return base
        coef = self.time_model.coefficients
        if coef is None:
            return base
        # candidate budgets: whole tiles above the base; each predicted as every decode plus the
        # rest as one prefill chunk at the longest started prefill's context (one chunk has the
        # largest sum of squares: the prediction errs long, never short, on the chunking)
        tile = cfg.tile_tokens
        top = cfg.max_token_budget // tile * tile
        budgets = np.arange(top, base, -tile, dtype=np.float64)
        if budgets.size == 0:
            return base
        chunk = np.maximum(budgets - n_dec, 0.0)
        predicted_s = (coef[0] + coef[1] * budgets + coef[2] * (ctx / 1e3)
                       + coef[3] * (chunk * chunk / 1e6) + coef[4] * (chunk * chunk_ctx / 1e6))
        fits = np.flatnonzero(predicted_s <= (1.0 - cfg.slo_margin) * slo)
        if fits.size:
            self.last_budget = int(budgets[fits[0]])
        return self.last_budget

    # --- learning from measured batches --------------------------------------------------------
    def record_batch_times(self, state: EngineState, plan: BatchPlan, starts_s: list[float],
                           ends_s: list[float]) -> None:
        """Every measured duration into the recent statistics, and into the time model with the
        shape the batch ran with (``plan.ran_shape``; the requests' contexts have moved since)."""
        super().record_batch_times(state, plan, starts_s, ends_s)
        shape = plan.ran_shape
        if shape is None:
            raise ValueError(f"{self.name}: the mechanism did not record the batch's shape (BatchPlan.record_shape)")
        n_dec = shape.num_decodes
        model = self.time_model
        terms = model.terms(shape.num_tokens, shape.sum_decode_ctx, shape.sum_prefill_sq, shape.sum_prefill_ctx).tolist()
        for j, (start, end) in enumerate(zip(starts_s, ends_s)):
            d = end - start
            self.recent.add(d)
            if j:  # a decode stretch: the same batch again, each decode's context j tokens longer
                terms[2] = (shape.sum_decode_ctx + j * n_dec) / 1e3  # as `terms` computes it
            model.add_terms(terms, d)
        for r in plan.decodes:
            if r.tbt_slo_s < self.strictest_slo_s:
                self.strictest_slo_s = r.tbt_slo_s

    def offset_s(self, state: EngineState) -> float:
        cfg = self.config
        if not cfg.adaptive_offset:
            mean = self.recent.mean_s if cfg.recent_batch_time else self.mean_batch_time_s
            return self.theta * mean
        scale = 1.0
        if cfg.dynamic_theta and cfg.theta_low > 0 and state.kv.usage >= cfg.theta_kv_threshold:
            scale = cfg.theta_high / cfg.theta_low
        return 2.0 * self.recent.max_s * scale

    def next_token_lst_s(self, r: Request, batch_end_s: float) -> float:
        if not self.config.adaptive_offset:
            return batch_end_s + r.tbt_slo_s - self._offset_s
        return batch_end_s + (1.0 - self.config.slo_margin) * r.tbt_slo_s - self._offset_s
