"""The one place generations run: a single worker thread with a bounded admission count.

The pipeline is not thread-safe, so every generation runs on one thread; at most `max_queue`
requests wait behind the running one and the next get 503 at once.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from builder.runtime.chatglmcpp.engine import ContextLengthError, Engine, SamplingParams
from builder.runtime.chatglmcpp.protocol import APIError


@dataclass(frozen=True)
class GenRequest:
    """One choice to generate: the prompt's token ids, sampling, and text sent before the output."""

    input_ids: list[int]
    params: SamplingParams
    strip_leading: bool = False  # GLM chat replies start with "\n": chatglm.cpp trims it
    prefix: str = ""  # `echo`: the prompt text, sent first


class Worker:
    """One thread runs every generation; at most `max_queue` admitted requests wait behind it."""

    def __init__(self, engine: Engine, max_queue: int):
        self.engine = engine
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

    def _generate(self, requests: list[GenRequest], emit, cancelled: threading.Event) -> None:
        for index, req in enumerate(requests):
            if req.prefix:
                emit(("delta", index, req.prefix))
            gen = self.engine.generate(req.input_ids, req.params, strip_leading=req.strip_leading, cancelled=cancelled)
            for delta in gen:
                emit(("delta", index, delta))
            emit(("done", index, gen.outcome))

    def start(self, requests: list[GenRequest]) -> tuple[asyncio.Queue, threading.Event]:
        """Generate `requests` in order on the worker (the caller has admitted them). Events arrive on
        the returned queue: ("delta", index, text), ("done", index, Outcome), ("error", APIError),
        and last ("end",). Setting the returned event stops the generation."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def emit(event: tuple) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        def run() -> None:
            try:
                if not cancelled.is_set():
                    self._generate(requests, emit, cancelled)
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
            raise APIError(503, "server is shutting down", type="service_unavailable") from None
        return events, cancelled

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
