"""inventory module: the input's file list read from an inventory instead of listing the bucket.

`input.inventory` names either an S3 Inventory report's `manifest.json` (its data files in CSV, Parquet or
ORC, the columns given by `fileSchema`), or any Parquet or CSV file (or folder of them) with the columns
bucket (optional), key, size, last-modified and ETag. Each data file is read as a stream of record batches
(`InventoryFile`, a callable a Ray task runs on its own), keeping only the keys under input.uri, so a night
at 100M photos reads a file list, partitioned like a listing, and no process ever holds all of it.
"""
from __future__ import annotations

import json
import posixpath
import urllib.parse
from dataclasses import dataclass
from typing import Iterator, Optional

import pyarrow as pa
import pyarrow.compute as pc

from resnet_batch.embed.input_listing import InputListing
from resnet_batch.errors import InputError
from resnet_batch.schema import ENTRY_SCHEMA
from resnet_batch.storage import display_path, filesystem, protocols

BATCH_ROWS = 64 * 1024  # inventory rows per page
# What an inventory's columns may be called (S3 Inventory's fileSchema names, their Parquet/ORC
# snake_case names, and the usual spellings of a hand-made list), normalised to ours.
_ALIASES = {
    "bucket": "bucket",
    "key": "key", "path": "key",
    "size": "size",
    "lastmodifieddate": "last_modified", "lastmodified": "last_modified", "last_modified_date": "last_modified",
    "last_modified": "last_modified", "mtime": "last_modified",
    "etag": "etag", "e_tag": "etag",
    "islatest": "is_latest", "is_latest": "is_latest",
    "isdeletemarker": "is_delete_marker", "is_delete_marker": "is_delete_marker",
}
REQUIRED = ("key", "size")


