"""Which replica holds which prompt-prefix block, as a router learns it from its own decisions.

A replica's engine keeps the KV blocks of the prompts it served (vLLM's automatic prefix cache:
blocks keyed by chained hashes, so an equal hash at position k means an equal prompt up to the end
of block k).  A router cannot see those caches, but it knows where it sent each prompt: after
sending a request with block hashes h0..hn to replica r (`record`), r very likely holds them, until
its cache evicts them.  `match(hashes)` then tells, per replica, how many LEADING blocks of a new
prompt it holds: the prompt tokens it need not compute again.

The index is an approximation of the replicas' caches and is bounded like one: at most
``max_entries`` (hash, replica) pairs, least recently used first out.  `record` touches a
request's hashes in reverse order, so its first blocks (shared system prompts, earlier turns of a
conversation) are the most recently used and leave last, as vLLM's block pool frees a finished
request's blocks tail first.  Memory is O(max_entries) whatever the traffic; a replica that is gone
is dropped with `forget` / `retain`.

Speed (the routing decision budget is tens of microseconds): each hash maps to a bitmask of the
replicas holding it (one bit per replica slot), so `match` walks the prompt's blocks with one dict
lookup and one AND per block and stops at the first block no replica holds; `record` costs one
ordered-dict touch per block.  Pure: no Ray, no vLLM.  Not thread-safe (one index per router).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence

_SLOT_BITS = 16  # up to 65,536 replicas known at once
_SLOT_MASK = (1 << _SLOT_BITS) - 1


class PrefixIndex:
    def __init__(self, max_entries: int = 131_072) -> None:
        if max_entries <= 0:
            raise ValueError(f"max_entries must be > 0, got {max_entries}")
        self.max_entries = max_entries
        self._owners: dict[int, int] = {}  # block hash -> bitmask of the slots holding it
        # (hash << _SLOT_BITS | slot) -> None, least recently used first
        self._lru: OrderedDict[int, None] = OrderedDict()
        self._slot_of: dict[str, int] = {}
        self._ids: list[str | None] = []  # slot -> replica id (None: free)
        self._free: list[int] = []
        self._sizes: list[int] = []  # slot -> entries held
        self._live = 0  # bitmask of the slots in use

    # --- learning ---
    def record(self, replica_id: str, hashes: Sequence[int]) -> None:
        """`replica_id` was sent a prompt with these block hashes (prompt order): it holds them now."""
        if not hashes:
            return
        slot = self._slot_of.get(replica_id)
        if slot is None:
            slot = self._new_slot(replica_id)
        bit = 1 << slot
        lru = self._lru
        owners = self._owners
        touch = lru.move_to_end
        added = 0
        for h in reversed(hashes):  # tail first: the prompt's first blocks end up most recent
            key = (h << _SLOT_BITS) | slot
            if key in lru:
                touch(key)
            else:
                lru[key] = None
                owners[h] = owners.get(h, 0) | bit
                added += 1
        if added:
            self._sizes[slot] += added
            if len(lru) > self.max_entries:
                self._evict(len(lru) - self.max_entries)

    def add(self, replica_id: str) -> None:
        """Know `replica_id`, holding nothing yet (a replica a router ranks before it sent it a
        prefix): then no block counts as held by every replica (`match_common`)."""
        if replica_id not in self._slot_of:
            self._new_slot(replica_id)

    def _new_slot(self, replica_id: str) -> int:
        if self._free:
            slot = self._free.pop()
            self._ids[slot] = replica_id
            self._sizes[slot] = 0
        else:
            slot = len(self._ids)
            if slot > _SLOT_MASK:
                raise ValueError(f"more than {_SLOT_MASK + 1} replicas in one prefix index")
            self._ids.append(replica_id)
            self._sizes.append(0)
        self._slot_of[replica_id] = slot
        self._live |= 1 << slot
        return slot

    def _evict(self, n: int) -> None:
        lru, owners, sizes = self._lru, self._owners, self._sizes
        for _ in range(n):
            key, _ = lru.popitem(last=False)
            h = key >> _SLOT_BITS
            slot = key & _SLOT_MASK
            rest = owners[h] & ~(1 << slot)
            if rest:
                owners[h] = rest
            else:
                del owners[h]
            sizes[slot] -= 1

    # --- asking ---
    def match(self, hashes: Sequence[int]) -> dict[str, int]:
        """Per replica holding at least the first block: how many leading blocks of `hashes` it
        holds (a replica that misses block k holds no later block as far as the prompt can use)."""
        return self._walk(hashes, True)[1]

    def match_common(self, hashes: Sequence[int]) -> tuple[int, dict[str, int]]:
        """`match`, split for speed when a prefix is everywhere (a shared system prompt): the
        leading blocks EVERY replica of the index holds, and the replicas holding more (with how
        many).  A replica of the index missing from the dict holds exactly the common blocks."""
        return self._walk(hashes, False)

    def _walk(self, hashes: Sequence[int], emit_common: bool) -> tuple[int, dict[str, int]]:
        out: dict[str, int] = {}
        owners = self._owners
        if not hashes or not owners:
            return 0, out
        ids = self._ids
        everyone = self._live
        it = iter(hashes)
        alive = owners.get(next(it), 0)  # the slots holding every block so far
        if not alive:
            return 0, out
        k = 1
        common = 0
        if alive == everyone:
            for h in it:  # the blocks every replica holds
                m = owners.get(h, 0)
                if m != everyone:
                    common = k
                    if emit_common:
                        dropped = alive & ~m
                        while dropped:
                            low = dropped & -dropped
                            out[ids[low.bit_length() - 1]] = k
                            dropped ^= low
                    alive &= m
                    if not alive:
                        return common, out
                    k += 1
                    break
                k += 1
            else:
                if emit_common:
                    out = {ids[s]: k for s in range(len(ids)) if everyone >> s & 1}
                return k, out
        for h in it:
            m = owners.get(h, 0) & alive
            if m != alive:
                dropped = alive ^ m  # they hold blocks 0..k-1 but not block k
                while dropped:
                    low = dropped & -dropped
                    out[ids[low.bit_length() - 1]] = k
                    dropped ^= low
                alive = m
                if not m:
                    return common, out
            k += 1
        while alive:
            low = alive & -alive
            out[ids[low.bit_length() - 1]] = k
            alive ^= low
        return common, out

    def best_match(self, hashes: Sequence[int], candidates: Iterable[str] | None = None) -> tuple[int, list[str]]:
        """The most leading blocks any of `candidates` (None: every replica of the index) holds,
        and the candidates holding that many, in `candidates` order ([] when none holds the first
        block)."""
        common, more = self.match_common(hashes)
        slots = self._slot_of
        if candidates is None:
            candidates = list(slots)
        best = 0
        who: list[str] = []
        for rid in candidates:
            c = more.get(rid)
            if c is None:
                c = common if rid in slots else 0
            if c > best:
                best, who = c, [rid]
            elif c == best and c > 0:
                who.append(rid)
        return best, who

    def size(self, replica_id: str) -> int:
        """Entries (blocks) held for `replica_id` (0 for an unknown replica): its cache as the index sees it."""
        slot = self._slot_of.get(replica_id)
        return 0 if slot is None else self._sizes[slot]

    def replicas(self) -> set[str]:
        return set(self._slot_of)

    @property
    def known(self) -> Mapping[str, int]:
        """The replicas the index has a place for (recorded, not forgotten since), read-only:
        membership is all a caller may ask of it."""
        return self._slot_of

    def __len__(self) -> int:
        return len(self._lru)

    # --- replicas that are gone ---
    def forget(self, replica_id: str) -> None:
        """Drop all that is known about `replica_id` (O(entries): replicas leave rarely)."""
        self.retain(rid for rid in self._slot_of if rid != replica_id)

    def retain(self, replica_ids: Iterable[str]) -> list[str]:
        """Keep only `replica_ids`; forget every other replica.  Returns the replicas forgotten."""
        live = set(replica_ids)
        gone = [rid for rid in self._slot_of if rid not in live]
        if not gone:
            return []
        slots = {self._slot_of.pop(rid) for rid in gone}
        clear = 0
        for s in slots:
            clear |= 1 << s
            self._ids[s] = None
            self._sizes[s] = 0
            self._free.append(s)
        keep = ~clear
        self._live &= keep
        owners = {}
        for h, m in self._owners.items():
            m &= keep
            if m:
                owners[h] = m
        self._owners = owners
        self._lru = OrderedDict((key, None) for key in self._lru if (key & _SLOT_MASK) not in slots)
        return gone
