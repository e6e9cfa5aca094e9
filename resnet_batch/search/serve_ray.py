"""serve_ray module: `resnet-batch serve --ray`: the query service's HTTP API on Ray Serve, for more than one machine.

Two deployments (serve.py's Searcher does the work in both, so the answers are `serve`'s and `similar`'s):
- `SearchReplica`, the HTTP ingress: opens the index memory-mapped (the replicas of one node share one copy in
  the page cache; id lookups go through the id map's sorted id column and a sorted array of id hashes, no Python
  object per id), autoscaled on the requests in flight; searches run in a thread pool (FAISS releases the GIL);
- `Embedder`: the model, embedding uploads in batches gathered across requests (`serve.batch`), one forward
  pass for up to `max_batch` images; the replicas call it through a deployment handle.
Same endpoints, answers and refusals as `resnet-batch serve` (serve.py): GET /healthz, GET /v1/index,
GET /v1/neighbors?id=&k=, POST /v1/neighbors/image?k= (multipart field "image" or the raw body),
POST /v1/neighbors/vector. deploy/ray-serve.yaml runs the same application on a cluster (`serve deploy`).
"""
from __future__ import annotations

import asyncio
import email.parser
import email.policy
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Optional

import numpy as np
from ray import serve

from resnet_batch.errors import ConfigError, SimilarityIndexError
from resnet_batch.search.serve import (MAX_JSON_BYTES, BadRequest, Searcher, ServiceConfig, public_results,
                                      vector_query)

APP_NAME = "resnet-batch-search"


@dataclass(frozen=True)
class RayServeConfig:
    """The service on Ray Serve: the service's own settings, and how the deployments scale."""

    service: ServiceConfig
    min_replicas: int = 1
    max_replicas: int = 4
    target_ongoing_requests: float = 8.0  # autoscaling: requests in flight a replica should carry
    max_ongoing_requests: int = 32  # per replica; more wait in the proxy
    cpus_per_replica: float = 1.0
    embed_replicas: int = 1
    max_batch: int = 16  # uploads embedded in one forward pass
    batch_wait_s: float = 0.01  # how long a batch waits for more uploads
    ray_address: Optional[str] = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ConfigError(f"replicas must satisfy 1 <= min ({self.min_replicas}) <= max ({self.max_replicas})")
        if self.max_batch < 1 or self.batch_wait_s < 0:
            raise ConfigError("--max-batch must be >= 1 and --batch-wait-s >= 0")


class RemoteEmbedder:
    """Stands in for the Searcher's QueryEmbedder in a replica: each upload goes to the Embedder deployment,
    which batches it with others; a DecodeError comes back as one."""

    def __init__(self, handle):
        self.handle = handle

    def embed_bytes(self, data: bytes) -> np.ndarray:
        from resnet_batch.decode import DecodeError

        result = self.handle.embed.remote(data).result()
        if isinstance(result, str):
            raise DecodeError(result)
        return result


class Embedder:
    """The model, embedding uploads in batches across requests."""

    def __init__(self, cfg: ServiceConfig, max_batch: int, batch_wait_s: float):
        from resnet_batch.search.index import read_meta
        from resnet_batch.search.similar import QueryEmbedder

        self.embedder = QueryEmbedder(read_meta(cfg.index, cfg.storage_options)["provenance"], weights=cfg.weights,
                                      storage_options=cfg.storage_options)
        self.embed.set_max_batch_size(max_batch)
        self.embed.set_batch_wait_timeout_s(batch_wait_s)
        self.batches: list[int] = []

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def embed(self, datas: list) -> list:
        """One forward pass over the batch (in a thread: the replica keeps gathering the next one); a picture
        that does not decode answers with its error, as a string."""
        self.batches.append(len(datas))
        found = await asyncio.to_thread(self.embedder.embed_many, list(datas))
        return [str(r) if isinstance(r, Exception) else r for r in found]

    def batch_sizes(self) -> list[int]:
        """The sizes of the batches embedded so far (what batching across requests achieved)."""
        return list(self.batches)


