"""Plain request and engine state shared by every scheduling policy.

The token accounting follows vLLM V1 (`Request.num_computed_tokens`, `num_tokens`), so the vLLM
adapter can mirror it one to one:

* `num_tokens = prompt_len + num_output_tokens` are the tokens the request knows;
* `num_computed_tokens` of them have their KV computed;
* a step that computes the last uncomputed token samples one new output token.

A fresh request is a prefill of `prompt_len` tokens; once it has emitted its first token it is a
decode (exactly one uncomputed token per step). A request preempted by recompute drops its KV
(`num_computed_tokens = 0`) and becomes a prefill of `prompt_len + num_output_tokens` tokens whose
last chunk emits its next token.

Prefix caching (vLLM's automatic prefix caching, the simulator's `replica.sim.prefix_cache`):
full KV blocks of a prompt are kept, keyed by a chain of block hashes, after their request is gone,
and a request whose prompt starts with cached blocks reuses them.  A mechanism with a prefix cache
gives the policy an `EngineState.prefix` (`PrefixCacheView`): what a waiting request would hit now
and what preempting a running one would free.  Then

* `Request.num_cached_tokens` is the request's cached prompt prefix (a waiting request: the
  mechanism's latest lookup; a running one: what it hit when admitted), so shortest-prompt-first
  orders by the tokens still to compute (`Request.num_uncached_prompt_tokens`);
* an admission needs KV blocks only for what the running requests do not already hold
  (`PrefixHit.num_blocks_in_use`: blocks shared with them cost no free block; cached blocks
  nobody holds sit in the free queue and leave it when reused, like new ones), and its first
  chunk starts after the cached tokens (`num_computed_tokens = num_cached_tokens` on admission);
* `KVCache.num_used_blocks` counts each block once however many requests share it.

Without a prefix cache (`EngineState.prefix is None`) all of this is the plain accounting above.

Nothing here imports vLLM or Ray.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from replica.contract import DEFAULT_TTFT_TARGET_S

INF = float("inf")


@dataclass(eq=False, slots=True)
class Request:
    req_id: str
    prompt_len: int
    arrival_s: float
    tier: str = "default"
    tbt_slo_s: float = 0.5
    tier_rank: int = 0  # 0 = strictest tier (first under tier-first ordering)
    ttft_target_s: float = DEFAULT_TTFT_TARGET_S  # the tier's time-to-first-token target (slai-plus bounds waiting by it)
    # Set by the mechanism (simulator: the trace's output length; vLLM: max_tokens/EOS).
    # Policies never read it: SLAI does not use output lengths.
    max_output_tokens: int | None = None
    # The prompt's full-block hashes in the engine's block size (the simulator's prefix cache
    # reads them; the vLLM adapter leaves them to vLLM, which hashes the tokens itself).
    block_hashes: Sequence[int] | None = None
    # Prompt tokens the engine's prefix cache holds for this request (see the module docstring).
    num_cached_tokens: int = 0

    # Progress, advanced by the mechanism that executes plans.
    num_output_tokens: int = 0
    num_computed_tokens: int = 0
    num_blocks: int = 0  # KV blocks held
    is_finished: bool = False
    num_preemptions: int = 0

    # Owned by the policy: SLAI's last schedulable time of the next token.
    lst_s: float = INF

    # Observed by the mechanism (TTFT = first_token_s - arrival_s; TBT = gaps between tokens).
    first_token_s: float | None = None
    last_token_s: float | None = None

    @property
    def num_tokens(self) -> int:
        return self.prompt_len + self.num_output_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.prompt_len + self.num_output_tokens - self.num_computed_tokens

    @property
    def num_uncached_prompt_tokens(self) -> int:
        """Prompt tokens not in the prefix cache: what shortest-prompt-first orders by."""
        return self.prompt_len - self.num_cached_tokens

    @property
    def is_prefill(self) -> bool:
        """True until the request's KV is complete and it has produced a token (decode phase)."""
        return (
            self.num_output_tokens == 0
            or self.prompt_len + self.num_output_tokens - self.num_computed_tokens > 1
        )


