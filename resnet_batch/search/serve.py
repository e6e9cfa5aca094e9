"""serve module: the HTTP query service: neighbours of an indexed image, of an uploaded image, or of a vector.

Built on aiohttp (already installed with Ray's dashboard; a mature asyncio HTTP server and client): one process
holds the memory-mapped index and, for uploads, the model the index records; searches run in a thread pool
(FAISS releases the GIL), embeddings in one thread of their own. Endpoints (JSON in, JSON out):

  GET  /healthz                          {"status": "ok", "count": N}
  GET  /v1/index                         what the index is (count, factory, nprobe, measured recall, provenance)
  GET  /v1/neighbors?id=IMAGE_ID&k=10    neighbours of an indexed image (itself excluded)
  POST /v1/neighbors/image?k=10          an image (multipart field "image", or the raw body), embedded as indexed
  POST /v1/neighbors/vector              {"vector": [2048 floats], "k": 10}

Every answer is JSON; a bad request gets a 4xx with {"error": reason}, never a crash. Every `reload_s` the
service looks at index.json, and when an update or a rebuild has published a new version it opens that one and
serves it from then on (requests in flight finish on the one they started with).
"""
from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np

from resnet_batch.errors import ConfigError, SimilarityIndexError
from resnet_batch.search.index import SimilarityIndex, UnknownImageId, index_version, read_meta
from resnet_batch.provenance import same_setup
from resnet_batch.search.similar import Match, QueryEmbedder, similar_to_id, similar_to_vector

log = logging.getLogger(__name__)

MAX_JSON_BYTES = 1 * 2**20  # a 2048-float vector as JSON is about 50 KiB
HEAD_BYTES = 64 * 2**10  # an upload's format and size are judged from this much, before the rest is read


@dataclass(frozen=True)
class ServiceConfig:
    """One service: which index, where to listen, and the caps on what a request may ask."""

    index: str
    host: str = "127.0.0.1"
    port: int = 8000
    weights: Optional[str] = None
    storage_options: dict = field(default_factory=dict)
    max_upload_bytes: int = 20 * 2**20
    max_k: int = 100
    threads: int = 4
    embed: bool = True  # load the model for uploads
    reload_s: float = 60.0  # how often to look for a newer version of the index (0: never)
    # Memory is bounded by (max_uploads + max_embed_queue) * max_upload_bytes: uploads being read at once, and
    # uploads read and waiting for (or in) the model; past either a request gets 503 with Retry-After at once.
    max_uploads: int = 8
    max_embed_queue: int = 8
    read_timeout_s: float = 30.0  # an upload not received in this time gets 408 (a slow or stalled client)
    retry_after_s: int = 2
    # Answers name images by image_id (relative to the input root); the server's own path of each image, and the
    # weights' checkpoint path, only when asked: they tell every client where the server keeps its files.
    show_paths: bool = False


class BadRequest(Exception):
    """A request the service refuses: HTTP status and reason."""

    def __init__(self, status: int, reason: str, headers: Optional[dict] = None):
        super().__init__(reason)
        self.headers = headers or {}
        self.status = status


