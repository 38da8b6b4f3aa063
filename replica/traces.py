"""Request-length traces: prompt and output token counts per request.

The paper's workload (arXiv:2508.01002, "Evaluation") is the Openchat ShareGPT4 trace as shipped
by Sarathi-Serve: 30,731 requests with Llama-2 token counts, 16,384 of them drawn after a shuffle
with seed 42.  ``load_trace("paper")`` loads that file (``replica/data``); ``sample_requests``
draws from it.

Users can bring their own trace:

* a CSV file with a header row containing ``num_prefill_tokens,num_decode_tokens`` (the
  Sarathi-Serve layout; other columns are ignored), one request per row;
* a ShareGPT JSON file (``load_sharegpt_json``), tokenized with a tokenizer of their choice.

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
    "load_sharegpt_json",
    "load_trace",
    "sample_requests",
]

PAPER_TRACE_PATH = Path(__file__).parent / "data" / "sharegpt_8k_filtered_stats_llama2_tokenizer.csv"
TRACE_ALIASES: Mapping[str, Path] = {"paper": PAPER_TRACE_PATH, "sharegpt": PAPER_TRACE_PATH}

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
    ``dropped`` counts the source entries left out while loading, by reason (ShareGPT JSON only).
    (``eq=False``: numpy arrays have no single truth value, so traces compare by identity.)
    """

    prompt_lens: np.ndarray
    output_lens: np.ndarray
    source: str
    dropped: Mapping[str, int] = field(default_factory=dict)

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
               max_model_len: int = 8192) -> Trace:
    """Load a trace by name (``"paper"``, alias ``"sharegpt"``) or from a file.

    A ``.json`` file is read as ShareGPT conversations (``load_sharegpt_json``; needs
    ``tokenizer``, and uses ``max_model_len``); any other file as a CSV with the columns
    ``num_prefill_tokens`` and ``num_decode_tokens``.
    """
    if isinstance(name_or_path, str) and name_or_path in TRACE_ALIASES:
        return _load_csv(TRACE_ALIASES[name_or_path])
    path = Path(name_or_path)
    if not path.is_file():
        raise TraceError(f"no such file (known trace names: {', '.join(TRACE_ALIASES)})", path=path)
    if path.suffix.lower() == ".json":
        if tokenizer is None:
            raise TraceError("a ShareGPT JSON trace needs a tokenizer to count tokens", path=path)
        return load_sharegpt_json(path, tokenizer, max_model_len=max_model_len)
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
