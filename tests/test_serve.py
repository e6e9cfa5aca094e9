"""The query service over real HTTP: the three query kinds answer what `similar` answers, bad requests get a 4xx
with a reason (and the service keeps serving), and the command binds to localhost."""
import asyncio
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from PIL import Image

from resnet_batch.schema import embeddings_to_numpy
from resnet_batch.search.serve import Searcher, ServiceConfig
from resnet_batch.search.similar import similar_to_id, similar_to_image, similar_to_vector
from tests.helpers.serving import Running, indexed  # noqa: F401 (indexed: a fixture)

pytestmark = pytest.mark.ray  # the embed job makes the indexed photos
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def service(indexed):
    searcher = Searcher(ServiceConfig(index=indexed[0], max_upload_bytes=200_000, max_k=20))
    running = Running(searcher)
    yield running, searcher
    running.close()


def as_found(body: dict) -> list[tuple]:
    assert all(set(r) == {"rank", "image_id", "score", "label"} for r in body["results"]), body  # no server paths
    return [(r["image_id"], pytest.approx(r["score"], abs=1e-6), r["label"]) for r in body["results"]]


def expected(matches) -> list[tuple]:
    return [(m.image_id, m.score, m.label) for m in matches]


def form(data: bytes, field: str = "image") -> aiohttp.FormData:
    f = aiohttp.FormData()
    f.add_field(field, data, filename="query.jpg", content_type="image/jpeg")
    return f


def test_the_three_query_kinds_answer_what_similar_answers(service, indexed, photos):
    running, searcher = service
    index = searcher.index
    _, table = indexed
    ids = table.column("image_id").to_pylist()
    assert running.call("GET", "/healthz") == (200, {"status": "ok", "count": 36})

    status, body = running.call("GET", "/v1/neighbors", params={"id": ids[4], "k": "5"})
    assert status == 200 and body["query"] == {"id": ids[4]} and body["k"] == 5
    assert [r["rank"] for r in body["results"]] == [1, 2, 3, 4, 5]
    assert as_found(body) == expected(similar_to_id(index, ids[4], 5)) and ids[4] not in str(body["results"])

    data = (photos / ids[9]).read_bytes()
    status, body = running.call("POST", "/v1/neighbors/image", params={"k": "3"}, data=form(data))
    assert status == 200 and body["query"] == {"image": "query.jpg", "bytes": len(data)}
    assert as_found(body) == expected(similar_to_image(index, searcher.embedder, str(photos / ids[9]), 3))
    assert body["results"][0]["image_id"] == ids[9]  # the indexed copy of the uploaded photo comes first
    status, raw = running.call("POST", "/v1/neighbors/image", data=data, headers={"Content-Type": "image/jpeg"})
    assert status == 200 and as_found(raw)[:3] == as_found(body)

    vector = embeddings_to_numpy(table.column("embedding"))[20]
    status, body = running.call("POST", "/v1/neighbors/vector", json={"vector": vector.tolist(), "k": 4})
    assert status == 200 and as_found(body) == expected(similar_to_vector(index, vector, 4))
    assert body["results"][0]["image_id"] == ids[20]
    status, about = running.call("GET", "/v1/index")
    assert status == 200 and about["count"] == 36 and about["kind"] == "flat" and about["uploads"] is True
    # Issue 18: no answer tells a client where the server keeps the photos or the weights (opt-in: --show-paths).
    weights = index.provenance["weights_id"]
    assert weights.startswith("checkpoint:/") and about["provenance"]["weights_id"] == \
        "checkpoint:" + os.path.basename(weights)
    assert str(photos) not in json.dumps([body, raw, about]) and os.path.dirname(weights[11:]) not in json.dumps(about)


def test_server_paths_only_when_asked(indexed, photos):
    """--show-paths (ServiceConfig.show_paths): each result carries its path on the server, /v1/index the
    checkpoint's path; the matches are the same."""
    searcher = Searcher(ServiceConfig(index=indexed[0], embed=False, show_paths=True))
    running = Running(searcher)
    try:
        image_id = indexed[1].column("image_id")[3].as_py()
        status, body = running.call("GET", "/v1/neighbors", params={"id": image_id, "k": "3"})
        assert status == 200 and [(r["image_id"], r["path"]) for r in body["results"]] == \
            [(m.image_id, m.path) for m in similar_to_id(searcher.index, image_id, 3)]
        assert all(r["path"].startswith(str(photos) + "/") for r in body["results"])
        status, about = running.call("GET", "/v1/index")
        assert about["provenance"] == searcher.index.provenance
    finally:
        running.close()


