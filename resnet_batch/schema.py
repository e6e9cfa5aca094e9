"""schema module: the one output schema, its status values, and the provenance stamped into Parquet."""
from __future__ import annotations

import json
from typing import Iterable, Optional

import numpy as np
import pyarrow as pa

EMBEDDING_DIM = 2048
EMBEDDING_DTYPES = {"float32": pa.float32(), "float16": pa.float16()}  # output.embedding_dtype
PROVENANCE_KEY = b"resnet_batch.provenance"

STATUS_OK = "ok"
STATUS_READ_ERROR = "read_error"  # the bytes could not be fetched
STATUS_DECODE_ERROR = "decode_error"  # not an image, truncated, too large, ...
# (A forward pass that raises fails its whole shard, which is retried and, if it keeps failing, named.)
# Control rows between the read tasks and the model actors (never written to a part):
CONTROL_END = "_end"  # closes a shard; its _chunks / _skipped say how many chunks and non-image members
CONTROL_FAILURE = "_failure"  # the whole shard failed this time (error = why); the driver retries it
DEVICE_NO_CUDA = "cpu (no CUDA)"  # a model actor given a GPU that its torch could not use

# One row per input image, success or failure. Extra per-format columns (WebDataset json fields,
# user Parquet columns) are appended after these by `output_schema`.
BASE_FIELDS = (
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("path", pa.string(), nullable=False),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("topk_ids", pa.list_(pa.int32())),
    pa.field("topk_labels", pa.list_(pa.string())),
    pa.field("topk_probs", pa.list_(pa.float32())),
    pa.field("embedding", pa.list_(pa.float32(), EMBEDDING_DIM)),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
)
OUTPUT_SCHEMA = pa.schema(BASE_FIELDS)


def embedding_type(dtype: str = "float32") -> pa.DataType:
    """The embedding column's type for output.embedding_dtype (float16 halves the bytes, as clip-retrieval does)."""
    return pa.list_(EMBEDDING_DTYPES[dtype], EMBEDDING_DIM)


def output_schema(extra_fields: Iterable[pa.Field] = (), embedding_dtype: str = "float32") -> pa.Schema:
    """The output schema: the base columns (embedding as float32 or float16), then any pass-through columns."""
    extra = list(extra_fields)
    clash = {f.name for f in extra} & set(OUTPUT_SCHEMA.names)
    if clash:
        raise ValueError(f"pass-through columns clash with output columns: {sorted(clash)}")
    base = [pa.field("embedding", embedding_type(embedding_dtype)) if f.name == "embedding" else f
            for f in BASE_FIELDS]
    return pa.schema(base + extra)


def embedding_array(emb: Optional[np.ndarray], valid: np.ndarray, dtype: str = "float32") -> pa.FixedSizeListArray:
    """Build the embedding column from an (N, 2048) float array; rows where `valid` is False are null."""
    n = len(valid)
    np_dtype = np.dtype(dtype)
    if emb is None:
        emb = np.zeros((n, EMBEDDING_DIM), dtype=np_dtype)
    emb = np.ascontiguousarray(emb, dtype=np_dtype)
    if emb.shape != (n, EMBEDDING_DIM):
        raise ValueError(f"embedding must be ({n}, {EMBEDDING_DIM}), got {emb.shape}")
    values = pa.array(emb.reshape(-1), type=EMBEDDING_DTYPES[dtype])
    mask = pa.array(~np.asarray(valid, dtype=bool))
    return pa.FixedSizeListArray.from_arrays(values, EMBEDDING_DIM, mask=mask)


