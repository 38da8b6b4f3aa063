"""Traces: the shipped ShareGPT trace, strict CSV loading, ShareGPT JSON, sampling."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from replica.traces import (
    PAPER_TRACE_PATH,
    Trace,
    TraceError,
    load_sharegpt_json,
    load_trace,
    sample_requests,
)

HEADER = "num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio\n"


def whitespace_tokenizer(text: str) -> list[str]:
    return text.split()


class EncodeWithIds:
    """Mimics tokenizers.Tokenizer: encode() returns an object with .ids."""

    class _Encoding:
        def __init__(self, ids: list[int]) -> None:
            self.ids = ids

    def encode(self, text: str) -> _Encoding:
        return self._Encoding(list(range(len(text.split()))))


class EncodeWithList:
    """Mimics a Hugging Face tokenizer: encode() returns a list of ids."""

    def encode(self, text: str) -> list[int]:
        return [0] * len(text.split())


# ------------------------------------------------------------------------------- shipped trace

@pytest.fixture(scope="module")
def paper() -> Trace:
    return load_trace("paper")


def test_paper_trace_is_shipped_with_attribution() -> None:
    assert PAPER_TRACE_PATH.is_file()
    assert (PAPER_TRACE_PATH.parent / "ATTRIBUTION.md").is_file()


def test_paper_trace_size_and_dtype(paper: Trace) -> None:
    assert len(paper) == 30_731
    assert paper.prompt_lens.dtype == np.int64 and paper.output_lens.dtype == np.int64
    assert paper.source == str(PAPER_TRACE_PATH)
    assert paper.prompt_lens.min() >= 1 and paper.output_lens.min() >= 1
    assert int((paper.prompt_lens + paper.output_lens).max()) <= 8192


@pytest.mark.parametrize(("kind", "stat", "paper_value"), [
    ("prompt", "median", 1730), ("prompt", "mean", 2340), ("prompt", "p90", 5696), ("prompt", "p99", 7434),
    ("output", "median", 415), ("output", "mean", 439), ("output", "p90", 834), ("output", "p99", 998),
])
def test_paper_trace_matches_paper_stats(paper: Trace, kind: str, stat: str, paper_value: int) -> None:
    assert round(paper.summary()[kind][stat]) == paper_value


def test_sharegpt_alias_is_the_paper_trace(paper: Trace) -> None:
    other = load_trace("sharegpt")
    np.testing.assert_array_equal(other.prompt_lens, paper.prompt_lens)
    np.testing.assert_array_equal(other.output_lens, paper.output_lens)


def test_paper_trace_loads_fast() -> None:
    start_s = time.perf_counter()
    load_trace("paper")
    assert time.perf_counter() - start_s < 0.5


def test_trace_arrays_are_read_only(paper: Trace) -> None:
    with pytest.raises(ValueError):
        paper.prompt_lens[0] = 5


# ---------------------------------------------------------------------------------- CSV loading

def write(tmp_path: Path, text: str, name: str = "trace.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_csv_minimal_columns_any_order(tmp_path: Path) -> None:
    path = write(tmp_path, "extra,num_decode_tokens,num_prefill_tokens\nx,5,10\ny, 7 ,20\n")
    trace = load_trace(path)
    assert trace.prompt_lens.tolist() == [10, 20]
    assert trace.output_lens.tolist() == [5, 7]
    assert trace.source == str(path)


def test_csv_path_as_string(tmp_path: Path) -> None:
    path = write(tmp_path, HEADER + "1,2,3,0.5\n")
    assert len(load_trace(str(path))) == 1


@pytest.mark.parametrize(("text", "line", "fragment"), [
    ("num_prefill_tokens,foo\n1,2\n", 1, "'num_decode_tokens' missing"),
    ("num_decode_tokens,other\n1,2\n", 1, "'num_prefill_tokens' missing"),
    ("num_prefill_tokens,num_decode_tokens,num_decode_tokens\n1,2,3\n", 1, "repeated"),
    (HEADER + "1,2,3,0.5\n4,5,9\n", 3, "expected 4 fields"),
    (HEADER + "1,2,3,0.5\n4,5,9,0.8,1\n", 3, "got 5 fields"),
    (HEADER + "1,2,3,0.5\n\n4,5,9,0.8\n", 3, "blank line"),
    (HEADER + "1,2,3,0.5\n1,2,3,0.5\nabc,2,3,0.5\n", 4, "num_prefill_tokens: not an integer: 'abc'"),
    (HEADER + "1,2.5,3,0.5\n", 2, "num_decode_tokens: not an integer: '2.5'"),
    (HEADER + "1,,3,0.5\n", 2, "num_decode_tokens: not an integer: ''"),
    (HEADER + "1,1_000,3,0.5\n", 2, "not an integer"),
    (HEADER + "0,2,3,0.5\n", 2, "num_prefill_tokens: must be >= 1, got 0"),
    (HEADER + "5,-2,3,0.5\n", 2, "num_decode_tokens: must be >= 1, got -2"),
    ("", 1, "empty file"),
])
def test_malformed_csv_names_file_and_line(tmp_path: Path, text: str, line: int, fragment: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(TraceError) as info:
        load_trace(path)
    message = str(info.value)
    assert message.startswith(f"{path}, line {line}: "), message
    assert fragment in message
    assert info.value.path == str(path) and info.value.line == line


def test_header_only_csv_is_empty_trace(tmp_path: Path) -> None:
    path = write(tmp_path, HEADER)
    with pytest.raises(TraceError, match="empty"):
        load_trace(path)


def test_missing_file_and_unknown_name() -> None:
    with pytest.raises(TraceError, match="no such file.*paper"):
        load_trace("no-such-trace")


def test_trace_error_is_value_error() -> None:
    assert issubclass(TraceError, ValueError)


@pytest.mark.parametrize(("prompts", "outputs", "fragment"), [
    ([], [], "empty"),
    ([1, 2], [1], "2 prompt lengths but 1 output"),
    ([1, 0], [1, 1], ">= 1"),
    ([1.5], [1], "integers"),
])
def test_trace_constructor_validates(prompts: list, outputs: list, fragment: str) -> None:
    with pytest.raises(TraceError, match=fragment):
        Trace(np.array(prompts), np.array(outputs), source="test")


# ------------------------------------------------------------------------------ ShareGPT JSON

def conv(*turns: tuple[str, str], cid: str = "x") -> dict:
    return {"id": cid, "conversations": [{"from": f, "value": v} for f, v in turns]}


def write_json(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data, indent=1))
    return path


@pytest.mark.parametrize("tokenizer", [whitespace_tokenizer, EncodeWithIds(), EncodeWithList()],
                         ids=["callable", "encode-ids", "encode-list"])
def test_sharegpt_json_counts_tokens(tmp_path: Path, tokenizer: object) -> None:
    path = write_json(tmp_path, [
        conv(("human", "a b c"), ("gpt", "d e")),
        conv(("system", "be nice"), ("human", "one two"), ("gpt", "x y z w"), ("human", "more"), ("gpt", "ok")),
    ])
    trace = load_sharegpt_json(path, tokenizer)
    assert trace.prompt_lens.tolist() == [3, 2]
    assert trace.output_lens.tolist() == [2, 4]
    assert trace.dropped == {"no_pair": 0, "empty": 0, "too_long": 0}


def test_sharegpt_json_drops_are_counted_and_warned(tmp_path: Path) -> None:
    path = write_json(tmp_path, [
        conv(("human", "a b"), ("gpt", "c")),                  # kept
        conv(("gpt", "hello"), ("human", "hi")),               # no gpt after the human turn
        conv(("human", "only a question")),                    # no pair
        {"id": "e", "conversations": []},                      # no pair
        conv(("human", "   "), ("gpt", "c")),                  # empty prompt
        conv(("human", "a b c d e f"), ("gpt", "g h i j k")),  # 11 tokens > 10
    ])
    with pytest.warns(UserWarning, match=r"dropped 5 of 6 conversations \(3 without a human->gpt pair, "
                                         r"1 with an empty turn, 1 longer than 10 tokens\)"):
        trace = load_sharegpt_json(path, whitespace_tokenizer, max_model_len=10)
    assert len(trace) == 1
    assert trace.dropped == {"no_pair": 3, "empty": 1, "too_long": 1}


def test_sharegpt_json_exactly_max_model_len_is_kept(tmp_path: Path) -> None:
    path = write_json(tmp_path, [conv(("human", "a b c"), ("gpt", "d e f g"))])
    assert len(load_sharegpt_json(path, whitespace_tokenizer, max_model_len=7)) == 1


def test_sharegpt_json_all_dropped_is_error(tmp_path: Path) -> None:
    path = write_json(tmp_path, [conv(("human", "a"))])
    with pytest.raises(TraceError, match="no usable conversations"):
        load_sharegpt_json(path, whitespace_tokenizer)


def test_sharegpt_json_via_load_trace(tmp_path: Path) -> None:
    path = write_json(tmp_path, [conv(("human", "a b"), ("gpt", "c"))])
    assert load_trace(path, tokenizer=whitespace_tokenizer).prompt_lens.tolist() == [2]
    with pytest.raises(TraceError, match="needs a tokenizer"):
        load_trace(path)


def test_malformed_json_names_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"id": "a",\n   "conversations": [}\n]\n')
    with pytest.raises(TraceError) as info:
        load_sharegpt_json(path, whitespace_tokenizer)
    assert str(info.value).startswith(f"{path}, line 3: column 22: malformed JSON")
    assert info.value.line == 3


@pytest.mark.parametrize(("data", "fragment"), [
    ({"a": 1}, "expected a JSON list of conversations, got dict"),
    ([conv(("human", "a"), ("gpt", "b")), "oops"], "entry 1: expected an object, got str"),
    ([{"id": "a"}], "entry 0: 'conversations' must be a list, got NoneType"),
    ([conv(("human", "a"), ("gpt", "b")), {"conversations": [{"from": "human", "value": 3}]}],
     "entry 1: turn 0: expected an object with string 'from' and 'value'"),
    ([{"conversations": ["hi"]}], "entry 0: turn 0: expected an object with string 'from' and 'value'"),
])
def test_wrong_entry_type_names_index(tmp_path: Path, data: object, fragment: str) -> None:
    path = write_json(tmp_path, data)
    with pytest.raises(TraceError) as info:
        load_sharegpt_json(path, whitespace_tokenizer)
    assert str(info.value) == f"{path}: {fragment}"


# ----------------------------------------------------------------------------------- sampling

def small_trace(n: int = 10) -> Trace:
    return Trace(np.arange(1, n + 1), np.arange(101, 101 + n), source="small")


def test_sampling_is_deterministic_per_seed(paper: Trace) -> None:
    a = sample_requests(paper, 16_384, seed=42)
    b = sample_requests(paper, 16_384, seed=42)
    c = sample_requests(paper, 16_384, seed=7)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    assert len(a[0]) == len(a[1]) == 16_384


def test_sampling_default_seed_is_42() -> None:
    trace = small_trace()
    np.testing.assert_array_equal(sample_requests(trace, 5)[0], sample_requests(trace, 5, seed=42)[0])


def test_sampling_keeps_pairs_and_draws_without_replacement() -> None:
    trace = small_trace()
    prompts, outputs = sample_requests(trace, 10, seed=3)
    np.testing.assert_array_equal(outputs, prompts + 100)  # each prompt keeps its own output
    assert sorted(prompts.tolist()) == list(range(1, 11))


def test_sampling_matches_default_rng_permutation() -> None:
    trace = small_trace()
    order = np.random.default_rng(42).permutation(10)[:4]
    np.testing.assert_array_equal(sample_requests(trace, 4)[0], trace.prompt_lens[order])


def test_sampling_more_than_trace_cycles_permutations() -> None:
    trace = small_trace()
    prompts, _ = sample_requests(trace, 25, seed=1)
    assert len(prompts) == 25
    for start in (0, 10):  # each full pass is a permutation of the whole trace
        assert sorted(prompts[start:start + 10].tolist()) == list(range(1, 11))
    assert len(set(prompts[20:].tolist())) == 5
    np.testing.assert_array_equal(prompts[:10], sample_requests(trace, 10, seed=1)[0])


@pytest.mark.parametrize("n", [0, 1])
def test_sampling_small_n(n: int) -> None:
    assert len(sample_requests(small_trace(), n)[0]) == n


def test_sampling_negative_n() -> None:
    with pytest.raises(ValueError):
        sample_requests(small_trace(), -1)


# --- prefix traces (Mooncake-style JSON lines) -------------------------------------------------

from replica.traces import engine_block_hashes, load_prefix_jsonl  # noqa: E402


def _jsonl(tmp_path: Path, rows: list, name: str = "t.jsonl") -> Path:
    p = tmp_path / name
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return p


def test_mooncake_trace_is_shipped_with_attribution_and_loads_in_order() -> None:
    trace = load_trace("mooncake")
    assert trace.has_prefixes and trace.hash_block_tokens == 512
    assert len(trace) + trace.dropped["too_long"] == 12_031
    assert (np.diff(trace.arrival_s) >= 0).all() and trace.arrival_s[0] == 0
    assert all(h[0] == 0 for h in trace.prefix_hashes)  # every prompt starts with the shared block
    assert "mooncake_conversation_trace.jsonl" in (Path(__file__).parents[2] / "replica/data/ATTRIBUTION.md").read_text()


def test_prefix_trace_leaves_out_requests_longer_than_the_model_context(tmp_path: Path) -> None:
    rows = [{"timestamp": 0, "input_length": 600, "output_length": 10, "hash_ids": [0, 1]},
            {"timestamp": 5, "input_length": 1000, "output_length": 100, "hash_ids": [0, 2]}]
    with pytest.warns(UserWarning, match="left out 1 of 2"):
        trace = load_prefix_jsonl(_jsonl(tmp_path, rows), max_model_len=1024)
    assert list(trace.prompt_lens) == [600] and trace.dropped["too_long"] == 1
    assert trace.prefix_hashes == ((0, 1),)


@pytest.mark.parametrize("line, fragment", [
    ('{"timestamp": 0, "input_length": 600, "output_length": 1, "hash_ids": [0]}', "1 hash_ids for 600"),
    ('{"timestamp": 0, "input_length": 0, "output_length": 1, "hash_ids": []}', "integers >= 1"),
    ('{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [-1]}', "non-negative"),
    ('{"timestamp": "x", "input_length": 10, "output_length": 1, "hash_ids": [1]}', "'timestamp' must be a number"),
    ('[1, 2]', "expected an object"),
    ('{"timestamp": 0,', "not JSON"),
])
def test_malformed_prefix_trace_names_file_and_line(tmp_path: Path, line: str, fragment: str) -> None:
    good = json.dumps({"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [3]})
    path = _jsonl(tmp_path, [good, line])
    with pytest.raises(TraceError, match=fragment) as err:
        load_prefix_jsonl(path)
    assert err.value.line == 2 and err.value.path == str(path)


def test_prefix_trace_timestamps_must_not_go_back(tmp_path: Path) -> None:
    rows = [{"timestamp": 10, "input_length": 10, "output_length": 1, "hash_ids": [1]},
            {"timestamp": 5, "input_length": 10, "output_length": 1, "hash_ids": [2]}]
    with pytest.raises(TraceError, match="line 2"):
        load_prefix_jsonl(_jsonl(tmp_path, rows))


def test_engine_block_hashes_split_each_trace_block_and_name_only_full_blocks() -> None:
    h = engine_block_hashes((7, 9), 512, 512 + 40, 16)
    assert len(h) == 32 + 2  # 40 tokens of the second trace block fill 2 engine blocks
    assert h[0] == 7 * 32 and h[31] == 7 * 32 + 31 and h[32] == 9 * 32 and h[-1] == 9 * 32 + 1
    other = engine_block_hashes((7, 8), 512, 1024, 16)
    assert h[:32] == other[:32] and h[32] != other[32]
    with pytest.raises(ValueError, match="must divide"):
        engine_block_hashes((1,), 512, 100, 24)
