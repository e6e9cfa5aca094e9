"""The gallery page: self-contained (thumbnails embedded), correct neighbours and scores, rendered in Chromium."""
import base64
import html
import io
import json
import os
import re
import shutil
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from resnet_batch.cli import main
from resnet_batch.decode import DecodeError
from resnet_batch.errors import SimilarityIndexError
from resnet_batch.output.store import parse_part, part_name
from resnet_batch.schema import read_provenance
from resnet_batch.search.gallery import ImageRoots, build_gallery, pick_queries, render_html, thumbnail_uri, write_gallery
from resnet_batch.search.index import SimilarityIndex
from resnet_batch.search.build import build_index
from resnet_batch.search.neighbors import NEIGHBORS_SCHEMA
from resnet_batch.search.similar import similar_to_id
from tests.helpers.search import clustered_vectors, embedded_photos, write_part

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-quic"]
# Appended to a copy of the page: after load, list every <img> with its decoded size.
PROBE = """<script>window.addEventListener("load", () => {
  const pre = document.createElement("pre"); pre.id = "img-probe";
  pre.textContent = JSON.stringify([...document.images].map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight]));
  document.body.appendChild(pre);
});</script>"""
ODD_ID = 'odd/<b>&"x".jpg'


@pytest.fixture(scope="module")
def gallery_index(tmp_path_factory, photos):
    """A flat index over 12 photo copies (one with an id that needs escaping), embeddings synthetic (not an embed
    output: no _state.json names the photos' folder, so the tests name it as the caller does, --image-root)."""
    root = tmp_path_factory.mktemp("gallery")
    files = sorted(photos.rglob("*.jpg"))[:12]
    ids = [f"img-{i:02d}.jpg" for i in range(11)] + [ODD_ID]
    paths = []
    for i, f in enumerate(files):
        dst = root / "photos" / f"copy-{i:02d}.jpg"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dst)
        paths.append(str(dst))
    write_part(root / "emb" / "part-000000.parquet", ids, clustered_vectors(12, seed=9), paths=paths)
    build_index([str(root / "emb")], str(root / "idx"), log=lambda m: None)
    return SimilarityIndex.open(str(root / "idx")), str(root / "idx"), root


def img_sources(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]*)"', page)


def test_page_lists_sampled_queries_labels_and_neighbour_scores(gallery_index):
    index, _, root = gallery_index
    queries = pick_queries(index, 4, seed=1)
    assert queries == sorted(queries) and len(set(queries)) == 4 and queries == pick_queries(index, 4, seed=1)
    entries = build_gallery(index, n=4, k=3, seed=1, image_roots=[str(root / "photos")])
    for (query, nbrs), q in zip(entries, queries):
        assert (query.image_id, query.score, query.label) == (q, None, index.row(index.faiss_id(q))["label"])
        assert query.labels == ((query.label, 0.5), ("other", pytest.approx(0.1))) and nbrs[0].labels == ()
        assert [(t.image_id, t.score) for t in nbrs] == [(m.image_id, m.score) for m in similar_to_id(index, q, 3)]
    page = render_html(entries, index.meta)
    assert page.count('<figure class="query">') == 4 and page.count('<figure class="nbr">') == 12
    assert all(src.startswith("data:image/jpeg;base64,") for src in img_sources(page)) and len(img_sources(page)) == 16
    for (query, nbrs) in entries:
        for t in nbrs:
            assert f'<span class="score">{t.score:.4f}</span><br><span class="id">{html.escape(t.image_id)}' in page
    thumb = Image.open(io.BytesIO(base64.b64decode(img_sources(page)[0].split(",", 1)[1])))
    assert thumb.format == "JPEG" and max(thumb.size) == 160
    q = entries[0][0]
    assert (f'<span class="labels"><span class="label">{q.label}</span> 0.50<br><span class="label">other</span> '
            '0.10</span>') in page