class SearchReplica:
    """The HTTP ingress: the index (memory-mapped) and the three query kinds, as serve.py answers them."""

    def __init__(self, cfg: ServiceConfig, embedder=None):
        import faiss

        faiss.omp_set_num_threads(1)
        self.cfg = cfg
        self.searcher = Searcher(replace(cfg, embed=False))
        if embedder is not None:
            self.searcher.embedder = RemoteEmbedder(embedder)
        self.routes = {("GET", "/healthz"): self.health, ("GET", "/v1/index"): self.describe,
                       ("GET", "/v1/neighbors"): self.by_id, ("POST", "/v1/neighbors/image"): self.by_image,
                       ("POST", "/v1/neighbors/vector"): self.by_vector}
        self.watch = None  # started by the first request, in the replica's event loop

    async def __call__(self, request):
        from starlette.responses import JSONResponse

        if self.watch is None and self.cfg.reload_s > 0:
            self.watch = asyncio.get_running_loop().create_task(self._watch())
        path = request.url.path.rstrip("/") or "/"
        handler = self.routes.get((request.method, path))
        try:
            if handler is None:
                if any(p == path for _, p in self.routes):
                    raise BadRequest(405, "Method Not Allowed")
                raise BadRequest(404, "Not Found")
            return JSONResponse(await handler(request))
        except BadRequest as err:
            return JSONResponse({"error": str(err)}, status_code=err.status)
        except SimilarityIndexError as err:
            return JSONResponse({"error": str(err)}, status_code=422)
        except Exception as err:  # a bug, not the client's fault: say so, keep serving
            print(f"serve: {request.method} {path}: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            return JSONResponse({"error": f"internal error: {type(err).__name__}"}, status_code=500)

    # -- the endpoints, as serve.create_app answers them --------------------------------------------------------
    def answer(self, query: dict, k: int, found: list, t0: float) -> dict:
        index = self.searcher.index
        return {"query": query, "k": k, "results": public_results(found, self.cfg.show_paths),
                "index": {"count": len(index), "nprobe": index.nprobe},
                "took_ms": round(1000 * (time.perf_counter() - t0), 3)}

    def k_of(self, request) -> int:
        text = request.query_params.get("k", "10")
        try:
            return self.searcher.check_k(int(text))
        except ValueError:
            raise BadRequest(400, f"k must be a whole number, got {text!r}") from None

    async def health(self, request) -> dict:
        return {"status": "ok", "count": len(self.searcher.index)}

    async def describe(self, request) -> dict:
        return self.searcher.describe()

    async def by_id(self, request) -> dict:
        t0 = time.perf_counter()
        image_id = request.query_params.get("id")
        if not image_id:
            raise BadRequest(400, "give the image as ?id=IMAGE_ID")
        k = self.k_of(request)
        return self.answer({"id": image_id}, k, await asyncio.to_thread(self.searcher.by_id, image_id, k), t0)

    async def by_image(self, request) -> dict:
        t0 = time.perf_counter()
        k = self.k_of(request)
        data, name = await read_upload(request, self.cfg.max_upload_bytes)
        vector = await asyncio.to_thread(self.searcher.embed, data)
        return self.answer({"image": name, "bytes": len(data)}, k,
                           await asyncio.to_thread(self.searcher.by_vector, vector, k), t0)

    async def by_vector(self, request) -> dict:
        t0 = time.perf_counter()
        vector, k = vector_query(await read_capped(request, MAX_JSON_BYTES))
        found = await asyncio.to_thread(self.searcher.by_vector, vector, self.searcher.check_k(k))
        return self.answer({"vector": len(vector)}, k, found, t0)

    async def _watch(self) -> None:
        """Serve a newer version of the index once it is open (as serve.py's watcher does)."""
        while True:
            await asyncio.sleep(self.cfg.reload_s)
            try:
                if await asyncio.to_thread(self.searcher.refresh):
                    print(f"serve: now serving generation {self.searcher.index.meta.get('generation', 0)} of "
                          f"{self.cfg.index} ({len(self.searcher.index)} images)", file=sys.stderr, flush=True)
            except Exception as err:  # a half-published or unreadable index: keep the one in use
                print(f"serve: keeping the index in use; cannot open the new one: {type(err).__name__}: {err}",
                      file=sys.stderr, flush=True)


async def read_capped(request, cap: int) -> bytes:
    """A body of at most `cap` bytes: refused by its Content-Length up front, else while reading."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise BadRequest(413, f"upload of {declared} bytes is over the cap of {cap} bytes")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > cap:
            raise BadRequest(413, f"upload is over the cap of {cap} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_upload(request, cap: int) -> tuple[bytes, Optional[str]]:
    """The uploaded image: the multipart field "image" (a browser form) or the raw request body."""
    content_type = request.headers.get("content-type", "")
    body = await read_capped(request, cap + 2**16 if content_type.startswith("multipart/") else cap)
    if content_type.startswith("multipart/"):
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {content_type}\r\n\r\n".encode("latin-1") + body)
        for part in message.iter_parts() if message.is_multipart() else []:
            if part.get_param("name", header="content-disposition") == "image":
                data = part.get_payload(decode=True) or b""
                if len(data) > cap:
                    raise BadRequest(413, f"upload is over the cap of {cap} bytes")
                if not data:
                    raise BadRequest(400, "the image field is empty")
                return data, part.get_filename()
        raise BadRequest(400, 'no "image" field in the form')
    if not body:
        raise BadRequest(400, "no image: send it as the body or as the multipart field \"image\"")
    return body, None


def application(cfg: RayServeConfig):
    """The Ray Serve application: the Embedder (when uploads are on) bound into the autoscaled SearchReplica."""
    replica = serve.deployment(
        SearchReplica, name="SearchReplica", max_ongoing_requests=cfg.max_ongoing_requests,
        ray_actor_options={"num_cpus": cfg.cpus_per_replica},
        **({"num_replicas": cfg.min_replicas} if cfg.min_replicas == cfg.max_replicas else
           {"autoscaling_config": {"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                                   "target_ongoing_requests": cfg.target_ongoing_requests}}))
    if not cfg.service.embed:
        return replica.bind(cfg.service)
    embedder = serve.deployment(Embedder, name="Embedder", num_replicas=cfg.embed_replicas,
                                max_ongoing_requests=4 * cfg.max_batch,
                                ray_actor_options={"num_cpus": cfg.cpus_per_replica})
    return replica.bind(cfg.service, embedder.bind(cfg.service, cfg.max_batch, cfg.batch_wait_s))


def build_app(args: dict):
    """Ray Serve application builder (`import_path: resnet_batch.search.serve_ray:build_app` with `args:` in
    deploy/ray-serve.yaml): the ServiceConfig fields and RayServeConfig's scaling fields, by name."""
    from resnet_batch.search.spec import parse_bytes

    args = dict(args)
    if "max_upload_bytes" in args:
        args["max_upload_bytes"] = parse_bytes(str(args["max_upload_bytes"]))
    service_keys = set(ServiceConfig.__dataclass_fields__)
    scale_keys = set(RayServeConfig.__dataclass_fields__) - {"service", "extra", "ray_address"}
    unknown = set(args) - service_keys - scale_keys
    if unknown:
        raise ConfigError(f"unknown settings for the search service: {', '.join(sorted(unknown))}")
    service = ServiceConfig(**{k: v for k, v in args.items() if k in service_keys})
    return application(RayServeConfig(service=service, **{k: v for k, v in args.items() if k in scale_keys}))


def for_replicas(service: ServiceConfig) -> ServiceConfig:
    """The service settings as the replicas must get them: a local index folder and a local checkpoint given as
    --weights made absolute, since a replica runs in its raylet's folder, not the driver's (cluster.worker_uri)."""
    import os

    from resnet_batch.cluster import worker_uri

    weights = service.weights
    if weights and os.path.exists(os.path.expanduser(weights)):  # a file (a name or a URI is left as it is)
        weights = worker_uri(weights)
    return replace(service, index=worker_uri(service.index), weights=weights)


def run(cfg: RayServeConfig, block: bool = True):
    """Start Ray Serve (HTTP on cfg.service.host:port) with the application; prints the address; with `block`,
    serves until interrupted, then shuts the application down."""
    from resnet_batch.cluster import init_ray

    t0 = time.perf_counter()
    init_ray(cfg.ray_address)
    cfg = replace(cfg, service=for_replicas(cfg.service))
    serve.start(http_options={"host": cfg.service.host, "port": cfg.service.port}, detached=False)
    handle = serve.run(application(cfg), name=APP_NAME, route_prefix="/", blocking=False)
    host = f"[{cfg.service.host}]" if ":" in cfg.service.host else cfg.service.host
    print(f"serving {cfg.service.index} on Ray Serve ({cfg.min_replicas}-{cfg.max_replicas} replicas, uploads "
          f"{'batched up to ' + str(cfg.max_batch) if cfg.service.embed else 'off'}; started in "
          f"{time.perf_counter() - t0:.1f} s) on http://{host}:{cfg.service.port}", flush=True)
    if not block:
        return handle
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
