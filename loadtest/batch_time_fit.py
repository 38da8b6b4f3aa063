"""How well slai-plus's batch-time model fits iteration times measured on a GPU.

    python -m loadtest.batch_time_fit [replica/cost/data/h100_torch_probe.csv] [--column split_graph_iter_ms]
    python -m loadtest.batch_time_fit --learned rtx6000ada-mistral7b,h100-mistral7b-measured [--requests 600 --qps 1.5]

The second form runs slai-plus in the simulator on each cost profile (the paper trace and tiers)
and prints the coefficients its time model learned from the simulated iterations next to the
profile's own (the simulator times every iteration with the profile, so they should agree), and
both predictions for one fresh 1,408-token chunk.

Feeds every grid row of the H100 probe (`loadtest/gpu_probe.py`: a Mistral-7B-shaped model
timed per batch shape) to `replica.policy.slai_plus.BatchTimeModel`, exactly as the policy feeds
its own measured iterations, then prints the relative error of its predictions: for the model's
five terms and for the first three alone (no prefill-attention terms).  What matters for the
adaptive budget is under-prediction of large batches (an iteration longer than predicted eats
the TBT margin), so that is counted too.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from replica.policy.slai_plus import BatchTimeModel

DEFAULT = Path(__file__).resolve().parents[1] / "replica/cost/data/h100_torch_probe.csv"


def fit_errors(rows: list[dict[str, str]], column: str, num_terms: int) -> np.ndarray:
    model = BatchTimeModel()
    xs, ys = [], []
    for r in rows:
        n_dec = float(r["num_decodes"])
        chunk = float(r["prefill_tokens"])
        x = BatchTimeModel.terms(float(r["batch_tokens"]), n_dec * float(r["decode_ctx"]),
                                 chunk * chunk, chunk * float(r["prefill_ctx"]))
        x[num_terms:] = 0.0
        y = float(r[column]) / 1e3
        xs.append(x)
        ys.append(y)
    if num_terms < BatchTimeModel.NUM_TERMS:  # the model needs every term; fit the subset alone
        X = np.array(xs)[:, :num_terms]
        y = np.array(ys)
        coef = np.linalg.lstsq(X / y[:, None], np.ones_like(y), rcond=None)[0]
        return X @ coef / y - 1
    for x, y in zip(xs, ys):
        model.add_terms(x, y)
    return np.array([model.predict_s(*_untransform(x)) / y - 1 for x, y in zip(xs, ys)])


def _untransform(x: np.ndarray) -> tuple[float, float, float, float]:
    return x[1], x[2] * 1e3, x[3] * 1e6, x[4] * 1e6


def learned_coefficients(profile_name: str, requests: int, qps: float) -> tuple[np.ndarray, np.ndarray]:
    """(the profile's coefficients, what slai-plus's time model learned running it in the
    simulator), in the model's units: s, s/token, s/Ktok of decode context, s/Mtok^2 twice."""
    from loadtest.simulate.replica import Workload, run_replica
    from replica.cost.profile import load_profile
    from replica.policy import make_policy
    from replica.tiers import paper_tiers
    from replica.traces import load_trace

    cost = load_profile(profile_name)
    c = cost.coefficients
    truth = np.array([c.base_ms / 1e3, c.per_token_ms / 1e3, c.decode_ctx_ms, c.prefill_sq_ms * 1e3,
                      c.prefill_ctx_ms * 1e3])
    policy = make_policy("slai-plus")
    run_replica(Workload.build(load_trace("paper"), requests, qps, paper_tiers()), policy, cost)
    return truth, policy.time_model.coefficients


def _print_learned(profiles: str, requests: int, qps: float) -> None:
    names = ("base s", "s/token", "decode s/Ktok", "prefill_sq s/Mtok^2", "prefill_ctx s/Mtok^2")
    chunk = np.array((1.0, 1408, 0.0, 1408**2 / 1e6, 0.0))
    print(f"slai-plus in the simulator, paper trace, {requests} requests at {qps} QPS")
    print("| profile | | " + " | ".join(names) + " | fresh 1,408-token chunk |")
    print("|---|---|" + "---|" * (len(names) + 1))
    for name in profiles.split(","):
        truth, learned = learned_coefficients(name, requests, qps)
        print(f"| {name} | profile | " + " | ".join(f"{x:.4e}" for x in truth) + f" | {chunk @ truth * 1e3:.2f} ms |")
        print("| | learned | " + " | ".join(f"{x:.4e} ({x / t - 1:+.1%})" for x, t in zip(learned, truth))
              + f" | {chunk @ learned * 1e3:.2f} ms ({chunk @ learned / (chunk @ truth) - 1:+.1%}) |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("probe", nargs="?", type=Path, default=DEFAULT)
    p.add_argument("--column", default="split_graph_iter_ms", help="the time column (default %(default)s)")
    p.add_argument("--learned", metavar="PROFILES", default=None,
                   help="comma-separated cost profiles: what slai-plus learns running each in the simulator")
    p.add_argument("--requests", type=int, default=600, help="with --learned: requests per run (default %(default)s)")
    p.add_argument("--qps", type=float, default=1.5, help="with --learned: arrival rate (default %(default)s)")
    a = p.parse_args(argv)
    if a.learned:
        _print_learned(a.learned, a.requests, a.qps)
        return 0
    with a.probe.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["source"] == "vidur_grid"]
    big = np.array([float(r["batch_tokens"]) >= 256 for r in rows])
    print(f"{a.probe.name}, column {a.column}: {len(rows)} grid shapes, {big.sum()} of 256+ tokens")
    print("| terms | mean abs error | max abs error | 256+ token batches under-predicted by > 10 % |")
    print("|---|---|---|---|")
    for k, label in ((5, "all five (slai-plus)"), (3, "1, tokens, decode context")):
        e = fit_errors(rows, a.column, k)
        print(f"| {label} | {100 * np.abs(e).mean():.1f} % | {100 * np.abs(e).max():.1f} % | "
              f"{int((e[big] < -0.10).sum())} of {int(big.sum())} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
