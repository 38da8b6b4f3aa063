"""How much prefix reuse a prefix trace offers, before any cache or router limits it.

  python -m loadtest.prefix_reuse [--trace mooncake] [--requests 2000 4000 8000]

Per request count N (the trace's first N usable requests, in order, as the simulators take them):
the infinite-cache hit rate (the share of prompt tokens whose block was seen in an earlier prompt's
same leading run, capped, as vLLM's lookup is, at the last full engine block before the prompt's
last token), and the distance in requests from a request to the last earlier request sharing one
of its blocks beyond the first (a conversation's previous turn), as percentiles.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from replica.traces import load_trace

ENGINE_BLOCK = 16


def infinite_cache_hit_rate(prefix_hashes, prompt_lens, block_tokens: int) -> float:
    seen: set[int] = set()
    hit = total = 0
    for hashes, prompt in zip(prefix_hashes, prompt_lens):
        k = 0
        while k < len(hashes) and hashes[k] in seen:
            k += 1
        hit += min(k * block_tokens, (int(prompt) - 1) // ENGINE_BLOCK * ENGINE_BLOCK)
        total += int(prompt)
        seen.update(hashes)
    return hit / total if total else 0.0


def reuse_distances(prefix_hashes) -> np.ndarray:
    last: dict[int, int] = {}
    out = []
    for i, hashes in enumerate(prefix_hashes):
        for h in reversed(hashes[1:]):
            if h in last:
                out.append(i - last[h])
                break
        for h in hashes:
            last[h] = i
    return np.array(out, dtype=np.int64)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.prefix_reuse", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", default="mooncake")
    ap.add_argument("--requests", type=int, nargs="+", default=[2000, 4000, 8000])
    a = ap.parse_args(argv)
    trace = load_trace(a.trace)
    if not trace.has_prefixes:
        print(f"error: {trace.source} has no prefix hashes", file=sys.stderr)
        return 2
    out = {"trace": trace.source, "usable_requests": len(trace), "infinite_cache_hit_rate": {}}
    for n in a.requests:
        n = min(n, len(trace))
        out["infinite_cache_hit_rate"][n] = round(infinite_cache_hit_rate(
            trace.prefix_hashes[:n], trace.prompt_lens[:n], trace.hash_block_tokens), 4)
    d = reuse_distances(trace.prefix_hashes)
    out["requests_with_an_earlier_turn"] = int(len(d))
    out["reuse_distance_requests_p10_p50_p90"] = [float(x) for x in np.percentile(d, [10, 50, 90])] if len(d) else []
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
