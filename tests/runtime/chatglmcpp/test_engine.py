"""builder.runtime.chatglmcpp.engine: exact decoding, stop-string and limit behaviour, against a scripted
fake pipeline (the real Pipeline is exercised over HTTP in test_server.py and test_hostile.py)."""

from __future__ import annotations

import threading
from types import SimpleNamespace

from builder.runtime.chatglmcpp.engine import Engine, Generation, SamplingParams, Utf8Stream, _held_back

EOS = 0


class FakeTokenizer:
    """Like chatglm.cpp's byte-level tokenizers: decode concatenates bytes and raises UnicodeDecodeError
    (with the raw bytes) on broken UTF-8, RuntimeError on unknown ids."""

    def __init__(self, table: dict[int, bytes]):
        self.table = table

    def decode(self, ids, skip_special_tokens=True):
        out = b""
        for i in ids:
            if i == EOS:
                continue
            if i not in self.table:
                raise RuntimeError(f"Unknown token {i}")
            out += self.table[i]
        return out.decode("utf-8")

    def encode(self, text, max_length):
        return [1] * len(text)

    def apply_chat_template(self, messages, max_length):
        return [1] * sum(len(m.content) + 1 for m in messages)


class FakeModel:
    def __init__(self, script, max_length=64):
        self.script = list(script)
        self.calls = []
        self.config = SimpleNamespace(
            max_length=max_length, model_type_name="FAKE", eos_token_id=EOS, extra_eos_token_ids=[]
        )

    def generate_next_token(self, input_ids, image, gen_config, n_past, n_ctx):
        self.calls.append((len(input_ids), n_past, n_ctx, gen_config.do_sample))
        return self.script[len(self.calls) - 1] if len(self.calls) <= len(self.script) else EOS


def fake_engine(pieces: list[bytes], max_length=64, extra=()):
    """Token i+10 decodes to pieces[i]; the model emits them in order, then EOS."""
    table = {i + 10: p for i, p in enumerate(pieces)}
    table.update(dict(extra))
    script = [i + 10 for i in range(len(pieces))]
    return Engine(SimpleNamespace(model=FakeModel(script, max_length), tokenizer=FakeTokenizer(table)))


def run(engine, params=None, prompt_len=3, **kw) -> tuple[list[str], Generation]:
    gen = engine.generate([1] * prompt_len, params or SamplingParams(temperature=0), **kw)
    return list(gen), gen


def test_utf8_stream_partial_and_invalid_sequences():
    table = {1: b"\xe4", 2: b"\xbd", 3: b"\xa0", 4: b"a", 5: b"\xff", 6: b"\xe4\xbd"}
    tok = FakeTokenizer(table)
    engine = Engine(SimpleNamespace(model=FakeModel([]), tokenizer=tok))
    s = Utf8Stream(engine.decode_bytes)
    assert [s.push(i) for i in (1, 2, 3, 4)] == ["", "", "你", "a"]
    s = Utf8Stream(engine.decode_bytes)
    assert [s.push(i) for i in (5, 4, 6)] + [s.flush()] == ["\ufffd", "a", "", "\ufffd"]
    assert engine.decode([5, 4, 1]) == "\ufffda\ufffd"
    assert engine.decode([4, 999, 4]) == "aa"  # ids the tokenizer does not know are dropped


def test_generation_limits_eos_and_new_token_count():
    engine = fake_engine([b"a", b"b", b"c", b"d"])
    deltas, gen = run(engine, SamplingParams(max_new_tokens=2, temperature=0), prompt_len=20)
    assert "".join(deltas) == gen.text == "ab"
    assert (gen.finish_reason, gen.prompt_tokens, gen.completion_tokens) == ("length", 20, 2)
    model = engine.model
    assert model.calls == [(20, 0, 20, False), (21, 20, 20, False)]  # prompt once, then one token at a time

    engine = fake_engine([b"a", b"b"])
    deltas, gen = run(engine, SamplingParams(max_new_tokens=10, temperature=0))
    assert (gen.text, gen.finish_reason, gen.completion_tokens) == ("ab", "stop", 3)  # eos counted, not shown

    engine = fake_engine([b"x"] * 20, max_length=8)
    _, gen = run(engine, SamplingParams(max_new_tokens=100), prompt_len=5)
    assert (gen.text, gen.finish_reason) == ("xxx", "length")  # the context caps max_tokens
    assert engine.model.calls[0][3] is True  # temperature 1: sampling


def test_generation_greedy_switch():
    for params, sample in [
        (SamplingParams(temperature=0), False),
        (SamplingParams(top_p=1e-9), False),
        (SamplingParams(temperature=0.7, top_p=0.9, top_k=5), True),
    ]:
        config = fake_engine([]).generation_config(params)
        assert config.do_sample is sample
    config = fake_engine([]).generation_config(SamplingParams(temperature=0.7, top_p=0.9, top_k=5))
    assert (config.top_k, round(config.top_p, 3), round(config.temperature, 3)) == (5, 0.9, 0.7)


def test_stop_strings_across_tokens_are_held_back_while_streaming():
    engine = fake_engine([b"Hel", b"lo ", b"wor", b"ld", b"!"])
    deltas, gen = run(engine, SamplingParams(temperature=0, stop=["o w"]))
    assert (gen.text, gen.finish_reason) == ("Hell", "stop")
    assert "".join(deltas) == "Hell" and all("o" not in d for d in deltas)
    assert gen.completion_tokens == 3  # stopped as soon as the stop string appeared

    deltas, gen = run(fake_engine([b"Hel", b"lo ", b"wor", b"ld"]), SamplingParams(temperature=0, stop=["low", "d"]))
    assert (gen.text, gen.finish_reason) == ("Hello worl", "stop")

    deltas, gen = run(fake_engine([b"ab", b"c"]), SamplingParams(temperature=0, stop=["cd"]))
    assert ("".join(deltas), gen.finish_reason) == ("abc", "stop")  # held-back "c" is released at the end
    assert _held_back("xxab", ["abc", "b!"]) == 2 and _held_back("xx", ["abc"]) == 0


def test_strip_leading_newline_of_chat_replies():
    deltas, gen = run(fake_engine([b"\n", b"Paris", b"."]), strip_leading=True)
    assert "".join(deltas) == gen.text == "Paris."
    _, gen = run(fake_engine([b"\n", b"Paris"]))
    assert gen.text == "\nParis"


def test_cancelled_generation_stops():
    cancelled = threading.Event()
    cancelled.set()
    _, gen = run(fake_engine([b"a"] * 10), cancelled=cancelled)
    assert gen.finish_reason == "abort" and gen.completion_tokens == 1
