"""builder.runtime.chatglmcpp.engine_process: what the engine loop sends the server for a job, on the
scripted fake pipeline of test_engine.py (the real child process is exercised in test_server.py and
test_hostile.py)."""

from __future__ import annotations

from test_engine import fake_engine

from builder.runtime.chatglmcpp.engine import SamplingParams
from builder.runtime.chatglmcpp.engine_process import GenRequest, _EngineLoop


class Pipe:
    """The child's end of the pipe: records what is sent; nothing arrives meanwhile."""

    def __init__(self):
        self.sent: list[tuple] = []

    def send(self, msg: tuple) -> None:
        self.sent.append(msg)

    def poll(self) -> bool:
        return False


def run_job(stream: bool, prefix: str = "") -> list[tuple]:
    pipe = Pipe()
    loop = _EngineLoop(fake_engine([b"he", b"llo", b" w", b"orld"]), pipe)
    loop.generate(7, [GenRequest([1, 2, 3], SamplingParams(temperature=0), prefix=prefix, stream=stream)])
    return pipe.sent


def test_streaming_job_sends_a_delta_per_token_then_done_and_end():
    sent = run_job(stream=True, prefix="P: ")
    assert [m[3] for m in sent if m[0] == "delta"] == ["P: ", "he", "llo", " w", "orld"]
    assert [m[0] for m in sent[-2:]] == ["done", "end"] and sent[-2][3].completion_tokens == 5  # four pieces and EOS


def test_non_streaming_job_sends_its_text_in_one_message():
    """One wake-up of the server per choice, not one per token (it costs the forward pass ~4%)."""
    sent = run_job(stream=False, prefix="P: ")
    assert [m[0] for m in sent] == ["delta", "done", "end"]
    assert sent[0] == ("delta", 7, 0, "P: hello world") and sent[1][3].completion_tokens == 5  # four pieces and EOS