class Searcher:
    """The service without HTTP: the open index (and model), answering the three query kinds."""

    def __init__(self, cfg: ServiceConfig):
        import faiss

        faiss.omp_set_num_threads(1)  # one thread a search; requests run side by side
        t0 = time.perf_counter()
        self.cfg = cfg
        self.index = SimilarityIndex.open(cfg.index, cfg.storage_options)
        self.embedder = QueryEmbedder(self.index.provenance, weights=cfg.weights,
                                      storage_options=cfg.storage_options) if cfg.embed else None
        prep = self.index.provenance.get("preprocessing", {})
        self.max_pixels = int(prep.get("max_pixels", 100_000_000))
        _warm(self.index)
        self.load_s = time.perf_counter() - t0

    def refresh(self) -> bool:
        """Open the index again when index.json names another version than the one served (an update or a
        rebuild published since); True when it did. The one in use serves until the new one is open."""
        meta = read_meta(self.cfg.index, self.cfg.storage_options)
        if index_version(meta) == index_version(self.index.meta):
            return False
        index = SimilarityIndex.open(self.cfg.index, self.cfg.storage_options)
        if self.embedder is not None and not same_setup(self.index.provenance, index.provenance):
            self.embedder = QueryEmbedder(index.provenance, weights=self.cfg.weights,
                                          storage_options=self.cfg.storage_options)
        _warm(index)
        self.index = index
        return True

    def check_k(self, k: int) -> int:
        if not 1 <= k <= self.cfg.max_k:
            raise BadRequest(400, f"k must be between 1 and {self.cfg.max_k}, got {k}")
        return k

    def ask(self, question):
        """`question(index)` of the index served. From object storage the re-ranking rows are read by range as
        queries need them, so a version whose files were removed since it was opened (two updates published
        within --reload-s) fails with FileNotFoundError: the current version is opened then and asked again."""
        index = self.index
        try:
            return question(index)
        except FileNotFoundError:
            if index is self.index and not self.refresh():
                raise  # index.json still names this version: its files are really missing
            log.info(f"serve: the version in use lost its files to newer ones; now serving generation "
                     f"{self.index.meta.get('generation', 0)} of {self.cfg.index}")
            return question(self.index)

    def by_id(self, image_id: str, k: int) -> list[Match]:
        try:
            return self.ask(lambda index: similar_to_id(index, image_id, k))
        except UnknownImageId as err:
            raise BadRequest(404, str(err)) from None

    def by_vector(self, vector: np.ndarray, k: int) -> list[Match]:
        if vector.ndim != 1 or len(vector) != self.index.meta["dim"]:
            raise BadRequest(422, f"vector must hold {self.index.meta['dim']} numbers, got {vector.size}")
        if not np.isfinite(vector).all() or not np.any(vector):
            raise BadRequest(422, "vector must be finite and not all zero")
        return self.ask(lambda index: similar_to_vector(index, vector, k))

    def check_header(self, head: bytes, complete: bool) -> bool:
        """Judge an upload by its first bytes (`complete`: they are all of it): not an allowed image format 422,
        over the pixel cap 413. Only the allowed formats' parsers are tried. True once judged; False when the
        size is not in `head` yet (judged again with more)."""
        from PIL import Image

        from resnet_batch.decode import DEFAULT_FORMATS, sniff_format

        if self.embedder is None:
            raise BadRequest(503, "this service was started with --no-upload")
        if sniff_format(head) not in DEFAULT_FORMATS:
            raise BadRequest(422, "not an image (format not recognised)")
        try:
            with Image.open(io.BytesIO(head), formats=list(DEFAULT_FORMATS)) as im:  # the header only
                width, height = im.size
        except Image.DecompressionBombError:
            raise BadRequest(413, f"image is over the pixel cap of {self.max_pixels} the index records") from None
        except Exception:
            if not complete:
                return False  # the size lies further in (a long EXIF block, say)
            raise BadRequest(422, "not an image (format not recognised)") from None
        if width * height > self.max_pixels:
            raise BadRequest(413, f"image is {width}x{height} = {width * height} pixels, over the cap of "
                                  f"{self.max_pixels} the index records")
        return True

    def embed(self, data: bytes) -> np.ndarray:
        """The embedding of uploaded bytes; over the pixel cap: 413, not an image: 422."""
        from resnet_batch.decode import DecodeError

        self.check_header(data, complete=True)
        try:
            return self.embedder.embed_bytes(data)
        except DecodeError as err:
            raise BadRequest(422, f"cannot decode the image: {err}") from None

    def describe(self) -> dict:
        m = self.index.meta
        return {"count": m["count"], "kind": m["kind"], "factory": m["factory"], "nprobe": self.index.nprobe,
                "tuning": m["tuning"], "dim": m["dim"],
                "provenance": public_provenance(m["provenance"], self.cfg.show_paths), "uploads": self.embedder
                is not None, "max_k": self.cfg.max_k, "max_upload_bytes": self.cfg.max_upload_bytes,
                "max_pixels": self.max_pixels}


def public_results(found: list[Match], show_paths: bool) -> list[dict]:
    """The results of an answer, best first: rank, image_id, score, label, and the image's path on the server
    only with `show_paths` (both services answer through here)."""
    return [{"rank": i, **{k: v for k, v in asdict(m).items() if show_paths or k != "path"}}
            for i, m in enumerate(found, 1)]


def public_provenance(provenance: dict, show_paths: bool) -> dict:
    """The index's provenance as `/v1/index` shows it: a checkpoint's path or URL cut to its file name unless
    `show_paths` (its identity is the recorded sha256)."""
    weights = str(provenance.get("weights_id", ""))
    if show_paths or not weights.startswith("checkpoint:"):
        return provenance
    return {**provenance, "weights_id": "checkpoint:" + weights.rstrip("/").rsplit("/", 1)[-1]}


