"""Request-length traces: prompt and output token counts per request.

The paper's workload (arXiv:2508.01002, "Evaluation") is the Openchat ShareGPT4 trace as shipped
by Sarathi-Serve: 30,731 requests with Llama-2 token counts, 16,384 of them drawn after a shuffle
with seed 42.  ``load_trace("paper")`` loads that file (``replica/data``); ``sample_requests``
draws from it.

Users can bring their own trace:

* a CSV file with a header row containing ``num_prefill_tokens,num_decode_tokens`` (the
  Sarathi-Serve layout; other columns are ignored), one request per row;
* a ShareGPT JSON file (``load_sharegpt_json``), tokenized with a tokenizer of their choice;
* a Mooncake-style JSON-lines file (``load_prefix_jsonl``; alias ``"mooncake"``: the production
  chat trace in ``replica/data``): arrival timestamps, token counts and the prompt's prefix block
  hashes, for prefix caching (`Trace.prefix_hashes`, `engine_block_hashes`).

Loading is strict: every malformed row raises :class:`TraceError` naming the file and the line
(or JSON entry) and what is wrong.  Nothing is silently skipped; the only rows left out are
ShareGPT conversations that cannot be served (no human->gpt pair, too long, empty), and those
are counted in :attr:`Trace.dropped` and reported with a warning.
"""

from __future__ import annotations

import csv
import json
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol, TypeAlias

import numpy as np

__all__ = [
    "PAPER_TRACE_PATH",
    "TRACE_ALIASES",
    "Trace",
    "TraceError",
    "EngineBlockHashes",
    "engine_block_hashes",
    "load_prefix_jsonl",
    "load_sharegpt_json",
    "load_trace",
    "sample_requests",
]

PAPER_TRACE_PATH = Path(__file__).parent / "data" / "sharegpt_8k_filtered_stats_llama2_tokenizer.csv"
MOONCAKE_TRACE_PATH = Path(__file__).parent / "data" / "mooncake_conversation_trace.jsonl"
TRACE_ALIASES: Mapping[str, Path] = {"paper": PAPER_TRACE_PATH, "sharegpt": PAPER_TRACE_PATH,
                                     "mooncake": MOONCAKE_TRACE_PATH}
# The context of Mistral-7B-Instruct-v0.2, the model of every cost profile (replica/cost): a prefix
# trace's requests that do not fit it are left out, as vLLM refuses them (HTTP 400).
DEFAULT_MAX_MODEL_LEN = 32_768

PROMPT_COLUMN = "num_prefill_tokens"
OUTPUT_COLUMN = "num_decode_tokens"

_INT_RE = re.compile(r"[+-]?[0-9]+")


class TraceError(ValueError):
    """A trace file (or trace data) is malformed.  ``path`` and ``line`` are set where known."""

    def __init__(self, message: str, *, path: str | os.PathLike[str] | None = None,
                 line: int | None = None) -> None:
        self.path = None if path is None else str(path)
        self.line = line
        if path is not None:
            where = f"{path}, line {line}" if line is not None else str(path)
            message = f"{where}: {message}"
        super().__init__(message)


