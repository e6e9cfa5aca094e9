"""The FAISS index: size-chosen kind, exact search against numpy, save/load (local and S3), provenance refusal."""
import json

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest

from resnet_batch.cli import main
from resnet_batch.index import (IDS_SCHEMA, INDEX_FILE, IndexSpec, SimilarityIndex, SimilarityIndexError,
                                build_index, normalize)
from resnet_batch.provenance import ProvenanceMismatch
from tests.search_helpers import PROVENANCE, brute_force, clustered_vectors, write_part


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    """The test machine is shared and small: OpenMP spinning on busy cores makes FAISS crawl."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="module")
def three_parts(tmp_path_factory):
    """An embed output of 3 parts x 100 rows; rows 0, 10, 20, ... of each part failed (no embedding)."""
    root = tmp_path_factory.mktemp("emb")
    vectors = clustered_vectors(300, seed=1)
    ids = [f"shard-{i // 100:03d}/img-{i:05d}.jpg" for i in range(300)]
    status = ["decode_error" if i % 10 == 0 else "ok" for i in range(300)]
    for p in range(3):
        sl = slice(100 * p, 100 * (p + 1))
        write_part(root / f"part-{p:06d}.parquet", ids[sl], vectors[sl], status=status[sl])
    (root / "_manifest.json").write_text("{}")  # bookkeeping files next to the parts are ignored
    ok = np.array([s == "ok" for s in status])
    return root, np.array(ids, dtype=object)[ok], vectors[ok]


def test_spec_is_chosen_from_the_count():
    assert IndexSpec.choose(10) == IndexSpec("flat", "Flat", 0, "")
    assert IndexSpec.choose(50_000).kind == "flat"
    refined = "IVF512,PQ128x8,Refine(SQ8)"
    assert IndexSpec.choose(50_001) == IndexSpec("ivfpq", refined, 20_480, "nprobe=32,k_factor_rf=8")
    assert IndexSpec.choose(100_000) == IndexSpec("ivfpq", refined, 20_480, "nprobe=32,k_factor_rf=8")
    assert IndexSpec.choose(1_000_000) == IndexSpec("ivfpq", "IVF2048,PQ128x8,Refine(SQ8)", 81_920,
                                                    "nprobe=128,k_factor_rf=8")
    assert IndexSpec.choose(10_000_000) == IndexSpec("ivfpq", "IVF8192,PQ128x8", 327_680, "nprobe=512")
    assert IndexSpec.choose(3000, "ivfpq") == IndexSpec("ivfpq", "IVF128,PQ128x6,Refine(SQ8)", 3000,
                                                        "nprobe=8,k_factor_rf=8")
    assert IndexSpec.choose(200, "hnsw") == IndexSpec("hnsw", "HNSW32,Flat", 0, "efSearch=128")
    assert IndexSpec.choose(500, "flat", flat_max=10).kind == "flat"
    assert IndexSpec.choose(500, flat_max=100).kind == "flat"  # too few to train IVF-PQ: exact anyway
    assert IndexSpec.choose(2000, flat_max=1000).kind == "ivfpq"
    with pytest.raises(SimilarityIndexError, match=r"^an IVF-PQ index needs at least 1000 vectors to train, "
                                                   r"got 999; use --kind flat$"):
        IndexSpec.choose(999, "ivfpq")
    with pytest.raises(SimilarityIndexError, match=r"^unknown index kind 'lsh'; choose one of auto, flat, ivfpq, "
                                                   r"hnsw$"):
        IndexSpec.choose(10, "lsh")


def test_normalize_keeps_zero_rows_and_does_not_touch_its_input():
    x = np.array([[3, 4] + [0] * 2046, [0] * 2048], dtype=np.float32)
    y = normalize(x)
    assert y[0, :2].tolist() == pytest.approx([0.6, 0.8]) and not y[1].any()
    assert x[0, 0] == 3


def test_exact_index_agrees_with_numpy_and_skips_failed_rows(three_parts):
    root, ids, vectors = three_parts
    index = build_index([str(root)], log=lambda m: None)
    assert index.meta["kind"] == "flat" and len(index) == 270 and index.meta["count"] == 270
    assert index.meta["provenance"] == PROVENANCE and index.meta["parts"] == 3
    assert index.ids.schema.remove_metadata() == IDS_SCHEMA
    assert index.ids.column("image_id").to_pylist() == list(ids)
    assert index.row(0) == {"image_id": "shard-000/img-00001.jpg", "path": "/nowhere/shard-000/img-00001.jpg",
                            "label": "label-1", "prob": pytest.approx(0.5)}
    queries = vectors[::9]
    scores, positions = index.search(queries, 10)
    ref_scores, ref_positions = brute_force(vectors, queries, 10)
    np.testing.assert_array_equal(positions, ref_positions)
    np.testing.assert_allclose(scores, ref_scores, atol=2e-6)
    assert (positions[:, 0] == np.arange(0, 270, 9)).all()  # every vector finds itself first
    assert index.image_ids(positions[:1, :3]).tolist() == [list(ids[ref_positions[0, :3]])]


def test_save_and_load_round_trip(three_parts, tmp_path):
    root, ids, vectors = three_parts
    index = build_index([str(root)], log=lambda m: None)
    index.save(str(tmp_path / "idx"))
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == ["ids.parquet", "index.faiss", "index.json"]
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert meta["index_bytes"] == (tmp_path / "idx" / INDEX_FILE).stat().st_size
    assert meta["sources"] == [str(root)] and meta["metric"] == "cosine"
    loaded = SimilarityIndex.load(str(tmp_path / "idx"))
    assert loaded.meta == index.meta and loaded.ids.equals(index.ids)
    a, b = index.search(vectors[:5], 7), loaded.search(vectors[:5], 7)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_allclose(loaded.vector(ids[4]), normalize(vectors[4:5])[0], atol=1e-6)
    with pytest.raises(KeyError, match="image_id 'nope' is not in the index"):
        loaded.vector("nope")

    (tmp_path / "idx" / INDEX_FILE).write_bytes((tmp_path / "idx" / INDEX_FILE).read_bytes()[:1000])
    expected = f"index.faiss has 1000 bytes, index.json says {meta['index_bytes']}$"
    with pytest.raises(SimilarityIndexError, match=expected):
        SimilarityIndex.load(str(tmp_path / "idx"))
    with pytest.raises(SimilarityIndexError, match=r"^no index at .*/missing \(index.json missing; build one with "):
        SimilarityIndex.load(str(tmp_path / "missing"))


def test_mixed_provenance_is_refused(tmp_path):
    vectors = clustered_vectors(20, seed=2)
    a = write_part(tmp_path / "a" / "part-000000.parquet", [f"a{i}" for i in range(10)], vectors[:10])
    other = {**PROVENANCE, "weights_sha256": "b" * 64, "precision": "bf16"}
    b = write_part(tmp_path / "b" / "part-000000.parquet", [f"b{i}" for i in range(10)], vectors[10:], other)
    with pytest.raises(ProvenanceMismatch) as err:
        build_index([str(tmp_path / "a"), str(tmp_path / "b")], log=lambda m: None)
    assert str(err.value) == (
        f"refusing to mix embeddings with different provenance: {b} differs from {a}: "
        f"weights_sha256: {'a' * 64!r} != {'b' * 64!r}; precision: 'fp32' != 'bf16'")
    # Non-binding differences (package version, torch build) do not block an index.
    write_part(tmp_path / "c" / "part-000000.parquet", [f"c{i}" for i in range(10)], vectors[10:],
               {**PROVENANCE, "version": "0.2.0", "torch": "other"})
    assert len(build_index([str(tmp_path / "a"), str(tmp_path / "c")], log=lambda m: None)) == 20


def test_unstamped_or_duplicate_embeddings_are_refused(tmp_path):
    vectors = clustered_vectors(10, seed=3)
    bare = write_part(tmp_path / "bare.parquet", [f"x{i}" for i in range(10)], vectors, provenance=None)
    with pytest.raises(SimilarityIndexError, match=f"^{bare} has no resnet_batch.provenance metadata: cannot tell "
                                                   "which model made these embeddings$"):
        build_index([str(bare)], log=lambda m: None)
    write_part(tmp_path / "one" / "part-000000.parquet", [f"x{i}" for i in range(10)], vectors)
    write_part(tmp_path / "two" / "part-000000.parquet", ["y", "x3"], vectors[:2])
    with pytest.raises(SimilarityIndexError, match=r"^image_id 'x3' appears more than once \(again in "
                                                   rf"{tmp_path}/two/part-000000.parquet\)"):
        build_index([str(tmp_path / "one"), str(tmp_path / "two")], log=lambda m: None)
    write_part(tmp_path / "failed" / "part-000000.parquet", ["z"], vectors[:1], status=["decode_error"])
    with pytest.raises(SimilarityIndexError, match="^no embeddings with status 'ok' under "):
        build_index([str(tmp_path / "failed")], log=lambda m: None)
    with pytest.raises(SimilarityIndexError, match="^embeddings not found: "):
        build_index([str(tmp_path / "absent")], log=lambda m: None)


def test_ivfpq_is_trained_on_a_sample_and_close_to_exact(tmp_path):
    vectors = clustered_vectors(3000, seed=4)
    for p in range(3):
        write_part(tmp_path / "emb" / f"part-{p:06d}.parquet", [f"v{i:05d}" for i in range(1000 * p, 1000 * (p + 1))],
                   vectors[1000 * p:1000 * (p + 1)])
    index = build_index([str(tmp_path / "emb")], kind="ivfpq", log=lambda m: None)
    assert (index.meta["kind"], index.meta["factory"], index.meta["search"]) == (
        "ivfpq", "IVF128,PQ128x6,Refine(SQ8)", "nprobe=8,k_factor_rf=8")
    assert index.meta["train_size"] == 3000
    index.save(str(tmp_path / "idx"))
    loaded = SimilarityIndex.load(str(tmp_path / "idx"))
    assert faiss.extract_index_ivf(loaded.index).nprobe == 8 and loaded.index.k_factor == 8
    queries = vectors[::30]
    _, approx = loaded.search(queries, 10)
    _, exact = brute_force(vectors, queries, 10)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)])
    assert recall >= 0.9, recall
    # Quantised storage: a reconstructed vector is an approximation of the normalised original.
    approx_vector = loaded.vector("v00042")
    assert not np.array_equal(approx_vector, normalize(vectors[42:43])[0])
    assert float(normalize(approx_vector[None])[0] @ normalize(vectors[42:43])[0]) > 0.999


def test_hnsw_on_request(three_parts):
    root, ids, vectors = three_parts
    index = build_index([str(root)], kind="hnsw", log=lambda m: None)
    assert faiss.downcast_index(index.index).hnsw.efSearch == 128
    _, approx = index.search(vectors[::27], 5)
    _, exact = brute_force(vectors, vectors[::27], 5)
    np.testing.assert_array_equal(approx, exact)  # 270 vectors, efSearch 128: the graph search is exhaustive


@pytest.mark.s3
def test_embeddings_and_index_on_s3(three_parts, s3_server):
    root, ids, vectors = three_parts
    bucket = s3_server.make_bucket("search-index")
    fs = s3_server.filesystem()
    for p in sorted(root.glob("part-*.parquet")):
        fs.put_file(str(p), f"{bucket}/emb/{p.name}")
    opts = s3_server.storage_options()
    index = build_index([f"s3://{bucket}/emb"], storage_options=opts, log=lambda m: None)
    assert len(index) == 270 and index.meta["sources"] == [f"s3://{bucket}/emb"]
    index.save(f"s3://{bucket}/idx", opts)
    assert sorted(fs.ls(f"{bucket}/idx", detail=False)) == [f"{bucket}/idx/{n}" for n in
                                                            ("ids.parquet", "index.faiss", "index.json")]
    loaded = SimilarityIndex.load(f"s3://{bucket}/idx", opts)
    np.testing.assert_array_equal(loaded.search(vectors[:3], 4)[1], index.search(vectors[:3], 4)[1])
    with pytest.raises(Exception, match="(?i)signature|denied|forbidden"):
        SimilarityIndex.load(f"s3://{bucket}/idx", s3_server.storage_options(secret="wrong"))


def test_cli_index(three_parts, tmp_path, capsys):
    root, _, _ = three_parts
    assert main(["index", "--embeddings", str(root), "--out", str(tmp_path / "idx")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("indexed 270 images (flat: Flat) in ") and out.rstrip().endswith("MiB)")
    assert pq.read_table(tmp_path / "idx" / "ids.parquet").num_rows == 270
    other = write_part(tmp_path / "other" / "part-000000.parquet", ["q"], clustered_vectors(1),
                       {**PROVENANCE, "model": "torchvision.resnet101"})
    assert main(["index", "--embeddings", str(root), "--embeddings", str(other.parent),
                 "--out", str(tmp_path / "idx2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: refusing to mix embeddings with different provenance: ")
    assert err.rstrip().endswith("model: 'torchvision.resnet50' != 'torchvision.resnet101'")
    assert not (tmp_path / "idx2").exists()
