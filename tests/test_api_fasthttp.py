"""The lean HTTP/1.1 path for POST /v1/payments (switch.api.fasthttp), over real TLS.

A raw client shows what an HTTP library hides: pipelining, requests split
across reads, the hand-off of a connection to aiohttp, and that both paths
answer the same request the same way.
"""
from __future__ import annotations

import asyncio
import json
import uuid

import pytest

from switch.api import ApiSettings
from switch.messages import TEST_PAN
from tests.switch_harness import run
from tests.test_api import FUTURE, BAD_LUHN_PAN, payment, running_api

pytestmark = pytest.mark.timeout(120)


class Raw:
    """One keep-alive HTTP/1.1 connection, written and read by hand."""

    def __init__(self, reader, writer):
        self.r, self.w = reader, writer

    @classmethod
    async def open(cls, api) -> Raw:
        host, port = api.url.split("://")[1].split(":")
        r, w = await asyncio.open_connection(host, int(port), ssl=api.ssl or None,
                                             server_hostname="localhost" if api.ssl else None)
        return cls(r, w)

    async def send(self, data: bytes) -> None:
        self.w.write(data)
        await self.w.drain()

    async def response(self) -> tuple[int, dict, bytes]:
        head = await asyncio.wait_for(self.r.readuntil(b"\r\n\r\n"), 10)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        body = await asyncio.wait_for(self.r.readexactly(int(headers.get("content-length", 0))), 10)
        return status, headers, body

    def close(self):
        self.w.close()


def request(api, body: bytes | dict | None = None, *, key: str | None = "payments", target="/v1/payments",
            method="POST", idem: str | None = "new", extra: str = "") -> bytes:
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    body = body or b""
    head = f"{method} {target} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    if key is not None:
        head += f"Authorization: Bearer {api.keys[key]}\r\n"
    if idem is not None:
        head += f"Idempotency-Key: {uuid.uuid4().hex if idem == 'new' else idem}\r\n"
    head += extra
    if "Transfer-Encoding" not in extra:
        head += f"Content-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


def lean(headers: dict) -> bool:
    return headers.get("server") == "isoswitch"


def test_pipelined_payments_are_answered_in_order(tmp_path):
    async def main():
        async with running_api(tmp_path, {"acq-a": {}}) as api:
            c = await Raw.open(api)
            amounts = [101, 202, 303, 404]
            await c.send(b"".join(request(api, payment(amount=a)) for a in amounts))
            for a in amounts:
                status, headers, body = await c.response()
                doc = json.loads(body)
                assert (status, doc["amount"], doc["response_code"]) == (201, a, "00")
                assert lean(headers) and headers["content-type"] == "application/json"
            # the same connection goes on serving
            await c.send(request(api, payment(amount=505)))
            status, headers, body = await c.response()
            assert status == 201 and json.loads(body)["amount"] == 505
            c.close()
    run(main())


def test_a_request_arriving_a_byte_at_a_time(tmp_path):
    async def main():
        async with running_api(tmp_path, {"acq-a": {}}) as api:
            c = await Raw.open(api)
            for b in request(api, payment(amount=777)):
                await c.send(bytes([b]))
            status, headers, body = await c.response()
            assert status == 201 and lean(headers) and json.loads(body)["amount"] == 777
            c.close()
    run(main())


def test_other_requests_hand_the_connection_to_aiohttp(tmp_path):
    async def main():
        async with running_api(tmp_path, {"acq-a": {}}) as api:
            c = await Raw.open(api)
            await c.send(request(api, payment(amount=1)))
            status, headers, body = await c.response()
            assert status == 201 and lean(headers)
            txn = json.loads(body)["id"]
            # a GET pipelined behind a payment: both answered, in order
            await c.send(request(api, payment(amount=2)) +
                         request(api, None, target=f"/v1/transactions/{txn}", method="GET", idem=None))
            s1, h1, b1 = await c.response()
            s2, h2, b2 = await c.response()
            assert (s1, json.loads(b1)["amount"]) == (201, 2) and lean(h1)
            assert (s2, json.loads(b2)["id"]) == (200, txn) and not lean(h2)
            # from then on aiohttp serves the connection, payments included
            await c.send(request(api, payment(amount=3)))
            s3, h3, b3 = await c.response()
            assert (s3, json.loads(b3)["amount"]) == (201, 3) and not lean(h3)
            c.close()
    run(main())


