"""The index build scaled out on Ray against the single-process build on the same vectors: same ids, same
training, recall within 0.01; run from another folder with relative paths; its on-disk lists opened in place and
kept on disk by updates; from object storage, each file a node needs fetched once, the re-ranking rows by range."""
import json
import os
from pathlib import Path

import numpy as np
import pytest

from resnet_batch.search.build import build_index
from resnet_batch.search.coders import read_coder
from resnet_batch.search.index import SimilarityIndex, normalize
from resnet_batch.search.scaleout import ScaleOut, build_index_ray
from resnet_batch.search.spec import IndexOptions
from resnet_batch.search.update import index_embeddings
from tests.helpers.search import brute_force, clustered_vectors, one_faiss_thread, write_part  # noqa: F401

QUIET = {"log": lambda m: None}
PARTS, ROWS = 6, 1000


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory, ray_local):
    """6,000 clustered vectors in 6 parts (one with failed rows), indexed by one process and by Ray tasks."""
    root = tmp_path_factory.mktemp("scaleout")
    vectors = clustered_vectors(PARTS * ROWS + 500, seed=11)
    held_out, vectors = vectors[-500:], vectors[:-500]
    ids = [f"img/{i:05d}.jpg" for i in range(len(vectors))]
    for p in range(PARTS):
        rows = slice(p * ROWS, (p + 1) * ROWS)
        status = ["ok"] * ROWS if p != 3 else ["ok"] * (ROWS - 10) + ["decode_error"] * 10
        write_part(root / "emb" / f"part-{p:06d}.parquet", ids[rows], vectors[rows], status=status)
    ok = np.ones(len(vectors), dtype=bool)
    ok[4 * ROWS - 10:4 * ROWS] = False
    options = IndexOptions(kind="ivf", tune_queries=400)
    single = build_index([str(root / "emb")], str(root / "single"), **options.as_dict(), **QUIET)
    scaled = build_index_ray([str(root / "emb")], str(root / "scaled"), options,
                             ScaleOut(tasks=4, rows_per_task=1500), **QUIET)
    return root, vectors[ok], np.array(ids, dtype=object)[ok], held_out, single, scaled



def _upload(fs, folder: Path, files, prefix: str) -> None:
    """An index folder put on S3 as `index` publishes one: its files, then index.json."""
    for name in files:
        fs.put_file(str(folder / name), f"{prefix}/{name}")
    fs.pipe(f"{prefix}/index.json", (folder / "index.json").read_bytes())

def test_distributed_build_equals_the_single_process_build(two_builds):
    root, vectors, ids, held_out, single, scaled = two_builds
    assert scaled["count"] == single["count"] == len(ids) == 5990
    assert scaled["factory"] == single["factory"] and scaled["spec"] == single["spec"]
    assert scaled["scaled_out"]["add_tasks"] == 3 and scaled["next_id"] == single["next_id"]
    assert sorted(scaled["files"]) == ["ids.arrow", "ids.hash", "index.faiss", "lists.ivfdata", "refine.f16",
                                       "refine.faiss"]
    codes = 5990 * (scaled["spec"]["pca"] + 8)  # SQ8 of the projection and a 64-bit id a vector
    assert scaled["files"]["lists.ivfdata"] == codes  # the codes are in the lists file, not index.faiss:
    assert single["files"]["index.faiss"] - scaled["files"]["index.faiss"] >= 0.99 * codes
    assert scaled["part_uris"] == single["part_uris"] and scaled["part_stamps"] == single["part_stamps"]
    assert scaled["query_node"]["lists_bytes"] == 5990 * scaled["spec"]["pca"] + 5990 * 8
    a, b = SimilarityIndex.open(str(root / "single")), SimilarityIndex.open(str(root / "scaled"))
    # same ids: every image has the same 64-bit id and id-map row in both
    assert a.ids.select(["id", "image_id", "path", "label", "part"]).equals(
        b.ids.select(["id", "image_id", "path", "label", "part"]))
    assert (a.ids.column("image_id").to_pylist() == list(ids))
    # same training and the same codes: the same answers, and the same recall against exact search
    assert a.nprobe == b.nprobe == scaled["nprobe"]
    _, exact = brute_force(vectors, held_out, 10)
    recall = []
    for index in (a, b):
        _, found = index.search(held_out, 10)
        rows = index.rows_of(found)
        recall.append(np.mean([len(set(r) & set(e)) / 10 for r, e in zip(rows, exact)]))
    assert abs(recall[0] - recall[1]) <= 0.01 and recall[1] >= 0.9, recall
    _, fa = a.search(held_out[:50], 10)
    _, fb = b.search(held_out[:50], 10)
    assert np.mean(fa == fb) >= 0.99
    # an indexed image's own vector finds it first, through the on-disk lists
    scores, found = b.search(b.vector("img/00042.jpg")[None, :], 1)
    assert b.image_ids(found)[0, 0] == "img/00042.jpg" and scores[0, 0] > 0.999


