"""The HTTP routes: /health, /v1/models, /v1/chat/completions, /v1/completions.

Each handler validates and tokenizes its request into `GenRequest`s; `respond` then admits them to
the worker and answers, for both endpoints, through one collect path (plain JSON) or one SSE path.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable
from typing import Optional

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from builder.runtime.chatglmcpp.engine import ContextLengthError, Engine
from builder.runtime.chatglmcpp.protocol import (
    ROLES,
    SSE_DONE,
    APIError,
    ChatCompletionRequest,
    ChatShape,
    CompletionRequest,
    CompletionShape,
    Shape,
    message_text,
    sse,
)
from builder.runtime.chatglmcpp.settings import Settings
from builder.runtime.chatglmcpp.worker import GenRequest, Worker

router = APIRouter()


class Server:
    """What the routes need: the engine (tokenizer, limits), the worker and the settings."""

    def __init__(self, engine: Engine, worker: Worker, settings: Settings, created: int):
        self.engine, self.worker, self.settings, self.created = engine, worker, settings, created

    @property
    def name(self) -> str:
        return self.settings.served_model_name

    def check_model(self, name: Optional[str]) -> None:
        if name is not None and name != self.name:
            raise APIError(404, f"The model `{name}` does not exist.", type="NotFoundError", param="model",
                           code="model_not_found")  # fmt: skip

    def model_card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "chatglm.cpp",
                "root": self.name, "parent": None, "max_model_len": self.engine.max_length}  # fmt: skip

    def encode(self, fn: Callable, arg, param: str) -> list[int]:
        try:
            ids = fn(arg)
        except RuntimeError as e:
            raise APIError(400, f"cannot tokenize the input: {e}", param=param) from None
        try:
            self.engine.check_context(ids)
        except ContextLengthError as e:
            raise APIError(400, str(e), param=param) from None
        return ids


def _server(request: Request) -> Server:
    return request.app.state.server


# -- routes ---------------------------------------------------------------------------------------


@router.get("/health")
async def health(request: Request):
    return {"status": "ok", "model": _server(request).name}


@router.get("/v1/models")
async def models(request: Request):
    return {"object": "list", "data": [_server(request).model_card()]}


@router.get("/v1/models/{name:path}")
async def model(name: str, request: Request):
    server = _server(request)
    server.check_model(name)
    return server.model_card()


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request):
    server = _server(request)
    _check_common(server, req)
    messages = []
    for m in req.messages:
        role = ROLES.get(m.role)
        if role is None:
            raise APIError(400, f"unsupported message role {m.role!r}", param="messages")
        messages.append((role, message_text(m)))
    if req.max_completion_tokens is not None and req.max_tokens is None:
        req.max_tokens = req.max_completion_tokens
    input_ids = server.encode(server.engine.encode_chat, messages, "messages")
    gens = [GenRequest(input_ids, req.sampling(default_max_tokens=None), strip_leading=True)]
    return await respond(server, ChatShape(f"chatcmpl-{uuid.uuid4().hex}", server.name), gens, req)


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request):
    server = _server(request)
    _check_common(server, req)
    prompts = req.prompt
    if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    if not prompts:
        raise APIError(400, "prompt must not be empty", param="prompt")
    params = req.sampling(default_max_tokens=16)
    gens = []
    for p in prompts:
        ids = server.encode(server.engine.encode_prompt, p, "prompt")
        prefix = (p if isinstance(p, str) else server.engine.decode(list(p))) if req.echo else ""
        gens.append(GenRequest(ids, params, prefix=prefix))
    return await respond(server, CompletionShape(f"cmpl-{uuid.uuid4().hex}", server.name), gens, req)


def _check_common(server: Server, req) -> None:
    server.check_model(req.model)
    if req.n != 1:
        raise APIError(400, "n > 1 is not supported by this server", param="n")


# -- the shared answer path ------------------------------------------------------------------------


async def respond(server: Server, shape: Shape, gens: list[GenRequest], req):
    """Admit `gens` to the worker, then answer with the whole JSON body or an SSE stream."""
    if not server.worker.admit():
        raise APIError(503, f"Server busy: {server.worker.max_queue} requests already waiting; retry later.",
                       type="service_unavailable", code=503)  # fmt: skip
    events, cancelled = server.worker.start(gens)
    if not req.stream:
        return await collect(shape, events, cancelled, len(gens))
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return EventStream(stream(shape, events, cancelled, include_usage), on_close=cancelled.set)


async def collect(shape: Shape, events: asyncio.Queue, cancelled: threading.Event, n: int) -> dict:
    """Wait for every choice; the job's error becomes the HTTP error."""
    texts, outcomes = [""] * n, [None] * n
    try:
        async for event in _events(events):
            if event[0] == "delta":
                texts[event[1]] += event[2]
            elif event[0] == "done":
                outcomes[event[1]] = event[2]
            elif event[0] == "error":
                raise event[1]
    finally:
        cancelled.set()  # the client went away (task cancelled): stop generating
    return shape.body(texts, outcomes)


async def stream(shape: Shape, events: asyncio.Queue, cancelled: threading.Event, include_usage: bool):
    prompt_tokens = completion_tokens = 0
    try:
        for chunk in shape.first_chunks():
            yield sse(chunk)
        async for event in _events(events):
            if event[0] == "delta":
                yield sse(shape.delta_chunk(event[1], event[2]))
            elif event[0] == "done":
                outcome = event[2]
                prompt_tokens += outcome.prompt_tokens
                completion_tokens += outcome.completion_tokens
                yield sse(shape.finish_chunk(event[1], outcome))
            elif event[0] == "error":
                yield sse(event[1].body())
        if include_usage:
            yield sse(shape.usage_chunk(prompt_tokens, completion_tokens))
        yield SSE_DONE
    finally:
        cancelled.set()


async def _events(events: asyncio.Queue):
    while True:
        event = await events.get()
        if event[0] == "end":
            return
        yield event


class EventStream(StreamingResponse):
    """SSE response that always runs `on_close` when the response ends, the client went away
    included: a cancelled body iterator is left suspended (its `finally` only runs whenever it is
    garbage-collected), so that is no place to stop the generation."""

    def __init__(self, content, on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
