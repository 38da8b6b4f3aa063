"""Time real engine iterations of a Mistral-7B-shaped model on a GPU, to check a cost profile.

    python loadtest/gpu_probe.py --out h100_torch_probe.csv              # on the GPU machine
    python loadtest/gpu_probe.py --attention split --no-sweep --breakdown-rows 0,14,58,67,95,110,132 \
        --out h100_torch_probe_split.csv                                 # the same grid, split attention
    python -m loadtest.gpu_probe merge h100_torch_probe.csv h100_torch_probe_split.csv   # -> split_* columns
    python -m loadtest.gpu_probe compare replica/cost/data/h100_torch_probe.csv     # profile vs measured
    python -m loadtest.gpu_probe --tiny --device cpu --rows 0,15 --out /tmp/p.csv   # CPU smoke run

Measuring (`--out`) needs only torch, numpy and the standard library, so it runs where the
project's own dependencies (pydantic, ...) are not installed, as a file or with `-m` (it imports
no project code; the Vidur grid it times is read by path from `replica/cost/data/`).
`compare` needs the project (it loads the shipped profile and uses `loadtest.calibrate`'s fit).

What one measured iteration is
------------------------------
One forward pass of a decoder with Mistral-7B-Instruct-v0.2's shapes and RANDOM bf16 weights
(32 layers, hidden 4096, 32 query heads, 8 KV heads, head_dim 128, SiLU-gated MLP with
intermediate 14336, vocab 32000, RMSNorm, RoPE with theta 1e6) over one mixed batch: prefill
chunks (p new tokens on top of c tokens already in the KV cache) and decodes (one new token on
top of ctx cached tokens). Per layer: RMSNorm, fused QKV GEMM, RoPE, writing the new K/V into a
preallocated cache at per-token slots (as vLLM's reshape_and_cache does), attention over the cache
(prior context + the new tokens; causal, aligned bottom-right for chunks with prior context),
output projection, residual, RMSNorm, fused gate/up GEMM, SiLU*up, down GEMM, residual. Then the
final norm and the LM head for the last token of each sequence only (vLLM's logits_indices).

Attention (`--attention`): `varlen` (default on CUDA) is one varlen FlashAttention-2 call for the
whole batch (torch's bundled kernel, `aten::_flash_attention_forward` with cu_seqlens, GQA
native), like vLLM's single `flash_attn_varlen_func` call for prefill and decode together. `split`
makes two such calls, the prefill chunks and then the decodes; with max_q = 1 the decode call
takes FlashAttention-2's decode path (the query heads of one KV head packed together), which a
mixed single call does not (on the H100 the decodes' attention inside a mixed call cost about 4x
more; docs/BENCHMARKS.md, section 5). Vidur, whose table the h100 profile was fitted to, times
prefill and decode attention as separate operators, i.e. like `split`. Before timing, the chosen
kernel is checked against a float32 reference on a small mixed batch; if it fails or disagrees,
the probe falls back to torch SDPA per group (`sdpa`: the chunk with a bottom-right causal mask,
equal-context decodes batched) and records that in the sidecar JSON.

Timing: `--warmup` untimed iterations, then `--reps` timed ones; before each timed iteration the
GPU is synchronised (vLLM also waits for every step's sampled tokens), then CUDA events around the
forward. Reported: the median (`iter_ms`), min and max, the median host time to issue the forward
(`cpu_issue_ms`), and `graph_iter_ms`: the same forward captured once as a CUDA graph and replayed
(GPU time without launch gaps; vLLM replays full graphs for decode-only batches and piecewise
graphs, attention outside, for small mixed batches). `iter_ms` uses no CUDA graphs.

What it does not do, compared with vLLM (see `HARNESS_NOTES`): no paged KV cache (each sequence's
KV is contiguous: block tables cost decode attention a little), FlashAttention-2 rather than the
FlashAttention-3 kernels vLLM uses on Hopper (prefill attention likely slower here), no torch.compile
fusions (RoPE, SiLU*up, residual+norm are separate eager kernels: extra launches and memory
traffic), no sampling, no scheduler / input preparation / detokenisation on the CPU.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

if __name__ == "__main__" and sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    # Run as a file: keep this directory's modules off the path, where they could shadow others.
    sys.path.pop(0)

import numpy as np
import torch
import torch.nn.functional as F

DATA_DIR = Path(__file__).resolve().parents[1] / "replica" / "cost" / "data"  # by path: measuring imports no project code
GRID_CSV = DATA_DIR / "vidur_mistral7b_h100.csv"
SWEEP_PROMPT_TOKENS = 2048
SWEEP_BUDGETS = (64, 128, 256, 384, 512, 768, 1024)
GIB = 1024**3

CSV_COLUMNS = (
    "source", "budget_tokens", "prefill_tokens", "prefill_ctx", "num_decodes", "decode_ctx",
    "batch_tokens", "iter_ms", "iter_ms_min", "iter_ms_max", "cpu_issue_ms", "graph_iter_ms", "reps",
)

HARNESS_NOTES = {
    "does": [
        "one forward of a Mistral-7B-shaped decoder, random bf16 weights, all 32 layers",
        "mixed batch: prefill chunks with prior KV context plus decodes, in one forward",
        "new K/V written into a preallocated cache at per-token slots (index_copy_), attention over the cache",
        "attention 'varlen': one varlen FlashAttention-2 call per layer for all sequences (causal, bottom-right "
        "aligned), GQA native; 'split': one call for the prefill chunks and one for the decodes",
        "final RMSNorm + LM head for the last token of each sequence only",
        "GPU synchronised before each timed iteration; CUDA events; median of reps",
        "graph_iter_ms: the same forward as one CUDA graph (GPU time without launch gaps)",
    ],
    "does_not": [
        "no paged KV cache / block table (contiguous KV per sequence): decode attention slightly faster than vLLM's",
        "FlashAttention-2 (torch's bundled kernel), not the FlashAttention-3 that vLLM uses on Hopper: prefill attention slower",
        "no torch.compile / fused custom ops: RoPE, SiLU*up, residual add and RMSNorm are separate eager kernels",
        "iter_ms uses no CUDA graphs: at small batches it includes eager launch gaps vLLM avoids with graphs",
        "no sampling, no logits processing, no CPU scheduling, input preparation or detokenisation",
        "KV cache buffers are shared between layers when all 32 do not fit (each layer still reads and writes its own full context; a shared buffer is then far larger than L2)",
    ],
}


# ------------------------------------------------------------------------------------ model


@dataclass(frozen=True)
class ModelConfig:
    """Decoder shape. The default is Mistral-7B-Instruct-v0.2."""

    num_layers: int = 32
    hidden: int = 4096
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    intermediate: int = 14336
    vocab: int = 32000
    rope_theta: float = 1.0e6
    rms_eps: float = 1.0e-5

    @property
    def kv_bytes_per_token_per_layer(self) -> int:
        """K and V of one token in one layer, bf16."""
        return 2 * self.num_kv_heads * self.head_dim * 2


MISTRAL_7B = ModelConfig()
TINY = ModelConfig(num_layers=2, hidden=64, num_heads=4, num_kv_heads=2, head_dim=16, intermediate=128, vocab=256)


class RandomDecoder:
    """Random weights in `dtype` on `device`, laid out as vLLM fuses them (QKV, gate/up)."""

    def __init__(self, cfg: ModelConfig, device: torch.device, dtype: torch.dtype, max_positions: int, seed: int = 0):
        self.cfg, self.device, self.dtype = cfg, device, dtype
        gen = torch.Generator(device=device).manual_seed(seed)

        def linear(out_features: int, in_features: int) -> torch.Tensor:
            w = torch.empty(out_features, in_features, device=device, dtype=dtype)
            return w.normal_(0.0, 1.0 / math.sqrt(in_features), generator=gen)

        h, hd = cfg.hidden, cfg.head_dim
        qkv_out = (cfg.num_heads + 2 * cfg.num_kv_heads) * hd
        self.embed = torch.empty(cfg.vocab, h, device=device, dtype=dtype).normal_(0.0, 1.0, generator=gen)
        self.layers = [
            {
                "in_norm": torch.ones(h, device=device, dtype=dtype),
                "qkv": linear(qkv_out, h),
                "o": linear(h, cfg.num_heads * hd),
                "post_norm": torch.ones(h, device=device, dtype=dtype),
                "gate_up": linear(2 * cfg.intermediate, h),
                "down": linear(h, cfg.intermediate),
            }
            for _ in range(cfg.num_layers)
        ]
        self.final_norm = torch.ones(h, device=device, dtype=dtype)
        self.lm_head = linear(cfg.vocab, h)
        # RoPE tables, rotate-half convention: x*cos + roll(x, hd/2)*sin_signed.
        inv_freq = cfg.rope_theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        freqs = torch.arange(max_positions, dtype=torch.float64)[:, None] * inv_freq[None, :]
        self.rope_cos = torch.cat([freqs.cos(), freqs.cos()], dim=-1).to(device=device, dtype=dtype)
        self.rope_sin = torch.cat([-freqs.sin(), freqs.sin()], dim=-1).to(device=device, dtype=dtype)

    def num_params(self) -> int:
        tensors = [self.embed, self.final_norm, self.lm_head] + [t for layer in self.layers for t in layer.values()]
        return sum(t.numel() for t in tensors)


class KVCache:
    """Flat per-layer K and V buffers, [tokens, num_kv_heads, head_dim]; sequence s owns the slice
    [kv_start_s, kv_start_s + kv_len_s). Layer i uses buffer i % num_buffers."""

    def __init__(self, cfg: ModelConfig, max_tokens: int, num_buffers: int, device: torch.device, dtype: torch.dtype):
        shape = (max_tokens, cfg.num_kv_heads, cfg.head_dim)
        gen = torch.Generator(device=device).manual_seed(1)
        self.k = [torch.empty(shape, device=device, dtype=dtype).normal_(0.0, 1.0, generator=gen) for _ in range(num_buffers)]
        self.v = [torch.empty(shape, device=device, dtype=dtype).normal_(0.0, 1.0, generator=gen) for _ in range(num_buffers)]
        self.max_tokens, self.num_buffers = max_tokens, num_buffers

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i % self.num_buffers], self.v[i % self.num_buffers]


# ------------------------------------------------------------------------------------ batches


@dataclass(frozen=True)
class BatchSpec:
    """One engine iteration: prefill chunks `(new_tokens, prior_ctx)` and decode contexts (tokens
    already in the KV cache; each decode adds one token that attends to ctx + 1 keys)."""

    prefill_chunks: tuple[tuple[int, int], ...] = ()
    decode_ctxs: tuple[int, ...] = ()

    @classmethod
    def of_row(cls, prefill_tokens: int, prefill_ctx: int, num_decodes: int, decode_ctx: int) -> "BatchSpec":
        chunks = ((prefill_tokens, prefill_ctx),) if prefill_tokens else ()
        return cls(chunks, (decode_ctx,) * num_decodes)

    @property
    def num_tokens(self) -> int:
        return sum(p for p, _ in self.prefill_chunks) + len(self.decode_ctxs)

    @property
    def kv_tokens(self) -> int:
        """Cache slots the batch uses: every sequence's prior context plus its new tokens."""
        return sum(p + c for p, c in self.prefill_chunks) + sum(c + 1 for c in self.decode_ctxs)

    @property
    def max_position(self) -> int:
        return max([p + c for p, c in self.prefill_chunks] + [c + 1 for c in self.decode_ctxs] + [1])


