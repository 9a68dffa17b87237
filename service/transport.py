"""HTTP/1.1 transport guards: caps on request headers and a deadline for receiving them.

uvicorn bounds neither the size nor the number of request headers when it parses with httptools, and nothing
closes a connection that sends its headers a byte at a time, or sends nothing at all. These protocol classes
add that, as uvicorn's ``Config(http=...)`` allows:

- request head (request line and headers) over ``max_bytes``: 431 Request Header Fields Too Large (RFC 6585);
  the bytes are counted as they arrive, so an oversized head is refused after ``max_bytes`` plus one read,
  never buffered whole;
- more than ``max_count`` header fields: 431;
- the head not complete ``timeout_s`` after the connection opened, or after the first byte of a later request
  on a kept-alive connection: 408 when something was sent, else the connection is just closed. Idle kept-alive
  connections are closed by uvicorn's own keep-alive timeout.

Each refusal is answered, counted through ``on_refusal(reason)`` and then the connection is closed after a
short lingering period (reads are drained and dropped), so the client reads the answer instead of a reset.
uvicorn parses with httptools when it is installed and with h11 otherwise; both get the same guards.

Written here rather than taken from a library: uvicorn has no such settings, and a proxy in front is an
ingress concern (the README advises one) that the server must not depend on.
"""

from __future__ import annotations

import asyncio
import http
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import h11
import orjson
from uvicorn.protocols.http.h11_impl import H11Protocol

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools is optional in uvicorn: h11 then parses
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

#: after a refusal, how long to drain what the client still sends before closing (a close with unread data
#: makes the kernel send a reset, which can destroy the answer before the client reads it)
LINGER_S = 2.0


@dataclass(frozen=True)
class HeaderLimits:
    max_bytes: int
    max_count: int
    timeout_s: float


def _answer(status: int, message: str) -> bytes:
    body = orjson.dumps({"error": message})
    phrase = http.HTTPStatus(status).phrase
    return (
        f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    ).encode() + body


