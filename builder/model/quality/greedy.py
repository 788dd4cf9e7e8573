"""Greedy answers to the eval prompts, from the binary that serves the model: `llama-server`.

The server renders each prompt with the chat template inside the GGUF (`/apply-template`, the same
code path as `/v1/chat/completions`) and answers it greedily (`/completion`, temperature 0, one
slot, no prompt cache) with `return_tokens`, so reference and artifact are compared token by token;
its timings give the decode speed. One server per model, on a free loopback port.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from builder.errors import BuilderError
from builder.model.gguf.convert import peak_rss_mb
from builder.model.quality.prompts import EvalPrompt
from builder.model.quality.tools import Cost, Served, binary, threads
from builder.runtime.smoke import free_port


@dataclass(frozen=True)
class Answer:
    tokens: tuple[int, ...]
    text: str


@dataclass
class EvalRun:
    answers: list[Answer]
    decode_tokens_per_s: float
    cost: Cost = field(default_factory=Cost)


def _post(url: str, body: dict, timeout: float = 300) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        raise BuilderError(f"llama-server {url}: HTTP {e.code}: {e.read()[:500]!r}") from None


@contextmanager
def server(model: Served, ctx: int = 4096, start_timeout: float = 300) -> Iterator[tuple[str, subprocess.Popen]]:
    """A llama-server on `model` (one slot, greedy-safe); yields its URL and process once /health is 200."""
    port = free_port()
    cmd = [str(binary("llama-server")), *model.server_args(), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["-np", "1", "-c", str(ctx), "-t", str(threads()), "--no-webui", "--no-warmup"]
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + start_timeout
            while not _healthy(url):
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    why = (
                        f"exited {proc.returncode}"
                        if proc.returncode is not None
                        else f"not ready in {start_timeout:.0f} s"
                    )
                    raise BuilderError(f"llama-server on {model.describe()} {why}:\n{log.read()[-3000:]}")
                time.sleep(0.1)
            yield url, proc
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200
    except (OSError, urllib.error.URLError):
        return False


def ask(url: str, prompt: EvalPrompt, n_predict: int) -> tuple[Answer, dict]:
    """One greedy answer and the server's timings for it."""
    rendered = _post(url + "/apply-template", {"messages": list(prompt.messages)})["prompt"]
    body = {
        "prompt": rendered,
        "n_predict": n_predict,
        "temperature": 0.0,
        "top_k": 1,
        "seed": 0,
        "cache_prompt": False,
        "return_tokens": True,
    }
    out = _post(url + "/completion", body)
    return Answer(tuple(out.get("tokens") or ()), out.get("content", "")), out.get("timings") or {}


def ask_with_images(url: str, prompt: EvalPrompt, n_predict: int) -> tuple[Answer, dict]:
    """One greedy answer to a prompt with images, through the OpenAI chat API (image_url data: parts, the
    way clients send them), its token ids from `logprobs`, and the server's timings."""
    body = {
        "messages": list(prompt.messages),
        "max_tokens": n_predict,
        "temperature": 0.0,
        "top_k": 1,
        "seed": 0,
        "cache_prompt": False,
        "logprobs": True,
        "top_logprobs": 1,
    }
    out = _post(url + "/v1/chat/completions", body)
    choice = out["choices"][0]
    tokens = tuple(int(t["id"]) for t in (choice.get("logprobs") or {}).get("content") or ())
    return Answer(tokens, choice["message"].get("content") or ""), out.get("timings") or {}


def greedy_answers(model: Served, prompts: Sequence[EvalPrompt], n_predict: int = 48) -> EvalRun:
    """Every prompt's greedy answer from `model`, its decode speed, and the cost (server start included)."""
    start = time.monotonic()
    answers, decoded, decode_ms = [], 0, 0.0
    with server(model) as (url, proc):
        for prompt in prompts:
            answer, timings = (ask_with_images if prompt.images else ask)(url, prompt, n_predict)
            answers.append(answer)
            decoded += int(timings.get("predicted_n") or 0)
            decode_ms += float(timings.get("predicted_ms") or 0.0)
        peak = peak_rss_mb(proc.pid)
    tps = decoded / (decode_ms / 1000.0) if decode_ms > 0 else 0.0
    return EvalRun(answers, tps, Cost(time.monotonic() - start, peak))


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first token where two answers part (a shorter answer parts where it ends); None if equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def expected_found(answer: str, expected: str | None) -> bool | None:
    """Whether the expected answer appears in `answer` (case and spacing ignored); None without one."""
    if not expected:
        return None
    norm = " ".join(expected.lower().split())
    return norm in " ".join(answer.lower().split())


def compare_answers(
    prompts: Sequence[EvalPrompt], reference: Sequence[Answer], answers: Sequence[Answer]
) -> list[dict]:
    """Per prompt: the same greedy answer as the reference, or the token it differs from."""
    rows = []
    for prompt, ref, ans in zip(prompts, reference, answers, strict=True):
        differs = first_difference(ref.tokens, ans.tokens)
        rows.append(
            {
                "prompt": prompt.question[:200],
                "same": differs is None,
                "differs_at_token": differs,
                "answer": ans.text[:400],
                "reference_answer": ref.text[:400],
                "expected_found": expected_found(ans.text, prompt.expected),
                "reference_expected_found": expected_found(ref.text, prompt.expected),
            }
        )
    return rows