@dataclass(frozen=True)
class SeqGroup:
    """Consecutive sequences with the same (q_len, kv_len), for the per-group SDPA path."""

    q_start: int
    kv_start: int
    num_seqs: int
    q_len: int
    kv_len: int


class Plan:
    """Device tensors and indices of one batch, built once per shape (outside the timed region,
    as vLLM prepares inputs before launching the forward)."""

    def __init__(self, spec: BatchSpec, cfg: ModelConfig, device: torch.device, seed: int = 0):
        seqs = [(p, c) for p, c in spec.prefill_chunks] + [(1, c) for c in spec.decode_ctxs]  # (q_len, prior ctx)
        if not seqs:
            raise ValueError("empty batch")
        positions, slots, q_lens, kv_lens, groups = [], [], [], [], []
        q_start = kv_start = 0
        for q_len, ctx in seqs:
            kv_len = ctx + q_len
            positions.extend(range(ctx, kv_len))
            slots.extend(range(kv_start + ctx, kv_start + kv_len))
            last = groups[-1] if groups else None
            if last and q_len == 1 and last.q_len == 1 and last.kv_len == kv_len:
                groups[-1] = SeqGroup(last.q_start, last.kv_start, last.num_seqs + 1, 1, kv_len)
            else:
                groups.append(SeqGroup(q_start, kv_start, 1, q_len, kv_len))
            q_lens.append(q_len)
            kv_lens.append(kv_len)
            q_start += q_len
            kv_start += kv_len
        gen = torch.Generator().manual_seed(seed)
        self.spec = spec
        self.num_tokens = q_start
        self.total_kv = kv_start
        self.q_lens, self.kv_lens = q_lens, kv_lens
        self.groups = groups
        self.max_q, self.max_k = max(q_lens), max(kv_lens)
        self.input_ids = torch.randint(0, cfg.vocab, (self.num_tokens,), generator=gen).to(device)
        self.positions = torch.tensor(positions, dtype=torch.long, device=device)
        self.slots = torch.tensor(slots, dtype=torch.long, device=device)
        cu_q = np.concatenate([[0], np.cumsum(q_lens)])
        cu_k = np.concatenate([[0], np.cumsum(kv_lens)])
        self.cu_seqlens_q = torch.tensor(cu_q, dtype=torch.int32, device=device)
        self.cu_seqlens_k = torch.tensor(cu_k, dtype=torch.int32, device=device)
        self.last_token_idx = torch.tensor(cu_q[1:] - 1, dtype=torch.long, device=device)
        # The same batch as two varlen calls, prefill chunks then decodes (the "split" attention).
        n_chunks = len(spec.prefill_chunks)
        self.num_prefill_q, self.num_prefill_kv = int(cu_q[n_chunks]), int(cu_k[n_chunks])
        self.prefill_part = self.decode_part = None
        if n_chunks:
            self.prefill_part = (self.cu_seqlens_q[:n_chunks + 1], self.cu_seqlens_k[:n_chunks + 1],
                                 max(q_lens[:n_chunks]), max(kv_lens[:n_chunks]))
        if len(seqs) > n_chunks:
            self.decode_part = (
                torch.tensor(cu_q[n_chunks:] - cu_q[n_chunks], dtype=torch.int32, device=device),
                torch.tensor(cu_k[n_chunks:] - cu_k[n_chunks], dtype=torch.int32, device=device),
                max(q_lens[n_chunks:]), max(kv_lens[n_chunks:]),
            )


