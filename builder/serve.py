"""OpenAI-compatible HTTP server (and a terminal chat) over chatglm.cpp's `Pipeline`.

Why not the bundled `chatglm_cpp.openai_api`: it has no /health, never sends `data: [DONE]`, treats
`max_tokens` as the total length, and crashes on the broken UTF-8 that small models emit. Here:

* `max_tokens` counts new tokens; temperature 0 (or a tiny top_p) is greedy decoding.
* `stop` strings are matched on the decoded text (held back while streaming, so a stop string is
  never half-sent).
* Text is decoded incrementally from the token ids; invalid UTF-8 comes back with U+FFFD, never a 500.
* The pipeline is not thread-safe: every generation runs on one worker thread, at most `max_queue`
  requests wait for it, the next ones get 503 at once.
* `$API_KEY` set -> `/v1/*` needs `Authorization: Bearer $API_KEY` (401 otherwise); /health is open.

No torch here: the runtime image installs only chatglm-cpp, fastapi and uvicorn.
"""

from __future__ import annotations

import asyncio
import codecs
import hmac
import json
import os
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from builder.errors import BuilderError

# Below these, sampling is pointless: decode greedily (vLLM uses the same epsilon).
SAMPLING_EPS = 1e-5
_NO_TRUNCATION = 1 << 30  # max_length passed to the tokenizer: we check the context ourselves


# --------------------------------------------------------------------------------------------------
# Engine: tokenization, generation loop, incremental decoding, stop strings (no HTTP in here)
# --------------------------------------------------------------------------------------------------


class ContextLengthError(ValueError):
    """The prompt leaves no room for a single new token."""


@dataclass
class SamplingParams:
    max_new_tokens: Optional[int] = None  # None: up to the context length
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS or self.top_p < SAMPLING_EPS


