"""The OpenAI wire format: request bodies, the error shape, and the response / stream-chunk JSON."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from builder.runtime.chatglmcpp.engine import Outcome, SamplingParams


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown OpenAI/vLLM fields are accepted and ignored


class StreamOptions(_Body):
    include_usage: bool = False


class ChatMessageIn(_Body):
    role: str
    content: Union[str, list[dict[str, Any]], None] = None
    name: Optional[str] = None


class _Sampling(_Body):
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0)
    top_p: Optional[float] = Field(default=None, ge=0, le=1)
    top_k: Optional[int] = None  # vLLM extension; -1 or 0: off
    repetition_penalty: Optional[float] = Field(default=None, gt=0)
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(default=1, ge=1)

    def sampling(self, default_max_tokens: Optional[int]) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_new_tokens=self.max_tokens if self.max_tokens is not None else default_max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(0, self.top_k or 0),
            repetition_penalty=self.repetition_penalty or 1.0,
            stop=stop,
        )


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]  # token ids are range-checked in routes.py
    echo: bool = False
    max_tokens: Optional[int] = Field(default=16, ge=1)  # OpenAI's and vLLM's default for completions


class APIError(Exception):
    """An error answered in the OpenAI shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param=None, code=None,
                 headers: Optional[dict[str, str]] = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.status, self.message, self.type, self.param, self.code)


def error_body(status: int, message: str, type: str, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code if code is not None else status}}


ROLES = {
    "system": "system", "user": "user", "assistant": "assistant", "developer": "system",
    "tool": "observation", "observation": "observation", "function": "observation",
}  # fmt: skip


def message_text(msg: ChatMessageIn) -> str:
    if msg.content is None:
        return ""
    if isinstance(msg.content, str):
        return msg.content
    parts = []
    for part in msg.content:
        if part.get("type") != "text":
            raise APIError(
                400, f"content part type {part.get('type')!r} is not supported (text only)", param="messages"
            )
        parts.append(str(part.get("text", "")))
    return "".join(parts)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def finish_reason(outcome: Outcome) -> str:
    """OpenAI knows "stop" and "length"; a generation cut short by its own cancellation ends as "stop"."""
    return "stop" if outcome.finish_reason == "abort" else outcome.finish_reason


# -- response shapes: what differs between /v1/chat/completions and /v1/completions ---------------


@dataclass
class Shape:
    """The JSON of one endpoint's responses; the collect and SSE paths (routes.py) are shared."""

    id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    object: ClassVar[str]
    chunk_object: ClassVar[str]

    def _envelope(self, obj: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices, **extra}

    def first_chunks(self) -> list[dict]:
        return []

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        return self._envelope(self.chunk_object, [], usage=usage(prompt_tokens, completion_tokens))


class ChatShape(Shape):
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def first_chunks(self) -> list[dict]:
        return [self._chunk({"role": "assistant", "content": ""})]

    def _chunk(self, delta: dict, finish: Optional[str] = None) -> dict:
        return self._envelope(
            self.chunk_object, [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        )

    def delta_chunk(self, index: int, text: str) -> dict:
        return self._chunk({"content": text})

    def finish_chunk(self, index: int, outcome: Outcome) -> dict:
        return self._chunk({}, finish_reason(outcome))

    def body(self, texts: list[str], outcomes: list[Outcome]) -> dict:
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": t},
                "logprobs": None,
                "finish_reason": finish_reason(o),
            }
            for i, (t, o) in enumerate(zip(texts, outcomes, strict=True))
        ]
        return self._envelope(self.object, choices, usage=_total_usage(outcomes))


class CompletionShape(Shape):
    object = "text_completion"
    chunk_object = "text_completion"

    def _chunk(self, index: int, text: str, finish: Optional[str] = None) -> dict:
        return self._envelope(
            self.chunk_object, [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}]
        )

    def delta_chunk(self, index: int, text: str) -> dict:
        return self._chunk(index, text)

    def finish_chunk(self, index: int, outcome: Outcome) -> dict:
        return self._chunk(index, "", finish_reason(outcome))

    def body(self, texts: list[str], outcomes: list[Outcome]) -> dict:
        choices = [
            {"index": i, "text": t, "logprobs": None, "finish_reason": finish_reason(o)}
            for i, (t, o) in enumerate(zip(texts, outcomes, strict=True))
        ]
        return self._envelope(self.object, choices, usage=_total_usage(outcomes))


def _total_usage(outcomes: list[Outcome]) -> dict:
    return usage(sum(o.prompt_tokens for o in outcomes), sum(o.completion_tokens for o in outcomes))


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
