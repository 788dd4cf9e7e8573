"""The engine in its own process, and the parent's handle on it.

chatglm.cpp's `generate_next_token` holds Python's GIL for a whole forward pass (a prefill of a
long prompt takes seconds), so no thread can keep an asyncio server responsive beside it. The
model therefore lives in a child process that owns the Pipeline; the HTTP process talks to it over
a pipe and never waits on it: a reader thread turns the child's messages into event-loop callbacks.

Messages, parent -> child:
  ("tokenize", tid, "chat", [(role, text), ...])        -> ("tokens", tid, ids)
  ("tokenize", tid, "prompts", [str | [int]], echo)      -> ("tokens", tid, [(ids, echo_text), ...])
  ("generate", jid, [GenRequest, ...])                   -> ("delta", jid, index, text)... (one
                                                            if not GenRequest.stream),
                                                            ("done", jid, index, Outcome) per choice,
                                                            ("error", jid, message) on failure, ("end", jid)
  ("cancel", jid)    stop that job at the next token
  ("shutdown",)
child -> parent, once at start: ("ready", EngineInfo) or ("fatal", message).
A tokenize failure answers ("tokens", tid, TokenizeError(message)).

The child reads the pipe between tokens, so tokenization and cancellation are served while a job
runs (only a prefill delays them). One job runs at a time; the parent decides the order.
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Optional

from builder.runtime.chatglmcpp.engine import Engine, SamplingParams


@dataclass(frozen=True)
class EngineInfo:
    max_length: int
    vocab_size: int
    model_type: str


@dataclass(frozen=True)
class GenRequest:
    """One choice to generate: the prompt's token ids, sampling, and text sent before the output."""

    input_ids: list[int]
    params: SamplingParams
    strip_leading: bool = False  # GLM chat replies start with "\n": chatglm.cpp trims it
    prefix: str = ""  # `echo`: the prompt text, sent first
    # False: the text comes in one message at the end. A message per token wakes the server for
    # every token, and on a small machine each wake-up stalls the forward pass's threads (~4%).
    stream: bool = True


class TokenizeError(Exception):
    """The tokenizer refused the input (the message is chatglm.cpp's)."""


# --------------------------------------------------------------------------------------------------
# child side
# --------------------------------------------------------------------------------------------------


def child_main(conn: Connection, ggml: str, max_length: Optional[int]) -> None:
    """The engine process: load the model, then serve the pipe until it closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the server, which stops us
    try:
        engine = Engine.load(ggml, max_length=max_length)
    except Exception as e:  # chatglm.cpp raises RuntimeError with a C++ source location
        conn.send(("fatal", f"cannot load {ggml} with chatglm.cpp: {e}"))
        return
    config = engine.model.config
    conn.send(("ready", EngineInfo(engine.max_length, int(config.vocab_size), engine.model_type)))
    try:
        _EngineLoop(engine, conn).run()
    except (EOFError, OSError, KeyboardInterrupt):  # the server went away
        pass


class _Cancelled:
    """The `cancelled` flag a Generation checks after every token: reading it serves the pipe."""

    def __init__(self, loop: _EngineLoop, jid: int):
        self.loop, self.jid = loop, jid

    def is_set(self) -> bool:
        self.loop.serve_pending()
        return self.jid in self.loop.cancelled


class _EngineLoop:
    def __init__(self, engine: Engine, conn: Connection):
        self.engine, self.conn = engine, conn
        self.jobs: list[tuple[int, list[GenRequest]]] = []
        self.cancelled: set[int] = set()

    def run(self) -> None:
        while True:
            self.handle(self.conn.recv())
            while self.jobs:
                jid, gens = self.jobs.pop(0)
                self.generate(jid, gens)
                self.cancelled.discard(jid)

    def serve_pending(self) -> None:
        while self.conn.poll():
            self.handle(self.conn.recv())

    def handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "tokenize":
            self.conn.send(("tokens", msg[1], self.tokenize(msg[2], *msg[3:])))
        elif kind == "generate":
            self.jobs.append((msg[1], msg[2]))
        elif kind == "cancel":
            self.cancelled.add(msg[1])
        elif kind == "shutdown":
            raise EOFError

    def tokenize(self, what: str, payload: Any, echo: bool = False) -> Any:
        engine = self.engine
        try:
            if what == "chat":
                return engine.encode_chat(payload)
            out = []
            for prompt in payload:
                ids = engine.encode_prompt(prompt)
                text = (prompt if isinstance(prompt, str) else engine.decode(ids)) if echo else ""
                out.append((ids, text))
            return out
        except RuntimeError as e:
            return TokenizeError(str(e))

    def generate(self, jid: int, gens: list[GenRequest]) -> None:
        send = self.conn.send
        cancelled = _Cancelled(self, jid)
        try:
            for index, req in enumerate(gens):
                gen = self.engine.generate(
                    req.input_ids, req.params, strip_leading=req.strip_leading, cancelled=cancelled
                )
                if req.stream:
                    if req.prefix:
                        send(("delta", jid, index, req.prefix))
                    for delta in gen:
                        send(("delta", jid, index, delta))
                else:
                    send(("delta", jid, index, req.prefix + "".join(gen)))
                send(("done", jid, index, gen.outcome))
        except (EOFError, OSError):
            raise
        except Exception as e:  # a failed generation must not take the engine down
            send(("error", jid, f"generation failed: {e}"))
        send(("end", jid))


# --------------------------------------------------------------------------------------------------
# parent side
# --------------------------------------------------------------------------------------------------


class EngineStartError(RuntimeError):
    """The engine process could not load the model; the message says why."""


def main(argv: Optional[list[str]] = None) -> None:
    """`python -m builder.runtime.chatglmcpp.engine_process --fd N --ggml FILE`: what EngineProcess runs."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--fd", type=int, required=True, help="our end of the socket pair to the server")
    parser.add_argument("--ggml", required=True)
    parser.add_argument("--max-length", type=int, default=None)
    args = parser.parse_args(argv)
    child_main(Connection(args.fd), args.ggml, args.max_length)