def test_a_moved_part_leaves_the_index_top_label(gallery_index, tmp_path):
    """The top-5 come from the embed parts the index records; where a part has moved since, the page shows the
    index's own top-1 label instead of failing."""
    index, _, root = gallery_index
    part = root / "emb" / "part-000000.parquet"
    part.rename(tmp_path / "away.parquet")
    try:
        entries = build_gallery(index, n=2, k=1, seed=0)
    finally:
        (tmp_path / "away.parquet").rename(part)
    assert all(q.labels == () and q.label.startswith("label-") for q, _ in entries)
    assert f'<span class="label">{entries[0][0].label}</span></figcaption>' in render_html(entries, index.meta)


def test_odd_ids_are_escaped_and_missing_images_are_shown_as_such(gallery_index, tmp_path):
    index, _, root = gallery_index
    shutil.copytree(root / "photos", tmp_path / "keep")
    (root / "photos" / "copy-11.jpg").unlink()  # the ODD_ID image
    try:
        summary = write_gallery(index, str(tmp_path / "all.html"), n=12, k=2, image_roots=[str(root / "photos")])
    finally:
        shutil.copy(tmp_path / "keep" / "copy-11.jpg", root / "photos" / "copy-11.jpg")
    page = (tmp_path / "all.html").read_text()
    assert html.escape(ODD_ID) in page and ODD_ID not in page
    shown = page.count(html.escape(ODD_ID))  # as a query and wherever it is a neighbour
    assert page.count('<div class="missing">image unavailable: FileNotFoundError') == shown
    assert summary == {"queries": 12, "thumbnails": 36 - shown, "unavailable": shown, "bytes": len(page.encode())}
    assert len(img_sources(page)) == 36 - shown


def test_neighbours_come_from_the_table_when_given(gallery_index, tmp_path):
    index, _, _ = gallery_index
    queries = pick_queries(index, 3, seed=0)
    table = {"image_id": queries, "neighbor_ids": [[ODD_ID, "img-00.jpg"]] * 3, "scores": [[0.5, 0.25]] * 3}
    (tmp_path / "nb").mkdir()
    pq.write_table(pa.table(table, schema=NEIGHBORS_SCHEMA), tmp_path / "nb" / "part-000000.parquet")
    entries = build_gallery(index, n=3, k=5, seed=0, neighbors_uri=str(tmp_path / "nb"))
    shown = [[(t.image_id, t.score) for t in nbrs] for _, nbrs in entries]
    assert shown == [[(ODD_ID, 0.5), ("img-00.jpg", 0.25)]] * 3
    first_missing = sorted(set(index.ids.column("image_id").to_pylist()) - set(queries))[0]
    with pytest.raises(SimilarityIndexError, match=rf"^9 sampled images are not in the neighbours table {tmp_path}/nb "
                                         rf"\(e\.g\. '{first_missing}'\); was it made from this index\?$"):
        build_gallery(index, n=12, k=5, seed=0, neighbors_uri=str(tmp_path / "nb"))


