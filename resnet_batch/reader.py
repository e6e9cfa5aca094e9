"""reader module: a Ray Data datasource that reads shards (image files, WebDataset tars, Parquet) as bytes rows."""
from __future__ import annotations

import json
import tarfile
from typing import Callable, Iterator, Optional

import pyarrow as pa
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from resnet_batch.config import InputConfig
from resnet_batch.listing import InputError, Listing, Shard, relative_id, tar_key
from resnet_batch.schema import OUTPUT_SCHEMA, STATUS_OK, STATUS_READ_ERROR
from resnet_batch.storage import display_path, filesystem

SHARD_END = "_end"  # status of the one sentinel row that closes each shard; its _count is the shard's size

READ_SCHEMA_BASE = (
    ("image_id", pa.string()),
    ("path", pa.string()),
    ("bytes", pa.binary()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("_shard", pa.int32()),
    ("_count", pa.int32()),  # -1 on image rows; the shard's image count on its SHARD_END row
    ("_skipped", pa.int32()),  # non-image members of the shard (on the SHARD_END row)
)


WDS_FIELDS = (pa.field("caption", pa.string()), pa.field("json", pa.string()))  # always, for webdataset input
JSON_PEEK_SAMPLES = 64


def extra_fields(cfg: InputConfig, listing: Listing) -> list[pa.Field]:
    """The pass-through output columns this input adds after the base schema (checked before any work).

    webdataset: `caption` (KEY.txt) and `json` (KEY.json as text), then each input.passthrough_columns
    name lifted from the json with a type inferred from the first samples of the first shard.
    parquet: the input.passthrough_columns of the Parquet files, with their own types.
    """
    taken = [c for c in cfg.passthrough_columns if c in OUTPUT_SCHEMA.names]
    if taken:
        raise InputError(f"input.passthrough_columns {taken} clash with output columns of the same name "
                         f"{list(OUTPUT_SCHEMA.names)}")
    fs, _ = filesystem(cfg.uri, dict(cfg.storage_options))
    first = listing.shards[0].paths[0]
    if listing.format == "webdataset":
        clash = [c for c in cfg.passthrough_columns if c in ("caption", "json")]
        if clash:
            raise InputError(f"input.passthrough_columns: {clash} are always output columns for webdataset input")
        types = json_field_types(fs, first, cfg.passthrough_columns, cfg.extensions, listing.protocol)
        return list(WDS_FIELDS) + [pa.field(c, types[c]) for c in cfg.passthrough_columns]
    if listing.format == "parquet":
        import pyarrow.parquet as pq

        with fs.open(first, "rb") as f:
            schema = pq.ParquetFile(f).schema_arrow
        shown = display_path(listing.protocol, first)
        if cfg.image_column not in schema.names:
            raise InputError(f"{shown} has no image column '{cfg.image_column}' (input.image_column); "
                             f"columns: {schema.names}")
        missing = [c for c in cfg.passthrough_columns if c not in schema.names]
        if missing:
            raise InputError(f"input.passthrough_columns {missing} not in {shown}; columns: {schema.names}")
        return [schema.field(c) for c in cfg.passthrough_columns]
    if cfg.passthrough_columns:
        raise InputError("input.passthrough_columns applies to webdataset and parquet input only")
    return []


def json_field_types(fs, tar_path: str, names: tuple[str, ...], extensions: tuple[str, ...],
                     protocol: str = "file", samples: int = JSON_PEEK_SAMPLES) -> dict[str, pa.DataType]:
    """Arrow types for json fields, from the first `samples` samples of one tar (read as a stream, stopping early).

    bool -> bool, int -> int64, float (or int and float) -> float64, str -> string; lists, objects, mixed
    or always-null fields -> string (JSON text). A name that no sample's json has is an InputError.
    """
    if not names:
        return {}
    seen: dict[str, set] = {n: set() for n in names}
    present: set[str] = set()
    all_fields: set[str] = set()
    n = 0
    with fs.open(tar_path, "rb", block_size=1 << 20) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            if not member.isfile() or tar_key(member.name)[1] != "json":
                continue
            meta = _parse_json(tar.extractfile(member).read().decode("utf-8", "replace"))
            all_fields.update(meta)
            for name in names:
                if name in meta:
                    present.add(name)
                    if meta[name] is not None:
                        seen[name].add(type(meta[name]))
            n += 1
            if n >= samples:
                break
    missing = [c for c in names if c not in present]
    if missing:
        raise InputError(f"input.passthrough_columns {missing} not found in the json of the first {n} samples of "
                         f"{display_path(protocol, tar_path)}; fields seen: {sorted(all_fields)}")
    return {name: _arrow_type(kinds) for name, kinds in seen.items()}


def _arrow_type(kinds: set) -> pa.DataType:
    if kinds == {bool}:
        return pa.bool_()
    if kinds == {int}:
        return pa.int64()
    if kinds and kinds <= {int, float}:
        return pa.float64()
    return pa.string()


def coerce_json_value(value, type_: pa.DataType):
    """A json value as the column's type; a value of another kind becomes null (the `json` column keeps it)."""
    if value is None:
        return None
    if pa.types.is_string(type_):
        return value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    if pa.types.is_boolean(type_):
        return value if isinstance(value, bool) else None
    if isinstance(value, bool):
        return None
    if pa.types.is_integer(type_):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value if isinstance(value, int) else None
    if pa.types.is_floating(type_):
        return float(value) if isinstance(value, (int, float)) else None
    return None


class _Rows:
    """Accumulates rows of one shard and emits Arrow tables of `chunk` rows."""

    def __init__(self, shard: Shard, extra: list[pa.Field], chunk: int):
        self.shard, self.extra, self.chunk = shard, extra, chunk
        self.fields = [pa.field(n, t) for n, t in READ_SCHEMA_BASE] + extra
        self.schema = pa.schema(self.fields)
        self.rows: list[dict] = []
        self.count = 0

    def add(self, image_id: str, path: str, data: Optional[bytes], error: Optional[str] = None,
            **extra) -> list[pa.Table]:
        """Add one row; returns the table of `chunk` rows it completed, if it did (`yield from` it)."""
        self.count += 1
        self.rows.append({"image_id": image_id, "path": path, "bytes": data or b"",
                          "status": STATUS_OK if error is None else STATUS_READ_ERROR, "error": error,
                          "_shard": self.shard.index, "_count": -1, "_skipped": 0, **extra})
        return [self.flush()] if len(self.rows) >= self.chunk else []

    def end(self, skipped: int = 0) -> pa.Table:
        self.rows.append({"image_id": "", "path": "", "bytes": b"", "status": SHARD_END, "error": None,
                          "_shard": self.shard.index, "_count": self.count, "_skipped": skipped})
        return self.flush()

    def flush(self) -> Optional[pa.Table]:
        if not self.rows:
            return None
        table = pa.Table.from_pylist(self.rows, schema=self.schema)
        self.rows = []
        return table


def read_shard(shard: Shard, cfg: InputConfig, root: str, protocol: str, extra: list[pa.Field],
               chunk: int, only: Optional[frozenset] = None) -> Iterator[pa.Table]:
    """Yield the shard's rows in tables of `chunk` rows, then its SHARD_END row.

    `only`, when given, restricts the rows to these image_ids (used by --retry-failed).
    """
    fs, _ = filesystem(cfg.uri, dict(cfg.storage_options))
    rows = _Rows(shard, extra, chunk)
    skipped = 0
    if shard.kind == "files":
        yield from _read_files(fs, shard, root, protocol, rows, chunk, only)
    elif shard.kind == "webdataset":
        skipped = yield from _read_tar(fs, shard, cfg, root, protocol, rows, only)
    elif shard.kind == "parquet":
        skipped = yield from _read_parquet(fs, shard, cfg, root, protocol, rows, only)
    else:
        raise ValueError(f"unknown shard kind {shard.kind}")
    yield rows.end(skipped)


def _read_files(fs, shard, root, protocol, rows, chunk, only) -> Iterator[pa.Table]:
    paths = [p for p in shard.paths if only is None or relative_id(p, root) in only]
    for i in range(0, len(paths), chunk):
        group = paths[i:i + chunk]
        # fs.cat on a list fetches concurrently on async filesystems (s3fs) and never raises per file.
        got = fs.cat(group, on_error="return") if len(group) > 1 else {group[0]: _cat_one(fs, group[0])}
        for p in group:
            data = got.get(p)
            if data is None:
                data = got.get(fs._strip_protocol(p)) if hasattr(fs, "_strip_protocol") else None
            err = None
            if isinstance(data, BaseException):
                data, err = None, f"{type(data).__name__}: {data}"
            elif data is None:
                err = "object not returned by the store"
            yield from rows.add(relative_id(p, root), display_path(protocol, p), data, err)


def _cat_one(fs, path):
    try:
        return fs.cat_file(path)
    except Exception as err:  # recorded as a read_error row
        return err


def _read_tar(fs, shard, cfg, root, protocol, rows, only):
    tar_path = shard.paths[0]
    rel = relative_id(tar_path, root)
    image_exts = set(cfg.extensions)
    lifted = {f.name: f.type for f in rows.extra if f.name not in ("caption", "json")}
    skipped = 0
    current: dict = {}

    def emit(sample: dict) -> list[pa.Table]:
        nonlocal skipped
        if "image" not in sample:  # json/txt without an image: its members count as skipped
            skipped += sample["members"]
            return []
        image_id = f"{rel}/{sample['key']}"
        if only is not None and image_id not in only:
            return []
        meta = sample.get("json")
        extra = {"caption": sample.get("txt"), "json": meta}
        if lifted:
            parsed = _parse_json(meta)
            extra.update({c: coerce_json_value(parsed.get(c), t) for c, t in lifted.items()})
        return rows.add(image_id, f"{display_path(protocol, tar_path)}#{sample['member']}", sample["image"],
                        sample.get("error"), **extra)

    try:
        with fs.open(tar_path, "rb", block_size=8 << 20) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = tar_key(member.name)
                if current and key != current["key"]:
                    yield from emit(current)
                    current = {}
                if not current:
                    current = {"key": key, "members": 0}
                current["members"] += 1
                payload = tar.extractfile(member).read()
                if ext in image_exts and "image" not in current:
                    current["image"], current["member"] = payload, member.name
                elif ext == "json":
                    current["json"] = payload.decode("utf-8", "replace")
                elif ext in ("txt", "caption"):
                    current["txt"] = payload.decode("utf-8", "replace")
            if current:
                yield from emit(current)
    except (tarfile.TarError, EOFError, OSError) as err:
        # The shard is damaged past this point: record it as one failed row so the counts say so.
        yield from rows.add(f"{rel}/<unreadable>", display_path(protocol, tar_path), None,
                            f"tar shard unreadable: {type(err).__name__}: {err}", caption=None, json=None,
                            **{c: None for c in cfg.passthrough_columns})
    return skipped


def _parse_json(text: Optional[str]) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _read_parquet(fs, shard, cfg, root, protocol, rows, only):
    """img2dataset-style Parquet: one row per sample, the image bytes in input.image_column, the key in `key`.

    A row without image bytes (img2dataset keeps failed downloads with a null image) counts as skipped,
    like a tar sample without an image; an image column that is a struct with `bytes` (Hugging Face
    datasets) works too. Pass-through columns that this shard lacks are null. Returns the skipped count.
    """
    import pyarrow.parquet as pq

    path = shard.paths[0]
    rel = relative_id(path, root)
    shown = display_path(protocol, path)
    skipped = 0
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        if cfg.image_column not in names:  # this shard's rows all fail, with the reason; the others go on
            err = f"{shown} has no image column '{cfg.image_column}' (input.image_column); columns: {names}"
            for row in range(pf.metadata.num_rows):
                image_id = f"{rel}/{row:09d}"
                if only is None or image_id in only:
                    yield from rows.add(image_id, f"{shown}#{row:09d}", None, err,
                                        **{c: None for c in cfg.passthrough_columns})
            return 0
        key_col = "key" if "key" in names else None
        present = [c for c in cfg.passthrough_columns if c in names]
        cols = list(dict.fromkeys([cfg.image_column] + ([key_col] if key_col else []) + present))
        row = 0
        for batch in pf.iter_batches(batch_size=256, columns=cols):
            data = batch.to_pydict()
            for i, img in enumerate(data[cfg.image_column]):
                key = data[key_col][i] if key_col and data[key_col][i] is not None else f"{row:09d}"
                row += 1
                if isinstance(img, dict):
                    img = img.get("bytes")
                if img is None:
                    skipped += 1
                    continue
                image_id = f"{rel}/{key}"
                if only is not None and image_id not in only:
                    continue
                yield from rows.add(image_id, f"{shown}#{key}", img, None,
                                    **{c: data[c][i] if c in data else None for c in cfg.passthrough_columns})
    return skipped


class ShardDatasource(Datasource):
    """One read task per shard: fetch bytes in chunks, decode each chunk in the same CPU task, then SHARD_END."""

    def __init__(self, cfg: InputConfig, listing: Listing, shards: list[Shard], extra: list[pa.Field],
                 chunk: int, decode: Callable[[pa.Table], pa.Table], only: Optional[dict[int, frozenset]] = None):
        self.cfg, self.listing, self.shards, self.extra, self.chunk = cfg, listing, shards, extra, chunk
        self.decode, self.only = decode, only

    def estimate_inmemory_data_size(self) -> Optional[int]:
        return None

    def get_name(self) -> str:
        return "ReadShards"

    def get_read_tasks(self, parallelism: int, per_task_row_limit: Optional[int] = None, data_context=None) -> list[ReadTask]:
        cfg, root, protocol, extra, chunk = self.cfg, self.listing.root, self.listing.protocol, self.extra, self.chunk
        decode = self.decode
        tasks = []
        for shard in self.shards:
            only = self.only.get(shard.index) if self.only is not None else None

            def read_fn(shard=shard, only=only) -> Iterator[pa.Table]:
                for table in read_shard(shard, cfg, root, protocol, extra, chunk, only):
                    yield decode(table)

            rows = len(shard.paths) + 1 if shard.kind == "files" else None
            meta = BlockMetadata(num_rows=rows, size_bytes=None, exec_stats=None, input_files=shard.paths)
            tasks.append(ReadTask(read_fn, meta))
        return tasks
