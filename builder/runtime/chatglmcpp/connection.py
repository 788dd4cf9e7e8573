"""uvicorn's HTTP/1.1 protocol with a header-read timeout, lingering close and OpenAI-shaped 400s.

* uvicorn closes idle keep-alive connections, but a connection that never completes its request
  headers (a TCP connect that sends nothing, a slowloris trickle) stays open forever: here it is
  closed after `header_timeout`.
* A request it cannot parse (10k headers, garbage) got a plain-text 400; here it is JSON in the
  OpenAI error shape.
* When the server answers before reading the whole request (413 for a 20 MB body, that 400) and
  closes, the unread bytes make the kernel reset the connection, and the client loses the answer.
  So the close lingers, as nginx's does: the server half-closes, discards what still arrives for
  up to `LINGER` seconds, then closes.
"""

from __future__ import annotations

import asyncio
import json
from typing import Optional

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from builder.runtime.chatglmcpp.protocol import error_body

LINGER = 2.0


class _LingeringTransport:
    """The connection's transport, whose close() half-closes first and closes for real once the
    client has closed its side or LINGER seconds have passed."""

    def __init__(self, transport, loop: asyncio.AbstractEventLoop):
        self._transport, self._loop = transport, loop
        self.lingering = False

    def __getattr__(self, name):
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()

    def close(self) -> None:
        if self.is_closing():
            return
        if not self._transport.can_write_eof():
            self._transport.close()
            return
        try:
            self._transport.write_eof()
        except OSError:  # the client has gone already
            self._transport.close()
            return
        self.lingering = True
        self._loop.call_later(LINGER, self._transport.close)


def protocol_class(header_timeout: float) -> type[H11Protocol]:
    class Protocol(_Protocol):
        pass

    Protocol.header_timeout = header_timeout
    return Protocol


class _Protocol(H11Protocol):
    header_timeout: float = 10.0
    _header_timer: Optional[asyncio.TimerHandle] = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(_LingeringTransport(transport, self.loop))
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if self.transport.lingering:
            return  # the answer is sent: what still arrives is read and dropped
        super().data_received(data)

    def eof_received(self):
        if self.transport.lingering:
            self.transport._transport.close()  # the client is done too
        return super().eof_received()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_timer()  # the next request's headers get the same time

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_timeout_expired)

    def _header_timeout_expired(self) -> None:
        # h11 stays IDLE on the client's side until a request's headers are complete.
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.logger.info("closing a connection that sent no complete request in %ss", self.header_timeout)
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        body = json.dumps(
            error_body(400, f"{msg} (malformed HTTP, or headers too large)", "invalid_request_error")
        ).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        try:
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                          h11.EndOfMessage()):  # fmt: skip
                self.transport.write(self.conn.send(event))
        except h11.LocalProtocolError:  # h11 refuses to answer this connection at all
            pass
        self.transport.close()