def test_chunked_bodies_and_http_1_0_are_served_by_aiohttp(tmp_path):
    async def main():
        async with running_api(tmp_path, {"acq-a": {}}) as api:
            c = await Raw.open(api)
            body = json.dumps(payment(amount=55)).encode()
            chunked = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
            await c.send(request(api, None, extra="Transfer-Encoding: chunked\r\n") + chunked)
            status, headers, b = await c.response()
            assert status == 201 and json.loads(b)["amount"] == 55 and not lean(headers)
            c.close()
            c = await Raw.open(api)
            await c.send(request(api, payment(amount=56)).replace(b"HTTP/1.1", b"HTTP/1.0", 1))
            status, headers, b = await c.response()
            assert status == 201 and json.loads(b)["amount"] == 56 and not lean(headers)
            c.close()
    run(main())


def test_malformed_and_oversized_requests_get_aiohttps_answers(tmp_path):
    async def main():
        async with running_api(tmp_path, {"acq-a": {}}, settings=ApiSettings(max_body=2048)) as api:
            c = await Raw.open(api)
            await c.send(b"POST /v1/payments HTTP/1.1\r\nHost: x\r\nBroken header line\r\nContent-Length: 2\r\n\r\n{}")
            status, _, _ = await c.response()
            assert status == 400
            c.close()
            c = await Raw.open(api)
            await c.send(request(api, b"x" * 3000))
            status, headers, body = await c.response()
            assert status == 413 and json.loads(body)["status"] == 413
            c.close()
            # bare LF line ends: never left waiting for a CRLF that will not come
            c = await Raw.open(api)
            await c.send(request(api, payment()).replace(b"\r\n", b"\n"))
            status, _, _ = await c.response()
            assert status in (201, 400)
            c.close()
            # two Content-Length headers are never guessed at
            c = await Raw.open(api)
            await c.send(request(api, payment(), extra="Content-Length: 5\r\n"))
            status, _, _ = await c.response()
            assert status == 400
            c.close()
    run(main())


def test_a_request_aiohttp_cannot_parse_echoes_nothing_it_sent(tmp_path, caplog):
    """aiohttp's parser errors quote the raw request: the 400 and the logged
    traceback carried the body's PAN and CVV and the API key. Now a problem
    document that names none of it, and a log line with the error's type."""
    async def main():
        async with running_api(tmp_path, {"acq-a": {}}) as api:
            secret = api.keys["payments"]
            for raw in (request(api, payment(cvv="987")).replace(b"\r\n", b"\n"),
                        request(api, payment(cvv="987"), extra=f"X-Card: {TEST_PAN}\x01\r\n")):
                c = await Raw.open(api)
                await c.send(raw)
                data = await asyncio.wait_for(c.r.read(65536), 10)
                c.close()
                assert data.startswith(b"HTTP/1.") and b" 400 " in data.split(b"\r\n", 1)[0]
                for leak in (TEST_PAN.encode(), b"987", secret.encode()):
                    assert leak not in data
                assert b"application/problem+json" in data
    run(main())
    logged = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    assert TEST_PAN not in logged and "987" not in logged and "isk_" not in logged


