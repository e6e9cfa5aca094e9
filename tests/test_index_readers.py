"""A reader opening an index while updates publish: two updates between its read of index.json and its opening
of the files remove the generation it read (only the current one and the one before are kept); it opens the
newer one instead, locally and on the S3 server the tests start."""
from __future__ import annotations

import pytest

from resnet_batch.search.index import SimilarityIndex, UnknownImageId
from resnet_batch.search.update import index_embeddings
from tests.helpers.search import clustered_vectors, write_part


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_a_reader_whose_generation_is_removed_while_it_opens_opens_the_newer_one(where, tmp_path, monkeypatch,
                                                                                request):
    emb = tmp_path / "emb"
    for p in range(2):
        write_part(emb / f"part-{p:06d}.parquet", [f"img-{p}-{i:03d}" for i in range(100)],
                   clustered_vectors(100, seed=p))
    if where == "s3":
        s3 = request.getfixturevalue("s3_server")
        uri, opts = f"s3://{s3.make_bucket('index-readers')}/idx", s3.storage_options()
        monkeypatch.setenv("RESNET_BATCH_CACHE", str(tmp_path / "reader-cache"))
    else:
        uri, opts = str(tmp_path / "idx"), {}
    quiet = {"storage_options": opts, "log": lambda m: None}
    assert index_embeddings([str(emb)], uri, **quiet).action == "built"

    real_open, attempts = SimilarityIndex._open, []

    def open_after_two_updates(cls, uri_, meta, storage_options):
        if not attempts:  # index.json was read; two updates publish before the files are opened (on S3 from
            # another machine: a node cache of their own, or the reader would find the old files in theirs)
            monkeypatch.setenv("RESNET_BATCH_CACHE", str(tmp_path / "writer-cache"))
            for p in (2, 3):
                write_part(emb / f"part-{p:06d}.parquet", [f"new-{p}-{i:03d}" for i in range(20)],
                           clustered_vectors(20, seed=p))
                assert index_embeddings([str(emb)], uri, **quiet).action == "updated"
            monkeypatch.setenv("RESNET_BATCH_CACHE", str(tmp_path / "reader-cache"))
        try:
            index = real_open(uri_, meta, storage_options)
        except Exception as err:
            attempts.append((meta.get("generation", 0), type(err).__name__))
            raise
        attempts.append((meta.get("generation", 0), "opened"))
        return index

    monkeypatch.setattr(SimilarityIndex, "_open", classmethod(open_after_two_updates))
    index = SimilarityIndex.open(uri, opts)
    assert attempts[0][0] == 0 and attempts[0][1] != "opened"  # the build's files were gone
    assert attempts[1:] == [(2, "opened")]
    assert len(index) == 240 and index.meta["generation"] == 2
    assert index.row(index.faiss_id("new-3-000"))["image_id"] == "new-3-000"
    with pytest.raises(UnknownImageId):
        index.faiss_id("gone")
