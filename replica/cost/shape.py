"""The shape of one engine iteration, as a cost profile sees it.

A batch is a set of prefill chunks (each `p_i` new tokens on top of `c_i` tokens already in the
KV cache) plus `num_decodes` single-token decodes whose contexts add up to `sum_decode_ctx`.
The five sums below are all a cost model needs (linear layers scale with tokens, prefill
attention with p_i^2 and p_i * c_i, decode attention with the summed context), so the simulator
can accumulate them without building per-chunk lists.

A named tuple: immutable, and built once per iteration by every engine (a frozen dataclass
costs 2.5x as much to build, which the per-step hot paths felt).
"""

from __future__ import annotations

from typing import NamedTuple


class BatchShape(NamedTuple):
    num_prefill_tokens: int = 0  # sum p_i
    sum_prefill_sq: int = 0  # sum p_i^2
    sum_prefill_ctx: int = 0  # sum p_i * c_i  (c_i: tokens of that request already in KV)
    num_decodes: int = 0
    sum_decode_ctx: int = 0  # sum over decodes of their context length (tokens in KV)

    @property
    def num_tokens(self) -> int:
        return self.num_prefill_tokens + self.num_decodes

    @classmethod
    def of(
        cls,
        prefill_chunks: list[tuple[int, int]] | tuple[tuple[int, int], ...] = (),
        decode_ctxs: list[int] | tuple[int, ...] = (),
    ) -> "BatchShape":
        """Build from explicit chunks `(new_tokens, prior_ctx)` and decode context lengths."""
        return cls(
            num_prefill_tokens=sum(p for p, _ in prefill_chunks),
            sum_prefill_sq=sum(p * p for p, _ in prefill_chunks),
            sum_prefill_ctx=sum(p * c for p, c in prefill_chunks),
            num_decodes=len(decode_ctxs),
            sum_decode_ctx=sum(decode_ctxs),
        )
