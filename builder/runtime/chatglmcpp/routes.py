"""The HTTP routes: /health, /metrics, /v1/models, /v1/chat/completions, /v1/completions.

A generation request is admitted first (503 at once when the queue is full), then tokenized by the
engine process and validated (token ids, context, max_tokens: 400 before anything is generated),
then queued. `respond` answers both endpoints through one collect path (plain JSON) or one SSE
path; either way a client that goes away cancels its job, queued or running.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Optional, Union

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from builder.runtime.chatglmcpp.engine_process import GenRequest, TokenizeError
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
from builder.runtime.chatglmcpp.scheduler import Job, Scheduler
from builder.runtime.chatglmcpp.settings import Settings

router = APIRouter()


class Server:
    """What the routes need: the scheduler (engine, queue, metrics) and the settings."""

    def __init__(self, scheduler: Scheduler, settings: Settings):
        self.scheduler, self.settings, self.created = scheduler, settings, int(time.time())

    @property
    def name(self) -> str:
        return self.settings.served_model_name

    def check_model(self, name: Optional[str]) -> None:
        if name is not None and name != self.name:
            raise APIError(404, f"The model `{name}` does not exist.", type="NotFoundError", param="model",
                           code="model_not_found")  # fmt: skip

    def model_card(self) -> dict:
        info = self.scheduler.info
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "chatglm.cpp",
                "root": self.name, "parent": None, "max_model_len": info.max_length if info else None}  # fmt: skip


def _server(request: Request) -> Server:
    return request.app.state.server


# -- plain routes ---------------------------------------------------------------------------------


@router.get("/health")
async def health(request: Request):
    """200 once the engine process has the model loaded; 503 while it starts or restarts."""
    server = _server(request)
    s = server.scheduler
    body = {"status": "ok" if s.healthy else s.state, "model": server.name, "engine": s.state,
            "running": int(s.running is not None), "waiting": len(s.queue)}  # fmt: skip
    return JSONResponse(body, status_code=200 if s.healthy else 503)


@router.get("/metrics")
async def metrics(request: Request):
    m = _server(request).scheduler.metrics
    return Response(m.render(), media_type=m.content_type)


@router.get("/v1/models")
async def models(request: Request):
    return {"object": "list", "data": [_server(request).model_card()]}


@router.get("/v1/models/{name:path}")
async def model(name: str, request: Request):
    server = _server(request)
    server.check_model(name)
    return server.model_card()


# -- generation routes ----------------------------------------------------------------------------


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

    async def prepare() -> list[GenRequest]:
        ids = await _tokenize(server, "chat", messages, param="messages")
        _check_length(server, ids, req.max_tokens, "messages")
        return [GenRequest(ids, req.sampling(default_max_tokens=None), strip_leading=True, stream=bool(req.stream))]

    return await respond(request, server, ChatShape(f"chatcmpl-{uuid.uuid4().hex}", server.name), prepare, req)


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request):
    server = _server(request)
    _check_common(server, req)
    prompts = _prompt_list(req.prompt)
    vocab = server.scheduler.info.vocab_size if server.scheduler.info else None
    for p in prompts:
        if isinstance(p, list):
            _check_token_ids(p, vocab)

    async def prepare() -> list[GenRequest]:
        params = req.sampling(default_max_tokens=16)
        tokenized = await _tokenize(server, "prompts", prompts, echo=req.echo, param="prompt")
        for ids, _ in tokenized:
            _check_length(server, ids, params.max_new_tokens, "prompt")
        return [GenRequest(ids, params, prefix=text, stream=bool(req.stream)) for ids, text in tokenized]

    return await respond(request, server, CompletionShape(f"cmpl-{uuid.uuid4().hex}", server.name), prepare, req)


def _check_common(server: Server, req) -> None:
    server.check_model(req.model)
    if req.n != 1:
        raise APIError(400, "n > 1 is not supported by this server", param="n")


def _prompt_list(prompt: Union[str, list]) -> list[Union[str, list[int]]]:
    """OpenAI's four prompt forms as a list of prompts: text, or token ids; none may be empty."""
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise APIError(400, "prompt must not be empty (nor hold an empty prompt)", param="prompt")
    return prompts


