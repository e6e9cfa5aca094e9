"""The 1 KiB re-ranking code (TC1024: coders.TransformCoder) against the default float16 one: the coder alone
(pure), then an index built, searched, updated and rebuilt with it."""
import numpy as np
import pytest

from resnet_batch.search.build import _trained_refiner
from resnet_batch.search.coders import TC_PLAN, TransformCoder, coder_bytes, coder_from_bytes
from resnet_batch.search.index import Refiner, SimilarityIndex, normalize, refined_search
from resnet_batch.search.update import index_embeddings
from tests.helpers.search import Library, brute_force, clustered_vectors, one_faiss_thread, recall  # noqa: F401

QUIET = {"log": lambda m: None}


@pytest.fixture(scope="module")
def vectors():
    return normalize(clustered_vectors(5000, seed=5))


@pytest.fixture(scope="module")
def coders(vectors):
    """Both coders, fitted on the first 4,000 vectors (the rest are held out)."""
    return {code: _trained_refiner(vectors[:4000], code=code) for code in ("FP16", "TC1024")}


def test_the_transform_code_takes_1_kib_and_decodes_close_to_the_vector(vectors, coders):
    coder = coders["TC1024"]
    assert coder.tiers == [(0, 256, 16), (256, 768, 4), (768, 1792, 2)]
    assert isinstance(coder, TransformCoder) and coder.sa_code_size() == 1024 == 256 * 2 + 512 // 2 + 1024 // 4
    assert coder.rotation.shape == (1792, 2048)
    np.testing.assert_allclose(coder.rotation @ coder.rotation.T, np.eye(1792), atol=1e-4)  # orthonormal rows
    codes = coder.sa_encode(vectors[4000:])
    assert codes.shape == (1000, 1024) and codes.dtype == np.uint8
    refiner = Refiner(coder)
    assert (refiner.row_bytes, refiner.dims, refiner.describe()) == (1024, 1792, "TC1024")
    # every component of the vectors it was fitted on comes back in its own bin: within half a bin (float16: its
    # rounding) of its value; those outside a range (as many as the plan leaves out) come back at its ends
    rotated, back = coder.rotate(vectors[:4000]), coder.decode_rotated(coder.sa_encode(vectors[:4000]))
    np.testing.assert_allclose(back[:, :256], rotated[:, :256], rtol=1e-3, atol=1e-6)
    for (a, b, bits), (_, _, outside) in zip(coder.tiers[1:], TC_PLAN[1:]):
        inside = (rotated[:, a:b] >= coder.low[a:b]) & (rotated[:, a:b] < coder.low[a:b] + 2**bits * coder.step[a:b])
        assert 1 - 2 * outside - 0.002 <= inside.mean() <= 1 - 2 * outside + 0.002
        error = np.abs(back[:, a:b] - rotated[:, a:b])[inside]
        assert error.max() <= 0.5001 * np.broadcast_to(coder.step[a:b], inside.shape)[inside].max()
        low, top = np.broadcast_to(coder.low[a:b], inside.shape), 2**bits - 0.5
        below, above = rotated[:, a:b] < low, ~inside & (rotated[:, a:b] >= low)
        step = np.broadcast_to(coder.step[a:b], inside.shape)
        np.testing.assert_allclose(back[:, a:b][below], (low + 0.5 * step)[below], rtol=1e-5)  # clipped to an end
        np.testing.assert_allclose(back[:, a:b][above], (low + top * step)[above], rtol=1e-5)
    decoded = refiner.vectors(codes)
    cosines = np.sum(normalize(decoded) * vectors[4000:], axis=1)
    # held-out vectors: the code generalises. These synthetic vectors carry isotropic noise in every dimension,
    # part of which is in the 768 components the code drops
    assert cosines.min() > 0.99 and cosines.mean() > 0.995, (cosines.min(), cosines.mean())
    # through bytes (as tasks get it, and as refine.coder holds it): the same codes and the same decoding
    again = coder_from_bytes(coder_bytes(coder))
    assert isinstance(again, TransformCoder)
    np.testing.assert_array_equal(again.sa_encode(vectors[4000:]), codes)
    np.testing.assert_array_equal(Refiner(again).vectors(codes), decoded)
    fp16 = coders["FP16"]  # the FAISS coder goes through the same functions
    np.testing.assert_array_equal(coder_from_bytes(coder_bytes(fp16)).sa_encode(vectors[:5]), fp16.sa_encode(vectors[:5]))