# ------------------------------------------------------------------------------------ attention


def lower_right_causal_mask(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """Boolean [q_len, kv_len] mask, True = attend: query i (the (kv_len - q_len + i)-th token of
    its sequence) sees keys 0 .. kv_len - q_len + i, i.e. the prior context and the chunk so far."""
    i = torch.arange(q_len, device=device)[:, None]
    j = torch.arange(kv_len, device=device)[None, :]
    return j <= (kv_len - q_len) + i


def attention_sdpa(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: Plan) -> torch.Tensor:
    """Per-group SDPA over the cache: q [T, H, D] -> [T, H, D]. A chunk attends to its prior
    context and itself (bottom-right causal); equal-context decodes are batched in one call."""
    out = torch.empty_like(q)
    heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = k_cache.shape[1]
    on_cuda = q.device.type == "cuda"
    for g in plan.groups:
        n_q, n_kv = g.num_seqs * g.q_len, g.num_seqs * g.kv_len
        qg = q[g.q_start:g.q_start + n_q].view(g.num_seqs, g.q_len, heads, head_dim).transpose(1, 2)
        kg = k_cache[g.kv_start:g.kv_start + n_kv].view(g.num_seqs, g.kv_len, kv_heads, head_dim).transpose(1, 2)
        vg = v_cache[g.kv_start:g.kv_start + n_kv].view(g.num_seqs, g.kv_len, kv_heads, head_dim).transpose(1, 2)
        if g.q_len == 1:
            mask = None  # a decode sees its whole context
        elif on_cuda:
            from torch.nn.attention.bias import causal_lower_right

            mask = causal_lower_right(g.q_len, g.kv_len)
        else:
            mask = lower_right_causal_mask(g.q_len, g.kv_len, q.device)
        og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, enable_gqa=heads != kv_heads)
        out[g.q_start:g.q_start + n_q] = og.transpose(1, 2).reshape(n_q, heads, head_dim)
    return out


def attention_varlen_flash(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: Plan) -> torch.Tensor:
    """One FlashAttention-2 varlen call for all sequences (CUDA only); causal is bottom-right
    aligned per sequence in FlashAttention >= 2.1."""
    return _flash_varlen(q, k_cache[:plan.total_kv], v_cache[:plan.total_kv], plan.cu_seqlens_q,
                         plan.cu_seqlens_k, plan.max_q, plan.max_k)


def _flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k):
    return torch.ops.aten._flash_attention_forward(
        q, k, v, cu_q, cu_k, max_q, max_k, 0.0, True, False, scale=q.shape[-1] ** -0.5,
    )[0]


