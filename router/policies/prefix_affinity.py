"""Prefix-cache affinity: Ray Serve's `PrefixCacheAffinityRouter`, over block hashes.

Ray's router (ray/llm/_internal/serve/routing_policies/prefix_aware/prefix_aware_router.py and
prefix_tree.py) keeps a prefix tree of the prompt TEXT each replica was sent and, per request:

1. load check: if the replicas' queue lengths are imbalanced (highest - lowest >
   ``imbalanced_threshold``, default infinity: never), power of two choices;
2. otherwise, match the prompt against the tree: the match rate is the longest prefix any
   candidate replica holds over the prompt length.  At ``match_rate >= match_rate_threshold``
   (default 0.1) the candidates are the replicas holding that longest prefix; below it, the replicas
   with the smallest tree (fewest characters), to spread new prefixes;
3. of those candidates, the replica with the shortest queue (Ray's request router probes them);
4. once the request is routed (``on_request_routed``), its prompt is inserted into the chosen
   replica's tree.  (Ray's tree is bounded only with ``do_eviction``, off by default: a per-replica
   LRU eviction from 400,000 characters down to 360,000, every 10 s.)

Here the same rule runs over the request's prefix block hashes (`RoutingRequest.prefix_hashes`)
in a `router.prefix_index.PrefixIndex`, always bounded (``index_max_entries`` (hash, replica)
pairs, LRU): matched tokens = the most leading blocks a candidate holds * prefix_block_tokens
(at most the prompt), match rate = matched tokens / prompt tokens, a replica's cache size = its
blocks in the index.  Queue length = waiting + running in the last snapshot + this router's ledger
entries since (`queue_length`, as for pow2).  Differences from Ray: the smallest-cache group is
taken among the candidates (Ray takes every replica in its tree); ties on queue length break at
random (seedable) instead of by list order; a request without prefix hashes gets power of two
choices (Ray's "no prefix data" case).

Ranking: the chosen group by queue length first (the pick is the first), then every other replica
by queue length, then id, so each replica appears once and a caller can fall down the list.
"""

from __future__ import annotations

import math
import random
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from router.feedback import ReplicaView
from router.policies.base import RoutingContext, RoutingPolicy, RoutingRequest, queue_length
from router.prefix_index import PrefixIndex


class PrefixAffinityConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    imbalanced_threshold: float = Field(
        math.inf, ge=0,
        description="queue lengths (requests) are imbalanced when the longest exceeds the shortest by more than "
                    "this: then power of two choices (Ray's default: infinity, never)")
    match_rate_threshold: float = Field(
        0.1, ge=0, le=1,
        description="least share of the prompt's tokens a replica must hold to be chosen for its prefix; below "
                    "it the replicas with the smallest cache are (Ray's default 0.1)")
    index_max_entries: int = Field(
        131_072, gt=0, description="bound of the prefix index in (block hash, replica) pairs, least recently used "
                                   "out (as `slo`'s prefix_index_max_entries)")


class PrefixAffinityPolicy(RoutingPolicy):
    name = "prefix-affinity"

    def __init__(self, config: PrefixAffinityConfig | None = None, seed: int | None = None, **overrides) -> None:
        if config is None:
            config = PrefixAffinityConfig(**overrides)
        elif overrides:
            config = PrefixAffinityConfig.model_validate({**config.model_dump(), **overrides})
        self.config = config
        self.rng = random.Random(seed)
        self.prefix_index = PrefixIndex(config.index_max_entries)

    @classmethod
    def context_options(cls, context: RoutingContext) -> dict[str, Any]:
        return {"seed": context.seed} if context.seed is not None else {}

    def on_routed(self, request: RoutingRequest, replica_id: str) -> None:
        """Ray inserts the prompt into the chosen replica's tree; here its block hashes."""
        if request.prefix_hashes:
            self.prefix_index.record(replica_id, request.prefix_hashes)

    def forget_replicas_except(self, live: set[str]) -> None:
        self.prefix_index.retain(live)

    def choose(self, request: RoutingRequest, replicas: list[ReplicaView],
               qlen: dict[str, int]) -> tuple[str, list[str]]:
        """Which rule applies ("pow2", "match", "smallest") and the replicas it leaves, before the
        queue-length pick."""
        cfg = self.config
        if len(replicas) > 1 and request.prefix_hashes:
            if max(qlen.values()) - min(qlen.values()) <= cfg.imbalanced_threshold:
                ids = [v.replica_id for v in replicas]
                blocks, holders = self.prefix_index.best_match(request.prefix_hashes, ids)
                matched = min(blocks * request.prefix_block_tokens, request.prompt_len)
                rate = matched / request.prompt_len if request.prompt_len else 0.0
                if holders and rate >= cfg.match_rate_threshold:
                    return "match", holders
                size = self.prefix_index.size
                sizes = {rid: size(rid) for rid in ids}
                least = min(sizes.values())
                return "smallest", [rid for rid in ids if sizes[rid] == least]
        if len(replicas) <= 2:
            return "pow2", [v.replica_id for v in replicas]
        return "pow2", [v.replica_id for v in self.rng.sample(replicas, 2)]

    def rank(self, request: RoutingRequest, replicas: list[ReplicaView]) -> list[str]:
        if not replicas:
            return []
        qlen = {v.replica_id: queue_length(v) for v in replicas}
        _, group = self.choose(request, replicas, qlen)
        rnd = self.rng.random
        first = sorted(group, key=lambda rid: (qlen[rid], rnd()))
        chosen = set(first)
        rest = sorted((rid for rid in qlen if rid not in chosen), key=lambda rid: (qlen[rid], rid))
        return first + rest