def test_updates_of_the_scaled_out_index_keep_its_lists_on_disk(two_builds, tmp_path):
    """An update writes the lists of its generation on disk again (the previous generation's file only read):
    index.faiss stays small, and the answers are those of the single-process index (lists in index.faiss, edited
    in memory) built from the same vectors and updated the same way."""
    import shutil

    root, held_out = two_builds[0], two_builds[3]
    emb, idx, ref = tmp_path / "emb", tmp_path / "idx", tmp_path / "ref"
    shutil.copytree(root / "emb", emb)
    options = IndexOptions(kind="ivf", tune_queries=200)
    build_index_ray([str(emb)], str(idx), options, ScaleOut(tasks=2), **QUIET)
    build_index([str(emb)], str(ref), **options.as_dict(), **QUIET)
    lists_before, built = (idx / "lists.ivfdata").stat(), (idx / "index.faiss").stat().st_size
    new = clustered_vectors(300, seed=99)

    def check(generation: int, count: int):
        meta = json.loads((idx / "index.json").read_text())
        gen = f"gen-{generation:06d}"
        assert meta["generation"] == generation and meta["count"] == count
        assert meta["layout"]["index"] == f"{gen}/index.faiss" and meta["layout"]["lists"] == f"{gen}/lists.ivfdata"
        codes = count * (meta["spec"]["pca"] + 8)  # SQ8 of the projection and a 64-bit id a vector, no holes
        assert meta["files"][f"{gen}/lists.ivfdata"] == (idx / gen / "lists.ivfdata").stat().st_size == codes
        assert abs(meta["files"][f"{gen}/index.faiss"] - built) < 1024  # the projection and centroids, no codes
        a, b = SimilarityIndex.open(str(idx)), SimilarityIndex.open(str(ref))
        assert len(a) == len(b) == count and a.ids.equals(b.ids)
        for queries in (held_out[:100], normalize(new[:5])):
            sa, fa = a.search(queries, 10)
            sb, fb = b.search(queries, 10)
            np.testing.assert_array_equal(fa, fb)
            np.testing.assert_array_equal(sa, sb)
        return a, meta

    (emb / "part-000005.parquet").unlink()  # one part deleted, one new
    write_part(emb / "part-000006.parquet", [f"new/{i}.jpg" for i in range(300)], new)
    for folder in (idx, ref):
        outcome = index_embeddings([str(emb)], str(folder), **QUIET)
        assert outcome.action == "updated" and (outcome.added, outcome.removed) == (300, 1000)
    index, _ = check(1, 5990 - 1000 + 300)
    _, found = index.search(normalize(new[:5]), 1)
    assert index.image_ids(found)[:, 0].tolist() == [f"new/{i}.jpg" for i in range(5)]
    # the previous generation's lists file was not touched (its readers still map it)
    after = (idx / "lists.ivfdata").stat()
    assert (after.st_size, after.st_mtime_ns) == (lists_before.st_size, lists_before.st_mtime_ns)

    write_part(emb / "part-000001.parquet", [f"img/{i:05d}.jpg" for i in range(ROWS, ROWS + 600)],
               two_builds[1][ROWS:ROWS + 600])  # a part rewritten without 400 of its rows: an update of the update
    for folder in (idx, ref):
        outcome = index_embeddings([str(emb)], str(folder), **QUIET)
        assert outcome.action == "updated" and (outcome.added, outcome.removed) == (0, 400)
    _, meta = check(2, 5990 - 1000 + 300 - 400)
    assert not (idx / "lists.ivfdata").exists()  # the build's, now two generations old: removed
    assert (idx / "gen-000001" / "lists.ivfdata").exists()  # the previous generation's stays for its readers


def _cwd() -> str:
    return os.getcwd()