def attention_split_flash(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: Plan) -> torch.Tensor:
    """Two FlashAttention-2 varlen calls (CUDA only): the prefill chunks, then the decodes. With
    max_q = 1 the decode call takes FlashAttention-2's decode path (the query heads that share a
    KV head packed into one query tile, so each KV head is read once); in a mixed single call every
    sequence gets whole query tiles per query head, one valid row for a decode."""
    tq, tk = plan.num_prefill_q, plan.num_prefill_kv
    parts = []
    if plan.prefill_part is not None:
        parts.append(_flash_varlen(q[:tq], k_cache[:tk], v_cache[:tk], *plan.prefill_part))
    if plan.decode_part is not None:
        parts.append(_flash_varlen(q[tq:], k_cache[tk:plan.total_kv], v_cache[tk:plan.total_kv], *plan.decode_part))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: Plan) -> torch.Tensor:
    """Slow float32 reference: each sequence's queries against its cache slice, explicit mask."""
    heads, kv_heads = q.shape[1], k_cache.shape[1]
    rep = heads // kv_heads
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    q_start = kv_start = 0
    for q_len, kv_len in zip(plan.q_lens, plan.kv_lens):
        qs = q[q_start:q_start + q_len].float().transpose(0, 1)  # [H, q, D]
        ks = k_cache[kv_start:kv_start + kv_len].float().repeat_interleave(rep, dim=1).transpose(0, 1)
        vs = v_cache[kv_start:kv_start + kv_len].float().repeat_interleave(rep, dim=1).transpose(0, 1)
        scores = qs @ ks.transpose(1, 2) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~lower_right_causal_mask(q_len, kv_len, q.device), float("-inf"))
        out[q_start:q_start + q_len] = (scores.softmax(-1) @ vs).transpose(0, 1)
        q_start += q_len
        kv_start += kv_len
    return out


ATTENTION = {"varlen": attention_varlen_flash, "split": attention_split_flash, "sdpa": attention_sdpa}


# ------------------------------------------------------------------------------------ forward


