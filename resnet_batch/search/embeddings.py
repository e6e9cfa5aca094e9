"""embeddings module: an embed output as the search side reads it: its parts, their provenance, 'ok' rows in chunks."""
from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from resnet_batch.errors import OutputError, SimilarityIndexError
from resnet_batch.output.state import load as load_state
from resnet_batch.output.store import OutputStore, parse_part
from resnet_batch.provenance import check_compatible
from resnet_batch.schema import PROVENANCE_KEY, STATUS_OK, read_provenance
from resnet_batch.storage import display_path, filesystem, protocols

STATE_RETRY_S = 30.0  # reading an embed output's state: transient store errors retried this long
CHUNK_ROWS = 8192  # rows read at a time: 64 MiB of float32 embeddings


@dataclass(frozen=True)
class Part:
    """One Parquet part of an embed output: where it is, and how many of its rows are usable (status 'ok')."""

    uri: str  # as displayed: a local path or protocol://...
    path: str  # filesystem path (no protocol)
    rows: int
    ok_rows: int


def list_parts(uri: str, storage_options: Optional[dict] = None) -> tuple[object, list[str]]:
    """The fsspec filesystem and the parts of an embed output (or the one .parquet file `uri` names), sorted."""
    fs, entries = list_part_entries(uri, storage_options)
    return fs, [e["name"] for e in entries]


def list_part_entries(uri: str, storage_options: Optional[dict] = None) -> tuple[object, list[dict]]:
    """The fsspec filesystem and the listing entries (name, size, mtime or ETag) of the parts of an embed
    output (or of the one .parquet file `uri` names), sorted by name.

    Only top-level parts count (output.store.parse_part: part-SSSSSS[-CCCC].parquet); sub-folders (`_manifest/`,
    `_ledger/`), `_`/`.`-prefixed entries and other Parquet files are ignored.
    """
    fs, root = filesystem(uri, dict(storage_options or {}))
    fs.invalidate_cache(root)  # a listing cached before workers wrote would miss their parts
    try:
        if fs.isfile(root):
            return fs, [fs.info(root)]
        entries = fs.ls(root, detail=True)
    except FileNotFoundError:
        raise SimilarityIndexError(f"not found: {uri}") from None
    parts = sorted((e for e in entries  # files, and links to files
                    if e.get("type") != "directory" and parse_part(posixpath.basename(e["name"])) is not None),
                   key=lambda e: e["name"])
    if not parts:
        raise SimilarityIndexError(f"no parts (part-*.parquet) under {uri}")
    return fs, parts


def part_provenance(schema: pa.Schema, shown: str) -> dict:
    """The provenance a part carries; one without it, or without an embedding column, is refused."""
    provenance = read_provenance(schema)
    if provenance is None:
        raise SimilarityIndexError(f"{shown} has no {PROVENANCE_KEY.decode()} metadata: "
                                   "cannot tell which model made these embeddings")
    if "embedding" not in schema.names:
        raise SimilarityIndexError(f"{shown} has no embedding column")
    return provenance


def check_provenance(provenance: dict, shown: str, reference: dict, reference_shown: str, hint: str = "") -> None:
    """Refuse embeddings made with another setup than `reference` (the binding provenance keys)."""
    check_compatible(reference, provenance, f"refusing to mix embeddings with different provenance: {shown} differs "
                     f"from {reference_shown}", hint=hint)


def scan_embeddings(uris: Sequence[str], storage_options: Optional[dict] = None) -> tuple[list[tuple], dict]:
    """[(fs, Part)] for every part under `uris` and their common provenance; mixed provenance is refused."""
    found, provenance, first = [], None, None
    for uri in uris:
        fs, paths = list_parts(uri, storage_options)
        for path in paths:
            shown = display_path(protocols(fs)[0], path)
            with fs.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                prov = part_provenance(pf.schema_arrow, shown)
                status = pf.read(columns=["status"]).column("status")
            if provenance is None:
                provenance, first = prov, shown
            check_provenance(prov, shown, provenance, first)
            ok = int(pc.sum(pc.equal(status, STATUS_OK)).as_py() or 0)
            found.append((fs, Part(shown, path, len(status), ok)))
    if not found:
        raise SimilarityIndexError("no embeddings given")
    return found, provenance


def duplicate_id(image_id: str, first: str, second: str) -> None:
    """Refuse an image_id found twice (in parts `first` and `second`): one embed output per input root."""
    raise SimilarityIndexError(f"image_id {image_id!r} appears more than once ({first} and {second}); "
                               "index one embed output per input root")


def ok_chunks(fs, path: str, columns: Sequence[str], rows: int = CHUNK_ROWS) -> Iterator[pa.Table]:
    """A part's rows with status 'ok' (those with an embedding), `rows` at a time: memory stays bounded."""
    wanted = list(dict.fromkeys([*columns, "status"]))
    with fs.open(path, "rb") as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=rows, columns=wanted):
            table = pa.Table.from_batches([batch])
            yield table.filter(pc.equal(table.column("status"), STATUS_OK)).select(list(columns))


def read_ok_rows(fs, path: str, columns: Sequence[str]) -> pa.Table:
    """All 'ok' rows of one part (a part is one shard: small enough to hold)."""
    chunks = list(ok_chunks(fs, path, columns))
    return pa.concat_tables(chunks) if chunks else pa.table({c: [] for c in columns})


def sample_rows(counts: list[int], size: int, seed: int) -> list[np.ndarray]:
    """Per part, the sorted row numbers (among its ok rows) of a uniform sample of `size` rows overall."""
    total = sum(counts)
    picked = np.sort(np.random.default_rng(seed).choice(total, size=min(size, total), replace=False))
    bounds = np.cumsum([0, *counts])
    return [picked[(picked >= lo) & (picked < hi)] - lo for lo, hi in zip(bounds[:-1], bounds[1:])]


def input_root(uri: str, storage_options: Optional[dict] = None) -> Optional[dict]:
    """{"protocol", "root"} of the images an embed output was made from (what its `_state.json` records), or
    None when `uri` is one file, or a folder that the embed job did not write (or whose state is unreadable)."""
    store = OutputStore(uri, dict(storage_options or {}), retry_window_s=STATE_RETRY_S)
    try:
        if store.fs.isfile(store.root):
            return None
        state = load_state(store)
    except (FileNotFoundError, OutputError, TypeError):  # TypeError: a state without the fields of one
        return None
    if state is None or not isinstance(state.root, str) or not isinstance(state.protocol, str):
        return None
    return {"protocol": state.protocol, "root": state.root}
