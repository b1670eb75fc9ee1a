"""The API's listening socket: a lean HTTP/1.1 path for POST /v1/payments, aiohttp for the rest.

Measured on the bench (``python -m bench.rest``): aiohttp's per-request
machinery (request and response objects, router, three middlewares, the
payload stream, the writer) cost about as much CPU as the payment itself,
which capped the shim well below its goal. Payments are the only hot
endpoint, so only they get a lean path; everything else is served by the
aiohttp application exactly as before.

Each connection starts on ``FastPaymentsProtocol``. It handles a request
itself only when it is the plain, common case: the request line is exactly
``POST /v1/payments HTTP/1.1``, every header line is well formed, the body
has a single Content-Length within the API's body limit and no
Transfer-Encoding, Expect or Upgrade. Anything else - another endpoint,
HTTP/1.0, chunked bodies, a malformed request - hands the connection, with
every byte read so far, to aiohttp's protocol for good; aiohttp then answers
it (including its errors) as it always did. The payment itself goes through
``server.serve_payment``: the same authentication, rate limit, idempotency,
validation, flow, journal and metrics as the aiohttp route.

Requests on one connection are answered in order (pipelining works); one
is processed at a time, and reading pauses while a backlog waits.

Slow senders are bounded in time and CPU: bytes are appended to one buffer
(never re-copied per read), the head is looked for only in what is new and
parsed once, and a request whose head and body have not all arrived within
``request_timeout`` of its first byte is answered 408 and the connection
closed (a drip of one byte a second cannot hold it; idle keep-alive
connections close after ``KEEPALIVE_TIMEOUT``, on both paths).
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
import traceback
from http import HTTPStatus

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from switch.logs import RateLimitedLog

log = logging.getLogger("isoswitch.api")
# a client can send malformed requests without end: a few lines a minute, then a count
_L_BAD_REQUEST = "REST API request failed"
_log_limiter = RateLimitedLog(log)

# the request line and its CRLF: a head without header lines has no
# Content-Length, so aiohttp's anyway
_REQUEST_LINE = b"POST /v1/payments HTTP/1.1\r\n"
# a header line as RFC 9110 allows it: a token, a colon, a value without
# control characters (obs-fold and anything odd go to aiohttp)
_TOKEN_CHARS = b"!#$%&'*+.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz-"
# control characters other than CR and LF (tab is allowed in values)
_CTL = re.compile(rb"[\x00-\x08\x0b-\x0c\x0e-\x1f\x7f]")
_HANDOFF_HEADERS = frozenset({"transfer-encoding", "expect", "upgrade"})
MAX_HEAD = 8190  # aiohttp's default line/field limit: larger heads are its to refuse
MAX_BACKLOG = 1 << 18  # bytes buffered behind a request in progress before reading pauses
KEEPALIVE_TIMEOUT = 75.0  # idle keep-alive connections close after this (both paths)
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


class _Date:
    """The Date header, formatted once a second."""

    def __init__(self):
        self._sec = -1
        self._value = b""

    def get(self) -> bytes:
        now = int(time.time())
        if now != self._sec:
            self._sec = now
            self._value = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now)).encode()
        return self._value


class _Problem:
    """A problem answer the protocol makes itself (render's reply shape)."""
    __slots__ = ("status", "body", "content_type", "headers")

    def __init__(self, status: int, body: bytes):
        self.status, self.body = status, body
        self.content_type = "application/problem+json"
        self.headers = None


class FastPaymentsProtocol(asyncio.Protocol):
    __slots__ = ("_srv", "_transport", "_tls", "_buf", "_scan", "_head", "_busy", "_eof", "_close",
                 "_read_paused", "_write_paused", "last_active", "partial_since")

    def __init__(self, srv: ApiServer):
        self._srv = srv
        self._transport = None
        self._tls = False
        self._buf = bytearray()
        self._scan = 0  # where the search for the end of the head resumes
        # the head of the request being received, once whole: (headers, body start, body end)
        self._head: tuple[dict, int, int] | None = None
        self._busy = False
        self._eof = False  # the client has sent all it will send
        self._close = False  # close once the request in progress is answered
        self._read_paused = False
        self._write_paused = False
        self.last_active = 0.0
        self.partial_since: float | None = None  # the first byte of a request not yet whole

    # -- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport) -> None:
        self._transport = transport
        self._tls = transport.get_extra_info("sslcontext") is not None
        self.last_active = self._srv.loop.time()
        self._srv.connections.add(self)

    def connection_lost(self, exc) -> None:
        self._srv.connections.discard(self)
        self._eof = self._close = True
        self._buf = bytearray()
        self._head = None

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self._busy or self._write_paused:
            if len(self._buf) > MAX_BACKLOG and not self._read_paused:
                self._read_paused = True
                self._transport.pause_reading()
            return
        self._next()

    def eof_received(self) -> bool:
        # the client has sent all it will: answer what is complete, then close
        self._eof = True
        if not self._busy:
            self._next()
        # keep a plain TCP transport open for the answer in progress; TLS
        # closes on the peer's close_notify whatever this returns
        return not self._tls

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if not self._busy:
            self._next()

    # -- requests -----------------------------------------------------------

    def _next(self) -> None:
        """Start the next complete request in the buffer, or wait for more bytes."""
        if self._close:
            return
        buf = self._buf
        if not buf:
            if self._eof:
                self._transport.close()
            return
        if self._head is None:
            if not self._parse_head():
                if self in self._srv.connections:  # not handed to aiohttp: the head is not whole yet
                    self._waiting()
                return
        headers, start, stop = self._head
        if len(buf) < stop:
            if self._eof:
                self._handoff()  # a truncated body: aiohttp reports it
            else:
                self._waiting()
            return
        body = bytes(buf[start:stop])
        del buf[:stop]
        self._head = None
        self._scan = 0
        self.partial_since = None
        conn = headers.get("connection")
        if conn is not None and "close" in [t.strip() for t in conn.lower().split(",")]:
            self._close = True
        self._busy = True
        self.last_active = self._srv.loop.time()
        self._srv.loop.create_task(self._serve(headers, body))

    def _waiting(self) -> None:
        """A request has begun but is not whole: its deadline runs from now (ApiServer._sweep)."""
        if self.partial_since is None:
            self.partial_since = self._srv.loop.time()

    def _parse_head(self) -> bool:
        """The head of the request at the start of the buffer, parsed once it is
        whole (``_head``); False while it is not, or when the connection was
        handed to aiohttp."""
        buf = self._buf
        end = buf.find(b"\r\n\r\n", self._scan)
        if end < 0:
            # bare-LF line ends, an oversized head or a truncated one: aiohttp's to judge
            if len(buf) > MAX_HEAD or self._eof or buf.find(b"\n\n", max(0, self._scan - 1)) >= 0:
                self._handoff()
                return False
            self._scan = max(0, len(buf) - 3)
            return False
        head = bytes(buf[:end])
        crlf = head.count(b"\r\n")
        if not head.startswith(_REQUEST_LINE) or _CTL.search(head) is not None \
                or head.count(b"\r") != crlf or head.count(b"\n") != crlf:
            self._handoff()  # another request, or a stray CR, LF or control character
            return False
        headers: dict[str, str] = {}
        for line in head[len(_REQUEST_LINE):].split(b"\r\n"):
            name, colon, value = line.partition(b":")
            if not colon or not name or name.translate(None, _TOKEN_CHARS):
                self._handoff()  # not "token: value"
                return False
            name = name.decode("ascii").lower()
            if name in headers or name in _HANDOFF_HEADERS:
                self._handoff()  # repeated headers and special bodies: aiohttp's rules apply
                return False
            headers[name] = value.strip(b" \t").decode("latin-1")
        cl = headers.get("content-length")
        if cl is None or not cl.isdigit() or not cl.isascii() or int(cl) > self._srv.max_body:
            self._handoff()
            return False
        start = end + 4
        self._head = (headers, start, start + int(cl))
        return True

    async def _serve(self, headers: dict, body: bytes) -> None:
        try:
            reply = await self._srv.serve_payment(self._srv.state, headers.get, body)
            transport = self._transport
            if not transport.is_closing():
                transport.write(self._srv.render(reply, self._close))
        finally:
            self._busy = False
            self.last_active = self._srv.loop.time()
        if self._close:
            self._transport.close()
            return
        if self._read_paused and len(self._buf) <= MAX_BACKLOG:
            self._read_paused = False
            self._transport.resume_reading()
        if not self._write_paused:
            self._next()

    def _handoff(self) -> None:
        """This connection is aiohttp's from now on, starting with the bytes read so far."""
        transport = self._transport
        self._srv.connections.discard(self)
        if transport.is_closing():
            return
        buf, self._buf = bytes(self._buf), bytearray()
        self._head = None
        self.partial_since = None
        proto = self._srv.aiohttp_factory()
        transport.set_protocol(proto)
        proto.connection_made(transport)
        if self._write_paused:  # the transport will call resume_writing on aiohttp's protocol
            proto.pause_writing()
        if self._read_paused:
            self._read_paused = False
            transport.resume_reading()
        if buf:
            proto.data_received(buf)
        if self._eof and not transport.is_closing() and not proto.eof_received():
            # what the transport itself does when a protocol does not ask to
            # stay half-open: without it aiohttp would wait for a body forever
            transport.close()

    # -- housekeeping ---------------------------------------------------------

    def idle_since(self) -> float | None:
        return None if self._busy else self.last_active

    def request_timed_out(self) -> None:
        """The request being received missed its deadline: 408, then close
        (what is left of it on the wire cannot be told from the next one)."""
        transport = self._transport
        self._close = True
        self._buf = bytearray()
        self._head = None
        self.partial_since = None
        if transport is None or transport.is_closing():
            return
        body = orjson.dumps({"type": "urn:isoswitch:problem:request-timeout", "title": "Request timeout",
                             "status": 408, "detail": f"the request did not arrive within "
                                                      f"{self._srv.request_timeout:g} s"})
        transport.write(self._srv.render(_Problem(408, body), True))
        transport.close()

    def close_when_idle(self) -> None:
        self._close = True
        if not self._busy:
            self._transport.close()

    @property
    def busy(self) -> bool:
        return self._busy


class QuietRequestHandler(RequestHandler):
    """aiohttp's connection handler, minus the echo of what the client sent.

    aiohttp answers a request it cannot parse (bare LF line ends, a control
    character in a header) with its parser's message, which quotes the raw
    request: the body's PAN and CVV and the Authorization header's API key,
    in the response and in the logged traceback. This one answers an RFC 9457
    problem that names nothing the client sent, and logs the error's type
    only (and, for a 500, where it happened: frames, not the message)."""

    __slots__ = ()

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        where = ""
        if status >= 500 and exc is not None and exc.__traceback__ is not None:
            where = "\n" + "".join(traceback.format_tb(exc.__traceback__))
        _log_limiter.warning(_L_BAD_REQUEST, "REST API: request failed with %d (%s)%s", status,
                             type(exc).__name__ if exc is not None else "no exception", where)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; the connection is closed")
        title = "Bad request" if status < 500 else "Internal error"
        detail = "malformed HTTP request" if status < 500 else "the request could not be completed"
        body = orjson.dumps({"type": f"urn:isoswitch:problem:{title.lower().replace(' ', '-')}",
                             "title": title, "status": status, "detail": detail})
        resp = web.Response(status=status, body=body, content_type="application/problem+json")
        resp.force_close()
        return resp


def _quiet(handler: RequestHandler) -> RequestHandler:
    handler.__class__ = QuietRequestHandler
    return handler


class ApiServer:
    """The started API: the listening socket, the lean payments path and the
    aiohttp application behind it. ``cleanup()`` stops it; ``addresses`` are
    the bound (host, port) pairs; ``app`` is the aiohttp application."""

    def __init__(self, runner: web.AppRunner, serve_payment, state, max_body: int,
                 request_timeout: float = 30.0):
        self.runner = runner
        self.request_timeout = float(request_timeout)
        self.app = runner.app
        self.serve_payment = serve_payment
        self.state = state
        self.max_body = max_body
        self.loop = asyncio.get_running_loop()
        self.aiohttp_factory = lambda: _quiet(runner.server())
        self.connections: set[FastPaymentsProtocol] = set()
        self.server: asyncio.AbstractServer | None = None
        self._date = _Date()
        self._sweeper: asyncio.TimerHandle | None = None
        self._stopped = False

    async def start(self, host: str, port: int, ssl_context) -> None:
        self.server = await self.loop.create_server(lambda: FastPaymentsProtocol(self), host, port,
                                                    ssl=ssl_context, backlog=1024, reuse_address=True)
        self._sweeper = self.loop.call_later(self._sweep_every(), self._sweep)

    def _sweep_every(self) -> float:
        return min(KEEPALIVE_TIMEOUT, self.request_timeout) / 5

    @property
    def addresses(self) -> list:
        return [s.getsockname() for s in (self.server.sockets if self.server else ())]

    def render(self, reply, close: bool) -> bytes:
        head = [b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nDate: %s\r\nServer: isoswitch\r\n"
                % (reply.status, _REASONS.get(reply.status, b"Unknown"), reply.content_type.encode(),
                   len(reply.body), self._date.get())]
        if reply.headers:
            for k, v in reply.headers.items():
                head.append(f"{k}: {v}\r\n".encode("latin-1"))
        if close:
            head.append(b"Connection: close\r\n")
        head.append(b"\r\n")
        head.append(reply.body)
        return b"".join(head)

    def _sweep(self) -> None:
        """Close keep-alive connections idle for KEEPALIVE_TIMEOUT, and answer 408 to
        requests still arriving request_timeout after their first byte."""
        now = self.loop.time()
        limit = now - KEEPALIVE_TIMEOUT
        late = now - self.request_timeout
        for conn in list(self.connections):
            if conn.busy:
                continue
            partial = conn.partial_since
            if partial is not None:
                if partial < late:
                    conn.request_timed_out()
            elif conn.last_active < limit:
                conn.close_when_idle()
        self._sweeper = self.loop.call_later(self._sweep_every(), self._sweep)

    async def cleanup(self, grace: float = 10.0) -> None:
        """Stop accepting, let payments in progress answer (up to ``grace`` s), close."""
        if self._stopped:
            return
        self._stopped = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            conn.close_when_idle()
        deadline = self.loop.time() + grace
        while any(c.busy for c in self.connections) and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            conn._transport.close()
        await self.runner.cleanup()