def _check_token_ids(ids: list[int], vocab: Optional[int]) -> None:
    if vocab is None:
        return
    bad = next((i for i in ids if not 0 <= i < vocab), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is out of range: this model's vocabulary has {vocab} tokens "
                            f"(ids 0..{vocab - 1})", param="prompt")  # fmt: skip


async def _tokenize(server: Server, what: str, payload, *, echo: bool = False, param: str):
    try:
        return await server.scheduler.tokenize(what, payload, echo)
    except TokenizeError as e:
        raise APIError(400, f"cannot tokenize the input: {e}", param=param) from None


def _check_length(server: Server, ids: list[int], max_tokens: Optional[int], param: str) -> None:
    """The prompt must leave room for one token, and for all of max_tokens when it is given
    (vLLM's rule and wording: a request is refused rather than silently cut)."""
    limit = server.scheduler.info.max_length
    if len(ids) + (max_tokens or 1) <= limit:
        return
    if max_tokens is None or len(ids) >= limit:
        message = (f"This model's maximum context length is {limit} tokens. However, your {param} has "
                   f"{len(ids)} tokens, which leaves no room for new tokens.")  # fmt: skip
    else:
        message = (f"This model's maximum context length is {limit} tokens. However, you requested "
                   f"{len(ids) + max_tokens} tokens ({len(ids)} in the {param}, {max_tokens} in the completion). "
                   f"Please reduce the length of the {param} or completion.")  # fmt: skip
    raise APIError(400, message, param="max_tokens" if max_tokens and len(ids) < limit else param)


# -- the shared answer path ------------------------------------------------------------------------


async def respond(request: Request, server: Server, shape: Shape, prepare: Callable, req):
    """Admit, prepare (tokenize + validate), queue; answer with the whole JSON body or an SSE stream."""
    scheduler = server.scheduler
    if not scheduler.admit():
        scheduler.metrics.rejected.inc()
        raise APIError(503, f"Server busy: {scheduler.max_queue} requests already waiting; retry later.",
                       type="service_unavailable", code=503,
                       headers={"Retry-After": str(server.settings.retry_after)})  # fmt: skip
    try:
        gens = await _until_disconnected(request, prepare())
    except BaseException:
        scheduler.release()
        raise
    job = scheduler.submit(gens)
    if not req.stream:
        return await collect(request, scheduler, shape, job)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return EventStream(stream(shape, job, include_usage), on_close=lambda: scheduler.cancel(job))


async def _until_disconnected(request: Request, work):
    """Await `work`, unless the client hangs up first (then cancel it and raise ClientGone)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task not in done:
        task.cancel()
        raise ClientGone
    return task.result()


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the request body has already been read by then)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def collect(request: Request, scheduler: Scheduler, shape: Shape, job: Job) -> dict:
    """Wait for every choice; the job's error becomes the HTTP error. A client that hangs up
    cancels the job (uvicorn does not cancel a non-streaming handler by itself)."""
    n = len(job.gens)
    texts, outcomes = [""] * n, [None] * n

    async def gather() -> None:
        async for event in _events(job):
            if event[0] == "delta":
                texts[event[1]] += event[2]
            elif event[0] == "done":
                outcomes[event[1]] = event[2]
            elif event[0] == "error":
                raise event[1]

    try:
        await _until_disconnected(request, gather())
    except BaseException:
        scheduler.cancel(job)
        raise
    return shape.body(texts, outcomes)


async def stream(shape: Shape, job: Job, include_usage: bool):
    prompt_tokens = completion_tokens = 0
    for chunk in shape.first_chunks():
        yield sse(chunk)
    async for event in _events(job):
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


async def _events(job: Job):
    while True:
        event = await job.events.get()
        if event[0] == "end":
            return
        yield event


class EventStream(StreamingResponse):
    """SSE response that always runs `on_close` when the response ends, the client going away
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