@dataclass(frozen=True, eq=False)
class Trace:
    """Token counts of a set of requests: ``prompt_lens[i]`` and ``output_lens[i]`` for request i.

    Both arrays are int64, read-only, of equal non-zero length, with every value >= 1.
    ``dropped`` counts the source entries left out while loading, by reason (ShareGPT JSON and
    prefix JSON lines).
    A prefix trace (`load_prefix_jsonl`) also has, per request, its arrival time in seconds
    (``arrival_s``, from the first request) and its prompt's prefix block hashes
    (``prefix_hashes[i]``, one per block of ``hash_block_tokens`` tokens, the last one partial;
    equal hash = equal prefix up to the end of that block); these are None / 0 otherwise.
    (``eq=False``: numpy arrays have no single truth value, so traces compare by identity.)
    """

    prompt_lens: np.ndarray
    output_lens: np.ndarray
    source: str
    dropped: Mapping[str, int] = field(default_factory=dict)
    arrival_s: np.ndarray | None = None
    prefix_hashes: tuple[tuple[int, ...], ...] | None = None
    hash_block_tokens: int = 0

    def __post_init__(self) -> None:
        for name in ("prompt_lens", "output_lens"):
            raw = np.asarray(getattr(self, name))
            if raw.ndim != 1:
                raise TraceError(f"{name} must be 1-D, got shape {raw.shape}", path=self.source)
            if raw.size and not np.issubdtype(raw.dtype, np.integer):
                raise TraceError(f"{name} must hold integers, got dtype {raw.dtype}", path=self.source)
            arr = raw.astype(np.int64)  # always a copy, so the caller's array stays writable
            if arr.size and arr.min() < 1:
                raise TraceError(f"{name} must be >= 1, found {arr.min()}", path=self.source)
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)
        if len(self.prompt_lens) != len(self.output_lens):
            raise TraceError(f"{len(self.prompt_lens)} prompt lengths but "
                             f"{len(self.output_lens)} output lengths", path=self.source)
        if len(self.prompt_lens) == 0:
            raise TraceError("trace is empty (no requests)", path=self.source)
        object.__setattr__(self, "dropped", MappingProxyType(dict(self.dropped)))
        if self.prefix_hashes is not None:
            if self.hash_block_tokens < 1:
                raise TraceError("prefix hashes need hash_block_tokens >= 1", path=self.source)
            if len(self.prefix_hashes) != len(self.prompt_lens):
                raise TraceError(f"{len(self.prefix_hashes)} prefix hash lists for {len(self.prompt_lens)} "
                                 "requests", path=self.source)
        if self.arrival_s is not None:
            arr = np.asarray(self.arrival_s, dtype=np.float64).copy()
            if arr.shape != self.prompt_lens.shape or (arr.size and (np.diff(arr) < 0).any()):
                raise TraceError("arrival_s must hold one non-decreasing time per request", path=self.source)
            arr.setflags(write=False)
            object.__setattr__(self, "arrival_s", arr)

    @property
    def has_prefixes(self) -> bool:
        return self.prefix_hashes is not None

    @property
    def mean_qps(self) -> float | None:
        """The recorded arrival rate (requests per second), for a trace with arrival times."""
        if self.arrival_s is None or len(self.arrival_s) < 2 or self.arrival_s[-1] <= self.arrival_s[0]:
            return None
        return (len(self.arrival_s) - 1) / float(self.arrival_s[-1] - self.arrival_s[0])

    def __len__(self) -> int:
        return len(self.prompt_lens)

    def summary(self) -> dict[str, dict[str, float]]:
        """``{"prompt": {...}, "output": {...}}``, each with median, mean, p90 and p99 in tokens
        (percentiles by numpy's default linear interpolation)."""
        return {"prompt": _stats(self.prompt_lens), "output": _stats(self.output_lens)}


def _stats(x: np.ndarray) -> dict[str, float]:
    p50, p90, p99 = np.percentile(x, [50, 90, 99])
    return {"median": float(p50), "mean": float(x.mean()), "p90": float(p90), "p99": float(p99)}


# --------------------------------------------------------------------------------------- loading

class _Encoder(Protocol):
    def encode(self, text: str) -> Any: ...


Tokenizer: TypeAlias = _Encoder | Callable[[str], Sequence[int]]


