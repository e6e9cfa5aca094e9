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
STATUS_MODEL_ERROR = "model_error"  # the forward pass failed for this image
STATUSES = (STATUS_OK, STATUS_READ_ERROR, STATUS_DECODE_ERROR, STATUS_MODEL_ERROR)
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


def with_provenance(schema: pa.Schema, provenance: dict) -> pa.Schema:
    """Attach the provenance dict as JSON in the schema's key-value metadata."""
    meta = dict(schema.metadata or {})
    meta[PROVENANCE_KEY] = json.dumps(provenance, sort_keys=True).encode()
    return schema.with_metadata(meta)


def read_provenance(schema: pa.Schema) -> Optional[dict]:
    """The provenance dict stored by `with_provenance`, or None."""
    raw = (schema.metadata or {}).get(PROVENANCE_KEY)
    return json.loads(raw) if raw else None
