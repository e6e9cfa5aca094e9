"""`serve --ray`: the query service on Ray Serve answers the three query kinds over real HTTP as `similar` does,
refuses bad requests as `serve` does, and embeds concurrent uploads in batches across requests."""
import asyncio
import json
import os
import shutil
from pathlib import Path

import aiohttp
import pyarrow.parquet as pq
import pytest
import yaml

from resnet_batch.errors import ConfigError
from resnet_batch.schema import embeddings_to_numpy
from resnet_batch.search.build import build_index
from resnet_batch.search.index import SimilarityIndex
from resnet_batch.search.serve import ServiceConfig
from resnet_batch.search.similar import QueryEmbedder, similar_to_id, similar_to_image, similar_to_vector
from tests.helpers.search import embedded_photos

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ray_served(tmp_path_factory, photos, checkpoint, ray_local):
    from ray import serve

    from resnet_batch.dev.localcluster import free_ports
    from resnet_batch.search.serve_ray import RayServeConfig, run

    out = embedded_photos(tmp_path_factory, photos, checkpoint)
    folder = tmp_path_factory.mktemp("serve-ray")
    uri = str(folder / "idx")
    build_index([str(out)], uri, log=lambda m: None)
    port = free_ports(1)[0]
    # Started from the user's folder with a relative --index and --weights: the replicas run in the raylet's
    # folder (this session's, elsewhere), so they must get absolute paths.
    shutil.copy(checkpoint, folder / "weights.pth")
    cfg = RayServeConfig(service=ServiceConfig(index="idx", weights="weights.pth", port=port,
                                               max_upload_bytes=200_000, max_k=20),
                         min_replicas=1, max_replicas=1, cpus_per_replica=0.5, max_batch=4, batch_wait_s=1.0)
    here = os.getcwd()
    os.chdir(folder)
    try:
        run(cfg, block=False)
    finally:
        os.chdir(here)
    yield f"http://127.0.0.1:{port}", uri, pq.read_table(sorted(out.glob("part-*.parquet")))
    serve.shutdown()


def call(base: str, method: str, path: str, **kwargs) -> tuple[int, dict]:
    async def go():
        async with aiohttp.ClientSession() as session:
            async with session.request(method, base + path, **kwargs) as r:
                return r.status, json.loads(await r.text())
    return asyncio.run(go())


def found(body: dict) -> list[tuple]:
    assert all("path" not in r for r in body["results"]), body  # server paths only with show_paths
    return [(r["image_id"], pytest.approx(r["score"], abs=1e-5), r["label"]) for r in body["results"]]


def expected(matches) -> list[tuple]:
    return [(m.image_id, m.score, m.label) for m in matches]


def form(data: bytes, field: str = "image") -> aiohttp.FormData:
    f = aiohttp.FormData()
    f.add_field(field, data, filename="query.jpg", content_type="image/jpeg")
    return f


def test_the_three_query_kinds_over_ray_serve_answer_what_similar_answers(ray_served, photos):
    base, uri, table = ray_served
    index = SimilarityIndex.open(uri)
    ids = table.column("image_id").to_pylist()
    assert call(base, "GET", "/healthz") == (200, {"status": "ok", "count": 36})

    status, body = call(base, "GET", "/v1/neighbors", params={"id": ids[4], "k": "5"})
    assert status == 200 and body["query"] == {"id": ids[4]} and body["k"] == 5
    assert found(body) == expected(similar_to_id(index, ids[4], 5))

    data = (photos / ids[9]).read_bytes()
    status, body = call(base, "POST", "/v1/neighbors/image", params={"k": "3"}, data=form(data))
    assert status == 200 and body["query"] == {"image": "query.jpg", "bytes": len(data)}
    assert found(body) == expected(similar_to_image(index, QueryEmbedder(index.provenance), str(photos / ids[9]), 3))
    assert body["results"][0]["image_id"] == ids[9]
    status, raw = call(base, "POST", "/v1/neighbors/image", data=data, headers={"Content-Type": "image/jpeg"})
    assert status == 200 and found(raw)[:3] == found(body)

    vector = embeddings_to_numpy(table.column("embedding"))[20]
    status, body = call(base, "POST", "/v1/neighbors/vector", json={"vector": vector.tolist(), "k": 4})
    assert status == 200 and found(body) == expected(similar_to_vector(index, vector, 4))
    status, about = call(base, "GET", "/v1/index")
    assert status == 200 and about["count"] == 36 and about["uploads"] is True


def test_bad_requests_are_refused_as_serve_refuses_them(ray_served, photos):
    base, _, table = ray_served
    assert call(base, "GET", "/v1/neighbors", params={"id": "nope.jpg"}) == \
        (404, {"error": "image_id 'nope.jpg' is not in the index"})
    assert call(base, "GET", "/v1/neighbors", params={"id": table.column("image_id")[0].as_py(), "k": "500"}) == \
        (400, {"error": "k must be between 1 and 20, got 500"})
    assert call(base, "GET", "/v1/nothing")[0] == 404
    assert call(base, "POST", "/healthz")[0] == 405
    status, body = call(base, "POST", "/v1/neighbors/image", data=form(b"not a picture at all"))
    assert (status, body) == (422, {"error": "not an image (format not recognised)"})
    status, body = call(base, "POST", "/v1/neighbors/image", data=b"x" * 300_000,
                        headers={"Content-Type": "image/jpeg"})
    assert status == 413 and "over the cap of 200000 bytes" in body["error"]
    status, body = call(base, "POST", "/v1/neighbors/vector", json={"vector": [1.0, 2.0]})
    assert status == 422 and body["error"] == "vector must hold 2048 numbers, got 2"
    assert call(base, "GET", "/healthz")[0] == 200  # still serving


def test_concurrent_uploads_are_embedded_in_batches(ray_served, photos):
    from ray import serve

    from resnet_batch.search.serve_ray import APP_NAME

    base, _, table = ray_served
    ids = table.column("image_id").to_pylist()[:4]

    async def go():
        async with aiohttp.ClientSession() as session:
            async def one(i):
                async with session.post(base + "/v1/neighbors/image", params={"k": "1"},
                                        data=(photos / i).read_bytes(), headers={"Content-Type": "image/jpeg"}) as r:
                    return r.status, (await r.json())["results"][0]["image_id"]
            return await asyncio.gather(*(one(i) for i in ids))

    assert asyncio.run(go()) == [(200, i) for i in ids]
    sizes = serve.get_deployment_handle("Embedder", app_name=APP_NAME).batch_sizes.remote().result()
    assert max(sizes) >= 2, sizes  # uploads of different requests shared a forward pass


def test_the_ray_serve_config_in_deploy_builds_the_application(ray_served):
    from resnet_batch.search.serve_ray import build_app

    config = yaml.safe_load((REPO / "deploy" / "ray-serve.yaml").read_text())
    app = config["applications"][0]
    assert app["import_path"] == "resnet_batch.search.serve_ray:build_app" and app["route_prefix"] == "/"
    build_app({**app["args"], "index": ray_served[1]})  # every setting it names is one the service knows
    with pytest.raises(ConfigError, match="unknown settings for the search service: colour"):
        build_app({"index": ray_served[1], "colour": "red"})
