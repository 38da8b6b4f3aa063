"""The ingress tokenizer: prompts are tokenized once, at the ingress, exactly as vLLM's own OpenAI
server would tokenize them (their length routes the request, their token ids go to the engine, the
client gets them back in ``usage``).

As vLLM does it (vLLM 0.32, ``vllm.renderers.hf``): a completion prompt is encoded with the
tokenizer's special tokens (``add_special_tokens``, default true: a Llama/Mistral tokenizer adds
BOS); a chat request is rendered with the model's chat template (the tokenizer config's
``chat_template``, or the app config's ``engine.chat_template`` override) by transformers'
``apply_chat_template(..., tokenize=False, add_generation_prompt=True)``, then encoded without
special tokens (the template writes BOS itself).  A message's content given as a list of parts is
its text parts joined with newlines (vLLM's "string" content format).  A model without a chat
template cannot serve chat requests (400), as with vLLM.

`load_tokenizer(path, chat_template=None)` loads a Hugging Face tokenizer (a model folder, a
``tokenizer.json`` file or a hub id) with transformers (fast tokenizers only: the ids come from
the same Rust tokenizer vLLM's uses); `default_tokenizer()` is the built-in deterministic
byte-level BPE of the simulated engine (`replica.tiny_model.train_tokenizer`), with the simple
chat template `SIM_CHAT_TEMPLATE` (one ``role: content`` line per message, then ``assistant:``),
cached per process.  `tokenizer_for(engine_config)` picks one for the app config: vllm ->
``engine.tokenizer`` or the model's; sim -> ``engine.tokenizer`` if given, else the built-in one.

`Tokenizer.sim_token_text(n)` is the text of the simulated engine's n-th generated token: a fixed
id (``300 + n % 500``) decoded, so sim output is deterministic text.
"""

from __future__ import annotations

import functools
import os
import re
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["SIM_CHAT_TEMPLATE", "ChatTemplateError", "Tokenizer", "default_tokenizer", "load_tokenizer",
           "tokenizer_for"]

SIM_TOKEN_BASE = 300  # past the 256 byte-alphabet ids (4..259): merged tokens, readable text
SIM_TOKEN_SPAN = 500

# The built-in tokenizer's chat template: "role: content" per message, then "assistant:" (the
# prompts the simulated engine got before chat templates: their lengths are unchanged)
SIM_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


class ChatTemplateError(ValueError):
    """The model has no chat template, or rendering it failed (the message says why)."""


class Tokenizer:
    """A Hugging Face fast tokenizer (transformers) as the ingress uses it: `encode` through its
    Rust tokenizer (thread-safe: no per-call settings), `render_chat` through transformers'
    ``apply_chat_template``."""

    def __init__(self, hf: Any, source: str) -> None:
        self.hf = hf
        self._tok = hf.backend_tokenizer
        self.source = source
        self.vocab_size = len(hf)
        # An upper bound on the UTF-8 bytes of text one token stands for: a token's string has c
        # characters, and covers at most c bytes (byte-level BPE: one character per byte) or c
        # characters of at most 4 bytes each (SentencePiece-style vocabularies).  So a text of B
        # bytes has at least B / max_token_bytes tokens: a cheap lower bound (`min_tokens`).
        longest = max((len(t) for t in self._tok.get_vocab(with_added_tokens=True)), default=1)
        self.max_token_bytes = 4 * max(1, longest)
        self._sim_texts: list[str] | None = None

    @property
    def has_chat_template(self) -> bool:
        return bool(self.hf.chat_template)

    def min_tokens(self, num_bytes: int) -> int:
        """At least this many tokens encode a text of ``num_bytes`` UTF-8 bytes (no tokenizing)."""
        return num_bytes // self.max_token_bytes

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def count(self, text: str) -> int:
        return len(self.encode(text))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                    continue_final_message: bool = False) -> str:
        """The chat prompt text, as vLLM renders it (the module docstring)."""
        if not self.has_chat_template:
            raise ChatTemplateError("this model has no chat template (its tokenizer config gives none): set "
                                    "engine.chat_template in the app config, or use /v1/completions")
        try:
            return self.hf.apply_chat_template(list(messages), tokenize=False,
                                               add_generation_prompt=add_generation_prompt,
                                               continue_final_message=continue_final_message)
        except Exception as e:  # noqa: BLE001 - the template raised (raise_exception) or is broken
            raise ChatTemplateError(f"the chat template could not render these messages: {e}") from None

    def sim_token_id(self, n: int) -> int:
        """The id the simulated engine 'generates' as its n-th token."""
        return (SIM_TOKEN_BASE + n % SIM_TOKEN_SPAN) % max(self.vocab_size, 1)

    def sim_token_text(self, n: int) -> str:
        """The text of the simulated engine's n-th token (decoded once per id: a table)."""
        table = self._sim_texts
        if table is None:
            table = self._sim_texts = [self.decode([self.sim_token_id(k)]) for k in range(SIM_TOKEN_SPAN)]
        return table[n % SIM_TOKEN_SPAN]

    def sim_text(self, first: int, last: int) -> str:
        """The text of the simulated engine's tokens ``first`` .. ``last`` (inclusive)."""
        return "".join(self.sim_token_text(n) for n in range(first, last + 1))

    def __repr__(self) -> str:
        return f"Tokenizer({self.source}, vocab={self.vocab_size}, chat template: {self.has_chat_template})"


