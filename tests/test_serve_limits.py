"""The query service's bounds, over real sockets: uploads past the bound get 503 with Retry-After before their
body is read, a stalled body gets 408, an upload is judged by its header before the rest arrives, and hostile
bodies (deep JSON, a pixel bomb) get a 4xx, not a 500 or a wrong reason."""
from __future__ import annotations

import io
import json
import socket
import struct
import time
import zlib

import pytest
from PIL import Image

from resnet_batch.search.serve import Searcher, ServiceConfig
from tests.helpers.serving import Running, indexed  # noqa: F401 (indexed: a fixture)

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def bounded(indexed):  # noqa: F811
    searcher = Searcher(ServiceConfig(index=indexed[0], max_upload_bytes=400_000, max_uploads=2, max_embed_queue=2,
                                      read_timeout_s=3.0, retry_after_s=7))
    running = Running(searcher)
    yield running
    running.close()


def _jpeg(size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (120, 30, 200)).save(buf, "JPEG")
    return buf.getvalue()


def _start_upload(base: str, length: int, first: bytes) -> socket.socket:
    """A raw HTTP upload that declares `length` bytes and sends only `first` of them (then stalls)."""
    host, port = base.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=30)
    s.sendall(f"POST /v1/neighbors/image?k=3 HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
              f"Content-Length: {length}\r\n\r\n".encode() + first)
    return s


def _status_of(s: socket.socket) -> tuple[int, str]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].decode()
    return int(head.split()[1]), head


def test_uploads_past_the_bound_get_503_with_retry_after_then_are_served_again(bounded):
    stalled = [_start_upload(bounded.base, 300_000, _jpeg()[:200]) for _ in range(2)]
    time.sleep(0.5)  # both are being read now (each holds a reading slot)
    status, body = bounded.call("POST", "/v1/neighbors/image?k=3", data=_jpeg(),
                                headers={"Content-Type": "application/octet-stream"})
    assert status == 503 and "busy" in body["error"], body

    async_headers = {}

    import aiohttp
    import asyncio

    async def headers_of():
        async with aiohttp.ClientSession() as session:
            async with session.post(bounded.base + "/v1/neighbors/image?k=3", data=_jpeg()) as r:
                async_headers.update(r.headers)
                return r.status
    assert asyncio.run(headers_of()) == 503 and async_headers.get("Retry-After") == "7"
    for s in stalled:  # the stalled clients time out (408) and their slots are free again
        status, _ = _status_of(s)
        assert status == 408
        s.close()
    status, body = bounded.call("POST", "/v1/neighbors/image?k=3", data=_jpeg(),
                                headers={"Content-Type": "application/octet-stream"})
    assert status == 200 and len(body["results"]) == 3, body


def test_a_stalled_upload_gets_408(bounded):
    s = _start_upload(bounded.base, 100_000, _jpeg()[:300])
    t0 = time.monotonic()
    status, head = _status_of(s)
    s.close()
    assert status == 408, head
    assert time.monotonic() - t0 < 20


def test_an_upload_is_judged_by_its_header_before_the_rest_is_read(bounded):
    junk = b"%!PS-Adobe-3.0 EPSF-3.0\n" + b"x" * 70_000  # not an allowed format, 70 KB of a declared 390 KB
    s = _start_upload(bounded.base, 390_000, junk)
    status, head = _status_of(s)  # answered although 320 KB were never sent
    s.close()
    assert status == 422, head


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a pixel bomb: decoding it would take gigabytes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data  # noqa: E731
                                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_hostile_bodies_get_the_right_4xx(bounded):
    status, body = bounded.call("POST", "/v1/neighbors/image?k=3", data=_png_claiming(60_000, 60_000),
                                headers={"Content-Type": "application/octet-stream"})
    assert status == 413 and "pixel" in body["error"], body
    deep = "[" * 100_000 + "]" * 100_000
    status, body = bounded.call("POST", "/v1/neighbors/vector", data=deep.encode()[:900_000],
                                headers={"Content-Type": "application/json"})
    assert status == 400, body
    status, body = bounded.call("POST", "/v1/neighbors/vector", data=json.dumps({"vector": [[[[1]]]]}).encode(),
                                headers={"Content-Type": "application/json"})
    assert status in (400, 422), body
    status, body = bounded.call("GET", "/healthz")
    assert status == 200
