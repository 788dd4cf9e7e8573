"""The FastAPI app (errors in the OpenAI shape, API key, body limit, metrics, the routes) and `serve`.

`$API_KEY` set -> `/v1/*` needs `Authorization: Bearer $API_KEY` (401 otherwise); /health and
/metrics are open. Every error the server returns, its own 404/405, validation and parse errors,
oversized bodies (413), overload (503 + Retry-After) and unexpected failures (500) included, is
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import sys
import time
from contextlib import asynccontextmanager
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from builder.runtime.chatglmcpp.engine_process import EngineStartError
from builder.runtime.chatglmcpp.metrics import Metrics
from builder.runtime.chatglmcpp.protocol import APIError, error_body
from builder.runtime.chatglmcpp.routes import ClientGone, Server, router
from builder.runtime.chatglmcpp.scheduler import Scheduler
from builder.runtime.chatglmcpp.settings import Settings

log = logging.getLogger("chatglmcpp")
_ERROR_TYPES = {404: "NotFoundError", 405: "invalid_request_error", 413: "invalid_request_error"}


def create_app(settings: Settings, scheduler: Optional[Scheduler] = None) -> FastAPI:
    """The app. Without `scheduler`, one is made and its engine process started at app startup
    (tests); `serve` passes one it has already started, so a bad model fails before any port opens."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if app.state.server.scheduler.state == "starting":
            await app.state.server.scheduler.start()
        yield
        await app.state.server.scheduler.stop()

    scheduler = scheduler or Scheduler(str(settings.ggml), settings.max_length, settings.max_queue, Metrics())
    app = FastAPI(title="chatglm.cpp OpenAI-compatible server", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)  # fmt: skip
    app.state.server = Server(scheduler, settings)
    app.include_router(router)
    _add_error_handlers(app)
    _add_middleware(app, settings, scheduler.metrics)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        details = "; ".join(f"{'.'.join(str(x) for x in err.get('loc', ()))}: {err.get('msg')}" for err in e.errors())
        return JSONResponse(error_body(400, details or "invalid request", "invalid_request_error"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        message = {
            404: f"No route {request.url.path}",
            405: f"Method {request.method} not allowed on {request.url.path}",
        }
        text = message.get(e.status_code, str(e.detail))
        body = error_body(e.status_code, text, _ERROR_TYPES.get(e.status_code, "invalid_request_error"))
        return JSONResponse(body, status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, e: ClientGone):
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse(
            error_body(500, f"internal error: {type(e).__name__}", "internal_server_error"), status_code=500
        )


def _add_middleware(app: FastAPI, settings: Settings, metrics: Metrics) -> None:
    app.add_middleware(Gate, settings=settings, metrics=metrics)


class Gate:
    """ASGI middleware in front of every route (plain ASGI, so streaming and disconnects pass
    through untouched): the body limit (413 before more than `max_body_bytes` is read), the API
    key on /v1, and the request counter and latency histogram."""

    PATHS = ("/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions")

    def __init__(self, app, settings: Settings, metrics: Metrics):
        self.app, self.limit, self.api_key, self.metrics = app, settings.max_body_bytes, settings.api_key, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        label = path if path in self.PATHS else "/v1/models/{name}" if path.startswith("/v1/models/") else "other"
        start, status = time.monotonic(), 500

        async def tracked_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, tracked_send)
            else:
                await self.app(scope, self._counted(receive), tracked_send)
        finally:
            self.metrics.requests.labels(path=label, status=str(status)).inc()
            if label in ("/v1/chat/completions", "/v1/completions"):
                self.metrics.latency.observe(time.monotonic() - start)

    def _refusal(self, scope) -> Optional[Response]:
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return JSONResponse(error_body(413, self._too_large, "invalid_request_error"), status_code=413,
                                headers={"Connection": "close"})  # fmt: skip
        if self.api_key and scope["path"].startswith("/v1"):
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key.encode()):
                body = error_body(401, "Invalid or missing API key (send 'Authorization: Bearer <key>').",
                                  "invalid_request_error", code="invalid_api_key")  # fmt: skip
                return JSONResponse(body, status_code=401)
        return None

    @property
    def _too_large(self) -> str:
        return f"request body larger than {self.limit} bytes (MAX_BODY_BYTES)"

    def _counted(self, receive):
        """A body sent without Content-Length (chunked) is counted as it arrives."""
        seen = 0

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise StarletteHTTPException(413, self._too_large, headers={"Connection": "close"})
            return message

        return counted_receive


def serve(settings: Settings) -> None:
    """Start the engine process (a bad model fails here, before any port opens), then serve HTTP."""
    asyncio.run(_serve(settings))


async def _serve(settings: Settings) -> None:
    import uvicorn

    from builder.runtime.chatglmcpp.connection import protocol_class

    if not settings.ggml.is_file():
        raise EngineStartError(f"GGML file not found: {settings.ggml} (make one with `builder convert`)")
    scheduler = Scheduler(str(settings.ggml), settings.max_length, settings.max_queue, Metrics())
    await scheduler.start()
    info = scheduler.info
    print(
        f"serving {settings.ggml} as {settings.served_model_name!r} on http://{settings.host}:{settings.port} "
        f"({info.model_type}, context {info.max_length}, engine pid {scheduler.engine.pid}, "
        f"max queue {settings.max_queue}, API key {'required' if settings.api_key else 'off'})",
        file=sys.stderr,
        flush=True,
    )
    config = uvicorn.Config(
        create_app(settings, scheduler),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        http=protocol_class(settings.header_timeout),
        timeout_keep_alive=settings.keepalive_timeout,
        timeout_graceful_shutdown=5,
    )
    await uvicorn.Server(config).serve()
