"""The OpenAI response side of the ingress: every response shape, rendered once for both
endpoints (pure: no Ray).

``/v1/completions`` and ``/v1/chat/completions`` differ in the object names, in where a choice's
text goes (``text`` or ``message``/``delta``) and in the shape of ``logprobs``; `Renderer` holds
those differences, so each shape (the whole response, a stream chunk, the usage chunk, an error
event) is written once.  Shapes follow vLLM's own OpenAI server (vLLM 0.32,
``vllm.entrypoints.openai``), which follows OpenAI's:

- completions ``logprobs``: ``tokens``, ``token_logprobs``, ``top_logprobs`` (per token a dict
  token -> logprob of the engine's candidates: the sampled token and the top N) and
  ``text_offset`` (each token's offset in the choice's text, continued across stream chunks);
  with ``echo`` the prompt's tokens come first (the first one has no logprob: null).
- chat ``logprobs``: ``{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob,
  bytes}]}]}``, ``top_logprobs`` the first ``top_logprobs`` of the engine's candidates.
- logprobs are clipped at -9999.0 (JSON has no -inf); a token the engine did not detokenize is
  decoded alone with the ingress tokenizer (as vLLM does).
- ``n`` > 1: one choice per index; streamed, each chunk carries one choice.
- ``service_tier``: on every response and every stream chunk, the value that served it
  (`serve_app.service_tier`).
- ``usage``: ``prompt_tokens``, ``completion_tokens``, ``total_tokens`` and OpenAI's
  ``prompt_tokens_details: {"cached_tokens": N}``, the prompt tokens the engine's prefix cache
  held (vLLM's ``num_cached_tokens``, as vLLM's server reports it with
  ``--enable-prompt-tokens-details``; 0 when the engine reported none), in the whole response,
  the stream's usage event and every event of vLLM's ``continuous_usage_stats`` (vLLM's server
  leaves it out of the latter).

`Choice` accumulates one choice's chunks (text, tokens, finish reason, logprobs).  The text of a
chunk is the engine's; the simulated engine has no model and produces none, so its n-th token
reads as the ingress tokenizer's `Tokenizer.sim_token_text(n)` (deterministic text).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from json.encoder import encode_basestring_ascii as _encode_str  # json.dumps's own string encoder (C)
from typing import Any

from replica.contract import StreamChunk, TokenLogprob
from serve_app.openai_api import RequestError
from serve_app.tokenizer import Tokenizer

__all__ = ["DONE_EVENT", "LOGPROB_FLOOR", "Choice", "Renderer", "StreamEvents", "usage"]

DONE_EVENT = "data: [DONE]\n\n"
LOGPROB_FLOOR = -9999.0  # what vLLM and OpenAI send for -inf


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; ``cached_tokens``: prompt tokens served from the prefix cache."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _clip(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


class Choice:
    """One choice of a response as its chunks arrive: ``num_tokens`` so far, the text ``parts``,
    the ``finish_reason``, and (when logprobs were asked) the entries and token ids so far
    (``text_offset``: where the next token's text starts, for completions logprobs)."""

    __slots__ = ("index", "num_tokens", "parts", "finish_reason", "stop_reason", "token_ids", "entries",
                 "text_offset", "started")

    def __init__(self, index: int) -> None:
        self.index = index
        self.num_tokens = 0
        self.parts: list[str] = []
        self.finish_reason: str | None = None
        self.stop_reason: str | None = None
        self.token_ids: list[int] = []
        self.entries: list[TokenLogprob | None] = []
        self.text_offset = 0
        self.started = False  # a stream sent something of this choice (the echo goes first)

    @property
    def text(self) -> str:
        return "".join(self.parts)


class Renderer:
    """Renders one endpoint's responses (``chat`` or completions) for model ``model_name``."""

    def __init__(self, model_name: str, tokenizer: Tokenizer, *, chat: bool) -> None:
        self.model_name, self.tokenizer, self.chat = model_name, tokenizer, chat

    # --- chunk contents -------------------------------------------------------------------------
    def text(self, chunk: StreamChunk, previous_tokens: int) -> str:
        """The new text of ``chunk`` (tokens ``previous_tokens + 1 .. chunk.num_tokens``)."""
        if chunk.text is not None:
            return chunk.text
        return self.tokenizer.sim_text(previous_tokens + 1, chunk.num_tokens)

    def _token(self, token_id: int, text: str | None) -> str:
        return text if text is not None else self.tokenizer.hf.decode([token_id])

    def logprobs(self, token_ids: Sequence[int], entries: Sequence[TokenLogprob | None], top: int,
                 text_offset: int = 0) -> dict[str, Any]:
        """The ``logprobs`` of a choice (or of a stream chunk's new tokens): the endpoint's shape
        for ``token_ids`` with their engine ``entries`` (None: no logprob, the prompt's first
        token), ``top`` candidates per token; ``text_offset``: where the first token's text starts
        (completions)."""
        if self.chat:
            content = []
            for tid, e in zip(token_ids, entries):
                if e is None:
                    token = self._token(tid, None)
                    content.append({"token": token, "logprob": LOGPROB_FLOOR,
                                    "bytes": list(token.encode("utf-8", errors="replace")), "top_logprobs": []})
                    continue
                tops = []
                for i, (cid, ctext, clp) in enumerate(e.top):
                    if i >= top:
                        break
                    ctoken = self._token(cid, ctext)
                    tops.append({"token": ctoken, "logprob": _clip(clp),
                                 "bytes": list(ctoken.encode("utf-8", errors="replace"))})
                content.append({"token": self._token(tid, e.token), "logprob": _clip(e.logprob),
                                "bytes": None if e.token is None else list(e.token.encode("utf-8", errors="replace")),
                                "top_logprobs": tops})
            return {"content": content}
        tokens: list[str] = []
        token_logprobs: list[float | None] = []
        top_logprobs: list[dict[str, float] | None] = []
        offsets: list[int] = []
        offset = text_offset
        for tid, e in zip(token_ids, entries):
            token = self._token(tid, None if e is None else e.token)
            tokens.append(token)
            offsets.append(offset)
            offset += len(token)
            if e is None:
                token_logprobs.append(None)
                top_logprobs.append(None)
            else:
                token_logprobs.append(_clip(e.logprob))
                top_logprobs.append({self._token(cid, ctext): _clip(clp)
                                     for i, (cid, ctext, clp) in enumerate(e.top) if i <= top})
        return {"text_offset": offsets, "token_logprobs": token_logprobs, "tokens": tokens,
                "top_logprobs": top_logprobs}

    # --- whole responses ------------------------------------------------------------------------
    def _base(self, request_id: str, created: int, service_tier: str | None, *, stream: bool) -> dict[str, Any]:
        if self.chat:
            obj = "chat.completion.chunk" if stream else "chat.completion"
        else:
            obj = "text_completion"
        base = {"id": request_id, "object": obj, "created": created, "model": self.model_name}
        if service_tier is not None:
            base["service_tier"] = service_tier
        return base

    def response(self, request_id: str, choices: Sequence[Choice], prompt_tokens: int, *,
                 service_tier: str | None = None, echo_text: str | None = None,
                 logprobs: list[dict[str, Any] | None] | None = None, cached_tokens: int = 0) -> dict[str, Any]:
        """The body of a non-streaming response: ``choices`` in index order, each starting with
        ``echo_text`` if given, with its ``logprobs`` (rendered by the caller, one per choice);
        ``cached_tokens``: the prompt tokens the engine's prefix cache held."""
        out = []
        for k, c in enumerate(choices):
            text = (echo_text or "") + c.text
            lp = logprobs[k] if logprobs is not None else None
            if self.chat:
                out.append({"index": c.index, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                            "finish_reason": c.finish_reason})
            else:
                out.append({"index": c.index, "text": text, "logprobs": lp, "finish_reason": c.finish_reason})
        return {**self._base(request_id, int(time.time()), service_tier, stream=False), "choices": out,
                "usage": usage(prompt_tokens, sum(c.num_tokens for c in choices), cached_tokens)}

    # --- stream events --------------------------------------------------------------------------
    def chunk_event(self, request_id: str, created: int, text: str | None, finish_reason: str | None,
                    *, index: int = 0, first: bool = False, logprobs: dict[str, Any] | None = None,
                    service_tier: str | None = None, usage: dict[str, Any] | None = None) -> str:
        """One SSE event of a stream: choice ``index``'s new text (None: none), its finish reason
        on its last one, its ``logprobs`` for these tokens; ``first``: the chat stream's opening
        event of the choice (the assistant role); ``usage``: the usage so far (vLLM's
        ``stream_options.continuous_usage_stats``)."""
        if self.chat:
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
        event = {**self._base(request_id, created, service_tier, stream=True), "choices": [choice]}
        if usage is not None:
            event["usage"] = usage
        return sse(event)

    def usage_event(self, request_id: str, created: int, prompt_tokens: int, completion_tokens: int, *,
                    service_tier: str | None = None, cached_tokens: int = 0) -> str:
        """The stream's usage event (``stream_options.include_usage``): no choices."""
        return sse({**self._base(request_id, created, service_tier, stream=True), "choices": [],
                    "usage": usage(prompt_tokens, completion_tokens, cached_tokens)})

    def stream_events(self, request_id: str, created: int, service_tier: str | None = None) -> StreamEvents:
        """The events of one stream without logprobs, preformatted (the common case, one per
        chunk): `StreamEvents.text` writes only the choice's index, text and
        finish reason into the stream's fixed head; the same JSON as `chunk_event`."""
        head = json.dumps(self._base(request_id, created, service_tier, stream=True))[:-1]
        return StreamEvents(f'data: {head}, "choices": [{{"index": ', chat=self.chat)

    @staticmethod
    def error_event(err: RequestError) -> str:
        """An error inside a stream that already answered 200: OpenAI's error JSON as an event."""
        return sse(err.to_openai())


_FINISH = {None: "null", "length": '"length"', "stop": '"stop"', "abort": '"abort"'}


class StreamEvents:
    """A stream's text events from a preformatted head (`Renderer.stream_events`): per chunk one
    string escape (the C encoder `json.dumps` uses) and a join, no dict and no generic dumps."""

    __slots__ = ("head", "chat")

    def __init__(self, head: str, *, chat: bool) -> None:
        self.head, self.chat = head, chat

    def text(self, index: int, text: str | None, finish_reason: str | None,
             usage: tuple[int, int, int] | None = None) -> str:
        """Choice ``index``'s event; ``usage``: (prompt tokens, completion tokens so far, cached
        prompt tokens), vLLM's ``continuous_usage_stats``."""
        finish = _FINISH.get(finish_reason) or _encode_str(finish_reason)
        tail = "}\n\n" if usage is None else (
            f', "usage": {{"prompt_tokens": {usage[0]}, "completion_tokens": {usage[1]}, '
            f'"total_tokens": {usage[0] + usage[1]}, "prompt_tokens_details": {{"cached_tokens": {usage[2]}}}}}}}\n\n')
        if self.chat:
            delta = "{}" if text is None else f'{{"content": {_encode_str(text)}}}'
            return f'{self.head}{index}, "delta": {delta}, "logprobs": null, "finish_reason": {finish}}}]{tail}'
        return (f'{self.head}{index}, "text": {_encode_str(text or "")}, "logprobs": null, '
                f'"finish_reason": {finish}}}]{tail}')
