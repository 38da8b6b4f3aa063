"""Chained block hashes of prompts (`replica.prefix_hash`): the router's prefix signal."""

from __future__ import annotations

import random
import subprocess
import sys
import time

import pytest

from replica.prefix_hash import HASH_BITS, chained_block_hashes


def test_one_hash_per_full_block_and_a_partial_block_is_left_out():
    ids = list(range(1000))
    assert len(chained_block_hashes(ids, 128)) == 7  # 7 * 128 = 896 <= 1000
    assert len(chained_block_hashes(ids[:896], 128)) == 7
    assert chained_block_hashes(ids[:127], 128) == ()
    assert chained_block_hashes([], 16) == ()
    assert all(0 <= h < 1 << HASH_BITS and type(h) is int for h in chained_block_hashes(ids, 16))


def test_equal_hashes_mean_equal_prefixes_and_the_common_run_is_the_common_prefix():
    rng = random.Random(7)
    system = [rng.randrange(32000) for _ in range(600)]
    a = chained_block_hashes(system + [rng.randrange(32000) for _ in range(300)], 64)
    b = chained_block_hashes(system + [rng.randrange(32000) for _ in range(300)], 64)
    common = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert common == 600 // 64  # the 9 blocks inside the shared 600 tokens
    assert a[:common] == chained_block_hashes(system, 64)  # a prefix's hashes are a prefix of the hashes


def test_each_hash_depends_on_every_token_before_it():
    ids = list(range(10, 10 + 512))
    base = chained_block_hashes(ids, 128)
    for pos in (0, 127, 128, 300, 511):
        changed = list(ids)
        changed[pos] += 1
        h = chained_block_hashes(changed, 128)
        block = pos // 128
        assert h[:block] == base[:block] and all(x != y for x, y in zip(h[block:], base[block:])), pos


def test_the_same_block_after_different_prefixes_hashes_differently():
    block = [5] * 16
    assert chained_block_hashes(block * 2, 16)[1] != chained_block_hashes(block, 16)[0]
    assert chained_block_hashes([1] * 16 + block, 16)[1] != chained_block_hashes([2] * 16 + block, 16)[1]


def test_different_block_sizes_never_share_hashes():
    ids = list(range(256))
    assert not set(chained_block_hashes(ids, 64)) & set(chained_block_hashes(ids, 128))


def test_lists_and_tuples_hash_alike():
    ids = list(range(300))
    assert chained_block_hashes(ids, 32) == chained_block_hashes(tuple(ids), 32)


def test_the_hashes_are_the_same_in_another_process_with_another_hash_seed():
    """No dependence on Python's per-process hash randomization (PYTHONHASHSEED) nor on the process."""
    ids = [(i * 7919) % 50021 for i in range(1000)]
    code = ("import sys; from replica.prefix_hash import chained_block_hashes as c; "
            "print(c([(i * 7919) % 50021 for i in range(1000)], 64))")
    for seed in ("0", "12345"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={"PYTHONHASHSEED": seed, "PATH": ""}, cwd=str(_root()))
        assert out.stdout.strip() == str(chained_block_hashes(ids, 64))


def test_known_values_pin_the_algorithm():
    """Changing the hash changes what a running router has learnt: it must be deliberate."""
    assert chained_block_hashes([0, 1, 2, 3, 4, 5, 6, 7, 8, 9], 4) == (16312236217881535078, 11377795175539321765)


@pytest.mark.parametrize("block", [0, -1, True, 1.5, "64"])
def test_a_bad_block_size_is_refused(block):
    with pytest.raises(ValueError, match="block_tokens"):
        chained_block_hashes([1, 2, 3], block)


@pytest.mark.parametrize("ids", [[-1, 2], [1 << 32, 2], [1.0, 2]])
def test_token_ids_outside_uint32_are_refused(ids):
    with pytest.raises(ValueError, match="token ids"):
        chained_block_hashes(ids, 2)


def test_a_32k_token_prompt_hashes_in_a_few_milliseconds():
    ids = [random.randrange(150_000) for _ in range(32_768)]
    chained_block_hashes(ids, 128)
    best = min(_timed(lambda: chained_block_hashes(ids, 128)) for _ in range(5))
    assert best < 0.010, best  # measured ~0.5 ms on 2 shared cores; a generous bound against noise


def _timed(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def _root():
    from pathlib import Path

    return Path(__file__).resolve().parents[2]
