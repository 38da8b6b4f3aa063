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

from replica.policy.base import order_waiting
from replica.policy.config import SchedulerConfig
from replica.policy.plan import BatchPlan
from replica.policy.slai import SLAIPolicy
from replica.policy.state import INF, EngineState, Request

_arrival = attrgetter("arrival_s")


class BatchTimeModel:
    """Iteration time ~ a + b * tokens + c * (decode context tokens / 1000), fitted by weighted
    least squares over the measured iterations (exponential forgetting ``forgetting`` per sample;
    1 = every sample weighs the same)."""

    MIN_SAMPLES = 32

    def __init__(self, forgetting: float = 1.0) -> None:
        if not 0.0 < forgetting <= 1.0:
            raise ValueError(f"forgetting must be in (0, 1], got {forgetting}")
        self.forgetting = forgetting
        self.num_samples = 0
        # normal equations: xtx (3x3, symmetric) and xty
        self._xtx = [[0.0] * 3 for _ in range(3)]
        self._xty = [0.0] * 3
        self._coef: tuple[float, float, float] | None = None
        self._dirty = 0

    def add(self, tokens: float, decode_ctx_ktokens: float, duration_s: float) -> None:
        lam = self.forgetting
        x = (1.0, float(tokens), float(decode_ctx_ktokens))
        xtx, xty = self._xtx, self._xty
        for i in range(3):
            row = xtx[i]
            xi = x[i]
            for j in range(3):
                row[j] = lam * row[j] + xi * x[j]
            xty[i] = lam * xty[i] + xi * duration_s
        self.num_samples += 1
        self._dirty += 1

    @property
    def coefficients(self) -> tuple[float, float, float] | None:
        """(a s, b s/token, c s/kilotoken of decode context), or None while the fit is not usable
        (too few samples, singular data, or a per-token cost <= 0)."""
        if self.num_samples < self.MIN_SAMPLES:
            return None
        if self._dirty >= 8 or self._coef is None:
            self._coef = _solve3(self._xtx, self._xty)
            self._dirty = 0
        c = self._coef
        if c is None or c[1] <= 0 or c[0] < 0 or c[2] < 0:
            return None
        return c

    def predict_s(self, tokens: float, decode_ctx_ktokens: float) -> float | None:
        c = self.coefficients
        return None if c is None else c[0] + c[1] * tokens + c[2] * decode_ctx_ktokens

    def max_tokens(self, time_s: float, decode_ctx_ktokens: float) -> float | None:
        """The most batch tokens whose predicted iteration time is at most ``time_s``."""
        c = self.coefficients
        return None if c is None else (time_s - c[0] - c[2] * decode_ctx_ktokens) / c[1]


def _solve3(a: list[list[float]], b: list[float]) -> tuple[float, float, float] | None:
    """Solve the 3x3 system a x = b (Cramer's rule); None if (nearly) singular."""
    (a00, a01, a02), (a10, a11, a12), (a20, a21, a22) = a
    det = a00 * (a11 * a22 - a12 * a21) - a01 * (a10 * a22 - a12 * a20) + a02 * (a10 * a21 - a11 * a20)
    scale = abs(a00 * a11 * a22) or 1.0
    if abs(det) <= 1e-12 * scale:
        return None
    b0, b1, b2 = b
    x0 = (b0 * (a11 * a22 - a12 * a21) - a01 * (b1 * a22 - a12 * b2) + a02 * (b1 * a21 - a11 * b2)) / det
    x1 = (a00 * (b1 * a22 - a12 * b2) - b0 * (a10 * a22 - a12 * a20) + a02 * (a10 * b2 - b1 * a20)) / det
    x2 = (a00 * (a11 * b2 - b1 * a21) - a01 * (a10 * b2 - b1 * a20) + b0 * (a10 * a21 - a11 * a20)) / det
    return x0, x1, x2


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
        slo = INF
        work = 0  # decodes + uncomputed prefill tokens: is there more than the base budget takes?
        ctx = 0
        for r in state.running:
            if r.tbt_slo_s < slo:
                slo = r.tbt_slo_s
            left = r.prompt_len + r.num_output_tokens - r.num_computed_tokens
            work += left
            if r.num_output_tokens and left == 1:
                ctx += r.num_computed_tokens
        if work <= base:
            for r in state.waiting:
                work += r.num_tokens
                if work > base:
                    break
            if work <= base:
                return base
        if slo == INF:  # nothing running: the strictest SLO seen (a prefill's next token will be one)
            slo = self.strictest_slo_s
        if slo == INF:
            return base
        n_max = self.time_model.max_tokens((1.0 - cfg.slo_margin) * slo, ctx / 1000.0)
        if n_max is None:
            return base
        tile = cfg.tile_tokens
        budget = min(cfg.max_token_budget, int(n_max)) // tile * tile  # whole tiles
        self.last_budget = max(base, budget)
        return self.last_budget

    # --- learning from measured batches --------------------------------------------------------
    def record_batch_times(self, state: EngineState, plan: BatchPlan, starts_s: list[float],
                           ends_s: list[float]) -> None:
        super().record_batch_times(state, plan, starts_s, ends_s)
        tokens = plan.num_tokens
        n_dec = len(plan.decodes)
        ctx = plan.shape().sum_decode_ctx if n_dec else 0
        add_time, add_sample = self.recent.add, self.time_model.add
        for j, (start, end) in enumerate(zip(starts_s, ends_s)):
            d = end - start
            add_time(d)
            add_sample(tokens, (ctx + j * n_dec) / 1000.0, d)  # a decode stretch: context grows
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
