"""Admission, the queue and the engine process's life, on the server's event loop.

* Admission is bounded: one job runs, at most `max_queue` requests wait (tokenizing or queued);
  the next are refused at once (the caller answers 503 with Retry-After).
* Jobs run one at a time in arrival order; a cancelled job (its client went away) leaves the queue
  at once, or stops at the engine's next token when it is running.
* If the engine process dies, the running job fails with a 500, the engine is restarted (the
  queue waits for it) and /health says so meanwhile.

Nothing here blocks the event loop: the engine's messages arrive through `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from typing import Any, Optional

from builder.runtime.chatglmcpp.engine_process import (
    EngineInfo,
    EngineProcess,
    EngineStartError,
    GenRequest,
    TokenizeError,
)
from builder.runtime.chatglmcpp.metrics import Metrics
from builder.runtime.chatglmcpp.protocol import APIError

log = logging.getLogger("chatglmcpp")

RESTART_BACKOFF = (0.0, 1.0, 2.0, 5.0, 10.0, 30.0)  # seconds before restart N (crash loops slow down)


class Job:
    """One admitted request's generation. Events on `events`: ("delta", index, text),
    ("done", index, Outcome), ("error", APIError), and last ("end",)."""

    def __init__(self, jid: int, gens: list[GenRequest]):
        self.id, self.gens = jid, gens
        self.events: asyncio.Queue = asyncio.Queue()
        self.state = "queued"  # queued | running | ended
        self.created = time.monotonic()

    def push(self, *event: Any) -> None:
        self.events.put_nowait(event)


class Scheduler:
    def __init__(self, ggml: str, max_length: Optional[int], max_queue: int, metrics: Metrics):
        self.max_queue = max_queue
        self.metrics = metrics
        self.engine = EngineProcess(ggml, max_length)
        self.info: Optional[EngineInfo] = None
        self.state = "starting"  # starting | ready | restarting | failed | stopped
        self.admitted = 0  # requests past admission: tokenizing, queued or running
        self.queue: deque[Job] = deque()
        self.running: Optional[Job] = None
        self._ids = itertools.count(1)
        self._tokenizing: dict[int, asyncio.Future] = {}
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._crashes: list[float] = []

    # -- engine lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the engine process and wait until the model is loaded (EngineStartError if not)."""
        self._loop = asyncio.get_running_loop()
        self.info = await self._loop.run_in_executor(None, self._start_engine)
        self.state = "ready"

    def _start_engine(self) -> EngineInfo:
        loop = self._loop
        assert loop is not None
        engine = self.engine

        def call(fn, *args) -> None:  # from the engine's reader thread onto the event loop
            if not loop.is_closed():
                loop.call_soon_threadsafe(fn, *args)

        return engine.start(on_message=lambda msg: call(self._on_message, msg),
                            on_exit=lambda code: call(self._on_exit, engine, code))  # fmt: skip

    async def stop(self) -> None:
        self.state = "stopped"
        error = APIError(503, "server is shutting down", type="service_unavailable")
        for job in [*self.queue, *([self.running] if self.running else [])]:
            self._fail(job, error)
        self.queue.clear()
        self.running = None
        assert self._loop is not None
        await self._loop.run_in_executor(None, self.engine.stop)

    def _on_exit(self, engine: EngineProcess, code: Optional[int]) -> None:
        if engine is not self.engine or self.state == "stopped":
            return
        log.error("the engine process exited (code %s); restarting it", code)
        self.metrics.engine_restarts.inc()
        self.state = "restarting"
        error = APIError(500, "the engine process died during this request; it is being restarted",
                         type="internal_server_error")  # fmt: skip
        for future in self._tokenizing.values():
            if not future.done():
                future.set_exception(
                    APIError(503, "the engine is restarting; retry shortly", type="service_unavailable")
                )
        self._tokenizing.clear()
        if self.running is not None:
            self._fail(self.running, error)
            self.running = None
        now = time.monotonic()
        self._crashes = [t for t in self._crashes if now - t < 300] + [now]
        delay = RESTART_BACKOFF[min(len(self._crashes) - 1, len(RESTART_BACKOFF) - 1)]
        asyncio.ensure_future(self._restart(delay))

    async def _restart(self, delay: float) -> None:
        await asyncio.sleep(delay)
        if self.state == "stopped":
            return
        self.engine = EngineProcess(self.engine.ggml, self.engine.max_length)
        try:
            self.info = await asyncio.get_running_loop().run_in_executor(None, self._start_engine)
        except EngineStartError as e:
            log.error("the engine could not be restarted: %s", e)
            self.state = "failed"
            for job in list(self.queue):
                self._fail(job, APIError(503, f"the engine could not be restarted: {e}", type="service_unavailable"))
            self.queue.clear()
            return
        self.state = "ready"
        log.warning("the engine process is back (pid %s)", self.engine.pid)
        self._dispatch()

    @property
    def healthy(self) -> bool:
        return self.state == "ready"

    # -- admission and tokenization ------------------------------------------------------------

    def admit(self) -> bool:
        if self.state in ("failed", "stopped") or self.admitted > self.max_queue:  # one running + max_queue waiting
            return False
        self.admitted += 1
        self._gauge()
        return True

    def release(self) -> None:
        self.admitted -= 1
        self._gauge()

    async def tokenize(self, what: str, payload: Any, echo: bool = False) -> Any:
        """Token ids from the engine's tokenizer (TokenizeError: it refused the input)."""
        while self.state in ("starting", "restarting"):
            await asyncio.sleep(0.1)
        if self.state != "ready":
            raise APIError(503, "the engine is not available", type="service_unavailable")
        tid = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._tokenizing[tid] = future
        if not self.engine.send(("tokenize", tid, what, payload, echo)):
            self._tokenizing.pop(tid, None)
            raise APIError(503, "the engine is restarting; retry shortly", type="service_unavailable")
        try:
            result = await future
        finally:
            self._tokenizing.pop(tid, None)
        if isinstance(result, TokenizeError):
            raise result
        return result

    # -- jobs ----------------------------------------------------------------------------------

    def submit(self, gens: list[GenRequest]) -> Job:
        """Queue an admitted request's generation; it runs when the engine is free."""
        job = Job(next(self._ids), gens)
        self.queue.append(job)
        self._dispatch()
        return job

    def cancel(self, job: Job) -> None:
        """The client went away: drop the job if it waits, stop it at the next token if it runs."""
        if job.state == "queued":
            self.queue.remove(job)
            self.metrics.cancelled.labels(state="queued").inc()
            self._end(job)
        elif job.state == "running":
            self.metrics.cancelled.labels(state="running").inc()
            self.engine.send(("cancel", job.id))

    def _dispatch(self) -> None:
        """Start the next queued job when the engine is ready and idle."""
        if self.running is None and self.state == "ready" and self.queue:
            job = self.queue[0]
            if self.engine.send(("generate", job.id, job.gens)):
                self.queue.popleft()
                job.state = "running"
                self.running = job
                self.metrics.queue_wait.observe(time.monotonic() - job.created)
            # else the engine is gone: the job stays first in line for the restarted one
        self._gauge()

    def _on_message(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "tokens":
            future = self._tokenizing.get(msg[1])
            if future is not None and not future.done():
                future.set_result(msg[2])
            return
        job = self.running
        if job is None or msg[1] != job.id:
            return  # a message of a job that already failed (engine restarted)
        if kind == "delta":
            job.push("delta", msg[2], msg[3])
        elif kind == "done":
            outcome = msg[3]
            self.metrics.prompt_tokens.inc(outcome.prompt_tokens)
            self.metrics.generation_tokens.inc(outcome.completion_tokens)
            job.push("done", msg[2], outcome)
        elif kind == "error":
            job.push("error", APIError(500, msg[2], type="internal_server_error"))
        elif kind == "end":
            self.running = None
            self._end(job)
            self._dispatch()

    def _fail(self, job: Job, error: APIError) -> None:
        job.push("error", error)
        self._end(job)

    def _end(self, job: Job) -> None:
        if job.state != "ended":
            job.state = "ended"
            job.push("end")
            self.release()

    def _gauge(self) -> None:
        self.metrics.running.set(1 if self.running is not None else 0)
        self.metrics.waiting.set(len(self.queue))
        self.metrics.admitted.set(self.admitted)
