"""The index follows its embeddings: `resnet-batch index` over an index it built reads only the parts whose ledger
stamp changed, takes out the rows that left, adds the ones that arrived under fresh ids, agrees with a fresh build
of the same output, rebuilds instead when the size class changed (and says why), and publishes each version as a
generation that readers see whole. Hand-written parts with ledger records here, one real embed run and sync at
the end (with the service, and the search the neighbours actors run)."""
import json
from pathlib import Path

import faiss
import numpy as np
import pyarrow.dataset as pads
import pytest

from resnet_batch.cli import main
from resnet_batch.errors import SimilarityIndexError
from resnet_batch.search.gallery import write_gallery
from resnet_batch.search.index import SimilarityIndex, UnknownImageId
from resnet_batch.search.build import build_index
from resnet_batch.search.spec import Decision, IndexOptions, decide
from resnet_batch.search.update import index_embeddings
from resnet_batch.search.similar import similar_to_id
from tests.helpers.search import (PROVENANCE, Library, clustered_vectors, one_faiss_thread, recall,  # noqa: F401
                                  write_part)

QUIET = {"log": lambda m: None}


def ok_rows(out: Path) -> int:
    table = pads.dataset(str(out), format="parquet").to_table(columns=["status"])
    return sum(s == "ok" for s in table.column("status").to_pylist())


def never_returned(index: SimilarityIndex, vectors: np.ndarray, names: list[str]) -> None:
    """Neither the removed images' ids nor their vectors (k=10) bring them back."""
    for name in names[:5]:
        with pytest.raises(UnknownImageId):
            similar_to_id(index, name, 5)
    _, found = index.search(vectors, 10)
    assert not set(index.image_ids(found).ravel()) & set(names)


