"""Does iteration time step at GEMM tile edges? Tile quantization in the measured data.

    python -m loadtest.tile_quantization                     # the H100 probe and the Vidur tables
    python -m loadtest.tile_quantization --json /tmp/tile.json
    python -m loadtest.tile_quantization --probe other_probe.csv --column graph_iter_ms
    python -m loadtest.tile_quantization --write-probe-grid /tmp/tile_grid.csv   # shapes for a GPU run

If the linear layers pad the batch's N tokens to whole tiles of T tokens, an iteration of k*T + 1
tokens costs like one of (k+1)*T: the time steps up just past each multiple of T and is flat inside
a tile. Each data set below is fitted with the smooth model the cost profiles use (five terms,
`loadtest.calibrate.features`, relative non-negative least squares; the Vidur `linear_ms` column
with `a + b*N`), and four tests look for such a step:

1. residues: residuals grouped by N mod T; a step shows as rows just past an edge (0 < N mod T <=
   T/4) lying above rows on an edge (N mod T = 0). Lists which residues were sampled at all.
2. padding fit: the smooth model plus `g * pad_T(N)`, pad_T(N) = ceil(N/T)*T - N padded tokens,
   weighted least squares with a standard error; g / per_token is the share of a token's cost
   paid for a padded token (1 = full padding, 0 = none). Optionally only rows with N >= a floor
   (below about 300 tokens a bf16 GEMM on an H100 is bound by reading weights, so padding there is
   nearly free and the small-N curvature would alias into g).
3. differences (probe grid only): for two prefill sizes P1 < P2 with the same prefill context, and
   the same decodes (n at ctx), D = t(P2 + decodes) - t(P1 + decodes). Under the five-term model D
   is the same for every (n, ctx); under padding it moves by g * (pad_T(P2+n) - pad_T(P1+n)). The
   decodes' own cost (their attention call, their context) cancels, which the other tests cannot
   do: in the probe grid every N off a multiple of 64 comes from adding 8 or 32 decodes.
4. steps: each pair N -> N + d (d <= 16, N a multiple of 64, same prefill chunk): measured minus
   the smooth model's predicted step, against a whole tile's cost at the fitted slope.

The run-to-run noise of the probe is estimated from the rows both probe runs timed with the same
code (decode-only and prefill-only rows: graph_iter_ms vs split_graph_iter_ms).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loadtest.calibrate import relative_nonneg_lstsq

DATA_DIR = Path(__file__).resolve().parents[1] / "replica" / "cost" / "data"
PROBE_CSV = DATA_DIR / "h100_torch_probe.csv"
VIDUR_CSVS = (DATA_DIR / "vidur_mistral7b_a100.csv", DATA_DIR / "vidur_mistral7b_h100.csv")
TILES_TOKENS = (64, 128, 256, 512)
COMPUTE_BOUND_MIN_TOKENS = 384  # H100 bf16 ridge: ~989 TFLOP/s / 3.35 TB/s = ~295 tokens per weight byte pair
SIGNIFICANT_T = 2.0  # |estimate| / standard error above this: distinguishable from zero
MATTERS_FRACTION = 0.01  # a mean padding cost below 1 % of an iteration is under the probe's run-to-run noise
SHAPE_COLUMNS = ("prefill_tokens", "prefill_ctx", "num_decodes", "decode_ctx")


@dataclass(frozen=True)
class Point:
    """One measured iteration: at most one prefill chunk (p tokens on c cached) and n decodes at ctx."""

    line: int  # line in its CSV (1 = header)
    source: str
    prefill_tokens: int
    prefill_ctx: int
    num_decodes: int
    decode_ctx: int
    time_ms: float

    @property
    def num_tokens(self) -> int:
        return self.prefill_tokens + self.num_decodes


# ---------------------------------------------------------------------------------- reading


def read_points(path: Path, column: str, sources: tuple[str, ...] | None = None) -> list[Point]:
    """Rows of a probe or Vidur CSV with a finite `column`; rows whose `column` is nan (not timed in
    that run) are skipped. Raises ValueError naming the file and line for malformed input."""
    path = Path(path)
    try:
        f = open(path, newline="", encoding="utf-8")
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e}") from None
    with f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in (*SHAPE_COLUMNS, column) if c not in header]
        if missing:
            raise ValueError(f"{path}:1: missing column(s) {', '.join(missing)} (header: {', '.join(header)})")
        points = []
        for row in reader:
            line = reader.line_num
            source = row.get("source") or row.get("gpu") or ""
            if sources is not None and source not in sources:
                continue
            shape = []
            for c in SHAPE_COLUMNS:
                try:
                    v = int(row[c])
                except (TypeError, ValueError):
                    raise ValueError(f"{path}:{line}: column {c}: not an integer: {row[c]!r}") from None
                if v < 0:
                    raise ValueError(f"{path}:{line}: column {c}: negative: {v}")
                shape.append(v)
            try:
                t_ms = float(row[column])
            except (TypeError, ValueError):
                raise ValueError(f"{path}:{line}: column {column}: not a number: {row[column]!r}") from None
            if math.isnan(t_ms):
                continue
            if not math.isfinite(t_ms) or t_ms <= 0:
                raise ValueError(f"{path}:{line}: column {column}: not a positive time: {row[column]!r}")
            if shape[0] + shape[2] == 0:
                raise ValueError(f"{path}:{line}: empty batch (no prefill tokens, no decodes)")
            points.append(Point(line, source, *shape, t_ms))
    if not points:
        raise ValueError(f"{path}: no rows with a finite {column}" + (f" among sources {sources}" if sources else ""))
    return points


# ---------------------------------------------------------------------------------- fitting


def five_term_features(points: list[Point]) -> np.ndarray:
    """The cost profiles' regressors (loadtest.calibrate.features): 1, N, p^2, p*c, n*ctx."""
    return np.array([
        [1.0, p.num_tokens, p.prefill_tokens**2, p.prefill_tokens * p.prefill_ctx, p.num_decodes * p.decode_ctx]
        for p in points
    ], dtype=float)


