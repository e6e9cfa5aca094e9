"""samples module: the top-k labels of a few embedded images (what the run summary shows, so a person sees at once
whether the weights classify)."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from resnet_batch.output.store import read_parquet
from resnet_batch.schema import STATUS_OK

SAMPLE_COLUMNS = ["image_id", "status", "topk_labels", "topk_probs"]


def sample_labels(store, ledger: pa.Table, run_no: int, n: int = 3) -> list[dict]:
    """`n` embedded images spread evenly over one part (this run's first part when it wrote any, else the output's
    first), each with its top-k labels and probabilities: one small read, whatever the output's size. Spread, since
    neighbouring rows are often near copies (one folder, one event)."""
    if n <= 0 or not ledger.num_rows:
        return []
    t = ledger.filter(pc.and_(pc.greater(ledger.column("ok"), 0), pc.not_equal(ledger.column("part"), "")))
    if not t.num_rows:
        return []
    rows = sorted(zip(t.column("run").to_pylist(), t.column("shard").to_pylist(), t.column("chunk").to_pylist(),
                      t.column("part").to_pylist()),
                  key=lambda r: (r[0] != run_no, r[1], r[2]))  # this run's parts first, then input order
    try:
        part = read_parquet(store.fs, store.path(rows[0][3]), SAMPLE_COLUMNS)
    except Exception:  # unreachable or gone since: the summary only shows less; the run's outcome is unchanged
        return []
    part = part.filter(pc.equal(part.column("status"), STATUS_OK))
    part = part.take(pa.array(sorted({i * part.num_rows // n for i in range(n)} - {part.num_rows}), pa.int64()))
    return [{"image_id": r["image_id"], "labels": list(r["topk_labels"] or []),
             "probs": [round(float(p), 4) for p in (r["topk_probs"] or [])]} for r in part.to_pylist()]