def _chat_template_text(chat_template: str | None) -> str | None:
    """An override from the app config: a template file's text, or the template itself."""
    if chat_template is None:
        return None
    p = Path(chat_template)
    if "{" not in chat_template and p.is_file():
        return p.read_text(encoding="utf-8")
    if "{" not in chat_template:
        raise FileNotFoundError(f"chat template file {chat_template} does not exist")
    return chat_template


def load_tokenizer(path: str | Path, chat_template: str | None = None) -> Tokenizer:
    """A model folder (``tokenizer.json`` + ``tokenizer_config.json``), a ``tokenizer.json`` file,
    or a Hugging Face hub id (``org/name``, not a local path: fetched as vLLM fetches the model,
    ``HF_TOKEN`` if set); ``chat_template``: an override (a file or the template text)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    p = Path(path)
    text = str(path)
    if p.is_file() and p.name.endswith(".json"):
        hf = PreTrainedTokenizerFast(tokenizer_file=str(p))
        source = str(p)
    elif p.is_dir():
        if not (p / "tokenizer.json").is_file() and not (p / "tokenizer_config.json").is_file():
            raise FileNotFoundError(f"no tokenizer.json at {path}")
        hf = AutoTokenizer.from_pretrained(str(p))
        source = str(p)
    elif _HUB_ID.fullmatch(text) and not Path(text.split("/")[0]).exists():
        try:
            hf = AutoTokenizer.from_pretrained(text, token=os.environ.get("HF_TOKEN"))
        except Exception as e:  # noqa: BLE001 - no network, unknown id, gated model
            raise FileNotFoundError(f"no tokenizer.json at {path}, and fetching the hub id {text!r} failed: {e}") from e
        source = f"hub:{text}"
    else:
        raise FileNotFoundError(f"no tokenizer.json at {path}")
    if not hf.is_fast:
        raise ValueError(f"{path}: a fast tokenizer (tokenizer.json) is needed")
    override = _chat_template_text(chat_template)
    if override is not None:
        hf.chat_template = override
    return Tokenizer(hf, source)


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


_LOCK = threading.Lock()


@functools.cache
def _trained() -> Any:
    from transformers import PreTrainedTokenizerFast

    from replica.tiny_model import BOS, EOS, PAD, UNK, train_tokenizer

    return PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(), bos_token=BOS, eos_token=EOS, unk_token=UNK,
                                   pad_token=PAD, chat_template=SIM_CHAT_TEMPLATE, clean_up_tokenization_spaces=False)


def default_tokenizer(chat_template: str | None = None) -> Tokenizer:
    """The built-in deterministic byte-level BPE (trained once per process, ~0.1-1 s), with
    `SIM_CHAT_TEMPLATE` or the given override."""
    with _LOCK:
        hf = _trained()
    if chat_template is not None:
        hf = hf.__class__(tokenizer_object=hf.backend_tokenizer, **hf.special_tokens_map,
                          chat_template=_chat_template_text(chat_template), clean_up_tokenization_spaces=False)
    return Tokenizer(hf, "builtin byte-level BPE")


def tokenizer_for(engine: Any) -> Tokenizer:
    """The tokenizer for an engine config (`serve_app.config.SimEngineConfig`/`VLLMEngineConfig`)."""
    path = engine.tokenizer
    chat_template = engine.chat_template
    if path is None and engine.backend == "vllm":
        path = engine.model
    if path is None:
        return default_tokenizer(chat_template)
    return load_tokenizer(path, chat_template)
