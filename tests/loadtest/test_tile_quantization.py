"""loadtest.tile_quantization: finds a planted tile step, finds none in smooth data."""

import csv
import json

import numpy as np
import pytest

from loadtest import tile_quantization as tq

PLANTED_TILE_TOKENS = 128
SLOPE_MS = 0.03


def _time_ms(prefill: int, decodes: int, ctx: int, step_ms_per_padded_token: float) -> float:
    """Smooth cost (base, per token, decode context, a fixed cost for having decodes) plus, above the
    memory-bound region, `step_ms_per_padded_token` for each token padded to a whole 128-token tile."""
    n = prefill + decodes
    t = 6.0 + SLOPE_MS * n + 5e-5 * decodes * ctx + (0.5 if decodes else 0.0)
    if n >= tq.COMPUTE_BOUND_MIN_TOKENS:
        t += step_ms_per_padded_token * float(tq.padding_tokens(n, PLANTED_TILE_TOKENS))
    return t


def _write_probe(path, step_ms_per_padded_token: float) -> None:
    """A probe-shaped CSV: the grid's layout, prefill 0..2048 x decodes 0..256 at three contexts."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["source", "prefill_tokens", "prefill_ctx", "num_decodes", "decode_ctx",
                    "graph_iter_ms", "split_graph_iter_ms"])
        for p in (0, 64, 128, 256, 512, 1024, 2048):
            for n, ctxs in ((0, (0,)), (8, (256, 1024, 2048)), (32, (256, 1024, 2048)), (64, (256, 1024, 2048))):
                for ctx in ctxs:
                    if p + n:
                        t = _time_ms(p, n, ctx, step_ms_per_padded_token)
                        w.writerow(["vidur_grid", p, 0, n, ctx, f"{t:.4f}", f"{t:.4f}"])


def _edge_test(tmp_path, step_ms_per_padded_token: float) -> dict:
    path = tmp_path / "probe.csv"
    _write_probe(path, step_ms_per_padded_token)
    return tq.edge_excess_test(tq.read_points(path, "split_graph_iter_ms"), (64, 128, 256))


def test_edge_excess_measures_a_planted_step(tmp_path):
    test = _edge_test(tmp_path, SLOPE_MS)
    at_1024 = next(e for e in test["by_edge"] if e["prefill_tokens"] == 1024 and e["num_decodes"] == 8)
    # 8 decodes past 1024: 120 padded tokens at the planted 0.03 ms (the synthetic per-token cost is
    # the same below and above the compute-bound floor, so the 8 tokens themselves cancel)
    assert at_1024["mean_excess_ms"] == pytest.approx(SLOPE_MS * 120, abs=1e-3)


def test_verdict_models_a_planted_128_token_step(tmp_path):
    verdict = tq.verdict({"run": _edge_test(tmp_path, SLOPE_MS)}, (64, 128, 256), None)
    t128 = next(t for t in verdict["tiles"] if t["tile_tokens"] == 128)
    assert t128["regular_step"] and t128["edges_checked"] == 3
    assert verdict["model_a_tile_term"]


def test_verdict_finds_no_step_in_smooth_data(tmp_path):
    test = _edge_test(tmp_path, 0.0)
    assert all(abs(e["mean_excess_ms"]) < 1e-3 for e in test["by_edge"])
    assert not tq.verdict({"run": test}, (64, 128, 256), None)["model_a_tile_term"]


def test_padding_fit_recovers_the_planted_share(tmp_path):
    path = tmp_path / "probe.csv"
    _write_probe(path, SLOPE_MS / 2)
    points = [p for p in tq.read_points(path, "split_graph_iter_ms") if p.num_decodes == 0 or p.prefill_tokens]
    fit = tq.padding_fit(points, "five_term", 128, min_tokens=tq.COMPUTE_BOUND_MIN_TOKENS, decode_indicator=True)
    assert fit["g_ms_per_padded_token"] == pytest.approx(SLOPE_MS / 2, rel=1e-3)


def test_residue_test_sees_no_step_in_smooth_data(tmp_path):
    path = tmp_path / "probe.csv"
    _write_probe(path, 0.0)
    points = tq.read_points(path, "split_graph_iter_ms")
    n = np.array([p.num_tokens for p in points], dtype=float)
    y = np.array([p.time_ms for p in points])
    resid = y - (6.0 + SLOPE_MS * n)  # exact smooth residuals minus the decode terms: no tile pattern left
    decode_part = np.array([5e-5 * p.num_decodes * p.decode_ctx + (0.5 if p.num_decodes else 0.0) for p in points])
    res = tq.residue_test(points, resid - decode_part, (resid - decode_part) / y, 128)
    assert res["step_ms"] == pytest.approx(0.0, abs=1e-3)


def test_cli_writes_the_verdict_for_a_planted_step(tmp_path, capsys):
    path, out = tmp_path / "probe.csv", tmp_path / "tile.json"
    _write_probe(path, SLOPE_MS)
    assert tq.main(["--probe", str(path), "--vidur", "--tiles", "64,128", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["verdict"]["model_a_tile_term"] is True
    assert "model a tile term: yes" in capsys.readouterr().out


def test_bad_csv_names_file_and_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("prefill_tokens,prefill_ctx,num_decodes,decode_ctx,iter_ms\n64,0,0,0,7.5\n64,0,x,0,7.5\n")
    with pytest.raises(ValueError, match=r"bad\.csv:3: column num_decodes"):
        tq.read_points(path, "iter_ms")


def test_probe_grid_samples_just_past_each_edge():
    rows = tq.probe_grid()
    prefill = {r["prefill_tokens"] for r in rows if not r["num_decodes"]}
    assert {1024, 1025, 1032, 2048, 2049, 2056} <= prefill
    assert all(r["prefill_ctx"] == 0 for r in rows)