def test_re_ranking_with_the_transform_code_keeps_the_true_neighbours(vectors, coders):
    """The same 40 candidates a query, re-scored from 1 KiB codes and from 4 KiB ones, against the exact top 10."""
    database, queries = vectors[:4000], vectors[4800:]
    _, exact = brute_force(database, queries, 10)
    rng = np.random.default_rng(0)
    candidates = np.array([np.concatenate([e, rng.choice(np.setdiff1d(np.arange(4000), e), 30, replace=False)])
                           for e in exact])  # the true 10 hidden among 30 others

    class Fixed:
        def search(self, q, k):
            return None, candidates

    found = {}
    for code, coder in coders.items():  # fitted on the database, as a build fits them on a sample of it
        codes = coder.sa_encode(database)
        _, found[code] = refined_search(Fixed(), Refiner(coder), codes, lambda ids: ids, queries, 10, 4)
    hit = {code: np.mean([len(set(f) & set(e)) / 10 for f, e in zip(ids, exact)]) for code, ids in found.items()}
    assert hit["FP16"] >= 0.99 and hit["TC1024"] >= 0.97, hit


def test_an_index_with_1_kib_re_ranking_codes_is_built_updated_and_rebuilt(tmp_path):
    lib = Library(tmp_path / "emb", clustered_vectors(2300, seed=4))
    for shard in range(2):
        lib.write(shard, range(1000 * shard, 1000 * shard + 1000), run=1)
    idx = tmp_path / "idx"
    built = index_embeddings([str(lib.root)], str(idx), {"kind": "ivf", "tune_queries": 300,
                                                        "refine_code": "TC1024"}, **QUIET)
    meta = built.meta
    assert meta["factory"].endswith(",IVF32,SQ8,Refine(TC1024)") and meta["spec"]["refine_code"] == "TC1024"
    assert sorted(meta["files"]) == ["ids.arrow", "ids.hash", "index.faiss", "refine.coder", "refine.f16"]
    # trained on 1,280 vectors (40 a list), which estimate about 640 principal directions: the code keeps those,
    # 256 as float16 and 384 in 4 bits (704 bytes); an index trained on 3,584 or more gets all of TC1024
    assert meta["files"]["refine.f16"] == 2000 * 704 and meta["train_size"] == 1280
    assert meta["query_node"]["refine_bytes_on_disk"] == 2000 * 704
    assert meta["tuning"]["target_met"]
    names = np.array(Library.names(range(2300)), dtype=object)
    index = SimilarityIndex.open(str(idx))
    live = lib.live()
    assert recall(index, lib.vectors[live], names[live], lib.vectors[live[::9]]) >= 0.93

    # a night: 300 new vectors are coded with the build's coder, appended as a segment of its rows
    lib.write(2, range(2000, 2300), run=2)
    night = index_embeddings([str(lib.root)], str(idx), **QUIET)  # the recorded options: TC1024 kept
    assert (night.action, night.added, night.meta["count"]) == ("updated", 300, 2300)
    assert night.meta["layout"]["refine"]["coder"] == "refine.coder"
    assert night.meta["layout"]["refine"]["segments"] == [["refine.f16", 2000], ["gen-000001/refine.f16", 300]]
    assert (idx / "gen-000001" / "refine.f16").stat().st_size == 300 * 704
    index = SimilarityIndex.open(str(idx))
    live = lib.live()
    assert recall(index, lib.vectors[live], names[live], lib.vectors[live[::9]]) >= 0.93
    v = index.vector("img-02150.jpg")  # a new row, decoded from its code
    assert float(v @ lib.vectors[2150] / np.linalg.norm(v) / np.linalg.norm(lib.vectors[2150])) > 0.99

    # asking for the other code rebuilds, and says why
    back = index_embeddings([str(lib.root)], str(idx), {"refine_code": "FP16"}, **QUIET)
    assert (back.action, back.reason) == ("rebuilt", "--refine-code changed (TC1024 -> FP16)")
    assert back.meta["layout"]["refine"]["coder"] == "gen-000002/refine.faiss"
    assert back.meta["factory"].endswith("Refine(FP16)")
    assert (idx / "gen-000002" / "refine.f16").stat().st_size == 2300 * 4096
    assert recall(SimilarityIndex.open(str(idx)), lib.vectors[live], names[live], lib.vectors[live[::9]]) >= 0.93