def test_cli_index_ray_from_another_folder_with_relative_paths(two_builds, tmp_path, capsys, monkeypatch, ray_local):
    """`index --ray` from the user's own folder with relative --embeddings and --out, on the session's Ray, whose
    workers run in the folder it was started from (as on a cluster one joins: the raylet's), not the user's: every
    path the tasks get is absolute, and the index is written where the user meant. In this process: a driver of its
    own would start a job's worst cost, fresh workers importing torch and FAISS, to show the same thing."""
    import shutil

    from resnet_batch.cli import main
    from tests.helpers.jobs import REPO

    workers_in = ray_local.get(ray_local.remote(_cwd).remote())
    user = tmp_path / "user"
    shutil.copytree(two_builds[0] / "emb", user / "emb")
    monkeypatch.chdir(user)
    assert workers_in != str(user)
    code = main(["index", "--embeddings", "emb", "--out", "idx", "--ray", "--kind", "ivf", "--tasks", "2",
                 "--tune-queries", "200"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.startswith("indexed 5990 images (PCA") and captured.out.count("\n") == 1
    assert "a query node needs" in captured.err and "on Ray (" in captured.err
    meta = json.loads((user / "idx" / "index.json").read_text())
    assert meta["scaled_out"]["add_tasks"] == 2 and "lists.ivfdata" in meta["files"]
    assert meta["part_uris"] == [str(user / "emb" / f"part-{p:06d}.parquet") for p in range(PARTS)]
    assert meta["sources"] == [str(user / "emb")]  # as neighbors and gallery, run from any folder, must read it
    # the staging folder and the tasks' partial files were in it, and are gone
    assert sorted(p.name for p in (user / "idx").iterdir()) == sorted([*meta["files"], "index.json"])
    assert not (REPO / "idx").exists() and not (Path(workers_in) / "idx").exists()
    assert len(SimilarityIndex.open(str(user / "idx"))) == 5990


@pytest.mark.s3
def test_a_service_whose_version_lost_its_files_on_s3_answers_from_the_current_one(two_builds, s3_server, tmp_path,
                                                                                     monkeypatch):
    """Issue 18: from S3 the re-ranking rows are read by range as queries need them, and only the current and the
    previous generation are kept; when two updates publish within --reload-s, the version a service opened loses
    its files. The query that finds them gone opens the current version and is answered from it (not a 500)."""
    from resnet_batch.search.serve import Searcher, ServiceConfig
    from resnet_batch.search.similar import similar_to_vector

    root, _, _, held_out, _, scaled = two_builds
    bucket = s3_server.make_bucket("serve-replaced")
    fs = s3_server.filesystem()
    _upload(fs, root / "scaled", scaled["files"], f"{bucket}/idx")
    monkeypatch.setenv("RESNET_BATCH_CACHE", str(tmp_path / "cache"))
    searcher = Searcher(ServiceConfig(index=f"s3://{bucket}/idx", embed=False, reload_s=0,
                                      storage_options=s3_server.storage_options()))
    searcher.by_vector(held_out[0], 5)
    # What two publications leave (as folder.publish_generation writes it): the index as generation 2 in a folder of
    # its own, index.json naming it, the build's top-level files removed.
    gen, meta = "gen-000002", json.loads((root / "scaled" / "index.json").read_text())
    for name in scaled["files"]:
        fs.put_file(str(root / "scaled" / name), f"{bucket}/idx/{gen}/{name}")
    meta.update(format=3, generation=2, previous_files=[], files={f"{gen}/{n}": b for n, b in meta["files"].items()},
                layout={"index": f"{gen}/index.faiss", "ids": f"{gen}/ids.arrow", "hash": f"{gen}/ids.hash",
                        "lists": f"{gen}/lists.ivfdata", "refine": {"coder": f"{gen}/refine.faiss", "rows": None,
                                                                    "segments": [[f"{gen}/refine.f16", meta["count"]]]}})
    fs.pipe(f"{bucket}/idx/index.json", json.dumps(meta).encode())
    for name in scaled["files"]:
        fs.rm(f"{bucket}/idx/{name}")
    local = SimilarityIndex.open(str(root / "scaled"))
    for q in held_out[1:20]:  # the first of them that needs a block not cached yet finds the files gone
        got = searcher.by_vector(q, 5)
        assert [(m.image_id, m.score) for m in got] == [(m.image_id, m.score) for m in similar_to_vector(local, q, 5)]
    assert searcher.index.meta["generation"] == 2


def test_a_reader_on_object_storage_fetches_only_the_rows_it_reads(two_builds, s3_server, tmp_path, monkeypatch):
    """Opened from S3, the re-ranking rows (most of the folder) are read by range into a per-node cache, never
    downloaded whole; the answers are those of the same index opened from a local folder."""
    root, vectors, _, held_out, _, scaled = two_builds
    bucket = s3_server.make_bucket("scaleout-open")
    fs = s3_server.filesystem()
    _upload(fs, root / "scaled", scaled["files"], f"{bucket}/idx")
    monkeypatch.setenv("RESNET_BATCH_CACHE", str(tmp_path / "cache"))
    remote = SimilarityIndex.open(f"s3://{bucket}/idx", s3_server.storage_options())
    local = SimilarityIndex.open(str(root / "scaled"))
    remote.search(held_out[:1], 10)
    blocks = remote._refine[1]
    assert 0 < blocks.cached_blocks() <= 4 * 10 < blocks.blocks / 4  # one query: its 40 candidates' blocks
    scores_r, found_r = remote.search(held_out[:20], 10)
    scores_l, found_l = local.search(held_out[:20], 10)
    np.testing.assert_array_equal(found_r, found_l)
    np.testing.assert_array_equal(scores_r, scores_l)
    cache = next((tmp_path / "cache" / "indexes").iterdir())
    assert not (cache / "refine.f16").exists()  # not copied
    allocated = os.stat(cache / "refine.f16.ranges").st_blocks * 512
    assert allocated <= blocks.cached_blocks() * blocks.BLOCK + 64 * 1024
    # a second reader on the node (another process in production) reads the same rows from the cache
    again = SimilarityIndex.open(f"s3://{bucket}/idx", s3_server.storage_options())
    before = again._refine[1].cached_blocks()
    np.testing.assert_array_equal(again.search(held_out[:20], 10)[1], found_l)
    assert again._refine[1].cached_blocks() == before


@pytest.fixture
def downloads(monkeypatch, request) -> list:
    """The object-store paths of every whole-file download (s3fs get_file) while the test runs, in order."""
    import s3fs

    fetched = []
    whole = s3fs.S3FileSystem._get_file

    async def counted(self, rpath, lpath, **kwargs):
        fetched.append(rpath)
        return await whole(self, rpath, lpath, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_get_file", counted)
    s3fs.S3FileSystem.clear_instance_cache()  # an instance binds its sync get_file when made: make new ones
    request.addfinalizer(s3fs.S3FileSystem.clear_instance_cache)  # and none that counts for later tests
    return fetched


@pytest.mark.s3
def test_an_update_on_object_storage_reads_the_reranking_rows_by_range(two_builds, s3_server, tmp_path, monkeypatch,
                                                                        downloads):
    """An update of an index on S3 copies what FAISS and Arrow map (as a reader does), never the re-ranking rows:
    a tuning reads the rows it scores by range. It publishes what the same update of a local copy does."""
    import shutil

    root, held_out = two_builds[0], two_builds[3]
    emb = tmp_path / "emb"
    shutil.copytree(root / "emb", emb)
    monkeypatch.setenv("RESNET_BATCH_CACHE", str(tmp_path / "cache"))
    bucket, opts = s3_server.make_bucket("update-ranged"), s3_server.storage_options()
    remote, local = f"s3://{bucket}/idx", str(tmp_path / "idx")
    options = IndexOptions(kind="ivf", tune_queries=200).as_dict()
    for out in (remote, local):
        build_index([str(emb)], out, **options, storage_options=opts, **QUIET)
    (emb / "part-000005.parquet").unlink()
    write_part(emb / "part-000006.parquet", [f"new/{i}.jpg" for i in range(300)], clustered_vectors(300, seed=99))
    downloads.clear()
    for out in (remote, local):  # a new recall target: nprobe tuned again, scoring every stored row
        done = index_embeddings([str(emb)], out, {"target_recall": 0.9}, storage_options=opts, **QUIET)
        assert done.action == "updated" and "nprobe tuned again" in done.line(out)
    assert sorted(p.split("/idx/", 1)[1] for p in downloads) == ["ids.arrow", "ids.hash", "index.faiss",
                                                                  "refine.faiss"]  # no refine.f16
    cache = next((tmp_path / "cache" / "indexes").iterdir())
    assert not (cache / "refine.f16").exists() and (cache / "refine.f16.ranges").exists()
    a, b = SimilarityIndex.open(remote, opts), SimilarityIndex.open(local)
    assert a.meta["nprobe"] == b.meta["nprobe"] and a.meta["tuning"] == b.meta["tuning"] and a.ids.equals(b.ids)
    sa, fa = a.search(held_out[:50], 10)
    sb, fb = b.search(held_out[:50], 10)
    np.testing.assert_array_equal(fa, fb)
    np.testing.assert_array_equal(sa, sb)


@pytest.mark.s3
def test_a_node_fetches_each_file_of_a_generation_once(two_builds, s3_server, tmp_path, monkeypatch, downloads):
    """From object storage a node copies the files FAISS and Arrow must map locally (index.faiss, the on-disk lists,
    the id map and its lookup, the re-ranking coder): those the current generation names, each once per node, however
    many readers open it at once or in turn and however many queries they answer; never the re-ranking rows (read
    by range). A new generation fetches only its own files, not those it shares with the one before."""
    from concurrent.futures import ThreadPoolExecutor

    root, _, _, held_out, _, scaled = two_builds
    bucket = s3_server.make_bucket("fetch-count")
    fs = s3_server.filesystem()
    _upload(fs, root / "scaled", scaled["files"], f"{bucket}/idx")
    monkeypatch.setenv("RESNET_BATCH_CACHE", str(tmp_path / "cache"))
    fetched = downloads
    uri, opts = f"s3://{bucket}/idx", s3_server.storage_options()
    with ThreadPoolExecutor(2) as pool:  # two readers of the node opening at once: one copies, the other waits
        readers = list(pool.map(lambda _: SimilarityIndex.open(uri, opts), range(2)))
    copied = ["ids.arrow", "ids.hash", "index.faiss", "lists.ivfdata", "refine.faiss"]
    fetched[:] = [f.split("/idx/", 1)[1] for f in fetched]
    assert sorted(fetched) == copied  # each once; refine.f16 (most of the folder) not at all
    for reader in readers:
        reader.search(held_out[:20], 10)
    SimilarityIndex.open(uri, opts).search(held_out[20:40], 10)  # a later reader (another process) as well
    assert sorted(fetched) == copied

    # The next generation (as an update publishes it): a new index, lists, id map and lookup; the coder and the
    # re-ranking rows shared with the build.
    gen, meta = "gen-000001", json.loads((root / "scaled" / "index.json").read_text())
    own = ["index.faiss", "lists.ivfdata", "ids.arrow", "ids.hash"]
    for name in own:
        fs.put_file(str(root / "scaled" / name), f"{bucket}/idx/{gen}/{name}")
    layout = {"index": f"{gen}/index.faiss", "lists": f"{gen}/lists.ivfdata", "ids": f"{gen}/ids.arrow",
              "hash": f"{gen}/ids.hash", "refine": {"coder": "refine.faiss", "rows": None,
                                                    "segments": [["refine.f16", meta["count"]]]}}
    meta.update(format=3, generation=1, previous_files=sorted(meta["files"]), layout=layout,
                files={**{f"{gen}/{n}": meta["files"][n] for n in own},
                       **{n: meta["files"][n] for n in ("refine.faiss", "refine.f16")}})
    fs.pipe(f"{bucket}/idx/index.json", json.dumps(meta).encode())
    fetched.clear()
    for _ in range(2):
        SimilarityIndex.open(uri, opts).search(held_out[:20], 10)
    assert sorted(f.split("/idx/", 1)[1] for f in fetched) == sorted(f"{gen}/{n}" for n in own)


def test_a_distributed_build_with_1_kib_re_ranking_codes_codes_every_row_with_the_trained_coder(two_builds):
    """The transform coder (--refine-code TC1024) goes to the add tasks as bytes and codes every part there: each
    id-map row's re-ranking row is the published coder's code of that row's vector, and the index meets its
    recall on held-out queries."""
    root, vectors, ids, held_out = two_builds[:4]
    options = IndexOptions(kind="ivf", tune_queries=200, refine_code="TC1024")
    scaled = build_index_ray([str(root / "emb")], str(root / "scaled-tc"), options,
                             ScaleOut(tasks=4, rows_per_task=1500), **QUIET)
    assert scaled["factory"].endswith("Refine(TC1024)") and scaled["scaled_out"]["add_tasks"] == 3
    assert sorted(scaled["files"]) == ["ids.arrow", "ids.hash", "index.faiss", "lists.ivfdata", "refine.coder",
                                       "refine.f16"]
    coder = read_coder(str(root / "scaled-tc" / "refine.coder"))
    row = coder.sa_code_size()
    assert 512 < row <= 1024 and scaled["files"]["refine.f16"] == 5990 * row  # trained on 2,560: a cut plan
    index = SimilarityIndex.open(str(root / "scaled-tc"))
    order = {name: i for i, name in enumerate(ids)}
    rows = np.array([order[name] for name in index.ids.column("image_id").to_pylist()])
    stored = np.fromfile(root / "scaled-tc" / "refine.f16", dtype=np.uint8).reshape(5990, row)
    np.testing.assert_array_equal(stored, coder.sa_encode(normalize(vectors[rows])))
    _, exact = brute_force(vectors, held_out, 10)
    _, found = index.search(held_out, 10)
    assert np.mean([len(set(r) & set(e)) / 10 for r, e in zip(index.rows_of(found), exact)]) >= 0.9