@dataclass(frozen=True)
class InventoryFile:
    """One data file of an inventory, read in pages of ENTRY_SCHEMA (paths relative to the input root).

    `columns` is the file's column order when the file has no header (S3 Inventory CSV), else empty.
    `encoded_keys`: S3 Inventory CSV writes keys URL-encoded."""

    uri: str
    storage_options: dict
    fmt: str  # csv | parquet | orc
    bucket: str  # the input's bucket ("" when the inventory has no bucket column or input is not on S3)
    prefix: str  # the input root's key prefix, with a trailing "/" (or "")
    columns: tuple[str, ...] = ()
    encoded_keys: bool = False

    def __call__(self) -> Iterator[pa.Table]:
        for batch in self._batches():
            page = self._entries(batch)
            if len(page):
                yield page

    def _batches(self) -> Iterator[pa.RecordBatch]:
        fs, path = filesystem(self.uri, dict(self.storage_options))
        if self.fmt == "parquet":
            import pyarrow.parquet as pq

            with fs.open(path, "rb") as f:
                yield from pq.ParquetFile(f).iter_batches(batch_size=BATCH_ROWS)
        elif self.fmt == "orc":
            import pyarrow.orc as orc

            with fs.open(path, "rb") as f:
                reader = orc.ORCFile(f)
                for i in range(reader.nstripes):
                    yield from reader.read_stripe(i).to_batches(BATCH_ROWS)
        else:
            import pyarrow.csv as pacsv

            names = list(self.columns)
            if not names:  # a header row: its names, so that every column can be read as text below
                with fs.open(path, "rb", compression="infer") as f:
                    header = pacsv.open_csv(f, read_options=pacsv.ReadOptions(block_size=1 << 20)).schema.names
            read = pacsv.ReadOptions(column_names=names or None, block_size=8 << 20)
            # every column as text: keys that look like numbers stay keys (and ETags keep leading zeros);
            # sizes and times are converted below
            convert = pacsv.ConvertOptions(column_types={c: pa.string() for c in (names or header)},
                                           strings_can_be_null=True)
            with fs.open(path, "rb", compression="infer") as f:
                reader = pacsv.open_csv(f, read_options=read, convert_options=convert)
                for batch in reader:
                    yield batch

    def _entries(self, batch: pa.RecordBatch) -> pa.Table:
        t = pa.Table.from_batches([batch])
        t = t.rename_columns([_ALIASES.get(_norm(c), _norm(c)) for c in t.column_names])
        missing = [c for c in REQUIRED if c not in t.column_names]
        if missing:
            raise InputError(f"inventory {self.uri}: no {', '.join(missing)} column (it has {t.column_names}); "
                             "an inventory needs key and size, and bucket, last-modified and ETag where known "
                             "(input.inventory)")
        keep = pc.invert(pc.is_null(t.column("key")))
        if self.bucket and "bucket" in t.column_names:
            keep = pc.and_(keep, pc.equal(t.column("bucket").cast(pa.string()), self.bucket))
        if "is_latest" in t.column_names:  # a versioned bucket: only the current version of each key
            keep = pc.and_(keep, pc.fill_null(_bool(t.column("is_latest")), True))
        if "is_delete_marker" in t.column_names:
            keep = pc.and_(keep, pc.invert(pc.fill_null(_bool(t.column("is_delete_marker")), False)))
        t = t.filter(keep)
        keys = t.column("key").cast(pa.string())
        if self.encoded_keys:
            keys = pa.array([urllib.parse.unquote_plus(k) for k in keys.to_pylist()], pa.string())
        under = pc.and_(pc.starts_with(keys, self.prefix), pc.invert(pc.ends_with(keys, "/"))) if self.prefix \
            else pc.invert(pc.ends_with(keys, "/"))
        t, keys = t.filter(under), keys.filter(under)
        rel = pc.utf8_slice_codeunits(keys, len(self.prefix)) if self.prefix else keys
        size = t.column("size")
        size = pc.cast(size if size.type != pa.string() else pc.if_else(pc.equal(size, ""), None, size), pa.int64())
        mtime = _mtime_ns(t.column("last_modified")) if "last_modified" in t.column_names else \
            pa.nulls(len(t), pa.int64())
        etag = (pc.replace_substring(t.column("etag").cast(pa.string()), '"', "").cast(pa.binary())
                if "etag" in t.column_names else pa.nulls(len(t), pa.binary()))
        return pa.table({"path": rel.cast(pa.binary()), "size": size, "mtime_ns": mtime, "etag": etag},
                        schema=ENTRY_SCHEMA)


