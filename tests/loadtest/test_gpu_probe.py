"""`loadtest.gpu_probe` on the CPU with a tiny model: batch plans, KV writes, attention over
the cache, and the CSV the measurement writes. (The real run is on a GPU, see docs/BENCHMARKS.md.)"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from loadtest import gpu_probe as gp  # noqa: E402

CPU = torch.device("cpu")


def tiny_model_and_cache(spec: gp.BatchSpec, num_buffers: int | None = None):
    cfg = gp.TINY
    model = gp.RandomDecoder(cfg, CPU, torch.float32, max_positions=spec.max_position + 1)
    cache = gp.KVCache(cfg, spec.kv_tokens, num_buffers or cfg.num_layers, CPU, torch.float32)
    return model, cache


def test_plan_layout_of_a_mixed_batch() -> None:
    # One chunk of 3 new tokens on 5 cached ones, then decodes at contexts 4, 4 and 2.
    plan = gp.Plan(gp.BatchSpec(((3, 5),), (4, 4, 2)), gp.TINY, CPU)
    assert plan.num_tokens == 3 + 3
    assert plan.q_lens == [3, 1, 1, 1]
    assert plan.kv_lens == [8, 5, 5, 3]  # the chunk attends to context + chunk; a decode to ctx + itself
    assert plan.total_kv == 21
    assert plan.positions.tolist() == [5, 6, 7, 4, 4, 2]
    # New K/V go right after each sequence's cached context in the flat cache.
    assert plan.slots.tolist() == [5, 6, 7, 8 + 4, 13 + 4, 18 + 2]
    assert plan.cu_seqlens_q.tolist() == [0, 3, 4, 5, 6]
    assert plan.cu_seqlens_k.tolist() == [0, 8, 13, 18, 21]
    assert plan.last_token_idx.tolist() == [2, 3, 4, 5]
    # The "split" attention: the chunk and the decodes as two varlen calls, each from offset 0.
    assert (plan.num_prefill_q, plan.num_prefill_kv) == (3, 8)
    cu_q, cu_k, max_q, max_k = plan.prefill_part
    assert (cu_q.tolist(), cu_k.tolist(), max_q, max_k) == ([0, 3], [0, 8], 3, 8)
    cu_q, cu_k, max_q, max_k = plan.decode_part
    assert (cu_q.tolist(), cu_k.tolist(), max_q, max_k) == ([0, 1, 2, 3], [0, 5, 10, 13], 1, 5)
    assert gp.Plan(gp.BatchSpec((), (4,)), gp.TINY, CPU).prefill_part is None
    assert gp.Plan(gp.BatchSpec(((4, 0),), ()), gp.TINY, CPU).decode_part is None
    # Equal-context decodes are batched into one SDPA group.
    assert [(g.num_seqs, g.q_len, g.kv_len) for g in plan.groups] == [(1, 3, 8), (2, 1, 5), (1, 1, 3)]


def test_lower_right_mask_lets_a_chunk_see_its_prior_context() -> None:
    mask = gp.lower_right_causal_mask(2, 5, CPU)  # 2 new tokens on 3 cached ones
    assert mask.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]


def test_sdpa_attention_matches_the_reference_with_gqa() -> None:
    spec = gp.BatchSpec(((6, 10),), (7, 7, 7, 3))
    plan = gp.Plan(spec, gp.TINY, CPU)
    gen = torch.Generator().manual_seed(0)
    cfg = gp.TINY
    q = torch.randn(plan.num_tokens, cfg.num_heads, cfg.head_dim, generator=gen)
    k = torch.randn(plan.total_kv, cfg.num_kv_heads, cfg.head_dim, generator=gen)
    v = torch.randn(plan.total_kv, cfg.num_kv_heads, cfg.head_dim, generator=gen)
    out = gp.attention_sdpa(q, k, v, plan)
    assert out.shape == (plan.num_tokens, cfg.num_heads, cfg.head_dim)
    torch.testing.assert_close(out, gp.attention_reference(q, k, v, plan), atol=1e-5, rtol=1e-5)


def test_chunk_reads_its_prior_context_and_nothing_outside_its_slice() -> None:
    spec = gp.BatchSpec(((4, 6),), (5,))
    plan = gp.Plan(spec, gp.TINY, CPU)
    cfg = gp.TINY
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(plan.num_tokens, cfg.num_heads, cfg.head_dim, generator=gen)
    k = torch.randn(plan.total_kv, cfg.num_kv_heads, cfg.head_dim, generator=gen)
    v = torch.randn(plan.total_kv, cfg.num_kv_heads, cfg.head_dim, generator=gen)
    base = gp.attention_sdpa(q, k, v, plan)
    # Changing the chunk's cached context (slots 0..5) changes the chunk's output, not the decode's.
    v2 = v.clone()
    v2[0] += 1.0
    changed = gp.attention_sdpa(q, k, v2, plan)
    assert not torch.allclose(changed[:4], base[:4])
    torch.testing.assert_close(changed[4:], base[4:])
    # The decode (slice 10..15) attends to its context and its own new token, nothing else.
    v3 = v.clone()
    v3[10:16] += 1.0
    changed = gp.attention_sdpa(q, k, v3, plan)
    torch.testing.assert_close(changed[:4], base[:4])
    assert not torch.allclose(changed[4:], base[4:])


def test_forward_writes_new_kv_at_the_slots_and_returns_last_token_logits() -> None:
    spec = gp.BatchSpec(((5, 3),), (4, 4))
    model, cache = tiny_model_and_cache(spec)
    plan = gp.Plan(spec, gp.TINY, CPU)
    before = [k.clone() for k in cache.k]
    logits = gp.forward(model, cache, plan)
    assert logits.shape == (3, gp.TINY.vocab)  # one row per sequence (chunk + 2 decodes)
    assert torch.isfinite(logits).all()
    slots = set(plan.slots.tolist())
    for layer in range(gp.TINY.num_layers):
        k_after = cache.layer(layer)[0]
        for i in range(plan.total_kv):
            assert torch.equal(k_after[i], before[layer][i]) == (i not in slots), (layer, i)


def test_forward_with_shared_kv_buffers_runs() -> None:
    spec = gp.BatchSpec(((4, 0),), ())
    model, cache = tiny_model_and_cache(spec, num_buffers=1)
    assert cache.layer(0)[0] is cache.layer(1)[0]
    assert gp.forward(model, cache, gp.Plan(spec, gp.TINY, CPU)).shape == (1, gp.TINY.vocab)


def test_grid_and_sweep_shapes() -> None:
    grid = gp.grid_specs()
    assert len(grid) == 135
    sweep = gp.sweep_specs()
    assert {b: sum(r["budget_tokens"] == b for r in sweep) for b in gp.SWEEP_BUDGETS} == {
        64: 32, 128: 16, 256: 8, 384: 6, 512: 4, 768: 3, 1024: 2,
    }
    for b in gp.SWEEP_BUDGETS:
        assert sum(r["prefill_tokens"] for r in sweep if r["budget_tokens"] == b) == gp.SWEEP_PROMPT_TOKENS


def test_measure_writes_csv_and_sidecar(tmp_path: Path) -> None:
    out = tmp_path / "probe.csv"
    # Rows 0 (8 decodes @256), 15 (prefill 64), 120 (prefill 512 @3072 context).
    rc = gp.main(["--tiny", "--device", "cpu", "--rows", "0,15,120", "--no-sweep", "--warmup", "1", "--reps", "2",
                  "--out", str(out)])
    assert rc == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == gp.CSV_COLUMNS
    assert [(r["prefill_tokens"], r["prefill_ctx"], r["num_decodes"], r["decode_ctx"]) for r in rows] == [
        ("0", "0", "8", "256"), ("64", "0", "0", "0"), ("512", "3072", "0", "0"),
    ]
    assert all(float(r["iter_ms"]) > 0 and r["reps"] == "2" for r in rows)
    assert [int(r["batch_tokens"]) for r in rows] == [8, 64, 512]
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["rows"] == 3 and meta["attention"]["used"] == "sdpa"
    assert meta["model"]["num_layers"] == gp.TINY.num_layers
    assert meta["harness"]["does_not"]


def test_a_custom_grid_is_probed_instead_of_the_vidur_one(tmp_path: Path) -> None:
    grid = tmp_path / "grid.csv"  # e.g. python -m loadtest.tile_quantization --write-probe-grid's shapes
    grid.write_text("prefill_tokens,prefill_ctx,num_decodes,decode_ctx\n72,0,0,0\n0,0,3,40\n")
    out = tmp_path / "probe.csv"
    assert gp.main(["--tiny", "--device", "cpu", "--grid", str(grid), "--no-sweep", "--warmup", "1", "--reps", "1",
                    "--out", str(out)]) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["prefill_tokens"], r["num_decodes"], r["decode_ctx"]) for r in rows] == [("72", "0", "0"),
                                                                                        ("0", "3", "40")]


def test_compare_runs_on_a_probe_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A synthetic probe file: the Vidur-derived table's own times, so the fit reproduces the shipped profile.
    out = tmp_path / "probe.csv"
    with open(gp.GRID_CSV, newline="") as f, open(out, "w", newline="") as g:
        writer = csv.DictWriter(g, fieldnames=gp.CSV_COLUMNS)
        writer.writeheader()
        for r in csv.DictReader(f):
            writer.writerow({
                "source": "vidur_grid", "budget_tokens": 0,
                **{k: r[k] for k in ("prefill_tokens", "prefill_ctx", "num_decodes", "decode_ctx")},
                "batch_tokens": r["batch_tokens"], "iter_ms": r["iter_ms"], "iter_ms_min": r["iter_ms"],
                "iter_ms_max": r["iter_ms"], "cpu_issue_ms": 1.0, "graph_iter_ms": "nan", "reps": 1,
            })
    assert gp.main(["compare", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| shipped h100-mistral7b | all | 135 | 5.0% |" in text
    assert "| fit to measured iter_ms | 5.49187 | 0.0269251 |" in text
