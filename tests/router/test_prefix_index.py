"""The router's prefix index: which replica holds which prompt-prefix block (router.prefix_index)."""

import random

import pytest

from router.prefix_index import PrefixIndex


def _index(records: list[tuple[str, list[int]]], max_entries: int = 1000) -> PrefixIndex:
    idx = PrefixIndex(max_entries)
    for rid, hashes in records:
        idx.record(rid, hashes)
    return idx


@pytest.mark.parametrize("records, query, expected", [
    ([], [1, 2, 3], {}),
    ([("a", [1, 2, 3])], [], {}),
    ([("a", [1, 2, 3])], [1, 2, 3], {"a": 3}),
    ([("a", [1, 2, 3])], [1, 2, 3, 4, 5], {"a": 3}),
    ([("a", [1, 2, 3])], [1, 2], {"a": 2}),
    ([("a", [1, 2, 3])], [9, 2, 3], {}),                       # the first block differs: nothing usable
    ([("a", [1, 2, 3]), ("b", [1, 2, 7])], [1, 2, 3], {"a": 3, "b": 2}),
    ([("a", [1, 2]), ("b", [1, 2, 3, 4])], [1, 2, 3, 4], {"a": 2, "b": 4}),
    ([("a", [1, 5]), ("a", [1, 2, 3])], [1, 2, 3], {"a": 3}),  # two prompts sharing block 1 on one replica
    ([("a", [2, 3])], [1, 2, 3], {}),                          # holding later blocks without the first counts for nothing
])
def test_match_counts_the_leading_blocks_each_replica_holds(records, query, expected):
    assert _index(records).match(query) == expected


def test_match_common_splits_off_the_blocks_every_replica_holds():
    idx = _index([("a", [0, 1, 2]), ("b", [0, 1, 5]), ("c", [0, 7])])
    assert idx.match([0, 1, 2]) == {"a": 3, "b": 2, "c": 1}
    assert idx.match_common([0, 1, 2]) == (1, {"a": 3, "b": 2})
    assert idx.match_common([0]) == (1, {})
    assert idx.match_common([9]) == (0, {})
    idx.add("d")  # a replica that holds nothing yet: no block is everyone's
    assert idx.match_common([0, 1, 2]) == (0, {"a": 3, "b": 2, "c": 1})


def test_match_common_agrees_with_match_on_random_histories():
    rng = random.Random(5)
    for _ in range(200):
        idx = PrefixIndex(rng.choice([8, 30, 1000]))
        for _ in range(rng.randint(0, 12)):
            n = rng.randint(1, 6)
            idx.record(rng.choice("abcd"), [0] + [rng.randint(1, 6) for _ in range(n)])
        query = [0] + [rng.randint(1, 6) for _ in range(rng.randint(0, 6))]
        full = idx.match(query)
        common, more = idx.match_common(query)
        rebuilt = {rid: more.get(rid, common) for rid in idx.known}
        assert {r: c for r, c in rebuilt.items() if c} == full
        assert all(c > common for c in more.values())


def test_the_index_never_holds_more_than_max_entries_and_drops_the_least_recent_first():
    idx = _index([("a", [1, 2, 3]), ("b", [1, 2])], max_entries=5)
    assert len(idx) == 5
    idx.record("c", [1])  # evicts a's block 3: a's tail, the least recently used pair
    assert len(idx) == 5
    assert idx.match([1, 2, 3]) == {"a": 2, "b": 2, "c": 1}
    for k in range(100):
        idx.record(f"r{k % 7}", list(range(k, k + 4)))
        assert len(idx) <= 5


def test_record_touches_a_prompt_tail_first_so_its_first_blocks_leave_last():
    idx = _index([("a", [1, 2, 3, 4])], max_entries=4)
    idx.record("b", [9, 8])  # room for two: a's last two blocks go, its first two stay
    assert idx.match([1, 2, 3, 4]) == {"a": 2}
    assert idx.match([9, 8]) == {"b": 2}


def test_recording_again_refreshes_a_prefix():
    idx = _index([("a", [1, 2]), ("b", [5, 6])], max_entries=4)
    idx.record("a", [1, 2])  # a's blocks are now the most recent
    idx.record("c", [7, 8])  # so b's leave
    assert idx.match([1, 2]) == {"a": 2}
    assert idx.match([5, 6]) == {}


@pytest.mark.parametrize("op", ["forget", "retain"])
def test_a_forgotten_replica_holds_nothing_and_its_place_is_reused_clean(op):
    idx = _index([("a", [1, 2, 3]), ("b", [1, 2])])
    if op == "forget":
        idx.forget("a")
    else:
        assert idx.retain(["b", "z"]) == ["a"]
    assert idx.match([1, 2, 3]) == {"b": 2}
    assert idx.size("a") == 0 and len(idx) == 2 and "a" not in idx.known
    idx.record("c", [5])  # takes a's place (slot): none of a's blocks come back with it
    assert idx.match([1, 2, 3]) == {"b": 2}
    assert idx.match([5]) == {"c": 1}


def test_size_counts_each_replicas_entries_through_records_and_evictions():
    idx = _index([("a", [1, 2, 3]), ("b", [1]), ("a", [1, 2, 4])], max_entries=6)
    assert (idx.size("a"), idx.size("b"), idx.size("nobody")) == (4, 1, 0)
    idx.record("b", [7, 8])  # 7 entries > 6: a's least recent pair (block 3) leaves
    assert (idx.size("a"), idx.size("b"), len(idx)) == (3, 3, 6)


@pytest.mark.parametrize("candidates, expected", [
    (None, (3, ["a"])),
    (["b", "c"], (2, ["b", "c"])),
    (["c", "b"], (2, ["c", "b"])),
    (["d"], (0, [])),
])
def test_best_match_is_the_longest_prefix_among_the_candidates(candidates, expected):
    idx = _index([("a", [1, 2, 3]), ("b", [1, 2]), ("c", [1, 2, 9])])
    assert idx.best_match([1, 2, 3], candidates) == expected


def test_memory_is_bounded_whatever_the_traffic():
    idx = PrefixIndex(max_entries=64)
    rng = random.Random(1)
    for k in range(2000):
        idx.record(f"r{rng.randrange(40)}", [rng.randrange(10**9) for _ in range(rng.randint(1, 30))])
    assert len(idx) == 64
    assert len(idx._owners) <= 64
    assert sum(idx.size(r) for r in idx.known) == 64


@pytest.mark.parametrize("bad", [0, -1])
def test_max_entries_must_be_positive(bad):
    with pytest.raises(ValueError, match="max_entries"):
        PrefixIndex(bad)