def test_bad_requests_get_a_4xx_and_a_reason_and_the_service_keeps_serving(service, photos):
    running, searcher = service
    big = Image.new("1", (12_000, 9_000))  # 108 megapixels in a few kilobytes: over the 100M the index records
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    photo = sorted(photos.rglob("*.jpg"))[0].read_bytes()
    cases = [
        (("POST", "/v1/neighbors/image"), {"data": form(photo + b"\0" * 210_000)}, 413,
         "upload is over the cap of 200000 bytes"),  # found while reading the field (its header is a JPEG's)
        (("POST", "/v1/neighbors/image"), {"data": b"\xff" * 300_000}, 413,
         "upload of 300000 bytes is over the cap of 200000 bytes"),
        (("POST", "/v1/neighbors/image"), {"data": form(buf.getvalue())}, 413,
         "image is 12000x9000 = 108000000 pixels, over the cap of 100000000 the index records"),
        (("POST", "/v1/neighbors/image"), {"data": form(b"not an image at all")}, 422,
         "not an image (format not recognised)"),
        (("POST", "/v1/neighbors/image"), {"data": form(photo[:2000])}, 422, "cannot decode the image: "),
        (("POST", "/v1/neighbors/image"), {"data": form(photo, field="file")}, 400, 'no "image" field in the form'),
        (("POST", "/v1/neighbors/image"), {"data": b""}, 400, "no image: send it as the body"),
        (("GET", "/v1/neighbors"), {"params": {"id": "nope.jpg"}}, 404, "image_id 'nope.jpg' is not in the index"),
        (("GET", "/v1/neighbors"), {}, 400, "give the image as ?id=IMAGE_ID"),
        (("GET", "/v1/neighbors"), {"params": {"id": "x", "k": "ten"}}, 400, "k must be a whole number, got 'ten'"),
        (("GET", "/v1/neighbors"), {"params": {"id": "x", "k": "21"}}, 400, "k must be between 1 and 20, got 21"),
        (("POST", "/v1/neighbors/vector"), {"data": "{not json"}, 400, "the body must be JSON"),
        (("POST", "/v1/neighbors/vector"), {"json": {"vector": [1.0, 2.0]}}, 422,
         "vector must hold 2048 numbers, got 2"),
        (("POST", "/v1/neighbors/vector"), {"json": {"vector": ["a"] * 2048}}, 422, "vector must be a list of numbers"),
        (("POST", "/v1/neighbors/vector"), {"data": json.dumps({"vector": [float("nan")] * 2048})}, 422,
         "vector must be finite and not all zero"),
        (("POST", "/v1/neighbors/vector"), {"json": {"vector": [1.0] * 2048, "k": True}}, 400,
         "k must be a whole number, got True"),
        (("GET", "/v1/nothing"), {}, 404, "Not Found"),
        (("DELETE", "/v1/neighbors"), {}, 405, "Method Not Allowed"),
    ]
    for (method, path), kwargs, status, reason in cases:
        got, body = running.call(method, path, **kwargs)
        assert (got, body["error"][:len(reason)]) == (status, reason), (path, kwargs.keys(), body)
    assert running.call("GET", "/healthz")[0] == 200


def test_the_command_binds_to_localhost_and_serves_without_a_model(indexed, tmp_path):
    uri, table = indexed
    proc = subprocess.Popen([sys.executable, "-m", "resnet_batch.cli", "serve", "--index", uri, "--port", "0",
                             "--no-upload"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"serving {uri} (36 images, loaded in ") and " on http://127.0.0.1:" in line, \
            (line, proc.poll() is not None and proc.stderr.read())
        base = line.split(" on ", 1)[1].strip()

        async def go():
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{base}/v1/neighbors", params={"id": table.column("image_id")[0].as_py(),
                                                                      "k": "2"}) as r:
                    ok = (r.status, len((await r.json())["results"]))
                async with session.post(f"{base}/v1/neighbors/image", data=b"\xff\xd8") as r:
                    return ok, (r.status, (await r.json())["error"])
        assert asyncio.run(go()) == ((200, 2), (503, "this service was started with --no-upload"))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    busy = subprocess.run([sys.executable, "-m", "resnet_batch.cli", "serve", "--index", str(tmp_path / "none")],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert busy.returncode == 2 and busy.stderr.startswith(f"error: no index at {tmp_path / 'none'} (index.json")
