"""A synthetic trace of a different shape from the paper's: short prompts, long outputs.

    python -m loadtest.synthetic_trace --out loadtest/data/synthetic_short_prompt_long_output.csv

Prompt and output lengths are lognormal (numpy, fixed seed), clipped to [1, max]; written in the
trace CSV format `replica.traces` reads (num_prefill_tokens,num_decode_tokens).  Defaults: prompts
median 300 tokens (sigma 1.2: ~1.5 % above 4k tokens, so the long-prompt tail is still measured),
outputs median 700 tokens (sigma 0.6), against the paper's ShareGPT trace's prompt median 1730 and
output median 415.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from replica.traces import OUTPUT_COLUMN, PROMPT_COLUMN


def synthetic_lengths(n: int, *, prompt_median: float = 300, prompt_sigma: float = 1.2, prompt_max: int = 8192,
                      output_median: float = 700, output_sigma: float = 0.6, output_max: int = 2048,
                      seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    prompts = np.clip(np.rint(rng.lognormal(np.log(prompt_median), prompt_sigma, n)), 1, prompt_max).astype(np.int64)
    outputs = np.clip(np.rint(rng.lognormal(np.log(output_median), output_sigma, n)), 1, output_max).astype(np.int64)
    return prompts, outputs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--requests", type=int, default=20_000)
    p.add_argument("--seed", type=int, default=7)
    a = p.parse_args(argv)
    prompts, outputs = synthetic_lengths(a.requests, seed=a.seed)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with a.out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([PROMPT_COLUMN, OUTPUT_COLUMN])
        w.writerows(zip(prompts.tolist(), outputs.tolist()))
    print(f"wrote {a.out}: {a.requests} requests, prompt median {np.median(prompts):.0f} "
          f"(>4k: {np.mean(prompts > 4000):.1%}), output median {np.median(outputs):.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
