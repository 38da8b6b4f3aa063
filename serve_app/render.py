"""The OpenAI response side of the ingress: every response shape, rendered once for both
endpoints (pure: no Ray).

``/v1/completions`` and ``/v1/chat/completions`` differ only in the object names and in where a
choice's text goes (``text`` or ``message``/``delta``); `Renderer` holds that difference, so each
shape (the whole response, a stream chunk, the usage chunk, an error event) is written once.

The text of a chunk is the engine's; the simulated engine has no model and produces none, so its
n-th token reads as the ingress tokenizer's `Tokenizer.sim_token_text(n)` (deterministic text).
"""

from __future__ import annotations

import json
import time
from typing import Any

from replica.contract import StreamChunk
from serve_app.openai_api import RequestError
from serve_app.tokenizer import Tokenizer

__all__ = ["DONE_EVENT", "Renderer", "usage"]

DONE_EVENT = "data: [DONE]\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


class Renderer:
    """Renders one endpoint's responses (``chat`` or completions) for model ``model_name``."""

    def __init__(self, model_name: str, tokenizer: Tokenizer, *, chat: bool) -> None:
        self.model_name, self.tokenizer, self.chat = model_name, tokenizer, chat

    def text(self, chunk: StreamChunk, previous_tokens: int) -> str:
        """The new text of ``chunk`` (tokens ``previous_tokens + 1 .. chunk.num_tokens``)."""
        if chunk.text is not None:
            return chunk.text
        return "".join(self.tokenizer.sim_token_text(n) for n in range(previous_tokens + 1, chunk.num_tokens + 1))

    def _base(self, request_id: str, created: int, *, stream: bool) -> dict[str, Any]:
        if self.chat:
            obj = "chat.completion.chunk" if stream else "chat.completion"
        else:
            obj = "text_completion"
        return {"id": request_id, "object": obj, "created": created, "model": self.model_name}

    def response(self, request_id: str, text: str, finish_reason: str, prompt_tokens: int,
                 completion_tokens: int) -> dict[str, Any]:
        """The body of a non-streaming response."""
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**self._base(request_id, int(time.time()), stream=False), "choices": [choice],
                "usage": usage(prompt_tokens, completion_tokens)}

    def chunk_event(self, request_id: str, created: int, text: str | None, finish_reason: str | None,
                    *, first: bool = False) -> str:
        """One SSE event of a stream: new text (None: none), the finish reason on the last one;
        ``first``: the chat stream's opening event (the assistant role)."""
        if self.chat:
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return sse({**self._base(request_id, created, stream=True), "choices": [choice]})

    def usage_event(self, request_id: str, created: int, prompt_tokens: int, completion_tokens: int) -> str:
        """The stream's usage event (``stream_options.include_usage``): no choices."""
        return sse({**self._base(request_id, created, stream=True), "choices": [],
                    "usage": usage(prompt_tokens, completion_tokens)})

    @staticmethod
    def error_event(err: RequestError) -> str:
        """An error inside a stream that already answered 200: OpenAI's error JSON as an event."""
        return sse(err.to_openai())
