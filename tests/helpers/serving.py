"""serving module: the query service on a free loopback port, its event loop in a thread, called over real HTTP."""
from __future__ import annotations

import asyncio
import json
import threading

import aiohttp
import pyarrow.parquet as pq
import pytest

from resnet_batch.search.build import build_index
from resnet_batch.search.serve import Searcher, start
from tests.helpers.search import embedded_photos


class Running:
    """A service listening on a free loopback port, its event loop in a thread; `call` is a real HTTP client."""

    def __init__(self, searcher: Searcher):
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.runner, port = self.run(start(searcher, "127.0.0.1", 0))
        self.base = f"http://127.0.0.1:{port}"

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=120)

    def call(self, method: str, path: str, **kwargs) -> tuple[int, dict]:
        async def go():
            async with aiohttp.ClientSession() as session:
                async with session.request(method, self.base + path, **kwargs) as r:
                    return r.status, json.loads(await r.text())
        return asyncio.run(go())

    def close(self):
        self.run(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, photos, checkpoint, ray_local):
    """An index over the real embed output of the test photos, and the output's rows (one per module)."""
    out = embedded_photos(tmp_path_factory, photos, checkpoint)
    uri = str(tmp_path_factory.mktemp("serve") / "idx")
    build_index([str(out)], uri, log=lambda m: None)
    return uri, pq.read_table(sorted(out.glob("part-*.parquet")))