def test_the_decision_follows_the_size_class():
    flat = {"count": 48_000, "spec": {"kind": "flat", "dim": 2048}}
    ivf = {"count": 1_000_000, "trained_count": 1_000_000, "options": {"pca": 256},
           "spec": {"kind": "ivf", "dim": 2048, "pca": 256, "nlist": 4096, "code": "SQ8"}}
    auto, g = IndexOptions(), 2**30
    assert decide(flat, 49_000, 47_000, auto).rebuild is False
    assert decide(flat, 52_000, 47_000, auto) == Decision(True, "48,000 -> 52,000 vectors crosses the exact-search "
                                                                 "limit (50,000)")
    assert decide(flat, 49_000, 47_000, IndexOptions(kind="ivf")).reason == "--kind ivf asked (the index is flat)"
    assert decide(flat, 40_000, 40_000, IndexOptions(max_memory=512 * 2**20)).reason == \
        "the raw vectors of 40,000 images are over half of --max-memory (0.50 GiB)"
    at = IndexOptions(pca=256)
    assert decide(ivf, 1_100_000, 980_000, at) == Decision(False, "no retraining (IVF4096 trained for 1,000,000, "
                                                                  "now 1,100,000)")
    assert decide(ivf, 40_000, 40_000, at).reason == "1,000,000 -> 40,000 vectors is within the exact-search " \
                                                     "limit (50,000)"
    assert decide(ivf, 4_000_001, 3_500_000, at).reason == \
        "4,000,001 vectors are over 4x the 1,000,000 that IVF4096 was trained for"
    assert decide(ivf, 240_000, 240_000, at).reason == \
        "240,000 vectors are under 1/4 of the 1,000,000 that IVF4096 was trained for"
    assert decide(ivf, 2_100_000, 1_000_000, at).reason == "most vectors would be new (1,000,000 of 2,100,000 kept)"
    assert decide(ivf, 1_100_000, 980_000, IndexOptions()).reason == "--pca changed (256 -> auto)"
    assert decide(ivf, 1_100_000, 980_000, IndexOptions(pca=256, max_memory=g // 2)).reason == \
        "SQ8 codes of 1,100,000 vectors need 0.27 GiB, over half of --max-memory (0.50 GiB)"


def test_an_update_reads_the_changed_parts_and_agrees_with_a_fresh_build(tmp_path):
    lib = Library(tmp_path / "emb", clustered_vectors(400, seed=5))
    for shard in range(3):  # the first row of each part failed
        lib.write(shard, range(100 * shard, 100 * shard + 100), run=1, failed={100 * shard})
    idx = tmp_path / "idx"
    built = index_embeddings([str(lib.root)], str(idx), **QUIET)
    assert (built.action, built.meta["count"], built.meta["next_id"]) == ("built", 297, 297)
    first_reader = SimilarityIndex.open(str(idx))  # a reader holding the first version through the update

    # the night's sync: part 1 loses its rows 105, 115, ... and its failed row 100 is retried (ok now); part 2 is
    # deleted; part 3 is new; part 0 is untouched (same ledger record: not read)
    lib.write(1, [r for r in range(100, 200) if r % 10 != 5], run=2)
    lib.delete(2)
    lib.write(3, range(300, 350), run=2)
    removed = Library.names([r for r in range(100, 200) if r % 10 == 5] + list(range(201, 300)))
    done = index_embeddings([str(lib.root)], str(idx), **QUIET)
    assert (done.action, done.added, done.removed, done.kept) == ("updated", 51, 109, 188)
    assert done.line(str(idx)) == (f"updated index: +51 added, -109 removed, 188 kept (239 images); exact search, "
                                   f"nothing to retrain -> {idx} in {done.seconds:.1f} s")
    index = SimilarityIndex.open(str(idx))
    live = lib.live()
    assert len(index) == 239 == ok_rows(lib.root) == len(live)
    assert sorted(index.ids.column("image_id").to_pylist()) == Library.names(live)
    faiss_ids = index.ids.column("id").to_numpy()
    assert (np.diff(faiss_ids) > 0).all() and done.meta["next_id"] == 297 + 51
    arrived = index.ids.filter(index.ids.column("id").to_numpy() >= 297)  # fresh ids, none used before
    assert arrived.column("image_id").to_pylist() == Library.names([100, *range(300, 350)])
    assert [index.ids.column("image_id")[int(r)].as_py() for r in index.rows_of(np.array([0, 98]))] == \
        Library.names([1, 99])  # the untouched part's rows keep their ids
    never_returned(index, lib.vectors[[int(n[4:9]) for n in removed]], removed)
    assert similar_to_id(index, "img-00100.jpg", 1)  # an arrived image is searchable by id...
    _, found = index.search(lib.vectors[[100, 300, 349]], 1)
    assert index.image_ids(found).ravel().tolist() == Library.names([100, 300, 349])  # ...and by its vector

    build_index([str(lib.root)], str(tmp_path / "fresh"), **QUIET)
    fresh = SimilarityIndex.open(str(tmp_path / "fresh"))
    queries = lib.vectors[live[::4]]
    (s_upd, f_upd), (s_new, f_new) = index.search(queries, 10), fresh.search(queries, 10)
    assert (index.image_ids(f_upd) == fresh.image_ids(f_new)).all()  # exact search: the same top 10
    np.testing.assert_allclose(s_upd, s_new, atol=1e-6)

    assert len(first_reader) == 297 and similar_to_id(first_reader, removed[0], 3)  # the old version, whole
    page = tmp_path / "gallery.html"
    write_gallery(index, str(page), n=239, k=5)
    assert "img-00001.jpg" in page.read_text() and not any(n in page.read_text() for n in removed)

    meta = json.loads((idx / "index.json").read_text())
    assert [(h["action"], h["count"], h["generation"]) for h in meta["history"]] == [("build", 297, 0),
                                                                                   ("update", 239, 1)]
    assert {k: meta["history"][1][k] for k in ("added", "removed", "kept")} == {"added": 51, "removed": 109,
                                                                               "kept": 188}
    assert meta["part_uris"] == [str(lib.root / f"part-{s:06d}.parquet") for s in (0, 1, 3)]
    assert [s["run"] for s in meta["part_stamps"]] == [1, 2, 2]
    again = index_embeddings([str(lib.root)], str(idx), **QUIET)  # nothing changed: nothing written
    assert again.action == "current" and again.line(str(idx)) == (
        f"index is current: 239 images, no part of the embeddings changed since its update -> {idx}")
    assert json.loads((idx / "index.json").read_text()) == meta


def test_ivf_update_keeps_its_training_then_compacts_and_tunes_again(tmp_path):
    lib = Library(tmp_path / "emb", clustered_vectors(2300, seed=4))
    for shard in range(2):
        lib.write(shard, range(1000 * shard, 1000 * shard + 1000), run=1)
    idx = tmp_path / "idx"
    built = index_embeddings([str(lib.root)], str(idx), {"kind": "ivf", "tune_queries": 300}, **QUIET)
    factory, nprobe = built.meta["factory"], built.meta["nprobe"]
    assert factory.startswith("PCA") and ",IVF32,SQ8," in factory  # a projection in front: a PreTransform

    def centroids(path: Path) -> np.ndarray:
        index = faiss.read_index(str(path))  # held: the lists and their quantizer are its own
        ivf = faiss.extract_index_ivf(index)
        return ivf.quantizer.reconstruct_n(0, ivf.nlist)

    trained = centroids(idx / "index.faiss")
    names = np.array(Library.names(range(2300)), dtype=object)

    # night 1: part 0 loses 100 rows, a new part brings 300 (about 10% changed): no retraining, nprobe kept
    lib.write(0, [r for r in range(1000) if r % 10 != 3], run=2)
    lib.write(2, range(2000, 2300), run=2)
    first = index_embeddings([str(lib.root)], str(idx), **QUIET)  # the options recorded: ivf, 300 queries
    assert (first.action, first.added, first.removed, first.kept, first.meta["count"]) == ("updated", 300, 100,
                                                                                           1900, 2200)
    assert first.reason == "no retraining (IVF32 trained for 2,000, now 2,200)"
    assert first.notes == (f"nprobe {nprobe} kept",) and first.meta["nprobe"] == nprobe
    np.testing.assert_array_equal(centroids(idx / first.meta["layout"]["index"]), trained)
    refine = first.meta["layout"]["refine"]  # the new rows' codes appended, the removed ones skipped
    assert refine["segments"] == [["refine.f16", 2000], ["gen-000001/refine.f16", 300]]
    assert refine["rows"] == "gen-000001/refine.rows"
    index = SimilarityIndex.open(str(idx))
    live = lib.live()
    assert len(index) == 2200 == ok_rows(lib.root)
    never_returned(index, lib.vectors[[r for r in range(1000) if r % 10 == 3]],
                   Library.names(r for r in range(1000) if r % 10 == 3))
    assert recall(index, lib.vectors[live], names[live], lib.vectors[live[::11]]) >= 0.93
    for name in ("img-00012.jpg", "img-02150.jpg"):  # decoded from the right re-ranking row, old and new
        v = index.vector(name)
        assert float(v @ lib.vectors[int(name[4:9])] / np.linalg.norm(lib.vectors[int(name[4:9])])) > 0.999

    # night 2: part 1 is deleted: 1,200 vectors, 45% fewer than tuned at; 1,100 of 2,300 stored codes dead
    lib.delete(1)
    second = index_embeddings([str(lib.root)], str(idx), **QUIET)
    assert (second.action, second.removed, second.meta["count"]) == ("updated", 1000, 1200)
    assert second.notes[0] == "re-ranking rows compacted"
    assert second.notes[1].startswith(f"nprobe tuned again: {nprobe} -> {second.meta['nprobe']}, recall@10 ")
    assert second.notes[1].endswith("(1,200 vectors, 2,000 when it was tuned)")
    assert second.meta["tuning"]["target_met"] and second.meta["tuned_count"] == 1200
    assert second.meta["layout"]["refine"] == {"coder": "refine.faiss", "rows": None,
                                               "segments": [["gen-000002/refine.f16", 1200]]}
    index = SimilarityIndex.open(str(idx))
    live = lib.live()
    assert recall(index, lib.vectors[live], names[live], lib.vectors[live[::7]]) >= 0.93
    never_returned(index, lib.vectors[1000:1010], Library.names(range(1000, 1010)))
    # only this generation and the one before remain (and the coder both use)
    assert sorted(str(p.relative_to(idx)) for p in idx.rglob("*") if p.is_file()) == [
        "gen-000001/ids.arrow", "gen-000001/ids.hash", "gen-000001/index.faiss", "gen-000001/refine.f16",
        "gen-000001/refine.rows", "gen-000002/ids.arrow", "gen-000002/ids.hash", "gen-000002/index.faiss",
        "gen-000002/refine.f16", "index.json", "refine.f16",
        "refine.faiss"]  # refine.f16: the build's codes, which generation 1 still reads


def test_crossing_the_exact_search_limit_rebuilds_and_says_why(tmp_path, capsys):
    lib = Library(tmp_path / "emb", clustered_vectors(1200, seed=6))
    lib.write(0, range(900), run=1)
    idx = tmp_path / "idx"
    index_cmd = ["index", "--embeddings", str(lib.root), "--out", str(idx)]
    assert main([*index_cmd, "--flat-max", "1000", "--tune-queries", "200"]) == 0
    assert capsys.readouterr().out.startswith("indexed 900 images (IDMap2,Flat, exact) in ")

    lib.write(1, range(900, 1100), run=2)
    assert main(index_cmd) == 0  # --flat-max 1000 and --tune-queries 200 are remembered
    out = capsys.readouterr().out
    assert out.startswith("rebuilt index: 900 -> 1,100 vectors crosses the exact-search limit (1,000); indexed 1100 "
                          "images (PCA") and ",IVF16,SQ8,Refine(FP16), nprobe=" in out and "on 200 queries" in out
    meta = json.loads((idx / "index.json").read_text())
    assert (meta["kind"], meta["generation"], meta["count"]) == ("ivf", 1, 1100)
    assert [h["action"] for h in meta["history"]] == ["build", "rebuild"]

    lib.delete(1)
    assert main(index_cmd) == 0
    assert capsys.readouterr().out.startswith("rebuilt index: 1,100 -> 900 vectors is within the exact-search limit "
                                              "(1,000); indexed 900 images (IDMap2,Flat, exact) in ")
    assert len(SimilarityIndex.open(str(idx))) == 900
    assert main([*index_cmd, "--rebuild"]) == 0
    assert capsys.readouterr().out.startswith("rebuilt index: --rebuild asked; indexed 900 images (IDMap2,Flat, ")

    before = (idx / "index.json").read_text()
    other = write_part(lib.root / "part-000007.parquet", ["q"], clustered_vectors(1), {**PROVENANCE, "model": "other"})
    assert main(index_cmd) == 2
    assert capsys.readouterr().err == (
        f"error: refusing to mix embeddings with different provenance: {other} differs from the index {idx}: "
        "model: 'torchvision.resnet50' != 'other'; index them with --rebuild (a new index), or another --out\n")
    assert (idx / "index.json").read_text() == before and not (idx / "_lock").exists()
    other.unlink()
    write_part(lib.root / "part-000008.parquet", ["img-00005.jpg"], lib.vectors[5:6])  # already in part 0
    with pytest.raises(SimilarityIndexError, match=r"^image_id 'img-00005.jpg' appears more than once "):
        index_embeddings([str(lib.root)], str(idx), **QUIET)


@pytest.mark.ray
def test_a_real_sync_then_the_update_serves_no_deleted_image(tmp_path, checkpoint, ray_local, capsys):
    import pyarrow.parquet as pq

    from resnet_batch.search.neighbors import neighbors_rows
    from resnet_batch.embed.runner import run
    from resnet_batch.dev.sample_data import make_sample_photos
    from resnet_batch.schema import embeddings_to_numpy
    from resnet_batch.search.serve import Searcher, ServiceConfig
    from tests.helpers.jobs import job_config
    from tests.helpers.serving import Running
    from tests.helpers.library import new_photo

    photos, out, idx = tmp_path / "photos", tmp_path / "out", tmp_path / "idx"
    make_sample_photos(photos, 8, per_folder=4, seed=3)
    cfg = job_config(photos, out, checkpoint)
    assert run(cfg, progress=False)["complete"]
    assert main(["index", "--embeddings", str(out), "--out", str(idx)]) == 0
    old = pq.read_table(sorted(out.glob("part-*.parquet")))
    old_vectors = dict(zip(old.column("image_id").to_pylist(), embeddings_to_numpy(old.column("embedding"))))
    searcher = Searcher(ServiceConfig(index=str(idx), embed=False, reload_s=0))
    service = Running(searcher)
    try:
        # the night: two new photos, one changed, one deleted; the embed rerun is a sync
        for i in range(2):
            new_photo(photos / "shard-001" / f"new-{i}.jpg", 700 + i)
        changed = sorted((photos / "shard-000").glob("*.jpg"))[1]
        new_photo(changed, 800)
        deleted = sorted((photos / "shard-000").glob("*.jpg"))[0]
        deleted.unlink()
        changed_id, deleted_id = (p.relative_to(photos).as_posix() for p in (changed, deleted))
        second = run(cfg, progress=False)
        assert second["complete"] and second["sync"]["deleted"] == 1 and second["sync"]["changed"] == 1
        before = SimilarityIndex.open(str(idx))
        old_changed_id = before.faiss_id(changed_id)

        capsys.readouterr()
        assert main(["index", "--embeddings", str(out), "--out", str(idx)]) == 0
        assert capsys.readouterr().out.startswith("updated index: +3 added, -2 removed, 6 kept (9 images); exact "
                                                  f"search, nothing to retrain -> {idx} in ")
        index = SimilarityIndex.open(str(idx))
        assert len(index) == 9 == ok_rows(out)
        now = pq.read_table(sorted(out.glob("part-*.parquet")))
        new_vectors = dict(zip(now.column("image_id").to_pylist(), embeddings_to_numpy(now.column("embedding"))))
        new_vector = new_vectors[changed_id] / np.linalg.norm(new_vectors[changed_id])
        np.testing.assert_allclose(index.vector(changed_id), new_vector, atol=1e-6)  # the new content
        assert index.faiss_id(changed_id) >= before.meta["next_id"] > old_changed_id  # a new id for new content
        never_returned(index, old_vectors[deleted_id][None], [deleted_id])

        assert service.call("GET", "/v1/neighbors?" + f"id={deleted_id}&k=3")[0] == 200  # the old version, whole
        assert searcher.refresh() is True and searcher.refresh() is False
        status, body = service.call("GET", f"/v1/neighbors?id={deleted_id}&k=3")
        assert (status, body) == (404, {"error": f"image_id {deleted_id!r} is not in the index"})
        assert service.call("GET", "/healthz") == (200, {"status": "ok", "count": 9})
        for image_id in index.ids.column("image_id").to_pylist():
            status, body = service.call("GET", f"/v1/neighbors?id={image_id}&k=8")
            assert status == 200 and len(body["results"]) == 8  # every other image, the deleted one not among them
            assert deleted_id not in {r["image_id"] for r in body["results"]}
    finally:
        service.close()

    table = neighbors_rows(index, now.column("image_id").to_pylist(), embeddings_to_numpy(now.column("embedding")),
                           8, 4)  # what each neighbours actor does with a part
    assert table.num_rows == 9 and all(len(n) == 8 for n in table.column("neighbor_ids").to_pylist())
    assert deleted_id not in {n for ns in table.column("neighbor_ids").to_pylist() for n in ns}


@pytest.mark.s3
def test_an_index_on_s3_follows_its_embeddings(s3_server, tmp_path, monkeypatch):
    lib = Library(tmp_path / "emb", clustered_vectors(300, seed=8))
    for shard in range(2):
        lib.write(shard, range(100 * shard, 100 * shard + 100), run=1)
    bucket, fs, opts = s3_server.make_bucket("index-update"), s3_server.filesystem(), s3_server.storage_options()

    def mirror() -> None:
        """The local output as it is now, on the store (parts and ledger pieces; deleted parts deleted)."""
        local = {p.relative_to(lib.root).as_posix() for p in lib.root.rglob("*") if p.is_file()}
        for name in local:
            fs.put_file(str(lib.root / name), f"{bucket}/emb/{name}")
        for path in fs.find(f"{bucket}/emb"):
            if path.split("/emb/", 1)[1] not in local:
                fs.rm(path)
        fs.invalidate_cache()

    def listing() -> list[str]:
        fs.invalidate_cache()
        return sorted(p.split("/idx/", 1)[1] for p in fs.find(f"{bucket}/idx"))

    monkeypatch.setenv("RESNET_BATCH_CACHE", str(tmp_path / "cache"))
    emb, idx = f"s3://{bucket}/emb", f"s3://{bucket}/idx"
    mirror()
    assert index_embeddings([emb], idx, storage_options=opts, **QUIET).action == "built"
    assert len(SimilarityIndex.open(idx, opts)) == 200
    lib.write(1, range(100, 150), run=2)
    lib.write(2, range(200, 260), run=2)
    mirror()
    done = index_embeddings([emb], idx, storage_options=opts, **QUIET)
    assert (done.action, done.added, done.removed, done.kept) == ("updated", 60, 50, 150)
    index = SimilarityIndex.open(idx, opts)  # through the node-local cache, which fetches the new generation
    assert sorted(index.ids.column("image_id").to_pylist()) == Library.names(lib.live())
    never_returned(index, lib.vectors[150:200], Library.names(range(150, 200)))
    assert listing() == ["gen-000001/ids.arrow", "gen-000001/ids.hash", "gen-000001/index.faiss", "ids.arrow",
                         "ids.hash", "index.faiss", "index.json"]

    lib.delete(0)
    mirror()
    assert index_embeddings([emb], idx, storage_options=opts, **QUIET).removed == 100
    assert listing() == ["gen-000001/ids.arrow", "gen-000001/ids.hash", "gen-000001/index.faiss",
                         "gen-000002/ids.arrow", "gen-000002/ids.hash", "gen-000002/index.faiss",
                         "index.json"]  # the build's files: neither version uses them
    assert len(SimilarityIndex.open(idx, opts)) == 110
    cached, = (tmp_path / "cache" / "indexes").iterdir()
    assert sorted(p.name for p in cached.iterdir() if not p.name.startswith(".")) == [
        "gen-000001", "gen-000002", "source.json"]