class _Guard:
    """What both parsers share: the head deadline and the refusal (answer, count, linger, close)."""

    limits: ClassVar[HeaderLimits]
    on_refusal: ClassVar[Callable[[str], None]]
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop

    def _guard_init(self) -> None:
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._refused = False

    def _arm(self) -> None:
        if self._head_timer is None and not self._refused:
            self._head_timer = self.loop.call_later(self.limits.timeout_s, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._refused or self.transport.is_closing():
            return
        if self._head_bytes:
            self._refuse(408, "header_timeout", f"the request headers took longer than {self.limits.timeout_s:g} s")
        else:  # nothing was sent: there is no request to answer
            self._refused = True
            self.on_refusal("header_timeout")
            self.transport.close()

    def _refuse(self, status: int, reason: str, message: str) -> None:
        self._refused = True
        self._disarm()
        self.on_refusal(reason)
        transport = self.transport
        transport.write(_answer(status, message))
        if transport.can_write_eof():
            transport.write_eof()  # the answer, then FIN; reads go on (and are dropped) until the client closes
            self.loop.call_later(LINGER_S, transport.close)
        else:
            transport.close()


class _CountingH11Connection(h11.Connection):
    """h11 with the header caps checked on each parsed request head (a head read in one go never sits in the
    buffer long enough for the per-read check in GuardedH11Protocol to see it)."""

    limits = HeaderLimits(64 * 1024, 100, 10.0)
    refusal: tuple[str, str] | None = None  # (reason, message), answered 431 by GuardedH11Protocol

    def next_event(self) -> Any:
        event = super().next_event()
        if isinstance(event, h11.Request):
            size = len(event.method) + len(event.target) + sum(len(n) + len(v) + 4 for n, v in event.headers)
            if len(event.headers) > self.limits.max_count:
                self.refusal = ("header_count", f"the request has more than {self.limits.max_count} header fields")
            elif size > self.limits.max_bytes:
                self.refusal = ("header_bytes", f"the request headers are over the {self.limits.max_bytes}-byte limit")
            if self.refusal:
                raise h11.RemoteProtocolError(self.refusal[1], error_status_hint=431)
        return event


class GuardedH11Protocol(_Guard, H11Protocol):
    """The fallback when httptools is not installed: the same caps and deadline on uvicorn's h11 parser."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._guard_init()
        # h11's own buffer cap only backs ours up: ours is checked after every read, so it refuses first (431),
        # as long as h11's cap is above ours by more than one read (asyncio and uvloop read at most 256 KiB)
        self.conn = _CountingH11Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_bytes + (1 << 20))
        self.conn.limits = self.limits

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self.conn.their_state is h11.IDLE:  # no request head parsed yet: these are head bytes
            self._head_bytes += len(data)
        super().data_received(data)
        if self._refused:
            return
        if self.conn.their_state is not h11.IDLE:  # the head is complete (or the connection failed)
            self._disarm()
            self._head_bytes = 0
        elif self._head_bytes > self.limits.max_bytes:
            self._refuse(431, "header_bytes", f"the request headers are over the {self.limits.max_bytes}-byte limit")
        elif self._head_bytes:
            self._arm()

    def send_400_response(self, msg: str) -> None:
        if self._refused:
            return
        refusal = self.conn.refusal
        if refusal is not None:
            self._refuse(431, *refusal)
        else:
            super().send_400_response(msg)


if HttpToolsProtocol is not None:  # the class derives from it: defined only where httptools is installed

    class GuardedHttpToolsProtocol(_Guard, HttpToolsProtocol):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._guard_init()
            self._awaiting_head = True
            self._head_count = 0
            self._head_exact = 0

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return  # draining until the linger period ends
            if self._awaiting_head:
                self._head_bytes += len(data)  # all head bytes if the head is still incomplete after this read
            super().data_received(data)
            # A head that arrived whole in this read needs no timer (the common case costs nothing); one still
            # incomplete is checked against the cap and timed from here (or from the connection's opening).
            if self._awaiting_head and self._head_bytes and not self._refused:
                if self._head_bytes > self.limits.max_bytes:
                    self._refuse_size()
                else:
                    self._arm()

        def send_400_response(self, msg: str) -> None:
            if not self._refused:  # the parser may trip over the rest of a refused head: it was answered already
                super().send_400_response(msg)

        def _refuse_size(self) -> None:
            self._refuse(431, "header_bytes", f"the request headers are over the {self.limits.max_bytes}-byte limit")

        # parser callbacks: count exactly, and ignore everything once refused
        def on_message_begin(self) -> None:
            if self._refused:
                return
            self._awaiting_head = True
            self._head_count = 0
            self._head_exact = 0
            super().on_message_begin()

        def on_url(self, url: bytes) -> None:
            if self._refused:
                return
            self._head_exact += len(url)
            if self._head_exact > self.limits.max_bytes:
                self._refuse_size()
                return
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            if self._refused:
                return
            self._head_count += 1
            self._head_exact += len(name) + len(value) + 4
            if self._head_count > self.limits.max_count:
                self._refuse(431, "header_count", f"the request has more than {self.limits.max_count} header fields")
            elif self._head_exact > self.limits.max_bytes:
                self._refuse_size()
            else:
                super().on_header(name, value)

        def on_headers_complete(self) -> None:
            if self._refused:
                return
            self._awaiting_head = False
            self._disarm()
            super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            if not self._refused:
                super().on_body(body)

        def on_message_complete(self) -> None:
            if self._refused:
                return
            super().on_message_complete()
            self._awaiting_head = True  # the next bytes on this connection start the next request's head
            self._head_bytes = 0


def protocol_class(limits: HeaderLimits, on_refusal: Callable[[str], None]) -> type[asyncio.Protocol]:
    """The guarded protocol for uvicorn's ``Config(http=...)``: httptools when installed (as uvicorn's "auto"
    would choose), else h11."""
    base: type[_Guard] = GuardedHttpToolsProtocol if HttpToolsProtocol is not None else GuardedH11Protocol
    return type(base.__name__, (base,), {"limits": limits, "on_refusal": staticmethod(on_refusal)})