@dataclass(slots=True)
class KVCache:
    """Paged KV cache accounting: blocks of `block_size` tokens, a free-block watermark kept for
    admissions (vLLM / Sarathi: 1 % of the blocks)."""

    num_blocks: int
    block_size: int = 16
    watermark: float = 0.01
    num_used_blocks: int = 0

    def __post_init__(self) -> None:
        if self.num_blocks <= 0 or self.block_size <= 0:
            raise ValueError(f"KVCache needs positive sizes, got {self.num_blocks} blocks of {self.block_size}")
        if not 0.0 <= self.watermark < 1.0:
            raise ValueError(f"KVCache watermark must be in [0, 1), got {self.watermark}")

    @property
    def watermark_blocks(self) -> int:
        return int(self.watermark * self.num_blocks)

    @property
    def num_free_blocks(self) -> int:
        return self.num_blocks - self.num_used_blocks

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_admit(self, num_free_blocks: int, num_tokens: int, num_shared_blocks: int = 0) -> bool:
        """Admission check for a whole prompt of which `num_shared_blocks` blocks are already held
        by running requests (prefix caching): the watermark must stay free afterwards."""
        return num_free_blocks - (self.blocks_for(num_tokens) - num_shared_blocks) >= self.watermark_blocks

    def extra_blocks_for_step(self, req: Request) -> int:
        """Blocks `req` must add so that every token it knows has a slot (0 or 1 for a decode)."""
        return max(0, self.blocks_for(req.num_tokens) - req.num_blocks)

    def new_blocks_for_decodes(self, reqs: Sequence[Request]) -> int:
        """Blocks one decode step of each of ``reqs`` (decodes) adds: one per request whose next
        token starts a new block."""
        bs = self.block_size
        need = 0
        for r in reqs:
            if r.prompt_len + r.num_output_tokens > r.num_blocks * bs:
                need += 1
        return need

    # --- mutation, used by mechanisms (the simulator; vLLM's own KV manager in the adapter) ---
    def grow_to(self, req: Request, num_tokens: int) -> None:
        need = self.blocks_for(num_tokens) - req.num_blocks
        if need <= 0:
            return
        if need > self.num_free_blocks:
            raise RuntimeError(
                f"KV cache overflow: {req.req_id} needs {need} blocks, {self.num_free_blocks} free"
            )
        req.num_blocks += need
        self.num_used_blocks += need

    def free(self, req: Request) -> None:
        self.num_used_blocks -= req.num_blocks
        req.num_blocks = 0


class PrefixHit(NamedTuple):
    """A prefix-cache lookup: the request's leading tokens whose KV is cached (whole blocks; never
    the last token of what it knows, which the engine always computes, as vLLM does), and how many
    of those blocks running requests hold (reusing them takes no free block)."""

    num_cached_tokens: int
    num_blocks_in_use: int


class PrefixCacheView(Protocol):
    """What a mechanism with a prefix cache answers a policy (read-only; no side effects)."""

    def lookup(self, req: Request) -> PrefixHit:
        """What `req` (waiting) would reuse if it were admitted now."""

    def blocks_freed_by_preempting(self, req: Request) -> int:
        """Blocks `req` (running) holds that no other running request holds: what preempting it
        returns to the free queue."""


@dataclass(slots=True)
class EngineState:
    """What a policy sees at the start of an iteration.

    `waiting`: arrived requests holding no KV, in arrival order, preempted ones in front.
    `running`: admitted requests holding KV (partly prefilled and decoding), in admission order.
    """

    now_s: float
    kv: KVCache
    waiting: list[Request] = field(default_factory=list)
    running: list[Request] = field(default_factory=list)
    # Set by a mechanism that keeps `waiting` already sorted in a policy's admission order
    # (an AdmissionOrder value), so the policy need not sort it every iteration.
    waiting_sorted_by: str | None = None
    # The engine's prefix cache, if it has one (see the module docstring).
    prefix: PrefixCacheView | None = None
