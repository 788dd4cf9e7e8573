"""The engine: one chatglm_cpp.Pipeline with tokenization, the generation loop, incremental UTF-8
decoding and stop strings. No HTTP in here.

* `max_new_tokens` counts new tokens; temperature 0 (or a tiny top_p) is greedy decoding.
* `stop` strings are matched on the decoded text (held back while streaming, so a stop string is
  never half-sent).
* Text is decoded incrementally from the token ids; invalid UTF-8 comes back as U+FFFD, never an error.
"""

from __future__ import annotations

import codecs
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

SAMPLING_EPS = 1e-5
_NO_TRUNCATION = 1 << 30  # max_length passed to the tokenizer: we check the context ourselves


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
    def load(cls, ggml: Path | str, max_length: Optional[int] = None) -> Engine:
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
    ) -> Generation:
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


@dataclass(frozen=True)
class Outcome:
    """How a generation ended: "stop", "length" or "abort" (cancelled), and its token counts."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


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

    @property
    def outcome(self) -> Outcome:
        return Outcome(self.finish_reason or "abort", self.prompt_tokens, self.completion_tokens)

    def run(self) -> Generation:
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


class EngineLoadError(RuntimeError):
    """The GGML file cannot be served; the message says what to do."""


def max_length_from_env(env=os.environ) -> Optional[int]:
    value = env.get("MAX_LENGTH", "").strip()
    if not value:
        return None
    try:
        n = int(value)
    except ValueError:
        raise EngineLoadError(f"MAX_LENGTH must be an integer, got {value!r}") from None
    if n < 2:
        raise EngineLoadError(f"MAX_LENGTH must be at least 2, got {n}")
    return n


def load_engine(ggml: Path, max_length: Optional[int] = None) -> Engine:
    """Load a GGML file, turning every way that fails into an EngineLoadError that says what to do."""
    ggml = Path(ggml)
    if not ggml.is_file():
        raise EngineLoadError(f"GGML file not found: {ggml} (make one with `builder convert`)")
    try:
        import chatglm_cpp  # noqa: F401
    except ImportError as e:
        raise EngineLoadError(f"chatglm-cpp is not installed ({e}); install the `builder[serve]` extra") from None
    try:
        return Engine.load(ggml, max_length=max_length)
    except Exception as e:  # chatglm.cpp raises RuntimeError with a C++ source location
        raise EngineLoadError(f"cannot load {ggml} with chatglm.cpp: {e}") from None
