"""failures module: an output's failed images grouped by reason (what `status` and the run summary show)."""
from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc

from resnet_batch.output.store import read_parquet
from resnet_batch.schema import STATUS_OK


def reason_key(error: str) -> str:
    """Errors that differ only in numbers, sizes or quoted names group together."""
    key = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", error or "")
    key = re.sub(r"\d+", "N", key)
    return key[:120]


def failure_groups(tables: list[pa.Table], examples: int = 3) -> list[dict]:
    """Failed rows (image_id, status, error) grouped by reason, most frequent first, a few ids each."""
    groups: dict[str, dict] = {}
    for t in tables:
        t = t.filter(pc.not_equal(t.column("status"), STATUS_OK))
        for image_id, status, error in zip(*(t.column(c).to_pylist() for c in ("image_id", "status", "error"))):
            g = groups.setdefault(reason_key(f"{status}: {error}"), {"status": status, "reason": error, "count": 0,
                                                                     "examples": []})
            g["count"] += 1
            if len(g["examples"]) < examples:
                g["examples"].append(image_id)
    return sorted(groups.values(), key=lambda g: -g["count"])


def read_failures(store, ledger: pa.Table, max_parts: int = 200) -> list[dict]:
    """Failure groups from the parts that have failed rows (their image_id/status/error columns only)."""
    parts = ledger.filter(pc.and_(pc.greater(ledger.column("failed"), 0),
                                  pc.not_equal(ledger.column("part"), ""))).column("part").to_pylist()[:max_parts]
    if not parts:
        return []
    with ThreadPoolExecutor(16) as pool:
        tables = list(pool.map(lambda n: read_parquet(store.fs, store.path(n), ["image_id", "status", "error"]),
                               parts))
    return failure_groups(tables)