def forward(model: RandomDecoder, cache: KVCache, plan: Plan, attention=attention_sdpa) -> torch.Tensor:
    """One engine iteration; returns the logits of each sequence's last token, [num_seqs, vocab]."""
    cfg = model.cfg
    t, nh, nkv, hd = plan.num_tokens, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    cos = model.rope_cos[plan.positions][:, None, :]
    sin = model.rope_sin[plan.positions][:, None, :]
    residual = model.embed[plan.input_ids]
    for i, w in enumerate(model.layers):
        h = F.rms_norm(residual, (cfg.hidden,), w["in_norm"], cfg.rms_eps)
        qkv = F.linear(h, w["qkv"])
        qk = qkv[:, :(nh + nkv) * hd].view(t, nh + nkv, hd)
        qk = torch.addcmul(qk * cos, qk.roll(hd // 2, dims=-1), sin)  # RoPE on q and k together
        q = qk[:, :nh].contiguous()
        k = qk[:, nh:]
        v = qkv[:, (nh + nkv) * hd:].view(t, nkv, hd)
        k_cache, v_cache = cache.layer(i)
        k_cache.index_copy_(0, plan.slots, k)
        v_cache.index_copy_(0, plan.slots, v)
        attn = attention(q, k_cache, v_cache, plan)
        residual = residual + F.linear(attn.reshape(t, nh * hd), w["o"])
        h = F.rms_norm(residual, (cfg.hidden,), w["post_norm"], cfg.rms_eps)
        gate, up = F.linear(h, w["gate_up"]).chunk(2, dim=-1)
        residual = residual + F.linear(F.silu(gate) * up, w["down"])
    last = F.rms_norm(residual[plan.last_token_idx], (cfg.hidden,), model.final_norm, cfg.rms_eps)
    return F.linear(last, model.lm_head)


# ------------------------------------------------------------------------------------ shapes


def grid_specs(path: Path = GRID_CSV) -> list[dict]:
    """The batch shapes of the Vidur-derived table the h100 profile was fitted to."""
    with open(path, newline="", encoding="utf-8") as f:
        return [
            {
                "source": "vidur_grid", "budget_tokens": 0,
                **{k: int(r[k]) for k in ("prefill_tokens", "prefill_ctx", "num_decodes", "decode_ctx")},
            }
            for r in csv.DictReader(f)
        ]


def sweep_specs(prompt_tokens: int = SWEEP_PROMPT_TOKENS, budgets=SWEEP_BUDGETS) -> list[dict]:
    """The SLAI token-budget sweep: one prompt prefilled alone in chunks of B tokens."""
    rows = []
    for b in budgets:
        for done in range(0, prompt_tokens, b):
            rows.append({
                "source": "budget_sweep", "budget_tokens": b, "prefill_tokens": min(b, prompt_tokens - done),
                "prefill_ctx": done, "num_decodes": 0, "decode_ctx": 0,
            })
    return rows


def row_spec(row: dict) -> BatchSpec:
    return BatchSpec.of_row(row["prefill_tokens"], row["prefill_ctx"], row["num_decodes"], row["decode_ctx"])


# ------------------------------------------------------------------------------------ timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_eager(fn, device: torch.device, warmup: int, reps: int) -> tuple[list[float], list[float]]:
    """Per rep: synchronise, then time `fn()` (GPU: CUDA events; CPU: wall clock). Returns
    (iteration times ms, host issue times ms)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    iter_ms, issue_ms = [], []
    for _ in range(reps):
        _sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            t0 = time.perf_counter()
            fn()
            t1 = time.perf_counter()
            end.record()
            end.synchronize()
            iter_ms.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            t1 = time.perf_counter()
            iter_ms.append(1000.0 * (t1 - t0))
        issue_ms.append(1000.0 * (t1 - t0))
    return iter_ms, issue_ms


def time_graph(fn, device: torch.device, reps: int) -> list[float]:
    """Capture `fn` as one CUDA graph, replay it `reps` times (each synchronised, CUDA events)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    graph.replay()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return times


SELF_CHECK_SPEC = BatchSpec(((48, 80),), (33, 33, 33, 200))  # chunk with prior context + two decode groups


def self_check(model: RandomDecoder, cache: KVCache, device: torch.device, attention_name: str) -> dict:
    """Run the chosen attention on a small mixed batch (chunk with prior context + decodes of two
    context lengths) against the float32 reference; falls back to `sdpa` if it fails or differs."""
    cfg = model.cfg
    plan = Plan(SELF_CHECK_SPEC, cfg, device, seed=7)
    gen = torch.Generator(device=device).manual_seed(3)
    q = torch.randn(plan.num_tokens, cfg.num_heads, cfg.head_dim, device=device, generator=gen).to(model.dtype)
    k_cache, v_cache = cache.layer(0)
    ref = attention_reference(q, k_cache, v_cache, plan)
    result = {"checked": attention_name}
    for name in dict.fromkeys([attention_name, "sdpa"]):
        try:
            got = ATTENTION[name](q, k_cache, v_cache, plan).float()
            rel = float((got - ref).abs().max() / ref.abs().max())
            result[f"{name}_max_rel_diff"] = rel
            if rel < 2e-2:
                result["used"] = name
                return result
        except Exception as e:  # noqa: BLE001 - any kernel failure means: use the fallback
            result[f"{name}_error"] = f"{type(e).__name__}: {e}"[:500]
    raise RuntimeError(f"no attention implementation matches the reference: {result}")


KERNEL_CATEGORIES = (  # (category, substrings of the kernel name), first match wins
    ("attention", ("flash",)),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_", "sm80_")),
    ("kv_write", ("index_copy", "indexcopy", "index_put")),
)


def kernel_category(name: str) -> str:
    lower = name.lower()
    for category, keys in KERNEL_CATEGORIES:
        if any(k in lower for k in keys):
            return category
    return "other"


def kernel_breakdown(fn, device: torch.device, reps: int = 3) -> dict:
    """GPU kernel time per forward by category (torch.profiler), and the top kernels by time."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    _sync(device)
    on_cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(reps):
            fn()
        _sync(device)
    per_kernel: dict[str, float] = {}
    for evt in prof.events():
        if on_cuda:  # GPU kernels only
            if evt.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = evt.device_time_total
        else:  # CPU smoke runs: top-level operators
            if evt.cpu_parent is not None:
                continue
            us = evt.cpu_time_total
        per_kernel[evt.name] = per_kernel.get(evt.name, 0.0) + us / 1000.0 / reps
    totals: dict[str, float] = {}
    for name, ms in per_kernel.items():
        totals[kernel_category(name)] = totals.get(kernel_category(name), 0.0) + ms
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:8]
    return {
        "kernel_ms_per_forward": {k: round(v, 3) for k, v in sorted(totals.items())},
        "kernel_ms_total": round(sum(totals.values()), 3),
        "top_kernels": [[name[:120], round(ms, 3)] for name, ms in top],
    }


def device_info(device: torch.device) -> dict:
    info = {
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "host": platform.node(), "device": str(device), "cpu_count": os.cpu_count(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            device_name=torch.cuda.get_device_name(device), capability=f"{props.major}.{props.minor}",
            total_memory_gib=round(props.total_memory / GIB, 2), multiprocessors=props.multi_processor_count,
            cudnn=torch.backends.cudnn.version(),
        )
        try:
            from torch.nn import attention as _attn

            info["flash_attention_impls"] = list(_attn.list_flash_attention_impls())
            info["flash_attention_impl_active"] = str(_attn.current_flash_attention_impl())
        except Exception as e:  # noqa: BLE001 - informational only
            info["flash_attention_impls"] = f"unavailable: {type(e).__name__}"
    else:
        info["device_name"] = platform.processor() or platform.machine()
    return info


def measure(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    ]
    cfg = TINY if args.tiny else MISTRAL_7B
    overrides = {k: getattr(args, k) for k in ("num_layers", "hidden", "intermediate") if getattr(args, k)}
    if overrides:
        cfg = ModelConfig(**{**asdict(cfg), **overrides})

    rows = grid_specs(args.grid)
    if args.rows:
        rows = [rows[int(i)] for i in args.rows.split(",")]
    if args.sweep:
        rows += sweep_specs()
    specs = [row_spec(r) for r in rows]

    torch.manual_seed(0)
    model = RandomDecoder(cfg, device, dtype, max_positions=max(s.max_position for s in specs) + 1)
    max_kv = max([s.kv_tokens for s in specs] + [SELF_CHECK_SPEC.kv_tokens])
    per_buffer = max_kv * cfg.kv_bytes_per_token_per_layer
    num_buffers = cfg.num_layers
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        num_buffers = max(1, min(cfg.num_layers, int((free - args.reserve_gib * GIB) // per_buffer)))
    cache = KVCache(cfg, max_kv, num_buffers, device, dtype)
    _sync(device)
    info = device_info(device)
    print(f"device: {info['device_name']} | torch {info['torch']} cuda {info['cuda']} | "
          f"{model.num_params() / 1e9:.3f} B params {dtype} | KV buffers {num_buffers} x {per_buffer / GIB:.2f} GiB "
          f"for {cfg.num_layers} layers | setup {time.perf_counter() - t_start:.1f} s", flush=True)

    attention_name = args.attention or ("varlen" if device.type == "cuda" else "sdpa")
    check = self_check(model, cache, device, attention_name)
    attention = ATTENTION[check["used"]]
    print(f"attention self-check: {check}", flush=True)

    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "what": "median iteration time (ms) of one forward of a Mistral-7B-shaped decoder with random weights "
                "per batch shape; see loadtest/gpu_probe.py",
        "command": " ".join(sys.argv),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device_info": info,
        "model": asdict(cfg), "dtype": str(dtype).removeprefix("torch."), "params": model.num_params(),
        "kv_buffers": num_buffers, "kv_buffer_gib": round(per_buffer / GIB, 3),
        "attention": check, "warmup": args.warmup, "reps": args.reps, "graph": bool(args.graph),
        "rows": "in progress", "run_seconds": None,
        "harness": HARNESS_NOTES,
        "columns": {
            "iter_ms": "median over reps of CUDA-event time of one eager forward, GPU synchronised before each",
            "iter_ms_min/iter_ms_max": "min and max over reps",
            "cpu_issue_ms": "median host time to issue the eager forward (Python + launches)",
            "graph_iter_ms": "median replay time of the forward captured as one CUDA graph (NaN: not measured)",
            "decode_ctx": "tokens already in the KV cache per decode; the decode attends to decode_ctx + 1 keys",
        },
    }
    meta_path = out_path.with_suffix(".json")
    meta_path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    out_rows = []
    csv_file = open(out_path, "w", newline="", encoding="utf-8")  # rows written as measured
    writer = csv.DictWriter(csv_file, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    with csv_file, torch.inference_mode():
        for n, (row, spec) in enumerate(zip(rows, specs)):
            plan = Plan(spec, cfg, device, seed=n)

            def fn(plan=plan):
                return forward(model, cache, plan, attention)

            iter_ms, issue_ms = time_eager(fn, device, args.warmup, args.reps)
            graph_ms = float("nan")
            if device.type == "cuda" and args.graph:
                try:
                    graph_ms = statistics.median(time_graph(fn, device, args.reps))
                except Exception as e:  # noqa: BLE001 - keep the eager number, record the failure
                    print(f"  graph capture failed: {type(e).__name__}: {e}", flush=True)
                torch.cuda.empty_cache()
            out = {
                **row, "batch_tokens": spec.num_tokens,
                "iter_ms": round(statistics.median(iter_ms), 4), "iter_ms_min": round(min(iter_ms), 4),
                "iter_ms_max": round(max(iter_ms), 4), "cpu_issue_ms": round(statistics.median(issue_ms), 4),
                "graph_iter_ms": round(graph_ms, 4), "reps": args.reps,
            }
            out_rows.append(out)
            writer.writerow(out)
            csv_file.flush()
            print(f"[{n + 1}/{len(rows)}] {row['source']:<12} p={row['prefill_tokens']}@{row['prefill_ctx']} "
                  f"d={row['num_decodes']}@{row['decode_ctx']}: iter {out['iter_ms']:.3f} ms "
                  f"(min {out['iter_ms_min']:.3f}, max {out['iter_ms_max']:.3f}) issue {out['cpu_issue_ms']:.3f} "
                  f"graph {out['graph_iter_ms']:.3f}", flush=True)

    if args.breakdown_rows:
        grid = grid_specs(args.grid)
        names = ("varlen", "split") if device.type == "cuda" else (check["used"],)
        breakdown = []
        with torch.inference_mode():
            for idx in (int(i) for i in args.breakdown_rows.split(",")):
                row = grid[idx]
                plan = Plan(row_spec(row), cfg, device, seed=idx)
                for name in names:
                    try:
                        result = kernel_breakdown(lambda: forward(model, cache, plan, ATTENTION[name]), device)
                    except Exception as e:  # noqa: BLE001 - diagnostics only
                        result = {"error": f"{type(e).__name__}: {e}"[:300]}
                    entry = {"grid_row": idx, **{k: row[k] for k in ("prefill_tokens", "prefill_ctx", "num_decodes",
                                                                     "decode_ctx")}, "attention": name, **result}
                    breakdown.append(entry)
                    print(f"breakdown row {idx} p={row['prefill_tokens']}@{row['prefill_ctx']} "
                          f"d={row['num_decodes']}@{row['decode_ctx']} {name}: "
                          f"{result.get('kernel_ms_per_forward', result)}", flush=True)
        meta["breakdown"] = breakdown

    meta["rows"] = len(out_rows)
    meta["run_seconds"] = round(time.perf_counter() - t_start, 1)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {len(out_rows)} rows to {out_path} and {meta_path} "
          f"in {meta['run_seconds']} s", flush=True)
    return 0


# ------------------------------------------------------------------------------------ compare


def shape_class(row: dict) -> str:
    if int(row["prefill_tokens"]) == 0:
        return "decode-only"
    return "prefill-only" if int(row["num_decodes"]) == 0 else "mixed"


def _read_probe(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _errors(pred: np.ndarray, meas: np.ndarray) -> np.ndarray:
    return pred / meas - 1.0


def compare(args: argparse.Namespace) -> int:
    """Print the shipped profile against the measurement, per shape class, and a refit."""
    from loadtest.calibrate import COEFFICIENT_NAMES, features, relative_nonneg_lstsq, round_sig
    from replica.cost.profile import load_profile
    from replica.cost.shape import BatchShape

    path = Path(args.csv)
    rows = _read_probe(path)
    meta_path = path.with_suffix(".json")
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        d = meta["device_info"]
        print(f"measured: {d.get('device_name')}, torch {d.get('torch')}, CUDA {d.get('cuda')}, "
              f"{meta.get('date_utc')}, attention {meta['attention'].get('used')}, {meta.get('reps')} reps")
        if "split_run" in meta:
            m = meta["split_run"]
            print(f"split_* columns: {m['device_info'].get('device_name')}, {m.get('date_utc')}, "
                  f"attention {m['attention'].get('used')}, {m.get('reps')} reps")
    profile = load_profile(args.profile)
    shipped = np.array([getattr(profile.coefficients, n) for n in COEFFICIENT_NAMES])

    def shape_of(r: dict) -> BatchShape:
        p, c = int(r["prefill_tokens"]), int(r["prefill_ctx"])
        return BatchShape.of(prefill_chunks=[(p, c)] if p else [], decode_ctxs=[int(r["decode_ctx"])] * int(r["num_decodes"]))

    grid = [r for r in rows if r["source"] == "vidur_grid"]
    sweep = [r for r in rows if r["source"] == "budget_sweep"]
    x = np.array([features(shape_of(r)) for r in grid])
    classes = np.array([shape_class(r) for r in grid])
    with open(GRID_CSV, newline="", encoding="utf-8") as f:
        table = {tuple(int(r[k]) for k in ("prefill_tokens", "prefill_ctx", "num_decodes", "decode_ctx")): float(r["iter_ms"])
                 for r in csv.DictReader(f)}
    table_ms = np.array([table[tuple(int(r[k]) for k in ("prefill_tokens", "prefill_ctx", "num_decodes", "decode_ctx"))]
                         for r in grid])
    columns = [c for c in ("iter_ms", "graph_iter_ms", "split_iter_ms", "split_graph_iter_ms")
               if grid and c in grid[0] and not any(math.isnan(float(r[c])) for r in grid)]

    fits = {}
    for col in columns:
        meas = np.array([float(r[col]) for r in grid])
        fits[col] = np.array([round_sig(v) for v in relative_nonneg_lstsq(x, meas)])

    def class_table(title: str, preds: dict[str, np.ndarray], meas: np.ndarray) -> None:
        print(f"\n{title}\n")
        print("| prediction | class | rows | mean abs rel err | mean signed rel err | max abs rel err | at |")
        print("|---|---|---|---|---|---|---|")
        for name, pred in preds.items():
            err = _errors(pred, meas)
            for cls in ("decode-only", "prefill-only", "mixed", "all"):
                m = np.ones(len(err), bool) if cls == "all" else classes == cls
                e = err[m]
                worst = grid[int(np.flatnonzero(m)[np.argmax(np.abs(e))])]
                at = (f"{worst['prefill_tokens']}@{worst['prefill_ctx']} + "
                      f"{worst['num_decodes']}@{worst['decode_ctx']}: {e[np.argmax(np.abs(e))]:+.1%}")
                print(f"| {name} | {cls} | {m.sum()} | {np.abs(e).mean():.1%} | {e.mean():+.1%} | "
                      f"{np.abs(e).max():.1%} | {at} |")

    for col in columns:
        meas = np.array([float(r[col]) for r in grid])
        preds = {f"shipped {args.profile}": x @ shipped, "Vidur-derived table (iter_ms)": table_ms,
                 f"5-coef fit to measured {col}": x @ fits[col]}
        class_table(f"Against measured `{col}`, {len(grid)} Vidur-grid shapes (rel err = predicted / measured - 1):",
                    preds, meas)

    print("\nCoefficients (t_ms = base + per_token*N + prefill_sq*sum p^2 + prefill_ctx*sum p*c + decode_ctx*sum ctx):\n")
    print("| coefficients | " + " | ".join(COEFFICIENT_NAMES) + " |")
    print("|---|" + "---|" * len(COEFFICIENT_NAMES))
    print(f"| shipped {args.profile} | " + " | ".join(f"{v:.6g}" for v in shipped) + " |")
    for col, coef in fits.items():
        print(f"| fit to measured {col} | " + " | ".join(f"{v:.6g}" for v in coef) + " |")

    reps = [(0, 0, 8, 256), (0, 0, 256, 2048), (0, 0, 128, 1024), (64, 0, 0, 0), (512, 0, 0, 0), (2048, 0, 0, 0),
            (512, 3072, 0, 0), (2048, 3072, 0, 0), (512, 0, 32, 256), (256, 0, 128, 1024), (2048, 0, 256, 2048),
            (1024, 1024, 128, 1024)]
    index = {tuple(int(r[k]) for k in ("prefill_tokens", "prefill_ctx", "num_decodes", "decode_ctx")): i
             for i, r in enumerate(grid)}
    print("\nRepresentative rows (ms):\n")
    head = "| prefill p@ctx | decodes n@ctx | Vidur-derived table | shipped profile |"
    head += "".join(f" measured {c} |" for c in columns)
    ref_col = columns[-1]  # split_graph_iter_ms when present: GPU time, decodes on the decode path
    head += " profile / iter_ms - 1 |" + (f" profile / {ref_col} - 1 |" if ref_col != "iter_ms" else "")
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for key in reps:
        if key not in index:
            continue
        i = index[key]
        r = grid[i]
        pred = float(x[i] @ shipped)
        line = f"| {key[0]}@{key[1]} | {key[2]}@{key[3]} | {table_ms[i]:.2f} | {pred:.2f} |"
        line += "".join(f" {float(r[c]):.2f} |" for c in columns)
        line += f" {pred / float(r['iter_ms']) - 1:+.1%} |"
        if ref_col != "iter_ms":
            line += f" {pred / float(r[ref_col]) - 1:+.1%} |"
        print(line)

    if sweep:
        fit_col = next((c for c in ("split_graph_iter_ms", "graph_iter_ms", "iter_ms") if c in fits), None)
        print(f"\nToken-budget sweep: one {SWEEP_PROMPT_TOKENS}-token prompt alone in chunks of B (mean ms over its "
              f"chunks; not in any fit; the fit column is the fit to {fit_col}):\n")
        print("| B | chunks | measured iter_ms | measured graph_iter_ms | shipped profile | profile / graph - 1 | "
              "fit | fit / graph - 1 |")
        print("|---|---|---|---|---|---|---|---|")
        for b in sorted({int(r["budget_tokens"]) for r in sweep}):
            rs = [r for r in sweep if int(r["budget_tokens"]) == b]
            xs = np.array([features(shape_of(r)) for r in rs])
            meas = np.mean([float(r["iter_ms"]) for r in rs])
            graph = np.mean([float(r["graph_iter_ms"]) for r in rs])
            prof = float(np.mean(xs @ shipped))
            fit = float(np.mean(xs @ fits[fit_col])) if fit_col else float("nan")
            print(f"| {b} | {len(rs)} | {meas:.2f} | {graph:.2f} | {prof:.2f} | {prof / graph - 1:+.1%} | "
                  f"{fit:.2f} | {fit / graph - 1:+.1%} |")

    if "graph_iter_ms" in columns and "split_graph_iter_ms" in columns:
        same = classes != "mixed"  # one attention call either way: the two runs time the same code
        a = np.array([float(r["graph_iter_ms"]) for r in grid])[same]
        b = np.array([float(r["split_graph_iter_ms"]) for r in grid])[same]
        d = np.abs(b / a - 1)
        print(f"\nRepeatability (decode-only and prefill-only rows, identical code in both runs): "
              f"|split_graph_iter_ms / graph_iter_ms - 1| mean {d.mean():.1%}, max {d.max():.1%} over {same.sum()} rows")

    breakdown = []
    if meta_path.is_file():
        breakdown = meta.get("breakdown", []) + meta.get("split_run", {}).get("breakdown", [])
    if breakdown:
        print("\nGPU kernel time per forward by category (torch.profiler, eager; ms):\n")
        print("| prefill p@ctx | decodes n@ctx | attention call | attention | GEMM | KV write | other | total |")
        print("|---|---|---|---|---|---|---|---|")
        for e in breakdown:
            k = e.get("kernel_ms_per_forward", {})
            print(f"| {e['prefill_tokens']}@{e['prefill_ctx']} | {e['num_decodes']}@{e['decode_ctx']} | "
                  f"{e['attention']} | {k.get('attention', 0):.2f} | {k.get('gemm', 0):.2f} | "
                  f"{k.get('kv_write', 0):.2f} | {k.get('other', 0):.2f} | {e.get('kernel_ms_total', float('nan')):.2f} |")

    if "cpu_issue_ms" in grid[0]:
        issue = np.array([float(r["cpu_issue_ms"]) for r in grid])
        it = np.array([float(r["iter_ms"]) for r in grid])
        print(f"\nHost issue time of the eager forward: median {np.median(issue):.2f} ms, max {issue.max():.2f} ms; "
              f"rows where issue >= 90 % of iter_ms (launch-bound): {(issue >= 0.9 * it).sum()} of {len(grid)}")
        if "graph_iter_ms" in columns:
            gr = np.array([float(r["graph_iter_ms"]) for r in grid])
            gap = it / gr - 1
            print(f"iter_ms / graph_iter_ms - 1: median {np.median(gap):+.1%}, max {gap.max():+.1%} "
                  f"(decode-only median {np.median(gap[classes == 'decode-only']):+.1%})")
    return 0


def merge(args: argparse.Namespace) -> int:
    """Add another run's iter_ms / graph_iter_ms (same shapes, e.g. `--attention split`) to a probe
    CSV as `<prefix>iter_ms` / `<prefix>graph_iter_ms`, and its sidecar JSON under `<prefix>run`."""
    key_cols = ("source", "budget_tokens", "prefill_tokens", "prefill_ctx", "num_decodes", "decode_ctx")
    main_rows, extra_rows = _read_probe(args.main), _read_probe(args.extra)
    extra = {tuple(r[k] for k in key_cols): r for r in extra_rows}
    new_cols = [f"{args.prefix}iter_ms", f"{args.prefix}graph_iter_ms"]
    fields = list(main_rows[0]) + [c for c in new_cols if c not in main_rows[0]]
    matched = 0
    for r in main_rows:
        e = extra.get(tuple(r[k] for k in key_cols))
        matched += e is not None
        r[new_cols[0]] = e["iter_ms"] if e else "nan"
        r[new_cols[1]] = e["graph_iter_ms"] if e else "nan"
    with open(args.main, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(main_rows)
    main_meta, extra_meta = args.main.with_suffix(".json"), args.extra.with_suffix(".json")
    if main_meta.is_file() and extra_meta.is_file():
        meta = json.loads(main_meta.read_text(encoding="utf-8"))
        meta[f"{args.prefix}run"] = json.loads(extra_meta.read_text(encoding="utf-8"))
        meta.setdefault("columns", {})[f"{args.prefix}iter_ms/{args.prefix}graph_iter_ms"] = (
            f"iter_ms / graph_iter_ms of the run under '{args.prefix}run' (NaN: shape not in that run)")
        main_meta.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    print(f"merged {matched} of {len(main_rows)} rows from {args.extra} into {args.main} as {', '.join(new_cols)}")
    return 0


# ------------------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "merge":
        p = argparse.ArgumentParser(prog="gpu_probe merge", description=merge.__doc__)
        p.add_argument("main", type=Path)
        p.add_argument("extra", type=Path)
        p.add_argument("--prefix", default="split_")
        return merge(p.parse_args(argv[1:]))
    if argv and argv[0] == "compare":
        p = argparse.ArgumentParser(prog="gpu_probe compare", description="shipped profile vs a probe CSV")
        p.add_argument("csv", type=Path)
        p.add_argument("--profile", default="h100-mistral7b")
        return compare(p.parse_args(argv[1:]))
    p = argparse.ArgumentParser(prog="gpu_probe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="CSV to write; a sidecar .json with device info goes beside it")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="default bf16 on cuda, fp32 on cpu")
    p.add_argument("--tiny", action="store_true", help="2 layers, hidden 64: a CPU smoke configuration")
    p.add_argument("--num-layers", type=int, default=None)
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--intermediate", type=int, default=None)
    p.add_argument("--grid", type=Path, default=GRID_CSV,
                   help="CSV of batch shapes (columns prefill_tokens, prefill_ctx, num_decodes, decode_ctx; default "
                        "the Vidur H100 grid; e.g. python -m loadtest.tile_quantization --write-probe-grid's)")
    p.add_argument("--rows", default="", help="comma-separated row indices of the Vidur grid (default: all 135)")
    p.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the token-budget sweep's chunks (default: yes)")
    p.add_argument("--graph", action=argparse.BooleanOptionalAction, default=True,
                   help="also time each shape as one CUDA graph (GPU only; default: yes)")
    p.add_argument("--attention", choices=sorted(ATTENTION), default=None, help="default varlen on cuda, sdpa on cpu")
    p.add_argument("--breakdown-rows", default="",
                   help="Vidur-grid row indices to profile per kernel category (torch.profiler), with each attention")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--reserve-gib", type=float, default=10.0, help="GPU memory left free for activations")
    return measure(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