def test_chromium_loads_every_thumbnail_of_a_page_that_stands_alone(gallery_index, tmp_path, capsys):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed here; on Debian `apt-get install -y chromium` (make test runs it)")
    index, uri, root = gallery_index
    page_path = tmp_path / "site" / "gallery.html"
    assert main(["gallery", "--index", uri, "--out", str(page_path), "-n", "5", "-k", "4", "--seed", "3",
                 "--image-root", str(root / "photos")]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {page_path}: 5 queries, 25 thumbnails (")
    # The page must not need the photos, the index or its folder: move it alone elsewhere.
    alone = tmp_path / "elsewhere" / "page.html"
    alone.parent.mkdir()
    alone.write_text(page_path.read_text().replace("</body>", PROBE + "</body>"))
    shutil.rmtree(page_path.parent)
    cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000",
           "--dump-dom", alone.as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="img-probe">(.*?)</pre>', done.stdout, re.S)
    assert done.returncode == 0 and found, f"chromium rc={done.returncode}\n{done.stderr[-2000:]}"
    images = json.loads(html.unescape(found.group(1)))
    expected = [q for q in pick_queries(index, 5, seed=3)]
    expected = [i for q in expected for i in [q] + [m.image_id for m in similar_to_id(index, q, 4)]]
    assert [alt for alt, *_ in images] == expected
    broken = [alt for alt, complete, w, h in images if not (complete and w > 0 and h > 0)]
    assert broken == [], f"thumbnails that did not load: {broken}"
    assert max(max(w, h) for _, _, w, h in images) == 160


def test_thumbnails_only_from_the_recorded_input_root_and_within_the_caps(photos, checkpoint, tmp_path_factory,
                                                                         tmp_path, ray_local):
    """Issue 11: the gallery loaded any path or URL an index named (local files, internal URLs). Issue 18: the
    allowed roots came from index.json itself. The root is the one the embed output records in its own
    `_state.json`, or the caller's --image-root; never index.json's image_roots, never the rows' common folder."""
    emb = tmp_path / "emb"
    shutil.copytree(embedded_photos(tmp_path_factory, photos, checkpoint), emb)
    real = pq.read_table(sorted(emb.glob("part-*.parquet"))[0])
    inside = real.column("path").to_pylist()[:2]
    secret = tmp_path / "secret.jpg"  # outside the input root, named through it with ".."
    secret.write_bytes(open(inside[0], "rb").read())
    paths = [*inside, os.path.join(str(photos), os.path.relpath(secret, photos)), "/etc/hostname",
             "http://127.0.0.1:9/internal.jpg", str(tmp_path / "input-other" / "x.jpg")]
    ids = [f"i{i}" for i in range(len(paths))]
    last = max(parse_part(p.name)[0] for p in emb.glob("part-*.parquet"))
    write_part(emb / part_name(last + 1), ids, clustered_vectors(len(ids), seed=4), paths=paths,
               provenance=read_provenance(real.schema))  # rows an index must not be trusted with
    build_index([str(emb)], str(tmp_path / "idx"), log=lambda m: None)
    index = SimilarityIndex.open(str(tmp_path / "idx"))
    assert index.meta["image_roots"] == {"from": "manifest", "roots": [{"protocol": "file", "root": str(photos)}]}
    index.meta["image_roots"] = {"from": "manifest", "roots": [{"protocol": "file", "root": "/"}]}  # crafted: unused
    entries = build_gallery(index, n=len(index.ids), k=1, seed=0)  # every image a query
    errors = {q.image_id: q.error for q, _ in entries}
    refused = f"PermissionError: outside the input root (file://{photos}, from the embed output's _state.json)"
    assert {i: errors.pop(i) for i in ids} == {"i0": None, "i1": None, "i2": refused, "i3": refused, "i4": refused,
                                               "i5": refused}
    assert len(errors) == len(list(photos.rglob("*.jpg"))) and set(errors.values()) == {None}  # all inside
    # The caller's roots replace the outputs': only the photos' first shard folder now.
    shard = os.path.dirname(inside[0])
    entries = build_gallery(index, n=len(index.ids), k=1, seed=0, image_roots=[shard])
    errors = {q.image_id: q.error for q, _ in entries}
    assert errors["i0"] is None and errors["i3"] == f"PermissionError: outside the input root (file://{shard}, " \
        "from --image-root)"
    assert sum(e is None for e in errors.values()) == 2 + len(list(photos.glob(f"{os.path.basename(shard)}/*.jpg")))
    roots = ImageRoots.of_outputs([str(tmp_path / "idx"), str(emb / part_name(last + 1))])  # no _state.json there
    with pytest.raises(PermissionError, match="^no input root is known .* so no image is read"):
        roots.check(str(inside[0]))
    s3 = ImageRoots.given(["s3://bucket/photos"])
    s3.check("s3://bucket/photos/a.jpg")
    s3.check("s3a://bucket/photos/x/b.jpg")
    for bad in ("s3://bucket/photos-private/a.jpg", "s3://bucket/photos/../keys.jpg", "file:///bucket/photos/a.jpg"):
        with pytest.raises(PermissionError):
            s3.check(bad)
    with pytest.raises(ValueError, match="^over 1000 bytes, not read$"):
        thumbnail_uri(str(inside[0]), 64, max_pixels=10**8, max_bytes=1000)
    with pytest.raises(DecodeError, match=r"pixels, over the limit of 1000 "):
        thumbnail_uri(str(inside[0]), 64, max_pixels=1000)


def test_the_page_can_point_at_the_query_service(gallery_index):
    index, _, root = gallery_index
    page = render_html(build_gallery(index, n=2, k=1, seed=0, image_roots=[str(root / "photos")]), index.meta,
                       service="http://127.0.0.1:8000")
    assert '<form action="http://127.0.0.1:8000/v1/neighbors/image" method="post" enctype="multipart/form-data">' \
        in page and '<input type="file" name="image"' in page
    q = pick_queries(index, 2, seed=0)[0]
    assert f'<a href="http://127.0.0.1:8000/v1/neighbors?id={q}&amp;k=10"><img' in page


@pytest.mark.ray
def test_a_page_of_real_photos_with_imagenet_weights(tmp_path_factory, photos, keras_weights, ray_local):
    """The job's embeddings of the test photos with IMAGENET1K_KERAS: every query's label is what the photograph
    shows, its neighbours are other crops of the same photograph, and their scores are spread, not ~1."""
    from tests.helpers.search import embedded_photos

    out = embedded_photos(tmp_path_factory, photos, "IMAGENET1K_KERAS")
    idx = str(tmp_path_factory.mktemp("gallery-real") / "idx")
    build_index([str(out)], idx, log=lambda m: None)
    index = SimilarityIndex.open(idx)
    entries = build_gallery(index, n=len(index), k=2, seed=0)
    photograph = lambda image_id: image_id.split("/")[-1].rsplit("-", 1)[0]  # noqa: E731
    labels = {}
    for query, nbrs in entries:
        labels.setdefault(photograph(query.image_id), set()).add(query.label)
        assert [photograph(t.image_id) for t in nbrs] == [photograph(query.image_id)] * 2, (query, nbrs)
        assert all(0.5 < t.score < 0.99 for t in nbrs), [(t.image_id, t.score) for t in nbrs]
    assert labels["chelsea"] <= {"tabby", "tiger cat", "Egyptian cat"} and labels["coffee"] == {"espresso"}
    assert labels["motorcycle_left"] <= {"moped", "motor scooter"}
    for query, _ in entries:  # the top-5 as the job wrote them, best first, probabilities summing to at most 1
        assert len(query.labels) == 5 and query.labels[0][0] == query.label, query
        assert [p for _, p in query.labels] == sorted((p for _, p in query.labels), reverse=True)
        assert sum(p for _, p in query.labels) <= 1.0 + 1e-3
    chelsea = next(q for q, _ in entries if photograph(q.image_id) == "chelsea")
    assert len({"tabby", "tiger cat", "Egyptian cat"} & {label for label, _ in chelsea.labels}) >= 2, chelsea.labels
    page = render_html(entries, index.meta)
    assert re.search(r'<span class="labels"><span class="label">espresso</span> 0\.9\d<br>', page)
    assert '<span class="label">Egyptian cat</span> 0.' in page


def test_an_index_without_an_embed_output_gets_no_thumbnails_unless_the_caller_names_the_root(gallery_index):
    """The rows' common folder is not a root (the rows are the index's own data): an index whose sources are no
    embed output shows every image as unavailable, saying how to name the root."""
    index, _, _ = gallery_index
    q, nbrs = build_gallery(index, n=1, k=2, seed=0)[0]
    assert [t.src for t in (q, *nbrs)] == [None] * 3
    assert q.error.startswith("PermissionError: no input root is known (no --image-root, and no embed output's")


def test_every_field_of_the_index_is_escaped_in_the_page(gallery_index):
    """index.json and the id map are data someone else may have written: no field of theirs becomes markup."""
    from dataclasses import replace

    index, _, _ = gallery_index
    bad = '<script>alert(1)</script>"><img src=x onerror=alert(2)>'
    meta = {**index.meta, "count": bad, "kind": bad, "factory": bad,
            "provenance": {"model": bad, "weights_id": bad, "precision": bad}}
    entries = build_gallery(index, n=2, k=2, seed=0)
    entries = [(replace(q, label=bad, labels=((bad, 0.5),), error=bad), [replace(t, label=bad, error=bad) for t in nbrs])
               for q, nbrs in entries]
    for page in (render_html(entries, meta, title=bad, service='http://x/"><script>'),
                 render_html(entries, {**meta, "provenance": bad})):  # a provenance of the wrong type: no crash
        assert "<script" not in page and "<img src=x" not in page and "&lt;script&gt;alert(1)" in page
