"""The ingress tokenizer: prompts are tokenized once, at the ingress, to give the router and the
replica the prompt length (and the client its ``usage``).

`load_tokenizer(path)` reads a Hugging Face ``tokenizer.json`` (a file, or a model folder holding
one) with the `tokenizers` package; `default_tokenizer()` trains a small deterministic byte-level
BPE in-process (`replica.tiny_model.train_tokenizer`: the tiny model's tokenizer, without
transformers/torch; every string encodes, no ``<unk>``), cached per process.
`tokenizer_for(engine_config)` picks one for the app config: vllm -> ``engine.tokenizer`` or the
model's; sim -> ``engine.tokenizer`` if given, else the built-in one.

`Tokenizer.sim_token_text(n)` is the text of the simulated engine's n-th generated token: a fixed
id (``300 + n % 500``) decoded, so sim output is deterministic text.
"""

from __future__ import annotations

import functools
import os
import re
import threading
from pathlib import Path
from typing import Any

__all__ = ["Tokenizer", "default_tokenizer", "load_tokenizer", "tokenizer_for"]

SIM_TOKEN_BASE = 300  # past the 256 byte-alphabet ids (4..259): merged tokens, readable text
SIM_TOKEN_SPAN = 500


class Tokenizer:
    """A thin wrapper around a `tokenizers.Tokenizer` (no special tokens added on encode)."""

    def __init__(self, tok: Any, source: str) -> None:
        self._tok = tok
        self.source = source
        self.vocab_size = tok.get_vocab_size()
        # An upper bound on the UTF-8 bytes of text one token stands for: a token's string has c
        # characters, and covers at most c bytes (byte-level BPE: one character per byte) or c
        # characters of at most 4 bytes each (SentencePiece-style vocabularies).  So a text of B
        # bytes has at least B / max_token_bytes tokens: a cheap lower bound (`min_tokens`).
        longest = max((len(t) for t in tok.get_vocab(with_added_tokens=True)), default=1)
        self.max_token_bytes = 4 * max(1, longest)

    def min_tokens(self, num_bytes: int) -> int:
        """At least this many tokens encode a text of ``num_bytes`` UTF-8 bytes (no tokenizing)."""
        return num_bytes // self.max_token_bytes

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def count(self, text: str) -> int:
        return len(self.encode(text))

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def sim_token_id(self, n: int) -> int:
        """The id the simulated engine 'generates' as its n-th token."""
        return (SIM_TOKEN_BASE + n % SIM_TOKEN_SPAN) % max(self.vocab_size, 1)

    def sim_token_text(self, n: int) -> str:
        return self.decode([self.sim_token_id(n)])

    def __repr__(self) -> str:
        return f"Tokenizer({self.source}, vocab={self.vocab_size})"


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A ``tokenizer.json`` file, or a folder holding one; a Hugging Face hub id (``org/name``,
    not a local path) is fetched from the hub, as vLLM fetches the model (``HF_TOKEN`` if set)."""
    from tokenizers import Tokenizer as HFTokenizer

    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if p.is_file():
        return Tokenizer(HFTokenizer.from_file(str(p)), str(p))
    text = str(path)
    if _HUB_ID.fullmatch(text) and not Path(text.split("/")[0]).exists():
        try:
            return Tokenizer(HFTokenizer.from_pretrained(text, token=os.environ.get("HF_TOKEN")), f"hub:{text}")
        except Exception as e:  # noqa: BLE001 - no network, unknown id, gated model
            raise FileNotFoundError(f"no tokenizer.json at {path}, and fetching the hub id {text!r} failed: {e}") from e
    raise FileNotFoundError(f"no tokenizer.json at {path}")


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


_LOCK = threading.Lock()


@functools.cache
def _trained() -> Any:
    from replica.tiny_model import train_tokenizer  # no torch or transformers at import

    return train_tokenizer()


def default_tokenizer() -> Tokenizer:
    """The built-in deterministic byte-level BPE (trained once per process, ~0.1-1 s)."""
    with _LOCK:
        return Tokenizer(_trained(), "builtin byte-level BPE")


def tokenizer_for(engine: Any) -> Tokenizer:
    """The tokenizer for an engine config (`serve_app.config.SimEngineConfig`/`VLLMEngineConfig`)."""
    path = getattr(engine, "tokenizer", None)
    if path is None and getattr(engine, "backend", "sim") == "vllm":
        path = engine.model
    if path is None:
        return default_tokenizer()
    return load_tokenizer(path)