def vector_query(raw: bytes) -> tuple[np.ndarray, int]:
    """The body of a by-vector query, `{"vector": [...], "k": 10}`, as (vector, k); BadRequest when it is not one.
    Both services (serve and serve --ray) parse it here, so they refuse the same bodies the same way."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON, or nested deeper than the parser goes
        raise BadRequest(400, 'the body must be JSON: {"vector": [...], "k": 10}') from None
    if not isinstance(body, dict) or not isinstance(body.get("vector"), list):
        raise BadRequest(400, 'the body must be JSON: {"vector": [...], "k": 10}')
    k = body.get("k", 10)
    if not isinstance(k, int) or isinstance(k, bool):
        raise BadRequest(400, f"k must be a whole number, got {k!r}")
    try:
        vector = np.asarray(body["vector"], dtype=np.float32)
    except (TypeError, ValueError):
        raise BadRequest(422, "vector must be a list of numbers") from None
    return vector, k


def _warm(index: SimilarityIndex) -> None:
    """Build an index's lookups now, not racing in the first requests' threads."""
    if len(index):
        index.vector(index.row(int(index.ids.column("id")[0].as_py()))["image_id"])


def create_app(searcher: Searcher):
    """The aiohttp application around a Searcher."""
    from aiohttp import web

    cfg = searcher.cfg
    search_pool = ThreadPoolExecutor(max_workers=cfg.threads, thread_name_prefix="search")
    embed_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")

    async def run(pool, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    def answer(query: dict, k: int, found: list[Match], t0: float):
        return web.json_response({
            "query": query, "k": k, "results": public_results(found, cfg.show_paths),
            "index": {"count": len(searcher.index), "nprobe": searcher.index.nprobe},
            "took_ms": round(1000 * (time.perf_counter() - t0), 3)})

    def k_of(request) -> int:
        text = request.query.get("k", "10")
        try:
            return searcher.check_k(int(text))
        except ValueError:
            raise BadRequest(400, f"k must be a whole number, got {text!r}") from None

    async def health(request):
        return web.json_response({"status": "ok", "count": len(searcher.index)})

    async def describe(request):
        return web.json_response(searcher.describe())

    async def by_id(request):
        t0 = time.perf_counter()
        image_id = request.query.get("id")
        if not image_id:
            raise BadRequest(400, "give the image as ?id=IMAGE_ID")
        k = k_of(request)
        return answer({"id": image_id}, k, await run(search_pool, searcher.by_id, image_id, k), t0)

    busy = {"reading": 0, "embedding": 0}  # uploads being read; read and waiting for (or in) the model

    def full(what: str, limit: int) -> BadRequest:
        return BadRequest(503, f"busy: {limit} uploads are {what} already; retry in {cfg.retry_after_s} s",
                          {"Retry-After": str(cfg.retry_after_s)})

    async def by_image(request):
        t0 = time.perf_counter()
        k = k_of(request)
        if searcher.embedder is None:
            raise BadRequest(503, "this service was started with --no-upload")
        if busy["reading"] >= cfg.max_uploads:  # refused before a byte of the body is read
            raise full("being received", cfg.max_uploads)
        if busy["embedding"] >= cfg.max_embed_queue:
            raise full("waiting for the model", cfg.max_embed_queue)
        busy["reading"] += 1
        try:
            data, name = await asyncio.wait_for(read_upload(request, cfg.max_upload_bytes, searcher.check_header),
                                                cfg.read_timeout_s)
        except asyncio.TimeoutError:
            raise BadRequest(408, f"the upload did not arrive within {cfg.read_timeout_s:g} s") from None
        finally:
            busy["reading"] -= 1
        if busy["embedding"] >= cfg.max_embed_queue:
            raise full("waiting for the model", cfg.max_embed_queue)
        busy["embedding"] += 1
        try:
            size = len(data)
            vector = await run(embed_pool, searcher.embed, data)
        finally:
            busy["embedding"] -= 1
            del data
        return answer({"image": name, "bytes": size}, k, await run(search_pool, searcher.by_vector, vector, k),
                      t0)

    async def by_vector(request):
        t0 = time.perf_counter()
        vector, k = vector_query(await read_capped(request.content, MAX_JSON_BYTES, request.content_length))
        found = await run(search_pool, searcher.by_vector, vector, searcher.check_k(k))
        return answer({"vector": len(vector)}, k, found, t0)

    @web.middleware
    async def errors(request, handler):
        try:
            return await handler(request)
        except BadRequest as err:
            return web.json_response({"error": str(err)}, status=err.status, headers=err.headers)
        except web.HTTPException as err:  # aiohttp's own: 404 route, 405 method, 413 body over client_max_size
            if err.status < 400:
                raise
            return web.json_response({"error": err.reason if err.status != 413 else
                                      f"request body over {cfg.max_upload_bytes} bytes"}, status=err.status)
        except SimilarityIndexError as err:
            return web.json_response({"error": str(err)}, status=422)
        except Exception as err:  # a bug, not the client's fault: say so, keep serving
            log.error(f"serve: {request.method} {request.path_qs}: {type(err).__name__}: {err}")
            return web.json_response({"error": f"internal error: {type(err).__name__}"}, status=500)

    app = web.Application(middlewares=[errors], client_max_size=cfg.max_upload_bytes + 2**16)
    app.add_routes([web.get("/healthz", health), web.get("/v1/index", describe), web.get("/v1/neighbors", by_id),
                    web.post("/v1/neighbors/image", by_image), web.post("/v1/neighbors/vector", by_vector)])

    watching: list = []

    async def watch_index(app):
        async def watch():
            while True:
                await asyncio.sleep(cfg.reload_s)
                try:
                    if await asyncio.get_running_loop().run_in_executor(None, searcher.refresh):
                        log.info(f"serve: now serving generation {searcher.index.meta.get('generation', 0)} of "
                                 f"{cfg.index} ({len(searcher.index)} images)")
                except Exception as err:  # a half-published or unreadable index: keep the one in use
                    log.warning(f"serve: keeping the index in use; cannot open the new one: {type(err).__name__}: "
                                f"{err}")
        if cfg.reload_s > 0:
            watching.append(asyncio.get_running_loop().create_task(watch()))

    async def close_pools(app):
        for task in watching:
            task.cancel()
        search_pool.shutdown(wait=False)
        embed_pool.shutdown(wait=False)

    app.on_startup.append(watch_index)
    app.on_cleanup.append(close_pools)
    return app


async def read_capped(stream, cap: int, declared: Optional[int], check_head=None) -> bytearray:
    """A body of at most `cap` bytes: refused by its Content-Length up front, else while reading; held once (one
    growing buffer, no list of chunks joined into a second copy). `check_head(head, complete)` judges the first
    HEAD_BYTES (more, until it can) before the rest is read."""
    if declared is not None and declared > cap:
        raise BadRequest(413, f"upload of {declared} bytes is over the cap of {cap} bytes")
    read = getattr(stream, "read_chunk", None) or stream.read  # a multipart field, or the request body
    body = bytearray()
    judged = check_head is None
    while chunk := await read(2**16):
        if len(body) + len(chunk) > cap:
            raise BadRequest(413, f"upload is over the cap of {cap} bytes")
        body += chunk
        if not judged and len(body) >= HEAD_BYTES:
            judged = check_head(bytes(body[:4 * HEAD_BYTES]), False) or len(body) >= 4 * HEAD_BYTES
    if not judged and body:
        check_head(bytes(body), True)
    return body


async def read_upload(request, cap: int, check_head=None) -> tuple[bytearray, Optional[str]]:
    """The uploaded image: the multipart field "image" (a browser form) or the raw request body."""
    if request.content_length is not None and request.content_length > cap + 2**16:
        raise BadRequest(413, f"upload of {request.content_length} bytes is over the cap of {cap} bytes")
    if request.content_type.startswith("multipart/"):
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if part.name == "image":
                data = await read_capped(part, cap, None, check_head)
                if not data:
                    raise BadRequest(400, "the image field is empty")
                return data, part.filename
        raise BadRequest(400, 'no "image" field in the form')
    data = await read_capped(request.content, cap, request.content_length, check_head)
    if not data:
        raise BadRequest(400, "no image: send it as the body or as the multipart field \"image\"")
    return data, None


async def start(searcher: Searcher, host: str, port: int):
    """Start listening; returns (runner, bound port). Stop with `await runner.cleanup()`."""
    from aiohttp import web

    runner = web.AppRunner(create_app(searcher), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as err:
        await runner.cleanup()
        raise ConfigError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return runner, runner.addresses[0][1]


def serve(cfg: ServiceConfig) -> None:
    """Load the index (and model), then serve until stopped (SIGTERM or SIGINT: the listener closes, requests in
    flight are answered, and it returns); prints the address it listens on."""
    import signal

    searcher = Searcher(cfg)

    async def main():
        runner, port = await start(searcher, cfg.host, cfg.port)
        host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread: KeyboardInterrupt
                pass
        print(f"serving {cfg.index} ({len(searcher.index)} images, loaded in {searcher.load_s:.1f} s) on "
              f"http://{host}:{port}", flush=True)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
