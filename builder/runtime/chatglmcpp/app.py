"""The FastAPI app: error shapes, API key check, the routes; and `serve`, which runs it with uvicorn.

`$API_KEY` set -> `/v1/*` needs `Authorization: Bearer $API_KEY` (401 otherwise); /health is open.
"""

from __future__ import annotations

import hmac
import sys
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from builder.runtime.chatglmcpp.engine import Engine, load_engine
from builder.runtime.chatglmcpp.protocol import APIError, error_body
from builder.runtime.chatglmcpp.routes import Server, router
from builder.runtime.chatglmcpp.settings import Settings
from builder.runtime.chatglmcpp.worker import Worker


def create_app(engine: Engine, settings: Settings) -> FastAPI:
    worker = Worker(engine, settings.max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        worker.shutdown()

    app = FastAPI(title="chatglm.cpp OpenAI-compatible server", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.server = Server(engine, worker, settings, created=int(time.time()))
    app.include_router(router)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        details = "; ".join(f"{'.'.join(str(x) for x in err.get('loc', ()))}: {err.get('msg')}" for err in e.errors())
        return JSONResponse(error_body(400, details or "invalid request", "invalid_request_error"), status_code=400)

    api_key = settings.api_key

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1"):
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
                body = error_body(401, "Invalid or missing API key (send 'Authorization: Bearer <key>').",
                                  "invalid_request_error", code="invalid_api_key")  # fmt: skip
                return JSONResponse(body, status_code=401)
        return await call_next(request)

    return app


def serve(settings: Settings) -> None:
    """Load the GGML file and serve it until interrupted."""
    import uvicorn

    engine = load_engine(settings.ggml, settings.max_length)
    app = create_app(engine, settings)
    print(
        f"serving {settings.ggml} as {settings.served_model_name!r} on http://{settings.host}:{settings.port} "
        f"({engine.model_type}, context {engine.max_length}, max queue {settings.max_queue}, "
        f"API key {'required' if settings.api_key else 'off'})",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower())