def embeddings_to_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """(N, 2048) float32 from an embedding column (float32 or float16) without nulls."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    if column.null_count:
        raise ValueError("embedding column has nulls; filter status == 'ok' first")
    flat = column.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(len(column), EMBEDDING_DIM).astype(np.float32, copy=False)


# -- the stage contract: what travels from the read tasks to the model actors -------------------------
# One block holds whole chunks (a folder shard is one chunk; a tar or Parquet file is one or more).
# Written by reader.read_shard (+ decode.decode_table / gpu_decode.probe_table), read by model.EmbedActor.
IN_FLIGHT_COLUMNS = {
    "image_id": "output column: path relative to the input root (+ member key)",
    "path": "output column: full path or URL of the image",
    "status": "ok, read_error or decode_error so far",
    "error": "the reason, null when ok",
    "width": "int32, original width as displayed; -1 when unknown",
    "height": "int32, original height as displayed; -1 when unknown",
    "pixels": "CPU decode: the uint8 crop (crop x crop x 3) as bytes; empty for a row that failed",
    "bytes": "compute.gpu_decode: the encoded image, decoded in the actor",
    "_device_ok": "compute.gpu_decode: the device decoder can take this image",
    "_decode_s": "float32, seconds this row took in the read task (fetch excluded)",
    "_shard": "int64, the shard index",
    "_chunk": "int32, the part of the shard (-1: a folder shard, written as one part)",
    "_rows": "int32, rows of this chunk: the actor refuses a chunk that arrived split",
    "_chunks": "int32, on the shard's last chunk: how many chunks the shard has (1 for a folder); else -1",
    "_groups": "int32, on the shard's last chunk: how many chunks this read produced (completion)",
    "_skipped": "int32, on the last chunk: members/rows of the shard that are not images",
    "_merge": "bool, --retry-failed: merge these rows into the chunk's existing part",
}
# Status values CONTROL_END and CONTROL_FAILURE mark rows that are not images (see above).
PASSTHROUGH_PREFIX = "pt:"  # pass-through columns travel as "pt:<name>", so no input column can clash

# One page of the listing: path relative to the root (raw bytes), size, and the version of the object:
# mtime in ns on file systems, the ETag on object stores.
ENTRY_SCHEMA = pa.schema([
    pa.field("path", pa.binary(), nullable=False),
    pa.field("size", pa.int64()),
    pa.field("mtime_ns", pa.int64()),
    pa.field("etag", pa.binary()),
])

# One record per part written, from the actor that wrote it to the driver (and the part ledger).
PART_RECORD_SCHEMA = pa.schema([
    pa.field("part", pa.string(), nullable=False),  # file name, e.g. part-000012.parquet
    pa.field("shard", pa.int64(), nullable=False),
    pa.field("chunk", pa.int32(), nullable=False),  # -1 for a folder shard
    pa.field("chunks", pa.int32()),  # set on the last chunk of a tar/Parquet shard; 1 for a folder shard
    pa.field("rows", pa.int64()),
    pa.field("ok", pa.int64()),
    pa.field("failed", pa.int64()),
    pa.field("skipped", pa.int64()),
    pa.field("decode_s", pa.float64()),  # summed over the part's rows, in the read tasks
    pa.field("model_s", pa.float64()),  # the actor's forward passes (and gpu_decode) for this part
    pa.field("write_s", pa.float64()),  # assembling + encoding + uploading the part
    pa.field("bytes", pa.int64()),  # the part file's size
    pa.field("node", pa.string()),
    pa.field("pid", pa.int64()),
    pa.field("device", pa.string()),
    pa.field("actor", pa.string()),
    pa.field("run", pa.int32()),
    pa.field("written_at", pa.float64()),  # unix time
])
PART_STATS_KEY = b"resnet_batch.part_stats"  # the part's record, also in its own Parquet metadata
WRITER_KEY = b"resnet_batch.writer"  # {"node_id": ..., "pid": ...} of the process that wrote the part


def with_provenance(schema: pa.Schema, provenance: dict) -> pa.Schema:
    """Attach the provenance dict as JSON in the schema's key-value metadata."""
    meta = dict(schema.metadata or {})
    meta[PROVENANCE_KEY] = json.dumps(provenance, sort_keys=True).encode()
    return schema.with_metadata(meta)


def read_provenance(schema: pa.Schema) -> Optional[dict]:
    """The provenance dict stored by `with_provenance`, or None."""
    raw = (schema.metadata or {}).get(PROVENANCE_KEY)
    return json.loads(raw) if raw else None