class EngineProcess:
    """One engine child process. `start()` blocks until the model is loaded (call it off the event
    loop); afterwards every message from the child, and finally its exit, arrive through the
    callbacks on the reader thread."""

    def __init__(self, ggml: str, max_length: Optional[int]):
        self.ggml, self.max_length = ggml, max_length
        self.process: Optional[subprocess.Popen] = None
        self.conn: Optional[Connection] = None
        self._send_lock = threading.Lock()

    def start(self, on_message: Callable[[tuple], None], on_exit: Callable[[Optional[int]], None]) -> EngineInfo:
        # A fresh interpreter (no threads or locks inherited), talking over a socket pair.
        ours, theirs = socket.socketpair()
        argv = [sys.executable, "-m", "builder.runtime.chatglmcpp.engine_process", "--fd", str(theirs.fileno()),
                "--ggml", self.ggml]  # fmt: skip
        if self.max_length is not None:
            argv += ["--max-length", str(self.max_length)]
        with ours, theirs:
            self.process = subprocess.Popen(argv, pass_fds=[theirs.fileno()])
            self.conn = Connection(ours.detach())
        try:
            first = self.conn.recv()
        except (EOFError, OSError):
            code = self.process.wait()
            raise EngineStartError(f"the engine process exited while loading {self.ggml} (exit code {code})") from None
        if first[0] != "ready":
            self.process.wait()
            raise EngineStartError(first[1])
        reader = threading.Thread(target=self._read, args=(self.conn, on_message, on_exit), name="engine-reader")
        reader.daemon = True
        reader.start()
        return first[1]

    def _read(self, conn: Connection, on_message, on_exit) -> None:
        try:
            while True:
                on_message(conn.recv())
        except (EOFError, OSError):
            pass
        code = None
        if self.process is not None:
            try:
                code = self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                code = self.process.wait()
        on_exit(code)

    @property
    def pid(self) -> Optional[int]:
        return self.process.pid if self.process is not None else None

    def send(self, msg: tuple) -> bool:
        """Send to the child; False when it is gone (its exit is reported through on_exit)."""
        if self.conn is None:
            return False
        try:
            with self._send_lock:
                self.conn.send(msg)
            return True
        except (OSError, ValueError):
            return False

    def stop(self, timeout: float = 5.0) -> None:
        process = self.process
        if process is None:
            return
        self.send(("shutdown",))
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)
        if self.conn is not None:
            self.conn.close()


if __name__ == "__main__":
    # Run the module under its real name, so what it pickles (EngineInfo, Outcome) unpickles in the server.
    from builder.runtime.chatglmcpp.engine_process import main as engine_main

    engine_main()
