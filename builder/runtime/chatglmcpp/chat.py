"""Interactive terminal chat (`docker run -it IMAGE chat`), like chatglm.cpp's `main -i`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from builder.runtime.chatglmcpp.engine import ContextLengthError, SamplingParams, load_engine, max_length_from_env


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
    engine = load_engine(Path(ggml), max_length if max_length is not None else max_length_from_env())
    params = SamplingParams(
        max_new_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
    )
    name = engine.model_type
    width = max(len(name), len("Prompt"))
    stdout.write(
        f"Chatting with {Path(ggml).name} ({name}, context {engine.max_length}). "
        "Type 'clear' to forget the history, 'stop' or Ctrl-D to quit.\n"
    )
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