def test_both_paths_answer_bad_requests_the_same(tmp_path):
    """The lean path and aiohttp (reached with a query string, which the lean
    path leaves alone) give the same status, type and problem document."""
    async def main():
        async with running_api(tmp_path, {"acq-a": {}}) as api:
            cases = [
                dict(body=payment(), key=None),
                dict(body=payment(), key="admin"),
                dict(body=payment(), idem=None),
                dict(body=b"{not json"),
                dict(body=b"[1, 2]"),
                dict(body=payment(pan=BAD_LUHN_PAN)),
                dict(body=payment(expiry="2001")),
                dict(body=payment(currency="XXX")),
                dict(body=payment(amount=-5, extra_field=1)),
            ]
            for case in cases:
                answers = []
                for target in ("/v1/payments", "/v1/payments?via=aiohttp"):
                    c = await Raw.open(api)
                    await c.send(request(api, target=target, **case))
                    status, headers, body = await c.response()
                    c.close()
                    answers.append((status, headers["content-type"], json.loads(body),
                                    headers.get("www-authenticate"), lean(headers)))
                (fast, via_aiohttp) = answers
                assert fast[4] and not via_aiohttp[4]
                assert fast[:4] == via_aiohttp[:4], case
                assert 400 <= fast[0] < 500
                assert TEST_PAN not in json.dumps(fast[2]) and BAD_LUHN_PAN not in json.dumps(fast[2])
            # and a replay with the same Idempotency-Key is the stored answer on both
            c = await Raw.open(api)
            await c.send(request(api, payment(amount=9), idem="same-key"))
            s1, _, b1 = await c.response()
            await c.send(request(api, payment(amount=9), idem="same-key"))
            s2, h2, b2 = await c.response()
            await c.send(request(api, payment(amount=10), idem="same-key"))
            s3, _, _ = await c.response()
            c.close()
            assert (s1, s2, b1) == (201, 201, b2) and h2.get("idempotent-replayed") == "true" and s3 == 422
    run(main())


def test_connection_close_and_rate_limits(tmp_path):
    async def main():
        async with running_api(tmp_path, {"acq-a": {}}) as api:
            c = await Raw.open(api)
            await c.send(request(api, payment(), extra="Connection: close\r\n"))
            status, headers, _ = await c.response()
            assert status == 201 and headers.get("connection") == "close"
            assert await asyncio.wait_for(c.r.read(), 5) == b""
            # the 'slow' key allows a burst of 2 at 0.5/s: the third is 429 with Retry-After
            c = await Raw.open(api)
            await c.send(b"".join(request(api, payment(), key="slow") for _ in range(3)))
            answers = [await c.response() for _ in range(3)]
            assert [a[0] for a in answers] == [201, 201, 429]
            assert int(answers[2][1]["retry-after"]) >= 1
            c.close()
            metrics = api.metrics.exposition().decode()
            assert 'route="/v1/payments"' in metrics and 'status="429"' in metrics
    run(main())


def test_stopping_answers_the_payment_in_progress(tmp_path):
    async def main():
        async with running_api(tmp_path, {"acq-a": {"latency_ms": 300.0}}) as api:
            c = await Raw.open(api)
            await c.send(request(api, payment(amount=4242)))
            await asyncio.sleep(0.1)  # in the flow, waiting for the acquirer
            stopping = asyncio.ensure_future(api.runner.cleanup())
            status, headers, body = await c.response()
            assert status == 201 and json.loads(body)["amount"] == 4242
            assert headers.get("connection") == "close"
            await stopping
            assert await asyncio.wait_for(c.r.read(), 5) == b""
            c.close()
    run(main())