def linear_features(points: list[Point]) -> np.ndarray:
    """a + b*N: for a linear-layers-only column (Vidur's linear_ms)."""
    return np.array([[1.0, p.num_tokens] for p in points], dtype=float)


MODELS = {"five_term": five_term_features, "linear": linear_features}


def padding_tokens(num_tokens: np.ndarray | int, tile_tokens: int) -> np.ndarray:
    """Padded tokens when N tokens fill whole tiles of T: ceil(N/T)*T - N."""
    return (-np.asarray(num_tokens)) % tile_tokens


def weighted_lstsq(x: np.ndarray, y_ms: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Least squares on relative error (rows weighted 1/y), unconstrained: coefficients, their
    standard errors and the mean |relative error|."""
    w = 1.0 / y_ms
    xw, yw = x * w[:, None], y_ms * w
    coef, *_ = np.linalg.lstsq(xw, yw, rcond=None)
    dof = max(1, len(y_ms) - np.linalg.matrix_rank(xw))
    sigma2 = float(np.sum((yw - xw @ coef) ** 2)) / dof
    cov = sigma2 * np.linalg.pinv(xw.T @ xw)
    return coef, np.sqrt(np.maximum(np.diag(cov), 0.0)), float(np.mean(np.abs(x @ coef / y_ms - 1.0)))


def _t(estimate: float, se: float) -> float:
    return estimate / se if se > 0 else (math.inf if estimate else 0.0)


# ---------------------------------------------------------------------------------- tests


def residue_test(points: list[Point], resid_ms: np.ndarray, rel: np.ndarray, tile_tokens: int) -> dict:
    """Residuals grouped by N mod T; the step = mean residual just past an edge minus on an edge."""
    n = np.array([p.num_tokens for p in points])
    r = n % tile_tokens
    groups = []
    for residue in sorted(set(r.tolist())):
        m = r == residue
        groups.append({"residue_tokens": int(residue), "rows": int(m.sum()),
                       "mean_resid_ms": float(resid_ms[m].mean()), "mean_rel_resid": float(rel[m].mean())})
    past, edge = (r > 0) & (r <= tile_tokens // 4), r == 0
    out = {
        "tile_tokens": tile_tokens, "groups": groups,
        "sampled_residues": sorted(set(r.tolist())),
        "just_past_tokens": sorted(set(n[past].tolist())), "rows_just_past": int(past.sum()), "rows_on_edge": int(edge.sum()),
    }
    if past.sum() and edge.sum():
        step = float(resid_ms[past].mean() - resid_ms[edge].mean())
        se = math.sqrt((resid_ms[past].var(ddof=1) / past.sum() if past.sum() > 1 else 0.0)
                       + (resid_ms[edge].var(ddof=1) / edge.sum() if edge.sum() > 1 else 0.0))
        out.update(step_ms=step, step_se_ms=se, step_t=_t(step, se),
                   step_rel=float(rel[past].mean() - rel[edge].mean()))
    else:
        out.update(step_ms=None, step_se_ms=None, step_t=None, step_rel=None,
                   cannot_show="no row just past a multiple of the tile" if not past.sum() else "no row on a tile edge")
    return out


def padding_fit(points: list[Point], model: str, tile_tokens: int, min_tokens: int = 0,
                decode_indicator: bool = False) -> dict:
    """The smooth model plus g * pad_T(N) (and optionally a 'has decodes' constant)."""
    pts = [p for p in points if p.num_tokens >= min_tokens]
    base = {"tile_tokens": tile_tokens, "min_tokens": min_tokens, "decode_indicator": decode_indicator, "rows": len(pts)}
    if len(pts) < 4:
        return {**base, "cannot_show": f"only {len(pts)} rows with N >= {min_tokens}"}
    x = MODELS[model](pts)
    if decode_indicator:
        x = np.column_stack([x, [1.0 if p.num_decodes else 0.0 for p in pts]])
    y = np.array([p.time_ms for p in pts])
    pad = padding_tokens([p.num_tokens for p in pts], tile_tokens).astype(float)
    if not pad.any():
        return {**base, "cannot_show": "every row is a whole number of tiles (no padded tokens to fit)"}
    x = x[:, np.linalg.norm(x, axis=0) > 0]  # drop all-zero terms (no prefill, no decodes on these rows)
    coef0, _, err0 = weighted_lstsq(x, y)
    xp = np.column_stack([x, pad])
    if np.linalg.matrix_rank(xp) < xp.shape[1]:
        return {**base, "cannot_show": "padding is collinear with the smooth model's terms on these rows"}
    coef, se, err = weighted_lstsq(xp, y)
    g, g_se, per_token = float(coef[-1]), float(se[-1]), float(coef[1])
    iter_ms = np.array([p.time_ms for p in pts])
    return {
        **base,
        "g_ms_per_padded_token": g, "g_se_ms": g_se, "g_t": _t(g, g_se),
        "per_token_ms": per_token, "padded_share_of_token_cost": g / per_token if per_token > 0 else None,
        "full_tile_step_ms": g * tile_tokens,
        "mean_padding_cost_ms": g * tile_tokens / 2,
        "mean_padding_share_of_iteration": float(np.median(g * tile_tokens / 2 / iter_ms)),
        "mean_rel_err_smooth": err0, "mean_rel_err_with_padding": err,
    }


def difference_test(points: list[Point], tile_tokens: int, min_tokens: int = 0) -> dict:
    """t(P2 + decodes) - t(P1 + decodes) across decode sets, regressed on the padding difference
    with one intercept per (P1, P2, prefill_ctx): the decodes' own cost cancels."""
    by_shape = {(p.prefill_tokens, p.prefill_ctx, p.num_decodes, p.decode_ctx if p.num_decodes else 0): p.time_ms
                for p in points}
    prefills: dict[int, set[int]] = {}
    for (pt, pc, _, _) in by_shape:
        prefills.setdefault(pc, set()).add(pt)
    rows, groups = [], []
    for pc in sorted(prefills):
        sizes = sorted(prefills[pc] | ({0} if pc == 0 else set()))
        for p1, p2 in zip(sizes, sizes[1:]):
            if p1 == 0 or p1 < min_tokens:
                continue  # decode-only vs mixed runs different attention code (varlen): decodes do not cancel
            obs = []
            for (pt, c, n, dctx), t2 in by_shape.items():
                if pt != p2 or c != pc:
                    continue
                key1 = (p1, pc if p1 else 0, n, dctx)
                if key1 not in by_shape:
                    continue
                dpad = int(padding_tokens(p2 + n, tile_tokens) - padding_tokens(p1 + n, tile_tokens))
                obs.append((n, dctx, t2 - by_shape[key1], dpad))
            if len(obs) < 2:
                continue
            gi = len(groups)
            groups.append({"p1_tokens": p1, "p2_tokens": p2, "prefill_ctx": pc, "pairs": len(obs),
                           "pad_diffs_tokens": sorted({o[3] for o in obs}),
                           "informative": len({o[3] for o in obs}) > 1})
            rows += [(gi, *o) for o in obs]
    out = {"tile_tokens": tile_tokens, "min_p1_tokens": min_tokens, "groups": groups,
           "informative_groups": sum(g["informative"] for g in groups)}
    if not out["informative_groups"]:
        out["cannot_show"] = ("the padding difference is the same for every decode set in every group "
                              "(every prefill size sampled is a multiple of the tile)")
        return out
    x = np.zeros((len(rows), len(groups) + 1))
    y = np.array([r[3] for r in rows])
    for i, r in enumerate(rows):
        x[i, r[0]] = 1.0
        x[i, -1] = r[4]
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    dof = max(1, len(y) - np.linalg.matrix_rank(x))
    sigma2 = float(np.sum((y - x @ coef) ** 2)) / dof
    se = float(math.sqrt(max(0.0, (sigma2 * np.linalg.pinv(x.T @ x))[-1, -1])))
    g = float(coef[-1])
    out.update(g_ms_per_padded_token=g, g_se_ms=se, g_t=_t(g, se), full_tile_step_ms=g * tile_tokens,
               resid_sd_ms=math.sqrt(sigma2), observations=len(rows))
    return out


def step_pairs(points: list[Point], coef: np.ndarray, model: str, max_gap_tokens: int = 16) -> list[dict]:
    """N -> N + d for N a multiple of 64 and the same prefill chunk: measured vs smooth-predicted step."""
    x = MODELS[model](points)
    pred = x @ coef
    out = []
    for i, a in enumerate(points):
        if a.num_tokens % 64:
            continue
        for j, b in enumerate(points):
            d = b.num_tokens - a.num_tokens
            if 0 < d <= max_gap_tokens and (b.prefill_tokens, b.prefill_ctx) == (a.prefill_tokens, a.prefill_ctx) \
                    and (a.num_decodes == 0 or a.decode_ctx == b.decode_ctx):
                step, smooth = b.time_ms - a.time_ms, float(pred[j] - pred[i])
                out.append({"from_tokens": a.num_tokens, "to_tokens": b.num_tokens,
                            "added": f"{b.num_decodes - a.num_decodes} decodes@{b.decode_ctx}" if b.num_decodes > a.num_decodes
                            else f"{d} prefill tokens",
                            "step_ms": step, "smooth_step_ms": smooth, "excess_ms": step - smooth,
                            "excess_share_of_iteration": (step - smooth) / b.time_ms})
    return out


def repeat_noise(path: Path) -> dict:
    """Rows both probe runs timed with the same code: graph_iter_ms vs split_graph_iter_ms."""
    try:
        read_points(path, "split_graph_iter_ms", ("vidur_grid",))
    except ValueError:
        return {"rows": 0}  # one run only (no merged split_* columns)
    a = {(p.line): p for p in read_points(path, "graph_iter_ms", ("vidur_grid",))}
    b = {(p.line): p for p in read_points(path, "split_graph_iter_ms", ("vidur_grid",))}
    same = [k for k in a if k in b and (a[k].num_decodes == 0 or a[k].prefill_tokens == 0)]
    if not same:
        return {"rows": 0}
    d_ms = np.array([b[k].time_ms - a[k].time_ms for k in same])
    rel = np.array([b[k].time_ms / a[k].time_ms - 1.0 for k in same])
    return {"rows": len(same), "mean_abs_rel": float(np.mean(np.abs(rel))), "max_abs_rel": float(np.max(np.abs(rel))),
            "sd_diff_ms": float(np.std(d_ms, ddof=1)), "sd_rel": float(np.std(rel, ddof=1))}


# ---------------------------------------------------------------------------------- analysis


@dataclass(frozen=True)
class DataSet:
    name: str
    path: Path
    column: str
    model: str
    sources: tuple[str, ...] | None = None
    prefill_only: bool = False
    decode_only: bool = False
    differences: bool = False  # the probe grid's factorial prefill x decodes layout


def default_datasets(probe: Path, column: str, vidur: tuple[Path, ...]) -> list[DataSet]:
    # the budget sweep was timed in the first (varlen) run only; prefill-only rows run the same code in both
    prefill_column = "graph_iter_ms" if column.startswith("split_") else column
    sets = [
        DataSet(f"probe grid, {column}", probe, column, "five_term", ("vidur_grid",), differences=True),
        DataSet(f"probe grid, decode-only, {column}", probe, column, "five_term", ("vidur_grid",), decode_only=True),
        DataSet(f"probe grid + budget sweep, prefill-only, {prefill_column}", probe, prefill_column,
                "five_term", ("vidur_grid", "budget_sweep"), prefill_only=True),
    ]
    if column == "split_graph_iter_ms":
        sets.insert(1, DataSet("probe grid, graph_iter_ms (the other run)", probe, "graph_iter_ms", "five_term",
                               ("vidur_grid",), differences=True))
    for v in vidur:
        gpu = Path(v).stem.rsplit("_", 1)[-1]
        sets.append(DataSet(f"vidur {gpu}, linear_ms", Path(v), "linear_ms", "linear"))
        sets.append(DataSet(f"vidur {gpu}, iter_ms", Path(v), "iter_ms", "five_term", differences=True))
    return sets


def analyse(ds: DataSet, tiles: tuple[int, ...]) -> dict:
    points = read_points(ds.path, ds.column, ds.sources)
    if ds.prefill_only:
        points = [p for p in points if p.num_decodes == 0]
    if ds.decode_only:
        points = [p for p in points if p.prefill_tokens == 0]
    x = MODELS[ds.model](points)
    y = np.array([p.time_ms for p in points])
    coef = relative_nonneg_lstsq(x, y)
    pred = x @ coef
    resid_ms, rel = y - pred, y / pred - 1.0
    out = {
        "name": ds.name, "file": str(ds.path), "column": ds.column, "model": ds.model, "rows": len(points),
        "median_ms": float(np.median(y)), "coefficients": coef.tolist(), "mean_abs_rel_resid": float(np.mean(np.abs(rel))),
        "sampled_tokens": sorted({p.num_tokens for p in points}),
        "tiles": [],
    }
    for t in tiles:
        entry = {
            "tile_tokens": t,
            "residues": residue_test(points, resid_ms, rel, t),
            "padding_fit": padding_fit(points, ds.model, t),
            "padding_fit_compute_bound": padding_fit(points, ds.model, t, COMPUTE_BOUND_MIN_TOKENS),
        }
        if ds.model == "five_term" and any(p.num_decodes for p in points) and any(not p.num_decodes for p in points):
            entry["padding_fit_decode_indicator"] = padding_fit(points, ds.model, t, decode_indicator=True)
        if ds.differences:
            entry["differences"] = difference_test(points, t)
            entry["differences_compute_bound"] = difference_test(points, t, COMPUTE_BOUND_MIN_TOKENS)
        out["tiles"].append(entry)
    out["step_pairs"] = step_pairs(points, coef, ds.model)
    return out


def edge_excess_test(points: list[Point], tiles: tuple[int, ...], compute_min_tokens: int = COMPUTE_BOUND_MIN_TOKENS) -> dict:
    """The step just past an edge with the decodes' own cost removed.

    E(P, n@ctx) = t(P prefill + n decodes at ctx) - t(P prefill alone), prefill without prior
    context. For small P (P + n < compute_min_tokens) the GEMMs are bound by reading weights, so
    padding is nearly free there and E is what the n decodes cost by themselves (their attention
    call and context). For a compute-bound P on a tile edge, excess = E(P, n) - E(small P, n) is
    the step: under ceil(N/T) padding about slope * (pad_T(P + n) + n), under the smooth model
    about slope * n (slope: the compute-bound per-token cost of prefill alone)."""
    ms = {(p.prefill_tokens, p.num_decodes, p.decode_ctx if p.num_decodes else 0): p.time_ms
          for p in points if p.prefill_ctx == 0}
    alone = {pt: t for (pt, n, _), t in ms.items() if n == 0 and pt}
    compute = sorted(pt for pt in alone if pt >= compute_min_tokens)
    slope_ms = None
    if len(compute) >= 2:
        slope_ms = (alone[compute[-1]] - alone[compute[0]]) / (compute[-1] - compute[0])
    rows = []
    for (pt, n, ctx), t in sorted(ms.items()):
        if not n or pt not in compute or pt % 64:
            continue
        small = [ms[(q, n, ctx)] - alone[q] for q in alone if q + n < compute_min_tokens and (q, n, ctx) in ms]
        if not small:
            continue
        excess = (t - alone[pt]) - float(np.mean(small))
        row = {"prefill_tokens": pt, "num_decodes": n, "decode_ctx": ctx, "step_ms": t - alone[pt],
               "small_prefill_step_ms": float(np.mean(small)), "small_prefills": len(small),
               "excess_ms": excess, "excess_share_of_iteration": excess / t,
               "smooth_excess_ms": None if slope_ms is None else slope_ms * n}
        if slope_ms is not None:
            for tt in tiles:
                row[f"padded_excess_T{tt}_ms"] = slope_ms * float(padding_tokens(pt + n, tt) + n)
        rows.append(row)
    by_edge = []
    for pt in sorted({r["prefill_tokens"] for r in rows}):
        for n in sorted({r["num_decodes"] for r in rows if r["prefill_tokens"] == pt}):
            sel = [r for r in rows if r["prefill_tokens"] == pt and r["num_decodes"] == n]
            ex = np.array([r["excess_ms"] for r in sel])
            by_edge.append({"prefill_tokens": pt, "num_decodes": n, "ctxs": len(sel),
                            "mean_excess_ms": float(ex.mean()), "min_excess_ms": float(ex.min()),
                            "max_excess_ms": float(ex.max()),
                            "mean_share": float(np.mean([r["excess_share_of_iteration"] for r in sel])),
                            "smooth_excess_ms": sel[0]["smooth_excess_ms"],
                            **{k: v for k, v in sel[0].items() if k.startswith("padded_excess_T")}})
    out = {"compute_min_tokens": compute_min_tokens, "slope_ms_per_token": slope_ms, "rows": rows, "by_edge": by_edge}
    if not rows or slope_ms is None:
        out["cannot_show"] = "no compute-bound prefill on an edge timed with and without the same decodes"
    return out


def verdict(edge_runs: dict[str, dict], tiles: tuple[int, ...], noise: dict | None) -> dict:
    """Model a tile term for T only if, in every probe run, the excess 8 tokens past every sampled
    compute-bound edge covers at least half of the gap between the smooth and the ceil(N/T)-padded
    prediction, and is at least MATTERS_FRACTION of the iteration: regular (every edge) and
    sizeable; otherwise a ceil(N/T) term would misdescribe the data."""
    per_tile = []
    for t in tiles:
        checks = []
        for run, test in edge_runs.items():
            for e in test.get("by_edge", []):
                if e["num_decodes"] != 8 or f"padded_excess_T{t}_ms" not in e:
                    continue
                padded, smooth = e[f"padded_excess_T{t}_ms"], e["smooth_excess_ms"]
                big = e["mean_excess_ms"] - smooth >= 0.5 * (padded - smooth) and e["mean_share"] >= MATTERS_FRACTION
                checks.append({"run": run, "edge_tokens": e["prefill_tokens"], "excess_ms": e["mean_excess_ms"],
                               "smooth_ms": smooth, "padded_ms": padded, "share": e["mean_share"], "passes": bool(big)})
        per_tile.append({"tile_tokens": t, "edges_checked": len(checks), "edges_passing": sum(c["passes"] for c in checks),
                         "regular_step": bool(checks) and all(c["passes"] for c in checks), "checks": checks})
    return {"threshold": {"share_of_padded_step": 0.5, "share_of_iteration": MATTERS_FRACTION},
            "noise": noise, "tiles": per_tile, "model_a_tile_term": any(p["regular_step"] for p in per_tile)}


# ---------------------------------------------------------------------------------- report


def _fmt(v, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def render(results: list[dict], final: dict) -> str:
    lines = []
    for res in results:
        lines.append(f"== {res['name']} ({res['rows']} rows, {res['file']}) ==")
        lines.append(f"smooth fit ({res['model']}): coefficients {', '.join(f'{c:.4g}' for c in res['coefficients'])}; "
                     f"mean |rel resid| {res['mean_abs_rel_resid']:.1%}")
        toks = res["sampled_tokens"]
        lines.append(f"sampled N (tokens): {', '.join(map(str, toks[:40]))}{' ...' if len(toks) > 40 else ''}")
        lines.append("  T    residues sampled        just past edge (N)         step past-vs-edge ms (t)   rel")
        for e in res["tiles"]:
            r = e["residues"]
            past = ",".join(map(str, r["just_past_tokens"][:8])) + (" ..." if len(r["just_past_tokens"]) > 8 else "")
            step = (f"{r['step_ms']:+.2f} ({r['step_t']:+.1f})" if r["step_ms"] is not None else r["cannot_show"])
            lines.append(f"  {e['tile_tokens']:<4} {str(r['sampled_residues'])[:24]:<24} {past or 'none':<26} "
                         f"{step:<26} {_fmt(r['step_rel'], '+.1%')}")
        lines.append("  padding fit: g = ms per padded token (t), share of a token's cost, full-tile step ms, "
                     "mean cost share of an iteration, mean |rel err| smooth -> padded")
        for e in res["tiles"]:
            for key, label in (("padding_fit", "all rows"), ("padding_fit_compute_bound", f"N>={COMPUTE_BOUND_MIN_TOKENS}"),
                               ("padding_fit_decode_indicator", "+has-decodes")):
                f = e.get(key)
                if not f:
                    continue
                if "cannot_show" in f:
                    lines.append(f"  T={e['tile_tokens']:<4} {label:<13} cannot show: {f['cannot_show']}")
                    continue
                lines.append(
                    f"  T={e['tile_tokens']:<4} {label:<13} g {f['g_ms_per_padded_token']:+.5f} ({f['g_t']:+.1f})  "
                    f"share {_fmt(f['padded_share_of_token_cost'], '+.2f')}  step {f['full_tile_step_ms']:+.2f} ms  "
                    f"mean {f['mean_padding_share_of_iteration']:+.1%}  err {f['mean_rel_err_smooth']:.2%} -> "
                    f"{f['mean_rel_err_with_padding']:.2%}  ({f['rows']} rows)")
        for e in res["tiles"]:
            for key, label in (("differences", "all P1"), ("differences_compute_bound", f"P1>={COMPUTE_BOUND_MIN_TOKENS}")):
                d = e.get(key)
                if not d:
                    continue
                if "cannot_show" in d:
                    lines.append(f"  differences T={e['tile_tokens']:<4} {label:<8} cannot show: {d['cannot_show']}")
                    continue
                lines.append(
                    f"  differences T={e['tile_tokens']:<4} {label:<8} g {d['g_ms_per_padded_token']:+.5f} ms/token "
                    f"(se {d['g_se_ms']:.5f}, t {d['g_t']:+.1f}), full-tile step {d['full_tile_step_ms']:+.2f} ms, "
                    f"{d['informative_groups']}/{len(d['groups'])} informative groups, {d['observations']} differences, "
                    f"resid sd {d['resid_sd_ms']:.2f} ms")
        if res["step_pairs"]:
            lines.append("  steps N -> N+d (ms): measured, smooth model, excess (share of the iteration)")
            for s in res["step_pairs"][:12]:
                lines.append(f"    {s['from_tokens']:>5} -> {s['to_tokens']:<5} +{s['added']:<16} {s['step_ms']:+7.2f} "
                             f"{s['smooth_step_ms']:+7.2f} {s['excess_ms']:+7.2f} ({s['excess_share_of_iteration']:+.1%})")
            if len(res["step_pairs"]) > 12:
                lines.append(f"    ... {len(res['step_pairs']) - 12} more in --json")
        lines.append("")
    for run, test in final["edge_runs"].items():
        lines.append(f"== edge steps with the decodes' own cost removed: {run} ==")
        if "cannot_show" in test:
            lines.append(f"  cannot show: {test['cannot_show']}")
            continue
        tkeys = [k for k in test["by_edge"][0] if k.startswith("padded_excess_T")]
        lines.append(f"  compute-bound slope {test['slope_ms_per_token']:.4f} ms/token (prefill alone); excess = step at P "
                     f"minus the same decodes' step at P < {test['compute_min_tokens']} (ms; mean [min..max] over decode contexts)")
        lines.append("  P      +n   excess                 share  smooth " + " ".join(
            f"{k.replace('padded_excess_', 'pad ').replace('_ms', ''):>8}" for k in tkeys))
        for e in test["by_edge"]:
            lines.append(f"  {e['prefill_tokens']:<6} {e['num_decodes']:<4} {e['mean_excess_ms']:+6.2f} "
                         f"[{e['min_excess_ms']:+.2f}..{e['max_excess_ms']:+.2f}] {e['mean_share']:+6.1%} "
                         f"{e['smooth_excess_ms']:+6.2f} " + " ".join(f"{e[k]:+8.2f}" for k in tkeys))
    n = final["noise"]
    if n and n.get("rows"):
        lines.append(f"probe run-to-run noise ({n['rows']} rows timed by both runs with the same code): mean |rel| "
                     f"{n['mean_abs_rel']:.1%}, max {n['max_abs_rel']:.1%}, sd of the difference {n['sd_diff_ms']:.2f} ms")
    th = final["threshold"]
    lines.append(f"rule: model tile T only if, in every probe run, the excess 8 tokens past every compute-bound edge covers "
                 f">= {th['share_of_padded_step']:.0%} of the gap smooth -> padded and is >= {th['share_of_iteration']:.0%} "
                 "of the iteration")
    for p in final["tiles"]:
        fails = [f"{c['run'].split(', ')[-1]} P={c['edge_tokens']}: {c['excess_ms']:+.2f} (smooth {c['smooth_ms']:+.2f}, "
                 f"padded {c['padded_ms']:+.2f})" for c in p["checks"] if not c["passes"]]
        lines.append(f"  T={p['tile_tokens']:<4} {p['edges_passing']}/{p['edges_checked']} edges pass"
                     + (f"; fail: {'; '.join(fails)}" if fails else ""))
    lines.append(f"model a tile term: {'yes' if final['model_a_tile_term'] else 'no'}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- probe grid


def probe_grid(bases_tokens: tuple[int, ...] = (512, 1024, 2048),
               offsets_tokens: tuple[int, ...] = (-8, 0, 1, 8, 16, 32, 64, 96, 120),
               decode_ctx: int = 1024) -> list[dict]:
    """Shapes that can show a tile step without the decode confound: prefill-only chunks (no prior
    context) at multiples of each tile plus small offsets, and decode-only batches around the same
    edges (each decode at `decode_ctx`). Rows have gpu_probe's grid columns."""
    prefill = sorted({b + o for b in bases_tokens for o in offsets_tokens if b + o > 0})
    decodes = sorted({b + o for b in (128, 256) for o in (-8, 0, 1, 8, 32, 64)})
    rows = [{"prefill_tokens": n, "prefill_ctx": 0, "num_decodes": 0, "decode_ctx": 0} for n in prefill]
    rows += [{"prefill_tokens": 0, "prefill_ctx": 0, "num_decodes": n, "decode_ctx": decode_ctx} for n in decodes]
    return rows


def write_probe_grid(path: Path) -> int:
    rows = probe_grid()
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(SHAPE_COLUMNS))
        w.writeheader()
        w.writerows(rows)
    return len(rows)


# ---------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.tile_quantization", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--probe", type=Path, default=PROBE_CSV, help="gpu_probe CSV (default: the shipped H100 probe)")
    ap.add_argument("--column", default="split_graph_iter_ms", help="probe time column (default: the profile's)")
    ap.add_argument("--vidur", type=Path, nargs="*", default=list(VIDUR_CSVS), help="Vidur tables (none: skip)")
    ap.add_argument("--tiles", default=",".join(map(str, TILES_TOKENS)), help="tile sizes in tokens")
    ap.add_argument("--json", type=Path, default=None, help="write every number here")
    ap.add_argument("--write-probe-grid", type=Path, default=None,
                    help="write the shapes a GPU probe should time to show a tile step, and exit")
    args = ap.parse_args(argv)
    if args.write_probe_grid:
        print(f"{write_probe_grid(args.write_probe_grid)} shapes -> {args.write_probe_grid}")
        return 0
    try:
        tiles = tuple(int(t) for t in args.tiles.split(","))
        if any(t <= 0 for t in tiles):
            raise ValueError
    except ValueError:
        print(f"--tiles: expected positive integers, got {args.tiles!r}", file=sys.stderr)
        return 2
    try:
        results = []
        for ds in default_datasets(args.probe, args.column, tuple(args.vidur)):
            results.append(analyse(ds, tiles))
        noise = repeat_noise(args.probe)
        edge_runs = {}
        for column in dict.fromkeys((args.column, "graph_iter_ms") if args.column == "split_graph_iter_ms" else (args.column,)):
            edge_runs[f"probe grid, {column}"] = edge_excess_test(read_points(args.probe, column, ("vidur_grid",)), tiles)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    final = {**verdict(edge_runs, tiles, noise), "edge_runs": edge_runs}
    print(render(results, final))
    if args.json:
        args.json.write_text(json.dumps({"results": results, "verdict": final}, indent=1), encoding="utf-8")
        print(f"json -> {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
