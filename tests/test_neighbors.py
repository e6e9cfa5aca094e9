"""The neighbours job: top-k per image (itself excluded) equal to numpy, index loaded once per actor, groups."""
import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from resnet_batch.cli import main
from resnet_batch.errors import ConfigError, OutputError
from resnet_batch.search.index import SimilarityIndex, normalize
from resnet_batch.search.build import build_index
from resnet_batch.search.neighbors import (GROUPS_FILE, GROUPS_SCHEMA, MARKER_FILE, NEIGHBORS_KEY, NEIGHBORS_SCHEMA,
                                    NEIGHBORS_REPORT_FILE, NeighborsConfig, exclude_self, near_duplicate_groups,
                                    read_neighbors, run_neighbors)
from resnet_batch.provenance import ProvenanceMismatch
from resnet_batch.schema import read_provenance
from tests.helpers.search import PROVENANCE, brute_force, clustered_vectors, write_part

REPO = Path(__file__).resolve().parent.parent


def test_exclude_self_drops_the_query_wherever_it_ranks_and_empty_slots():
    found = np.array([["a", "b", "c"], ["x", "b", "c"], ["d", None, None]], dtype=object)
    scores = np.array([[1.0, 0.9, 0.8], [0.99, 0.98, 0.7], [0.5, -3e38, -3e38]], dtype=np.float32)
    ids, sc = exclude_self(np.array(["a", "c", "e"], dtype=object), found, scores, k=2)
    assert ids == [["b", "c"], ["x", "b"], ["d"]]
    assert sc == [pytest.approx([0.9, 0.8]), pytest.approx([0.99, 0.98]), pytest.approx([0.5])]


def test_near_duplicate_groups_are_connected_components_above_the_threshold():
    table = pa.table({"image_id": ["a", "b", "c", "d", "e", "f"],
                      "neighbor_ids": [["b", "e"], ["a", "c"], ["b", "a"], ["e", "f"], ["d", "a"], ["d", "e"]],
                      "scores": [[0.99, 0.5], [0.99, 0.97], [0.97, 0.9], [0.96, 0.2], [0.96, 0.5], [0.2, 0.1]]},
                     schema=NEIGHBORS_SCHEMA)
    groups = near_duplicate_groups(table, 0.95)
    assert groups.schema == GROUPS_SCHEMA
    assert groups.to_pylist() == [
        {"group_id": 0, "size": 3, "image_ids": ["a", "b", "c"], "min_score": pytest.approx(0.97)},
        {"group_id": 1, "size": 2, "image_ids": ["d", "e"], "min_score": pytest.approx(0.96)}]
    assert near_duplicate_groups(table, 0.999).num_rows == 0
    assert near_duplicate_groups(table, 0.0).column("size").to_pylist() == [6]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """3 embed parts, 90 rows (4 failed), with planted near duplicates: {g0, g0b, g0c} and {g1, g1b} across parts."""
    root = tmp_path_factory.mktemp("nb-emb")
    rng = np.random.default_rng(5)
    vectors = clustered_vectors(90, seed=6, clusters=90)
    ids = [f"img-{i:03d}" for i in range(90)]
    for i, src, name in ((10, 3, "g0b"), (50, 3, "g0c"), (70, 40, "g1b")):
        vectors[i] = vectors[src] * 1.1 + 0.002 * rng.random(2048, dtype=np.float32)
        ids[i] = name
    ids[3], ids[40] = "g0", "g1"
    status = ["decode_error" if i in (7, 31, 32, 88) else "ok" for i in range(90)]
    for p in range(3):
        sl = slice(30 * p, 30 * (p + 1))
        write_part(root / f"part-{p:06d}.parquet", ids[sl], vectors[sl], status=status[sl])
    ok = np.array([s == "ok" for s in status])
    index_uri = str(tmp_path_factory.mktemp("nb-idx") / "idx")
    build_index([str(root)], index_uri, log=lambda m: None)
    return root, index_uri, [i for i, o in zip(ids, ok) if o], vectors[ok]