def test_plain_http(tmp_path):
    """The lean path also serves the API without TLS (tls = false)."""
    async def main():
        async with running_api(tmp_path, {"acq-a": {}}, tls=False) as api:
            c = await Raw.open(api)
            await c.send(request(api, payment(expiry=FUTURE, amount=31)))
            status, headers, body = await c.response()
            assert status == 201 and lean(headers) and json.loads(body)["amount"] == 31
            c.close()
    run(main())


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_mangled_requests_never_hang_crash_or_get_a_5xx(tmp_path, tls):
    """Seeded mutations of a valid payment request (flipped, inserted, deleted and
    duplicated bytes, wrong lengths, stray CR/LF/NUL), each followed by the client
    closing: every answer is < 500, no request is left hanging (the API stops
    promptly), and a clean payment still works."""
    import random

    rng = random.Random(8583)

    def mangle(raw: bytes) -> bytes:
        b = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(6)
            i = rng.randrange(len(b))
            if op == 0:
                b[i] = rng.randrange(256)
            elif op == 1:
                b[i:i] = rng.choice([b"\r", b"\n", b"\0", b"\r\n", b":", b" ", b"\t", b"\xff"])
            elif op == 2:
                del b[i:i + rng.randint(1, 8)]
            elif op == 3:
                j = rng.randrange(len(b))
                b[i:i] = b[min(i, j):max(i, j)][:64]
            elif op == 4:
                b = bytearray(bytes(b).replace(b"Content-Length: ", b"Content-Length: " +
                                               str(rng.randint(0, 9)).encode(), 1))
            else:
                b = b[:i]
        return bytes(b)

    async def main():
        async with running_api(tmp_path, {"acq-a": {}}, tls=tls) as api:
            statuses = []
            for _ in range(60):
                c = await Raw.open(api)
                await c.send(mangle(request(api, payment())))
                try:
                    head = await asyncio.wait_for(c.r.readuntil(b"\r\n\r\n"), 0.5)
                    statuses.append(int(head.split(b" ")[1]))
                except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, ValueError):
                    pass  # waiting for bytes that will not come, or closed: both fine
                c.close()
            assert statuses and all(s < 500 for s in statuses), statuses
            c = await Raw.open(api)
            await c.send(request(api, payment(amount=8583)))
            status, headers, body = await c.response()
            assert status == 201 and lean(headers) and json.loads(body)["amount"] == 8583
            c.close()
            await asyncio.sleep(0.2)
            # nothing is left waiting for a body from a client that has gone
            await asyncio.wait_for(api.runner.cleanup(), 5)
    run(main())


def test_a_failing_handler_is_a_plain_500_on_both_paths(tmp_path, monkeypatch, caplog):
    """A bug in the payment handler: both paths answer the same 500 problem, log
    the traceback (never the card) and count it in the metrics."""
    from switch.api import server

    def broken(st, key, body):
        raise RuntimeError("boom")

    monkeypatch.setattr(server, "payment_reply", broken)

    async def main():
        async with running_api(tmp_path, {"acq-a": {}}) as api:
            answers = []
            for target in ("/v1/payments", "/v1/payments?via=aiohttp"):
                c = await Raw.open(api)
                await c.send(request(api, payment(), target=target))
                status, headers, body = await c.response()
                c.close()
                answers.append((status, headers["content-type"], json.loads(body)))
            assert answers[0] == answers[1]
            status, ctype, doc = answers[0]
            assert status == 500 and ctype == "application/problem+json"
            assert doc["type"] == "urn:isoswitch:problem:internal-error" and "boom" not in json.dumps(doc)
            assert 'route="/v1/payments",status="500"' in api.metrics.exposition().decode()
    run(main())
    failures = [r for r in caplog.records if "API handler failed" in r.getMessage()]
    assert len(failures) == 2 and all(TEST_PAN not in r.getMessage() for r in failures)


async def closed_after(c: Raw) -> bool:
    """True when the server closed the connection (EOF within 10 s)."""
    try:
        return await asyncio.wait_for(c.r.read(), 10) == b""
    except (ConnectionError, OSError):
        return True