def _norm(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def _bool(col) -> pa.ChunkedArray:
    return col if pa.types.is_boolean(col.type) else pc.equal(pc.utf8_lower(col.cast(pa.string())), "true")


def _mtime_ns(col) -> pa.Array:
    """Last-modified as ns since the epoch: a timestamp column, or ISO 8601 text (S3 Inventory CSV)."""
    if pa.types.is_timestamp(col.type):
        return pc.cast(pc.cast(col, pa.timestamp("ns", tz=col.type.tz)), pa.int64())
    if pa.types.is_integer(col.type):
        return pc.cast(col, pa.int64())
    text = col.cast(pa.string())
    text = pc.replace_substring_regex(text, r"(\.\d+)?Z$", "")
    ts = pc.strptime(text, format="%Y-%m-%dT%H:%M:%S", unit="s", error_is_null=True)
    return pc.multiply(pc.cast(ts, pa.int64()), 1_000_000_000)


# -- what an inventory is made of ------------------------------------------------------------------------


def inventory_files(inventory: str, storage_options: dict, input_uri: str) -> list[InventoryFile]:
    """The data files of an inventory (the S3 Inventory manifest's `files`, or the Parquet/CSV files named),
    each ready to be read on its own. Raises InputError naming input.inventory when it cannot be used."""
    fs, path = filesystem(inventory, dict(storage_options))
    proto = protocols(fs)[0]
    in_fs, in_root = filesystem(input_uri, dict(storage_options))
    bucket, prefix = "", ""
    if set(protocols(in_fs)) & {"s3", "s3a"}:
        bucket, _, key = in_root.partition("/")
        prefix = f"{key.rstrip('/')}/" if key else ""
    else:
        prefix = f"{in_root.rstrip('/')}/"  # a local or other input: the inventory's keys are full paths
    shown = display_path(proto, path)
    try:
        if path.endswith("manifest.json"):
            with fs.open(path, "rb") as f:
                manifest = json.loads(f.read())
            return _from_manifest(manifest, proto, storage_options, bucket, prefix, shown)
        if not fs.exists(path):
            raise FileNotFoundError(path)
        paths = sorted(p for p in fs.find(path) if _data_format(p)) if fs.isdir(path) else [path]
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(f"inventory not found: {shown} (input.inventory)") from None
    except (ValueError, KeyError) as err:
        raise InputError(f"inventory {shown} is not an S3 Inventory manifest ({type(err).__name__}: {err}) "
                         "(input.inventory)") from None
    if not paths:
        raise InputError(f"inventory {shown} holds no .parquet, .csv or .csv.gz file (input.inventory)")
    out = []
    for p in paths:
        fmt = _data_format(p)
        if fmt is None:
            raise InputError(f"inventory file {display_path(proto, p)}: not .parquet, .orc, .csv or .csv.gz "
                             "(input.inventory)")
        out.append(InventoryFile(display_path(proto, p), dict(storage_options), fmt, bucket, prefix))
    return out


def _data_format(path: str) -> Optional[str]:
    p = path.lower()
    if p.endswith(".parquet"):
        return "parquet"
    if p.endswith(".orc"):
        return "orc"
    if p.endswith((".csv", ".csv.gz")):
        return "csv"
    return None


def _from_manifest(manifest: dict, proto: str, options: dict, bucket: str, prefix: str,
                   shown: str) -> list[InventoryFile]:
    """An S3 Inventory manifest.json: its data files live in the destination bucket under `files[].key`."""
    fmt = str(manifest["fileFormat"]).lower()
    if fmt not in ("csv", "parquet", "orc"):
        raise InputError(f"inventory {shown}: fileFormat {manifest['fileFormat']!r} is not CSV, Parquet or ORC")
    dest = str(manifest["destinationBucket"]).rsplit(":", 1)[-1]  # arn:aws:s3:::bucket -> bucket
    columns = tuple(_ALIASES.get(_norm(c), _norm(c)) for c in str(manifest.get("fileSchema", "")).split(",")
                    if c.strip()) if fmt == "csv" else ()
    if fmt == "csv" and "key" not in columns:
        raise InputError(f"inventory {shown}: its fileSchema has no Key ({manifest.get('fileSchema')!r})")
    source = str(manifest.get("sourceBucket", ""))
    if bucket and source and source != bucket:
        raise InputError(f"inventory {shown} lists bucket {source!r}, not the input's bucket {bucket!r} "
                         "(input.inventory, input.uri)")
    return [InventoryFile(f"{proto}://{posixpath.join(dest, f['key'])}", dict(options), fmt, bucket, prefix, columns,
                          encoded_keys=fmt == "csv") for f in manifest["files"]]


def inventory_listing(inventory: str, storage_options: dict, input_uri: str) -> InputListing:
    """The inventory as a listing: its files' pages one after another (for a first run's streaming plan)."""
    files = inventory_files(inventory, storage_options, input_uri)
    fs, root = filesystem(input_uri, dict(storage_options))

    def pages() -> Iterator[pa.Table]:
        for f in files:
            yield from f()

    return InputListing(root.rstrip("/"), protocols(fs)[0], pages())


def rows_estimate(files: list[InventoryFile]) -> int:
    """About how many entries an inventory holds (Parquet/ORC footers; CSV: not known, 0)."""
    total = 0
    for f in files:
        if f.fmt not in ("parquet", "orc"):
            continue
        fs, path = filesystem(f.uri, dict(f.storage_options))
        with fs.open(path, "rb") as fh:
            if f.fmt == "parquet":
                import pyarrow.parquet as pq

                total += pq.ParquetFile(fh).metadata.num_rows
            else:
                import pyarrow.orc as orc

                total += orc.ORCFile(fh).nrows
    return total

