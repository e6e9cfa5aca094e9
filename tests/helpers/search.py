"""Helpers for the similarity-search tests: embed-output Parquet parts with chosen vectors, and one real embed run."""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from resnet_batch.schema import EMBEDDING_DIM, embedding_array, output_schema, with_provenance

PROVENANCE = {
    "package": "resnet-batch", "version": "0.1.0", "model": "torchvision.resnet50", "weights_id": "random(seed=7)",
    "weights_sha256": "a" * 64, "transforms": "IMAGENET1K_V2",
    "preprocessing": {"resize_size": 232, "crop_size": 224, "mean": [0.485, 0.456, 0.406],
                      "std": [0.229, 0.224, 0.225], "interpolation": "bilinear", "antialias": True,
                      "jpeg_draft": True, "exif_transpose": True, "max_pixels": 100_000_000},
    "precision": "fp32", "channels_last": True, "topk": 5, "embedding_dim": EMBEDDING_DIM,
}


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    """The test machine is shared and small: OpenMP spinning on busy cores makes FAISS crawl (import this
    fixture into a test module to use it there)."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def clustered_vectors(n: int, seed: int = 0, clusters: int = 50, latent: int = 32) -> np.ndarray:
    """Non-negative 2048-d vectors like pooled CNN features: a low-dimensional clustered latent, a random linear
    map, ReLU, and a little noise (structure an ANN index can use, as with real embeddings)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((latent, EMBEDDING_DIM)).astype(np.float32) / np.sqrt(latent)
    centres = rng.standard_normal((clusters, latent)).astype(np.float32)
    z = centres[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, latent)).astype(np.float32)
    noise = 0.05 * np.abs(rng.standard_normal((n, EMBEDDING_DIM)).astype(np.float32))
    return (np.maximum(z @ w, 0) + noise).astype(np.float32)


def write_part(path: Path, ids: Sequence[str], vectors: np.ndarray, provenance: Optional[dict] = PROVENANCE,
               status: Optional[Sequence[str]] = None, paths: Optional[Sequence[str]] = None,
               dtype: str = "float32") -> Path:
    """An embed-output part (the output schema with a float32 or float16 embedding column, provenance in the
    metadata); rows whose status is not 'ok' get nulls."""
    n = len(ids)
    schema = output_schema(embedding_dtype=dtype)
    status = list(status or ["ok"] * n)
    ok = np.array([s == "ok" for s in status])
    labels = [[f"label-{i % 7}", "other"] if o else None for i, o in enumerate(ok)]
    table = pa.table({
        "image_id": pa.array(ids, pa.string()),
        "path": pa.array(paths or [f"/nowhere/{i}" for i in ids], pa.string()),
        "width": pa.array([640] * n, pa.int32()), "height": pa.array([480] * n, pa.int32()),
        "topk_ids": pa.array([[i % 7, 999] if o else None for i, o in enumerate(ok)], pa.list_(pa.int32())),
        "topk_labels": pa.array(labels, pa.list_(pa.string())),
        "topk_probs": pa.array([[0.5, 0.1] if o else None for o in ok], pa.list_(pa.float32())),
        "embedding": embedding_array(vectors, ok, dtype),
        "status": pa.array(status, pa.string()),
        "error": pa.array([None if o else "decode_error: test" for o in ok], pa.string()),
    }, schema=schema)
    schema = with_provenance(schema, provenance) if provenance else schema
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.replace_schema_metadata(schema.metadata), path)
    return path


def brute_force(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-k with numpy (float64): (scores, indices), best first."""
    x = vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(1e-30)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True).clip(1e-30)
    sims = q.astype(np.float64) @ x.astype(np.float64).T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), order


def embedded_photos(tmp_path_factory, photos: Path, checkpoint) -> Path:
    """The real embed job's output over the 36 test photos (fp32; `checkpoint` a path, or a weights name such as
    IMAGENET1K_KERAS); run once per test run for each, shared by the xdist workers (helpers/shared.py)."""
    from tests.helpers.shared import shared_path

    def embed(out: Path) -> None:
        from resnet_batch.embed.runner import run
        from tests.helpers.jobs import job_config

        report = run(job_config(photos, out, checkpoint), progress=False)
        assert report["complete"], json.dumps(report)[:2000]

    name = "" if isinstance(checkpoint, Path) else f"-{checkpoint}"
    return shared_path(tmp_path_factory, f"search-embedded-photos{name}", embed)


def jpeg(path: Path, quality: int, flip: bool = False) -> bytes:
    """The image at `path` re-encoded as JPEG at `quality` (optionally mirrored)."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if flip:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_logged_part(root: Path, shard: int, ids: Sequence[str], vectors: np.ndarray, run: int,
                      status: Optional[Sequence[str]] = None) -> Path:
    """A part of an embed output as the job writes it: the part (write_part), and its record in the output's
    ledger (a new record, as a sync's rewrite of the part appends one)."""
    import time

    from resnet_batch.output.ledger import LedgerWriter
    from resnet_batch.output.store import OutputStore, part_name

    path = write_part(root / part_name(shard), ids, vectors, status=status)
    ok = sum(s == "ok" for s in (status or ["ok"] * len(ids)))
    ledger = LedgerWriter(OutputStore(str(root), {}), run)
    ledger.add({"part": path.name, "shard": shard, "chunk": -1, "chunks": 1, "rows": len(ids), "ok": ok,
                "failed": len(ids) - ok, "skipped": 0, "run": run, "written_at": time.time()})
    ledger.flush()
    return path


class Library:
    """A hand-written embed output whose parts change as a sync changes them: rewritten without some rows (a
    new ledger record), deleted, or new. Row r of `vectors` is the image img-r.jpg."""

    def __init__(self, root: Path, vectors: np.ndarray):
        self.root, self.vectors, self.rows, self.failed = root, vectors, {}, {}

    def write(self, shard: int, rows, run: int, failed=()) -> None:
        rows = list(rows)
        status = ["decode_error" if r in failed else "ok" for r in rows]
        write_logged_part(self.root, shard, self.names(rows), self.vectors[rows], run, status)
        self.rows[shard], self.failed[shard] = rows, set(failed)

    def delete(self, shard: int) -> None:
        (self.root / f"part-{shard:06d}.parquet").unlink()
        del self.rows[shard]

    def live(self) -> list[int]:
        return sorted(r for s, rows in self.rows.items() for r in rows if r not in self.failed[s])

    @staticmethod
    def names(rows) -> list[str]:
        return [f"img-{r:05d}.jpg" for r in rows]


def recall(index, vectors: np.ndarray, names: np.ndarray, queries: np.ndarray) -> float:
    """recall@10 of `queries` against exact search over `vectors` (image ids `names`)."""
    _, exact = brute_force(vectors, queries, 10)
    _, found = index.search(queries, 10)
    return float(np.mean([len(set(f) & set(e)) / 10 for f, e in zip(index.image_ids(found), names[exact])]))