def test_job_writes_numpy_exact_neighbours_and_groups(planted, tmp_path, ray_local):
    root, index_uri, ids, vectors = planted
    sims = normalize(vectors) @ normalize(vectors).T
    np.fill_diagonal(sims, 0)
    planted_pairs = {frozenset(p) for p in (("g0", "g0b"), ("g0", "g0c"), ("g0b", "g0c"), ("g1", "g1b"))}
    natural = [sims[i, j] for i in range(len(ids)) for j in range(i)
               if frozenset((ids[i], ids[j])) not in planted_pairs]
    assert max(natural) < 0.999 < min(sims[ids.index(a), ids.index(b)] for a, b in planted_pairs)

    out = tmp_path / "nb"
    out.mkdir()
    (out / MARKER_FILE).write_text("{}")  # an earlier neighbours run's folder: its leftovers are removed
    (out / "part-000009.parquet").write_bytes(b"stale")
    report = run_neighbors(NeighborsConfig(index=index_uri, out=str(out), k=5, threshold=0.999), progress=False)
    assert sorted(p.name for p in out.iterdir()) == [MARKER_FILE, NEIGHBORS_REPORT_FILE, GROUPS_FILE, "part-000000.parquet",
                                                     "part-000001.parquet", "part-000002.parquet"]
    assert (report["parts"], report["images"], report["failed_rows_skipped"]) == (3, 86, 4)
    assert len(report["actors"]) == 1  # one actor, the index loaded once for all three parts
    assert report["outputs"] == {f"part-{p:06d}.parquet": str(root / f"part-{p:06d}.parquet") for p in range(3)}
    assert json.loads((out / NEIGHBORS_REPORT_FILE).read_text())["near_duplicate_groups"] == 2

    schema = pq.read_schema(out / "part-000001.parquet")
    assert schema.remove_metadata() == NEIGHBORS_SCHEMA
    assert read_provenance(schema) == PROVENANCE
    assert json.loads(schema.metadata[NEIGHBORS_KEY]) == {"k": 5, "index": index_uri, "index_kind": "flat",
                                                          "index_count": 86, "nprobe": None}
    table = read_neighbors(str(out))
    assert table.column("image_id").to_pylist() == ids
    ref_scores, ref_pos = brute_force(vectors, vectors, 6)
    for row, pos, sc, me in zip(table.to_pylist(), ref_pos, ref_scores, range(len(ids))):
        keep = pos != me
        assert row["neighbor_ids"] == [ids[p] for p in pos[keep][:5]]
        np.testing.assert_allclose(row["scores"], sc[keep][:5], atol=1e-5)

    strong = read_neighbors(str(out), min_score=0.999)  # what the groups are computed from
    assert sorted(strong.column("image_id").to_pylist()) == ["g0", "g0b", "g0c", "g1", "g1b"]
    groups = pq.read_table(out / GROUPS_FILE)
    assert groups.schema.remove_metadata() == GROUPS_SCHEMA
    assert [(g["size"], g["image_ids"]) for g in groups.to_pylist()] == [(3, ["g0", "g0b", "g0c"]), (2, ["g1", "g1b"])]
    assert min(groups.column("min_score").to_pylist()) >= 0.999


