"""The simulated engine's KV block pool with automatic prefix caching, as vLLM V1's block pool.

vLLM (``vllm/v1/core/block_pool.py``, ``kv_cache_manager.py``) keeps every KV block in one pool:

* a block holds ``block_size`` tokens; a request's block table lists its blocks in token order;
* a full block of computed tokens gets the hash of its tokens chained with the previous block's
  hash, and is entered in the cache (hash -> block) unless another block already holds that hash;
* a block's reference count is the number of running requests whose table holds it; when it
  drops to 0 the block goes to the tail of the free queue *keeping its hash* (still reusable), a
  request's blocks tail first, so its last blocks are evicted before its first ones;
* a new block is taken from the head of the free queue (least recently freed); if it still has a
  hash, that cached prefix is evicted;
* an admitted request reuses its longest run of cached leading blocks (never its last known token:
  a lookup covers at most ``num_tokens - 1`` tokens), taking those blocks out of the free queue if
  nobody held them; it then computes only the tokens after them.

The pool does the same with block ids, so hit rates and eviction follow vLLM's LRU exactly for
the blocks the simulator can name: a request's ``block_hashes`` (its prompt's full blocks, from a
trace's prefix hashes, `loadtest.prefix_traces`).  Blocks of generated tokens get no hash (no
later request of a trace can name them; a conversation's next turn names its whole prompt), so
they are freed like any uncached block.

`PrefixBlockPool` is the simulator's mechanism and also the policy's `PrefixCacheView`
(`replica.policy.state`): `lookup` and `blocks_freed_by_preempting` read it without changing it.
It keeps `KVCache.num_used_blocks` = blocks out of the free queue (each block once however many
requests share it).
"""

from __future__ import annotations

from collections import OrderedDict

from replica.policy.state import KVCache, PrefixHit, Request


class PrefixBlockPool:
    def __init__(self, kv: KVCache) -> None:
        self.kv = kv
        self.block_size = kv.block_size
        n = kv.num_blocks
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(n))  # head: evicted first
        self.ref = [0] * n
        self.hash_of: list[int | None] = [None] * n
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.tables: dict[str, list[int]] = {}  # request id -> block ids, in token order
        kv.num_used_blocks = 0
        # counters (prompt tokens looked up at admission / found cached; blocks evicted)
        self.num_lookup_tokens = 0
        self.num_hit_tokens = 0
        self.num_evictions = 0

    # --- the policy's view (read only) --------------------------------------------------------
    def _hit_blocks(self, req: Request) -> list[int]:
        hashes = req.block_hashes
        if not hashes:
            return []
        cached = self.cached
        out = []
        for k in range(min(len(hashes), (req.num_tokens - 1) // self.block_size)):
            bid = cached.get(hashes[k])
            if bid is None:
                break
            out.append(bid)
        return out

    def lookup(self, req: Request) -> PrefixHit:
        hit = self._hit_blocks(req)
        ref = self.ref
        return PrefixHit(len(hit) * self.block_size, sum(1 for b in hit if ref[b]))

    def blocks_freed_by_preempting(self, req: Request) -> int:
        ref = self.ref
        return sum(1 for b in self.tables.get(req.req_id, ()) if ref[b] == 1)

    @property
    def hit_rate(self) -> float:
        """Share of the prompt tokens looked up at admission that were cached."""
        return self.num_hit_tokens / self.num_lookup_tokens if self.num_lookup_tokens else 0.0

    # --- the mechanism ----------------------------------------------------------------------------
    def _take_new(self, n: int) -> list[int]:
        if n > len(self.free):
            raise RuntimeError(f"KV cache overflow: {n} blocks needed, {len(self.free)} free")
        free, ref, hash_of, cached = self.free, self.ref, self.hash_of, self.cached
        out = []
        for _ in range(n):
            bid, _ = free.popitem(last=False)
            h = hash_of[bid]
            if h is not None:  # evict the cached prefix this block held
                hash_of[bid] = None
                if cached.get(h) == bid:
                    del cached[h]
                self.num_evictions += 1
            ref[bid] = 1
            out.append(bid)
        self.kv.num_used_blocks += n
        return out

    def admit(self, req: Request) -> None:
        """Admit a waiting request: reuse its cached prefix, take blocks for the rest of what it
        knows (its whole prompt: the Sarathi-style reservation the policies assume), and start its
        computation after the cached tokens (``num_computed_tokens = num_cached_tokens``)."""
        hit = self._hit_blocks(req)
        ref, free = self.ref, self.free
        reused = 0
        for b in hit:
            if ref[b] == 0:
                del free[b]
                reused += 1
            ref[b] += 1
        self.kv.num_used_blocks += reused
        table = hit + self._take_new(self.kv.blocks_for(req.num_tokens) - len(hit))
        self.tables[req.req_id] = table
        req.num_blocks = len(table)
        req.num_cached_tokens = req.num_computed_tokens = len(hit) * self.block_size
        self.num_lookup_tokens += req.prompt_len
        self.num_hit_tokens += req.num_cached_tokens

    def grow(self, req: Request, num_blocks: int) -> None:
        """Append `num_blocks` new blocks to a running request's table (decodes)."""
        if num_blocks > 0:
            self.tables[req.req_id] += self._take_new(num_blocks)
            req.num_blocks += num_blocks

    def on_computed(self, req: Request, before: int, after: int) -> None:
        """Tokens [before, after) of `req` were computed: the prompt blocks they complete enter
        the cache under their hash (unless a block already holds it)."""
        hashes = req.block_hashes
        if not hashes:
            return
        bs = self.block_size
        first, last = before // bs, min(after // bs, len(hashes))
        if first >= last:
            return
        table, hash_of, cached = self.tables[req.req_id], self.hash_of, self.cached
        for k in range(first, last):
            bid = table[k]
            if hash_of[bid] is None:
                h = hashes[k]
                if h not in cached:
                    cached[h] = bid
                    hash_of[bid] = h

    def free_request(self, req: Request) -> None:
        """Release a request's blocks (finished, aborted or preempted), last block first."""
        table = self.tables.pop(req.req_id, None)
        req.num_blocks = 0
        if not table:
            return
        ref, free = self.ref, self.free
        released = 0
        for b in reversed(table):
            ref[b] -= 1
            if ref[b] == 0:
                free[b] = None
                released += 1
        self.kv.num_used_blocks -= released