def load_trace(name_or_path: str | os.PathLike[str], *,
               tokenizer: Tokenizer | str | os.PathLike[str] | None = None,
               max_model_len: int | None = None) -> Trace:
    """Load a trace by name (``"paper"``, alias ``"sharegpt"``; ``"mooncake"``) or from a file.

    A ``.json`` file is read as ShareGPT conversations (``load_sharegpt_json``; needs
    ``tokenizer``, and uses ``max_model_len``, default 8192); a ``.jsonl`` file as a Mooncake-style
    prefix trace (``load_prefix_jsonl``, ``max_model_len`` default `DEFAULT_MAX_MODEL_LEN`); any
    other file as a CSV with the columns ``num_prefill_tokens`` and ``num_decode_tokens``.
    """
    if isinstance(name_or_path, str) and name_or_path in TRACE_ALIASES:
        name_or_path = TRACE_ALIASES[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise TraceError(f"no such file (known trace names: {', '.join(TRACE_ALIASES)})", path=path)
    if path.suffix.lower() == ".jsonl":
        return load_prefix_jsonl(path, max_model_len=max_model_len or DEFAULT_MAX_MODEL_LEN)
    if path.suffix.lower() == ".json":
        if tokenizer is None:
            raise TraceError("a ShareGPT JSON trace needs a tokenizer to count tokens", path=path)
        return load_sharegpt_json(path, tokenizer, max_model_len=max_model_len or 8192)
    return _load_csv(path)


def _load_csv(path: Path) -> Trace:
    prompts: list[int] = []
    outputs: list[int] = []
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            try:
                header = next(reader, None)
                if header is None:
                    raise TraceError("empty file: no header row", path=path, line=1)
                names = [h.strip() for h in header]
                for col in (PROMPT_COLUMN, OUTPUT_COLUMN):
                    if names.count(col) != 1:
                        problem = "missing" if col not in names else "repeated"
                        raise TraceError(f"header: column {col!r} {problem} (header is {names}; "
                                         f"need {PROMPT_COLUMN},{OUTPUT_COLUMN})", path=path, line=1)
                i_prompt, i_output, width = names.index(PROMPT_COLUMN), names.index(OUTPUT_COLUMN), len(names)
                for row in reader:
                    line = reader.line_num
                    if len(row) != width:
                        what = "blank line" if not row else f"{len(row)} fields"
                        raise TraceError(f"expected {width} fields (as in the header), got {what}",
                                         path=path, line=line)
                    prompts.append(_parse_count(row[i_prompt], PROMPT_COLUMN, path, line))
                    outputs.append(_parse_count(row[i_output], OUTPUT_COLUMN, path, line))
            except csv.Error as e:
                raise TraceError(f"CSV syntax error: {e}", path=path, line=reader.line_num) from e
    except UnicodeDecodeError as e:
        raise TraceError(f"not UTF-8 text ({e})", path=path) from e
    if not prompts:
        raise TraceError("trace is empty: a header but no requests", path=path)
    return Trace(np.array(prompts, dtype=np.int64), np.array(outputs, dtype=np.int64), source=str(path))


def _parse_count(text: str, column: str, path: Path, line: int) -> int:
    s = text.strip()
    if not _INT_RE.fullmatch(s):
        raise TraceError(f"{column}: not an integer: {text!r}", path=path, line=line)
    value = int(s)
    if value < 1:
        raise TraceError(f"{column}: must be >= 1, got {value}", path=path, line=line)
    return value


def load_sharegpt_json(path: str | os.PathLike[str], tokenizer: Tokenizer | str | os.PathLike[str],
                       max_model_len: int = 8192) -> Trace:
    """Token counts from ShareGPT conversations (a JSON list of ``{"id", "conversations": [...]}``).

    One request per conversation: its first ``"human"`` turn is the prompt and the turn right
    after it, which must be ``"gpt"``, the output.  ``tokenizer`` is anything with
    ``encode(text)`` returning a list of ids or an object with ``.ids`` (``tokenizers.Tokenizer``,
    a Hugging Face tokenizer), a plain callable ``text -> list of ids``, or the path of a
    ``tokenizer.json`` file (needs the ``tokenizers`` package).  Counts are whatever the tokenizer
    returns, special tokens (e.g. BOS) included if it adds them.

    Conversations left out are counted in ``Trace.dropped`` and reported with a ``UserWarning``:
    ``no_pair`` (no human turn followed by a gpt turn), ``empty`` (prompt or output of 0 tokens),
    ``too_long`` (prompt + output > ``max_model_len``).  Malformed JSON raises
    :class:`TraceError` with the line and column; an entry of the wrong shape, with its index.
    """
    path = Path(path)
    count_tokens = _token_counter(tokenizer)
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise TraceError(f"column {e.colno}: malformed JSON: {e.msg}", path=path, line=e.lineno) from e
    except UnicodeDecodeError as e:
        raise TraceError(f"not UTF-8 text ({e})", path=path) from e
    if not isinstance(data, list):
        raise TraceError(f"expected a JSON list of conversations, got {type(data).__name__}", path=path)

    prompts: list[int] = []
    outputs: list[int] = []
    dropped = {"no_pair": 0, "empty": 0, "too_long": 0}
    for index, entry in enumerate(data):
        pair = _first_exchange(entry, index, path)
        if pair is None:
            dropped["no_pair"] += 1
            continue
        n_prompt, n_output = count_tokens(pair[0]), count_tokens(pair[1])
        if n_prompt < 1 or n_output < 1:
            dropped["empty"] += 1
        elif n_prompt + n_output > max_model_len:
            dropped["too_long"] += 1
        else:
            prompts.append(n_prompt)
            outputs.append(n_output)

    n_dropped = sum(dropped.values())
    if not prompts:
        raise TraceError(f"no usable conversations among {len(data)} entries (dropped: {dropped})", path=path)
    if n_dropped:
        warnings.warn(f"{path}: dropped {n_dropped} of {len(data)} conversations "
                      f"({dropped['no_pair']} without a human->gpt pair, {dropped['empty']} with an "
                      f"empty turn, {dropped['too_long']} longer than {max_model_len} tokens)",
                      UserWarning, stacklevel=2)
    return Trace(np.array(prompts, dtype=np.int64), np.array(outputs, dtype=np.int64),
                 source=str(path), dropped=dropped)


def _first_exchange(entry: object, index: int, path: Path) -> tuple[str, str] | None:
    """(prompt text, output text) of an entry's first human turn and the gpt turn after it."""
    def bad(problem: str) -> TraceError:
        return TraceError(f"entry {index}: {problem}", path=path)

    if not isinstance(entry, dict):
        raise bad(f"expected an object, got {type(entry).__name__}")
    turns = entry.get("conversations")
    if not isinstance(turns, list):
        raise bad(f"'conversations' must be a list, got {type(turns).__name__}")
    for t, turn in enumerate(turns):
        if not (isinstance(turn, dict) and isinstance(turn.get("from"), str)
                and isinstance(turn.get("value"), str)):
            raise bad(f"turn {t}: expected an object with string 'from' and 'value'")
    for t, turn in enumerate(turns):
        if turn["from"] == "human":
            if t + 1 < len(turns) and turns[t + 1]["from"] == "gpt":
                return turn["value"], turns[t + 1]["value"]
            return None
    return None


def _token_counter(tokenizer: Tokenizer | str | os.PathLike[str]) -> Callable[[str], int]:
    if isinstance(tokenizer, (str, os.PathLike)):
        from tokenizers import Tokenizer as _HFTokenizer  # optional dependency

        tokenizer = _HFTokenizer.from_file(str(tokenizer))
    encode = getattr(tokenizer, "encode", None)
    if encode is None:
        if not callable(tokenizer):
            raise TypeError(f"tokenizer must have encode(text) or be callable, got {type(tokenizer).__name__}")
        encode = tokenizer

    def count(text: str) -> int:
        ids = encode(text)
        return len(getattr(ids, "ids", ids))

    return count


def load_prefix_jsonl(path: str | os.PathLike[str], *, max_model_len: int = DEFAULT_MAX_MODEL_LEN,
                      hash_block_tokens: int = 512) -> Trace:
    """A Mooncake-style prefix trace: one JSON object per line with ``timestamp`` (ms),
    ``input_length`` and ``output_length`` (tokens, >= 1) and ``hash_ids`` (non-negative ints, one
    per ``hash_block_tokens``-token block of the prompt, the last one partial: exactly
    ceil(input_length / hash_block_tokens) of them); timestamps must not decrease.  Blank lines are
    skipped; anything else malformed raises `TraceError` naming the file and line.

    Requests whose prompt plus output exceed ``max_model_len`` are left out (vLLM refuses them),
    counted in ``dropped["too_long"]`` with a warning.  The prompts are kept whole otherwise, also
    beyond the cost profiles' fitted range (their prefill-context term is extrapolated linearly;
    docs/BENCHMARKS.md says where that matters)."""
    path = Path(path)
    if max_model_len < 2:
        raise ValueError(f"max_model_len must be >= 2, got {max_model_len}")
    times: list[float] = []
    prompts: list[int] = []
    outputs: list[int] = []
    hashes: list[tuple[int, ...]] = []
    too_long = total = 0
    last_t = -np.inf
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            total += 1
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TraceError(f"not JSON: {e.msg}", path=path, line=lineno) from None
            if not isinstance(row, dict):
                raise TraceError(f"expected an object, got {type(row).__name__}", path=path, line=lineno)
            vals = {}
            for key in ("timestamp", "input_length", "output_length"):
                v = row.get(key)
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
                    raise TraceError(f"{key!r} must be a number, got {v!r}", path=path, line=lineno)
                vals[key] = v
            n_in, n_out, t = vals["input_length"], vals["output_length"], float(vals["timestamp"]) / 1000.0
            if n_in != int(n_in) or n_out != int(n_out) or n_in < 1 or n_out < 1:
                raise TraceError(f"input_length and output_length must be integers >= 1, got {n_in!r}, {n_out!r}",
                                 path=path, line=lineno)
            if t < last_t:
                raise TraceError(f"timestamp {vals['timestamp']!r} is earlier than the line before's", path=path,
                                 line=lineno)
            last_t = t
            ids = row.get("hash_ids")
            if not isinstance(ids, list) or any(isinstance(h, bool) or not isinstance(h, int) or h < 0 for h in ids):
                raise TraceError("'hash_ids' must be a list of non-negative integers", path=path, line=lineno)
            n_in = int(n_in)
            expected = -(-n_in // hash_block_tokens)
            if len(ids) != expected:
                raise TraceError(f"{len(ids)} hash_ids for {n_in} prompt tokens (expected {expected}, one per "
                                 f"{hash_block_tokens}-token block)", path=path, line=lineno)
            if n_in + int(n_out) > max_model_len:
                too_long += 1
                continue
            times.append(t)
            prompts.append(n_in)
            outputs.append(int(n_out))
            hashes.append(tuple(ids))
    if not prompts:
        raise TraceError(f"no usable requests among {total} lines ({too_long} longer than {max_model_len} tokens)",
                         path=path)
    if too_long:
        warnings.warn(f"{path}: left out {too_long} of {total} requests longer than max_model_len={max_model_len} "
                      "tokens (prompt + output), as vLLM would refuse them", UserWarning, stacklevel=2)
    t0 = times[0]
    return Trace(np.array(prompts, dtype=np.int64), np.array(outputs, dtype=np.int64), source=str(path),
                 dropped={"too_long": too_long}, arrival_s=np.array(times) - t0, prefix_hashes=tuple(hashes),
                 hash_block_tokens=hash_block_tokens)


class EngineBlockHashes(Sequence[int]):
    """A prompt's full-block hashes in the engine's block size, from a trace's coarser block
    hashes: engine block k lies in trace block k // r (r = trace block / engine block tokens) and
    gets the hash ``trace_hash * r + k % r``, so two prompts share engine block k exactly when they
    share trace block k // r (distinct trace hashes never collide).  Only full engine blocks of the
    prompt are named.  Computed on access: a 30k-token prompt has ~2,000 engine blocks."""

    __slots__ = ("trace_hashes", "ratio", "num_blocks")

    def __init__(self, trace_hashes: Sequence[int], ratio: int, num_blocks: int) -> None:
        self.trace_hashes = trace_hashes
        self.ratio = ratio
        self.num_blocks = num_blocks

    def __len__(self) -> int:
        return self.num_blocks

    def __getitem__(self, k):  # type: ignore[override]
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(self.num_blocks))]
        if k < 0:
            k += self.num_blocks
        if not 0 <= k < self.num_blocks:
            raise IndexError(k)
        r = self.ratio
        return self.trace_hashes[k // r] * r + k % r


def engine_block_hashes(trace_hashes: Sequence[int], hash_block_tokens: int, prompt_len: int,
                        block_size: int) -> EngineBlockHashes:
    """`EngineBlockHashes` of a prompt of ``prompt_len`` tokens whose ``hash_block_tokens``-token
    blocks have ``trace_hashes``, in engine blocks of ``block_size`` tokens (which must divide
    ``hash_block_tokens``)."""
    if block_size < 1 or hash_block_tokens % block_size:
        raise ValueError(f"the engine block size ({block_size}) must divide the trace's hash block "
                         f"({hash_block_tokens} tokens)")
    return EngineBlockHashes(trace_hashes, hash_block_tokens // block_size, prompt_len // block_size)


# -------------------------------------------------------------------------------------- sampling

def sample_requests(trace: Trace, n: int, seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` requests of ``trace`` after a shuffle: ``(prompt_lens, output_lens)``.

    The order is ``np.random.default_rng(seed).permutation(len(trace))`` (the paper shuffles with
    seed 42).  If ``n > len(trace)``, further permutations from the same generator are appended,
    so every request appears once per pass.  The result depends only on the trace and the seed.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    passes = max(1, -(-n // len(trace)))
    order = np.concatenate([rng.permutation(len(trace)) for _ in range(passes)])[:n]
    return trace.prompt_lens[order], trace.output_lens[order]