class Engine:
    """One chatglm_cpp.Pipeline plus what the server needs around it. Not thread-safe: call
    `generate` from one thread at a time (the server's single worker)."""

    def __init__(self, pipeline: Any):
        self.pipeline = pipeline
        self.model = pipeline.model
        self.tokenizer = pipeline.tokenizer
        config = self.model.config
        self.max_length = int(config.max_length)
        self.model_type = str(config.model_type_name)
        self.eos_ids = {i for i in [config.eos_token_id, *config.extra_eos_token_ids] if i is not None and i >= 0}
        self._tok_lock = threading.Lock()  # tokenizer calls come from the event loop and the worker
        self._decodable: dict[int, bool] = {}

    @classmethod
    def load(cls, ggml: Path | str, max_length: Optional[int] = None) -> "Engine":
        import chatglm_cpp

        # chatglm_cpp.Pipeline treats a path that is not a file as a Hugging Face model to convert
        # (torch, transformers, downloads): never go there from a server.
        if not Path(ggml).is_file():
            raise FileNotFoundError(f"GGML file not found: {ggml}")
        return cls(chatglm_cpp.Pipeline(str(ggml), max_length=max_length))

    # -- tokenization --------------------------------------------------------------------------

    def encode_prompt(self, prompt: Union[str, list[int]]) -> list[int]:
        if isinstance(prompt, list):
            return list(prompt)
        with self._tok_lock:
            return list(self.tokenizer.encode(prompt, _NO_TRUNCATION))

    def encode_chat(self, messages: list[tuple[str, str]]) -> list[int]:
        import chatglm_cpp

        msgs = [chatglm_cpp.ChatMessage(role=role, content=content) for role, content in messages]
        with self._tok_lock:
            return list(self.tokenizer.apply_chat_template(msgs, _NO_TRUNCATION))

    def decode_bytes(self, ids: list[int]) -> bytes:
        """The UTF-8 bytes of `ids` (special tokens skipped), even where they are not valid UTF-8.

        chatglm.cpp's decode returns a C++ string that pybind11 turns into `str`: broken bytes raise
        UnicodeDecodeError, whose `.object` holds the raw bytes. Ids the tokenizer does not know (the
        padding rows of a random model's vocabulary) make it throw; those are dropped."""
        try:
            with self._tok_lock:
                return self.tokenizer.decode(ids).encode("utf-8")
        except UnicodeDecodeError as e:
            return bytes(e.object)
        except RuntimeError:
            known = [i for i in ids if self._is_decodable(i)]
            if len(known) == len(ids):
                raise
            return self.decode_bytes(known) if known else b""

    def _is_decodable(self, token_id: int) -> bool:
        ok = self._decodable.get(token_id)
        if ok is None:
            try:
                with self._tok_lock:
                    self.tokenizer.decode([token_id])
                ok = True
            except UnicodeDecodeError:
                ok = True
            except RuntimeError:
                ok = False
            self._decodable[token_id] = ok
        return ok

    def decode(self, ids: list[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # -- generation ----------------------------------------------------------------------------

    def generation_config(self, params: SamplingParams) -> Any:
        import chatglm_cpp

        return chatglm_cpp._C.GenerationConfig(
            max_length=self.max_length,
            max_new_tokens=-1,
            max_context_length=self.max_length,
            do_sample=not params.greedy,
            top_k=max(0, int(params.top_k or 0)),
            top_p=float(params.top_p) if not params.greedy else 1.0,
            temperature=float(params.temperature) if not params.greedy else 1.0,
            repetition_penalty=float(params.repetition_penalty),
        )

    def check_context(self, input_ids: list[int]) -> int:
        """Room for new tokens after the prompt; ContextLengthError when there is none."""
        room = self.max_length - len(input_ids)
        if room < 1:
            raise ContextLengthError(
                f"This model's maximum context length is {self.max_length} tokens. However, your prompt has "
                f"{len(input_ids)} tokens, which leaves no room for new tokens."
            )
        return room

    def generate_ids(self, input_ids: list[int], params: SamplingParams, limit: int) -> Iterator[int]:
        """Up to `limit` new token ids (the eos id included when the model stops by itself)."""
        gen_config = self.generation_config(params)
        ids = list(input_ids)
        n_ctx = len(ids)
        n_past = 0
        for _ in range(limit):
            token = self.model.generate_next_token(ids, None, gen_config, n_past, n_ctx)
            n_past = len(ids)  # what the KV cache now holds (count_tokens without an image)
            ids.append(token)
            yield token
            if token in self.eos_ids:
                return

    def generate(
        self,
        input_ids: list[int],
        params: SamplingParams,
        *,
        strip_leading: bool = False,
        cancelled: Optional[threading.Event] = None,
    ) -> "Generation":
        return Generation(self, input_ids, params, strip_leading=strip_leading, cancelled=cancelled)


class Utf8Stream:
    """Token ids in, text deltas out: partial multi-byte sequences wait for their next bytes, invalid
    bytes become U+FFFD (errors='replace'), `flush()` settles a dangling partial sequence."""

    def __init__(self, decode_bytes: Callable[[list[int]], bytes]):
        self._decode_bytes = decode_bytes
        self.ids: list[int] = []
        self._nbytes = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        data = self._decode_bytes(self.ids)
        # Byte-level (tiktoken) decoding is prefix-stable; should a tokenizer rewrite earlier bytes,
        # what was sent stays sent and only the growth is decoded.
        if len(data) <= self._nbytes:
            return ""
        new, self._nbytes = data[self._nbytes :], len(data)
        return self._decoder.decode(new)

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that starts some stop string (it may yet complete)."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


class Generation:
    """Iterate for text deltas; afterwards `text`, `finish_reason` ("stop", "length" or "abort"),
    `prompt_tokens` and `completion_tokens` describe the result."""

    def __init__(
        self,
        engine: Engine,
        input_ids: list[int],
        params: SamplingParams,
        *,
        strip_leading: bool = False,
        cancelled: Optional[threading.Event] = None,
    ):
        self.engine = engine
        self.input_ids = list(input_ids)
        self.params = params
        self.strip_leading = strip_leading  # GLM chat replies start with "\n": chatglm.cpp trims it
        self.cancelled = cancelled
        self.prompt_tokens = len(self.input_ids)
        self.completion_tokens = 0
        self.finish_reason: Optional[str] = None
        self.text = ""

    def __iter__(self) -> Iterator[str]:
        engine, params = self.engine, self.params
        room = engine.check_context(self.input_ids)
        limit = room if params.max_new_tokens is None else min(int(params.max_new_tokens), room)
        stops = [s for s in params.stop if s]
        stream = Utf8Stream(engine.decode_bytes)
        text, sent = "", 0
        finish = "length"
        stopped = False

        for token in engine.generate_ids(self.input_ids, params, limit):
            self.completion_tokens += 1
            if self.cancelled is not None and self.cancelled.is_set():
                finish = "abort"
                break
            if token in engine.eos_ids:
                finish = "stop"
                break
            text += stream.push(token)
            if self.strip_leading and not text.strip():
                text = ""
                continue
            if self.strip_leading:
                text, self.strip_leading = text.lstrip(), False
            cut = _find_stop(text, stops, sent)
            if cut is not None:
                text, finish, stopped = text[:cut], "stop", True
                break
            safe = len(text) - _held_back(text, stops)
            if safe > sent:
                yield text[sent:safe]
                sent = safe

        if not stopped:
            text += stream.flush()
            if self.strip_leading:
                text = text.lstrip()
            cut = _find_stop(text, stops, sent)
            if cut is not None:
                text, finish = text[:cut], "stop"
        if len(text) > sent:
            yield text[sent:]
        self.text = text
        self.finish_reason = finish

    def run(self) -> "Generation":
        for _ in self:
            pass
        return self


def _find_stop(text: str, stops: list[str], start: int) -> Optional[int]:
    """Index of the earliest stop string in text[start - longest + 1:], or None."""
    if not stops:
        return None
    start = max(0, start - max(len(s) for s in stops) + 1)
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None


# --------------------------------------------------------------------------------------------------
# OpenAI request bodies
# --------------------------------------------------------------------------------------------------


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
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    max_tokens: Optional[int] = Field(default=16, ge=1)  # OpenAI's and vLLM's default for completions


# --------------------------------------------------------------------------------------------------
# HTTP app
# --------------------------------------------------------------------------------------------------


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def _error_body(status: int, message: str, type: str, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code if code is not None else status}}


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(_error_body(e.status, e.message, e.type, e.param, e.code), status_code=e.status)


_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "observation", "observation": "observation",
          "function": "observation", "developer": "system"}