@pytest.mark.parametrize("where", ["head", "body"])
def test_a_slow_or_stalled_payment_gets_408_and_the_connection_closes(tmp_path, where):
    """A payment whose head or body stops arriving (or drips too slowly) is
    answered 408 request_timeout after its first byte, and the connection
    closed: a slow sender cannot hold connections and buffers without end.
    Requests that arrive in time on other connections are served meanwhile,
    and nothing of the partial request was forwarded."""
    async def main():
        settings = ApiSettings(request_timeout=0.6)
        async with running_api(tmp_path, {"acq-a": {}}, settings=settings) as api:
            raw = request(api, payment(amount=901))
            cut = raw.index(b"\r\n\r\n") - 10 if where == "head" else len(raw) - 5
            slow = await Raw.open(api)
            await slow.send(raw[:cut])
            for b in raw[cut:cut + 2]:  # dripping within the deadline: a byte does not restart the clock
                await asyncio.sleep(0.2)
                await slow.send(bytes([b]))
            fast = await Raw.open(api)
            await fast.send(request(api, payment(amount=902)))
            status, headers, body = await fast.response()
            assert status == 201 and json.loads(body)["amount"] == 902
            status, headers, body = await slow.response()
            problem = json.loads(body)
            assert status == 408 and lean(headers) and headers["connection"] == "close"
            assert problem["status"] == 408 and problem["type"].endswith("request-timeout")
            assert TEST_PAN not in body.decode()
            assert await closed_after(slow)
            amounts = [r.get("4") for r in api.sw.sims["acq-a"].received]
            assert "000000000902" in amounts and "000000000901" not in amounts
            fast.close()
    run(main())


def test_a_stalled_body_on_the_aiohttp_path_gets_408_and_closes(tmp_path):
    """The same bound where aiohttp serves the request (a refund here): its
    handler's body read has request_timeout, then 408 and the connection closed."""
    async def main():
        settings = ApiSettings(request_timeout=0.6)
        async with running_api(tmp_path, {"acq-a": {}}, settings=settings) as api:
            c = await Raw.open(api)
            await c.send(request(api, payment(amount=500)))
            status, _h, body = await c.response()
            txn = json.loads(body)["id"]
            raw = request(api, {"amount": 100}, target=f"/v1/payments/{txn}/refund")
            await c.send(raw[:-4])  # the head and all but the body's last bytes
            status, headers, body = await c.response()
            assert status == 408 and not lean(headers)
            assert json.loads(body)["type"].endswith("request-timeout")
            assert await closed_after(c)
            # nothing was refunded
            c2 = await Raw.open(api)
            await c2.send(request(api, None, target=f"/v1/transactions/{txn}", method="GET", idem=None))
            status, _h, body = await c2.response()
            assert status == 200 and json.loads(body)["status"] == "approved"
            c2.close()
    run(main())


def test_a_large_body_in_small_pieces_is_parsed_once_and_served(tmp_path):
    """A body near the size limit sent in many small writes (TCP_NODELAY) is
    served like one sent whole: the lean path appends to one buffer and
    parses the head once instead of re-copying and re-parsing on every read.
    The payment's JSON is padded with whitespace to the size."""
    async def main():
        settings = ApiSettings(max_body=64 * 1024)
        async with running_api(tmp_path, {"acq-a": {}}, settings=settings) as api:
            from switch.api import fasthttp
            parses = 0
            real = fasthttp.FastPaymentsProtocol._parse_head

            def counting(self):
                nonlocal parses
                done = real(self)
                parses += done
                return done
            fasthttp.FastPaymentsProtocol._parse_head = counting
            try:
                body = json.dumps(payment(amount=703)).encode()
                body = body[:-1] + b" " * (60 * 1024 - len(body)) + b"}"
                raw = request(api, body)
                c = await Raw.open(api)
                sock = c.w.get_extra_info("socket")
                import socket
                if sock is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                for i in range(0, len(raw), 256):
                    await c.send(raw[i:i + 256])
                status, headers, out = await c.response()
                assert status == 201 and lean(headers) and json.loads(out)["amount"] == 703
                assert parses == 1
                c.close()
            finally:
                fasthttp.FastPaymentsProtocol._parse_head = real
    run(main())