def test_job_script_and_its_checks(planted, tmp_path, ray_local, monkeypatch, capsys):
    root, index_uri, ids, _ = planted
    monkeypatch.setattr(sys, "argv", ["jobs/neighbors.py", "--index", index_uri, "--out", str(tmp_path / "nb"),
                                      "-k", "2", "--threshold", "0.5", "--quiet"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(REPO / "jobs" / "neighbors.py"), run_name="__main__")
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("neighbours of 86 images (k=2) in 3 parts -> ") and "4 failed rows skipped" in out
    assert read_neighbors(str(tmp_path / "nb")).column("neighbor_ids").to_pylist()[0].__len__() == 2

    other = write_part(tmp_path / "other" / "part-000000.parquet", ["q"], clustered_vectors(1),
                       {**PROVENANCE, "weights_sha256": "c" * 64})
    with pytest.raises(ProvenanceMismatch, match=rf"^embeddings {other.parent} were made with a different setup "
                                                 rf"than the index {index_uri}: weights_sha256: "):
        run_neighbors(NeighborsConfig(index=index_uri, out=str(tmp_path / "x"), embeddings=(str(other.parent),)))
    assert not (tmp_path / "x").exists()
    with pytest.raises(ConfigError, match=r"^threshold is a cosine similarity in \[-1, 1\], got 1.5$"):
        NeighborsConfig(index=index_uri, out="x", threshold=1.5)


def test_out_may_not_touch_the_sources_or_the_index_and_foreign_folders_are_kept(planted, tmp_path, capsys):
    """Issue 11: --out pointing at the embeddings deleted every part there; now nothing is deleted."""
    root, index_uri, _, _ = planted
    before = sorted(p.name for p in root.iterdir())
    cases = {str(root): f"--out {root} is the embeddings {root}",
             str(root.parent): f"--out {root.parent} contains the embeddings {root}",
             str(root / "sub"): f"--out {root / 'sub'} lies inside the embeddings {root}",
             index_uri + "/nb": f"--out {index_uri}/nb lies inside the index {index_uri}"}
    for out, message in cases.items():
        with pytest.raises(OutputError, match=f"^{message}; write the neighbours to a folder of their own$"):
            run_neighbors(NeighborsConfig(index=index_uri, out=out), progress=False)
    link = tmp_path / "alias"
    link.symlink_to(root)  # the same folder under another name
    with pytest.raises(OutputError, match=f"^--out {link} is the embeddings {root}"):
        run_neighbors(NeighborsConfig(index=index_uri, out=str(link)), progress=False)
    other = tmp_path / "photos-and-more"
    other.mkdir()
    (other / "part-000000.parquet").write_bytes(b"someone else's")
    (other / "_SUCCESS").write_text("")
    with pytest.raises(OutputError, match=rf"^--out {other} is not empty \(_SUCCESS, part-000000.parquet\) and is "
                                          r"not a neighbours output; choose a new or empty folder$"):
        run_neighbors(NeighborsConfig(index=index_uri, out=str(other)), progress=False)
    assert main(["neighbors", "--index", index_uri, "--out", str(root), "--quiet"]) == 2
    assert capsys.readouterr().err.startswith(f"error: --out {root} is the embeddings {root}")
    assert sorted(p.name for p in root.iterdir()) == before
    assert (other / "part-000000.parquet").read_bytes() == b"someone else's"


def test_job_on_an_ivf_index_uses_the_tuned_nprobe(tmp_path, ray_local):
    vectors = clustered_vectors(1200, seed=8)
    for p in range(2):
        write_part(tmp_path / "emb" / f"part-{p:06d}.parquet", [f"w{i:04d}" for i in range(600 * p, 600 * (p + 1))],
                   vectors[600 * p:600 * (p + 1)], dtype="float16")
    meta = build_index([str(tmp_path / "emb")], str(tmp_path / "idx"), kind="ivf", pca=0, tune_queries=200,
                       log=lambda m: None)
    report = run_neighbors(NeighborsConfig(index=str(tmp_path / "idx"), out=str(tmp_path / "nb"), k=4,
                                           threshold=0.999), progress=False)
    assert report["nprobe"] == meta["nprobe"] and report["index_factory"] == meta["factory"]
    assert report["images"] == 1200 and report["search_ms_per_query"] > 0
    index = SimilarityIndex.open(str(tmp_path / "idx"))  # opened with the same tuned nprobe
    table = read_neighbors(str(tmp_path / "nb"))
    stored = vectors.astype(np.float16).astype(np.float32)
    _, found = index.search(stored, 5)
    ids = np.array([f"w{i:04d}" for i in range(1200)], dtype=object)
    expected = [[ids[j] for j in row if j != i][:4] for i, row in enumerate(found)]
    assert table.column("neighbor_ids").to_pylist() == expected


@pytest.mark.s3
def test_job_reads_and_writes_s3_and_keeps_the_secret_out_of_the_report(planted, s3_server, ray_local):
    from tests.helpers.s3server import SECRET_KEY

    root, _, ids, _ = planted
    bucket = s3_server.make_bucket("search-neighbors")
    fs = s3_server.filesystem()
    for p in sorted(root.glob("part-*.parquet")):
        fs.put_file(str(p), f"{bucket}/emb/{p.name}")
    opts = s3_server.storage_options()
    build_index([f"s3://{bucket}/emb"], f"s3://{bucket}/idx", storage_options=opts, log=lambda m: None)
    cfg = NeighborsConfig(index=f"s3://{bucket}/idx", out=f"s3://{bucket}/nb", k=3, threshold=0.999,
                          storage_options=opts)
    report = run_neighbors(cfg, progress=False)
    assert (report["images"], report["near_duplicate_groups"]) == (86, 2)
    # Issue 11: a rerun into the same folder listed its own output from a stale s3fs cache and found 0 groups.
    assert read_neighbors(f"s3://{bucket}/nb", opts).num_rows == 86  # the driver's cache now holds the listing
    again = run_neighbors(cfg, progress=False)
    assert (again["images"], again["near_duplicate_groups"], again["images_in_groups"]) == (86, 2, 5)
    assert report["outputs"]["part-000002.parquet"] == f"s3://{bucket}/emb/part-000002.parquet"
    assert read_neighbors(f"s3://{bucket}/nb", opts).column("image_id").to_pylist() == ids
    stored = fs.cat_file(f"{bucket}/nb/{NEIGHBORS_REPORT_FILE}").decode()
    assert SECRET_KEY not in stored and json.loads(stored)["config"]["storage_options"]["secret"] == "***"