def _message_text(msg: ChatMessageIn) -> str:
    if msg.content is None:
        return ""
    if isinstance(msg.content, str):
        return msg.content
    parts = []
    for part in msg.content:
        if part.get("type") != "text":
            raise APIError(400, f"content part type {part.get('type')!r} is not supported (text only)", param="messages")
        parts.append(str(part.get("text", "")))
    return "".join(parts)


class Worker:
    """One thread runs every generation; at most `max_queue` admitted requests wait behind it."""

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chatglm")
        self._lock = threading.Lock()
        self._admitted = 0  # running + waiting

    @property
    def admitted(self) -> int:
        return self._admitted

    def admit(self) -> bool:
        with self._lock:
            if self._admitted > self.max_queue:  # one running + max_queue waiting
                return False
            self._admitted += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._admitted -= 1

    def start(self, job: Callable[[Callable[[tuple], None], threading.Event], None]) -> tuple[asyncio.Queue, threading.Event]:
        """Run job(emit, cancelled) on the worker (the caller has admitted it). Events arrive on the
        returned queue; the last one is ("end",)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def emit(event: tuple) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        def run() -> None:
            try:
                if not cancelled.is_set():
                    job(emit, cancelled)
            except ContextLengthError as e:
                emit(("error", APIError(400, str(e), param="messages")))
            except Exception as e:  # a generation failure must not kill the worker
                emit(("error", APIError(500, f"generation failed: {e}", type="internal_server_error")))
            finally:
                self.release()
                emit(("end",))

        try:
            self._executor.submit(run)
        except RuntimeError:  # executor shut down
            self.release()
            raise APIError(503, "server is shutting down", type="service_unavailable")
        return events, cancelled

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def create_app(engine: Engine, served_model_name: str, *, api_key: Optional[str] = None, max_queue: int = 16) -> FastAPI:
    worker = Worker(max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        worker.shutdown()

    app = FastAPI(title="chatglm.cpp OpenAI-compatible server", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.engine, app.state.worker, app.state.served_model_name = engine, worker, served_model_name
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        details = "; ".join(f"{'.'.join(str(x) for x in err.get('loc', ()))}: {err.get('msg')}" for err in e.errors())
        return JSONResponse(_error_body(400, details or "invalid request", "invalid_request_error"), status_code=400)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1"):
            header = request.headers.get("authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
                return JSONResponse(
                    _error_body(401, "Invalid or missing API key (send 'Authorization: Bearer <key>').",
                                "invalid_request_error", code="invalid_api_key"),
                    status_code=401,
                )
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": served_model_name}

    def model_card() -> dict:
        return {"id": served_model_name, "object": "model", "created": created, "owned_by": "chatglm.cpp",
                "root": served_model_name, "parent": None, "max_model_len": engine.max_length}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        check_model(name)
        return model_card()

    def check_model(name: Optional[str]) -> None:
        if name is not None and name != served_model_name:
            raise APIError(404, f"The model `{name}` does not exist.", type="NotFoundError", param="model",
                           code="model_not_found")

    def check_common(req: _Sampling) -> None:
        check_model(req.model)
        if req.n != 1:
            raise APIError(400, "n > 1 is not supported by this server", param="n")

    def admit() -> None:
        if not worker.admit():
            raise APIError(503, f"Server busy: {max_queue} requests already waiting; retry later.",
                           type="service_unavailable", code=503)

    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def encode(fn, *args):
        try:
            return fn(*args)
        except RuntimeError as e:
            raise APIError(400, f"cannot tokenize the input: {e}")

    # -- chat ----------------------------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest):
        check_common(req)
        messages = []
        for m in req.messages:
            role = _ROLES.get(m.role)
            if role is None:
                raise APIError(400, f"unsupported message role {m.role!r}", param="messages")
            messages.append((role, _message_text(m)))
        if req.max_completion_tokens is not None and req.max_tokens is None:
            req.max_tokens = req.max_completion_tokens
        params = req.sampling(default_max_tokens=None)
        input_ids = encode(engine.encode_chat, messages)
        try:
            engine.check_context(input_ids)
        except ContextLengthError as e:
            raise APIError(400, str(e), param="messages")
        admit()

        def job(emit, cancelled):
            gen = engine.generate(input_ids, params, strip_leading=True, cancelled=cancelled)
            for delta in gen:
                emit(("delta", delta))
            emit(("done", gen))

        events, cancelled = worker.start(job)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        if not req.stream:
            gen, text = await _collect(events, cancelled)
            return {
                "id": rid, "object": "chat.completion", "created": now, "model": served_model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": None, "finish_reason": gen.finish_reason}],
                "usage": usage(gen.prompt_tokens, gen.completion_tokens),
            }

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(delta: dict, finish: Optional[str] = None) -> dict:
            return {"id": rid, "object": "chat.completion.chunk", "created": now, "model": served_model_name,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        async def sse():
            try:
                yield _sse(chunk({"role": "assistant", "content": ""}))
                async for kind, payload in _events(events):
                    if kind == "delta":
                        yield _sse(chunk({"content": payload}))
                    elif kind == "done":
                        yield _sse(chunk({}, _finish(payload)))
                        if include_usage:
                            yield _sse({"id": rid, "object": "chat.completion.chunk", "created": now,
                                        "model": served_model_name, "choices": [],
                                        "usage": usage(payload.prompt_tokens, payload.completion_tokens)})
                    elif kind == "error":
                        yield _sse(_error_body(payload.status, payload.message, payload.type))
                yield "data: [DONE]\n\n"
            finally:
                cancelled.set()

        return _EventStream(sse(), on_close=cancelled.set)

    # -- completions ---------------------------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        check_common(req)
        prompts = req.prompt
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise APIError(400, "prompt must not be empty", param="prompt")
        params = req.sampling(default_max_tokens=16)
        inputs = []
        for p in prompts:
            ids = encode(engine.encode_prompt, p)
            try:
                engine.check_context(ids)
            except ContextLengthError as e:
                raise APIError(400, str(e), param="prompt")
            prefix = (p if isinstance(p, str) else engine.decode(list(p))) if req.echo else ""
            inputs.append((ids, prefix))
        admit()

        def job(emit, cancelled):
            for index, (ids, prefix) in enumerate(inputs):
                if prefix:
                    emit(("delta", (index, prefix)))
                gen = engine.generate(ids, params, cancelled=cancelled)
                for delta in gen:
                    emit(("delta", (index, delta)))
                emit(("done", (index, gen)))

        events, cancelled = worker.start(job)
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        if not req.stream:
            texts = [""] * len(inputs)
            gens: list = [None] * len(inputs)
            try:
                async for kind, payload in _events(events):
                    if kind == "delta":
                        texts[payload[0]] += payload[1]
                    elif kind == "done":
                        gens[payload[0]] = payload[1]
                    elif kind == "error":
                        raise payload
            finally:
                cancelled.set()
            return {
                "id": rid, "object": "text_completion", "created": now, "model": served_model_name,
                "choices": [{"index": i, "text": texts[i], "logprobs": None, "finish_reason": g.finish_reason}
                            for i, g in enumerate(gens)],
                "usage": usage(sum(g.prompt_tokens for g in gens), sum(g.completion_tokens for g in gens)),
            }

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(index: int, text: str, finish: Optional[str] = None) -> dict:
            return {"id": rid, "object": "text_completion", "created": now, "model": served_model_name,
                    "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}]}

        async def sse():
            prompt_tokens = completion_tokens = 0
            try:
                async for kind, payload in _events(events):
                    if kind == "delta":
                        yield _sse(chunk(payload[0], payload[1]))
                    elif kind == "done":
                        index, gen = payload
                        prompt_tokens += gen.prompt_tokens
                        completion_tokens += gen.completion_tokens
                        yield _sse(chunk(index, "", _finish(gen)))
                    elif kind == "error":
                        yield _sse(_error_body(payload.status, payload.message, payload.type))
                if include_usage:
                    yield _sse({"id": rid, "object": "text_completion", "created": now, "model": served_model_name,
                                "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
                yield "data: [DONE]\n\n"
            finally:
                cancelled.set()

        return _EventStream(sse(), on_close=cancelled.set)

    return app


class _EventStream(StreamingResponse):
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


def _finish(gen: Generation) -> str:
    return "stop" if gen.finish_reason == "abort" else gen.finish_reason


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _events(events: asyncio.Queue):
    while True:
        event = await events.get()
        if event[0] == "end":
            return
        yield event[0], (event[1] if len(event) > 1 else None)


async def _collect(events: asyncio.Queue, cancelled: threading.Event) -> tuple[Generation, str]:
    """Wait for a single-choice job; raise its error as an HTTP error."""
    text, gen = "", None
    try:
        async for kind, payload in _events(events):
            if kind == "delta":
                text += payload
            elif kind == "done":
                gen = payload
            elif kind == "error":
                raise payload
    finally:
        cancelled.set()  # the client went away (task cancelled): stop generating
    assert gen is not None
    return gen, text


# --------------------------------------------------------------------------------------------------
# Entry points: `builder serve` and `builder chat`
# --------------------------------------------------------------------------------------------------


def _max_length_from_env() -> Optional[int]:
    value = os.environ.get("MAX_LENGTH", "").strip()
    if not value:
        return None
    try:
        n = int(value)
    except ValueError:
        raise BuilderError(f"MAX_LENGTH must be an integer, got {value!r}")
    if n < 2:
        raise BuilderError(f"MAX_LENGTH must be at least 2, got {n}")
    return n


def load_engine(ggml: Path, max_length: Optional[int] = None) -> Engine:
    """Load a GGML file, turning every way that fails into a BuilderError that says what to do."""
    ggml = Path(ggml)
    if not ggml.is_file():
        raise BuilderError(f"GGML file not found: {ggml} (make one with `builder convert`)")
    try:
        import chatglm_cpp  # noqa: F401
    except ImportError as e:
        raise BuilderError(f"chatglm-cpp is not installed ({e}); install the `builder[serve]` extra")
    try:
        return Engine.load(ggml, max_length=max_length)
    except Exception as e:  # chatglm.cpp raises RuntimeError with a C++ source location
        raise BuilderError(f"cannot load {ggml} with chatglm.cpp: {e}")


def serve(
    ggml: Path,
    host: str = "0.0.0.0",
    port: int = 8001,
    served_model_name: Optional[str] = None,
    max_queue: int = 16,
    api_key: Optional[str] = None,
    max_length: Optional[int] = None,
) -> None:
    """Load `ggml` and serve it until interrupted. API key: `api_key` or $API_KEY; context length:
    `max_length` or $MAX_LENGTH (default: the model's; the KV cache is allocated for all of it)."""
    import uvicorn

    if max_queue < 0:
        raise BuilderError("--max-queue must be 0 or more")
    engine = load_engine(Path(ggml), max_length if max_length is not None else _max_length_from_env())
    name = served_model_name or Path(ggml).stem
    key = api_key if api_key is not None else (os.environ.get("API_KEY") or None)
    app = create_app(engine, name, api_key=key, max_queue=max_queue)
    print(f"serving {ggml} as {name!r} on http://{host}:{port} ({engine.model_type}, context {engine.max_length}, "
          f"max queue {max_queue}, API key {'required' if key else 'off'})", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level=os.environ.get("LOG_LEVEL", "info").lower())


def chat_repl(
    ggml: Path,
    *,
    system: Optional[str] = None,
    max_tokens: Optional[int] = None,
    temperature: float = 0.8,
    top_p: float = 0.8,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    max_length: Optional[int] = None,
    stdin=None,
    stdout=None,
) -> None:
    """Interactive terminal chat like chatglm.cpp's `main -i`: `clear` forgets the history, `stop`,
    `exit` or end of input (Ctrl-D) quits."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    engine = load_engine(Path(ggml), max_length if max_length is not None else _max_length_from_env())
    params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            repetition_penalty=repetition_penalty)
    name = engine.model_type
    width = max(len(name), len("Prompt"))
    stdout.write(f"Chatting with {Path(ggml).name} ({name}, context {engine.max_length}). "
                 "Type 'clear' to forget the history, 'stop' or Ctrl-D to quit.\n")
    history: list[tuple[str, str]] = [("system", system)] if system else []
    interactive = stdin is sys.stdin and stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    while True:
        try:
            if interactive:
                line = input(f"{'Prompt':<{width}} > ") + "\n"
            else:
                stdout.write(f"{'Prompt':<{width}} > ")
                stdout.flush()
                line = stdin.readline()
        except (EOFError, KeyboardInterrupt):
            line = ""
        if not line:
            stdout.write("\n")
            break
        prompt = line.strip()
        if not prompt:
            continue
        if prompt in ("stop", "exit", "quit"):
            break
        if prompt == "clear":
            history = [("system", system)] if system else []
            continue
        messages = history + [("user", prompt)]
        input_ids = engine.encode_chat(messages)
        # Keep the newest turns when the history outgrows the context (like chatglm.cpp's sliding window).
        while len(input_ids) > engine.max_length // 2 and len(messages) > 1 + bool(system):
            messages = messages[:1] + messages[3:] if system else messages[2:]
            input_ids = engine.encode_chat(messages)
        stdout.write(f"{name:<{width}} > ")
        try:
            gen = engine.generate(input_ids, params, strip_leading=True)
            for delta in gen:
                stdout.write(delta)
                stdout.flush()
        except (ContextLengthError, RuntimeError) as e:
            stdout.write(f"[error: {e}]\n")
            continue
        except KeyboardInterrupt:
            stdout.write("\n")
            continue
        stdout.write("\n")
        history = messages + [("assistant", gen.text)]
