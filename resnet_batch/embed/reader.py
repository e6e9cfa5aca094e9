"""reader module: one shard (image files, a WebDataset tar, a Parquet file) -> decoded chunks, in a read task.

`read_shard` fetches the shard's images (listed paths are opened one by one, never globbed), decodes them
in small groups as they arrive, and yields chunks of at most `chunk_images` rows (a folder shard is one
chunk) carrying the in-flight columns of `schema.IN_FLIGHT_COLUMNS`. Whatever is wrong with one image or
one file becomes a row with a reason; a store that stays unreachable for the whole retry window makes the
shard yield one `_failure` row instead, so the driver retries it and, in the end, names it.
"""
from __future__ import annotations

import asyncio
import json
import tarfile
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import pyarrow as pa
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from resnet_batch.embed.listing import Shard, relative_id, storable, tar_key
from resnet_batch.retry import TransientExhausted, is_transient, retrying
from resnet_batch.schema import (CONTROL_END, CONTROL_FAILURE, OUTPUT_SCHEMA, PASSTHROUGH_PREFIX, STATUS_OK,
                                 STATUS_READ_ERROR)
from resnet_batch.storage import display_path, filesystem

WDS_FIELDS = (pa.field("caption", pa.string()), pa.field("json", pa.string()))  # always, for webdataset input
JSON_PEEK_SAMPLES = 64
META_MAX_BYTES = 1 << 20  # a sample's .json / .txt larger than this is not read
CHUNK_BYTES = 192 << 20  # in-flight bytes per chunk (gpu_decode carries encoded images)
PARQUET_BATCH = 16  # Parquet rows decoded at a time at most ...
PARQUET_BATCH_BYTES = 16 << 20  # ... and fewer when a row group's values are large (bounded buffers)
# pyarrow decodes a row group's image column as a whole: larger row groups are refused (their rows fail, saying
# how to rewrite the file). img2dataset writes 100 samples per row group, Hugging Face a few hundred MB at most.
ROW_GROUP_MAX_BYTES = 96 << 20
GROUP_BYTES = 8 << 20  # encoded bytes a read task holds before decoding them (a few copies exist meanwhile)
_READ_FIELDS = (pa.field("image_id", pa.string()), pa.field("path", pa.string()), pa.field("bytes", pa.binary()),
                pa.field("status", pa.string()), pa.field("error", pa.string()))


@dataclass(frozen=True)
class ReadSettings:
    """Everything a read task needs, in one frozen object (handed to every task by the driver)."""

    root: str
    protocol: str
    uri: str
    storage_options: dict
    extensions: tuple[str, ...]
    image_column: str
    passthrough: tuple[pa.Field, ...]  # output columns after the base ones (webdataset: caption, json, ...)
    max_bytes: int
    chunk_images: int
    fetch_batch: int
    retry_window_s: float
    decode: Callable[[pa.Table], pa.Table]  # decode.decode_table or gpu_decode.probe_table, bound to the spec
    chunk_bytes: int = CHUNK_BYTES

    def fs(self):
        return filesystem(self.uri, dict(self.storage_options))[0]

    def shown(self, path: str) -> str:
        return display_path(self.protocol, storable(path))


def in_flight_schema(passthrough: tuple[pa.Field, ...]) -> pa.Schema:
    """The rows a read task builds before decoding: base columns, then the pass-through ones (prefixed)."""
    return pa.schema(list(_READ_FIELDS) + [pa.field(PASSTHROUGH_PREFIX + f.name, f.type) for f in passthrough])


class ChunkBuilder:
    """Collects a shard's rows, decodes them in groups of `fetch_batch`, and cuts chunks.

    Ids are made unique within the shard (a repeated tar key or Parquet key gets `#2`, `#3`, ...), in
    reading order, so the same file always gives the same ids. With `shard.only` (--retry-failed: image_id ->
    the chunk whose part holds it) only those rows are kept, each in the chunk of its part, marked `_merge`.
    """

    def __init__(self, shard: Shard, s: ReadSettings, chunked: bool):
        self.shard, self.s, self.chunked = shard, s, chunked
        self.schema = in_flight_schema(s.passthrough)
        self.rows: list[dict] = []
        self.group_bytes = 0
        self.decoded: list[pa.Table] = []
        self.chunk_rows = 0
        self.chunk_bytes = 0
        self.chunk = 0
        self.ids: set[str] = set()
        self.merge: dict[int, list[dict]] = {}  # --retry-failed: target chunk -> rows

    def unique(self, image_id: str) -> str:
        candidate, n = image_id, 1
        while candidate in self.ids:
            n += 1
            candidate = f"{image_id}#{n}"
        self.ids.add(candidate)
        return candidate

    def add(self, image_id: str, path: str, data: Optional[bytes], error: Optional[str] = None,
            extra: Optional[dict] = None) -> Iterator[pa.Table]:
        """Add one image row; yields a chunk when this row completes one."""
        image_id = self.unique(image_id)
        row = {"image_id": image_id, "path": path, "bytes": data or b"",
               "status": STATUS_OK if error is None else STATUS_READ_ERROR, "error": error}
        for f in self.s.passthrough:
            row[PASSTHROUGH_PREFIX + f.name] = (extra or {}).get(f.name)
        if self.shard.only is not None:
            if image_id in self.shard.only:
                self.merge.setdefault(self.shard.only[image_id], []).append(row)
            return
        self.rows.append(row)
        self.group_bytes += len(data or b"")
        if len(self.rows) >= self.s.fetch_batch or self.group_bytes >= GROUP_BYTES:
            self._decode_group()
        if self.chunked and (self.chunk_rows >= self.s.chunk_images or self.chunk_bytes >= self.s.chunk_bytes):
            yield self._emit(self.chunk if self.chunked else -1)

    def _decode_group(self) -> None:
        if not self.rows:
            return
        table = self.s.decode(pa.Table.from_pylist(self.rows, schema=self.schema))
        self.decoded.append(table)
        self.chunk_rows += len(table)
        self.chunk_bytes += table.nbytes
        self.rows, self.group_bytes = [], 0

    def _control(self, status: str, error: Optional[str] = None) -> None:
        """A row that is not an image (CONTROL_END, CONTROL_FAILURE); decoding passes it through untouched."""
        self.rows.append({"image_id": "", "path": "", "bytes": b"", "status": status, "error": error})

    def _emit(self, chunk: int, chunks: int = -1, groups: int = -1, skipped: int = 0) -> pa.Table:
        self._decode_group()
        table = pa.concat_tables(self.decoded)
        n = len(table)
        columns = {"_shard": (self.shard.index, pa.int64()), "_chunk": (chunk, pa.int32()), "_rows": (n, pa.int32()),
                   "_chunks": (chunks, pa.int32()), "_groups": (groups, pa.int32()),
                   "_skipped": (skipped, pa.int32()), "_merge": (self.shard.only is not None, pa.bool_())}
        for name, (value, type_) in columns.items():
            table = table.append_column(name, pa.array([value] * n, type_))
        self.decoded, self.chunk_rows, self.chunk_bytes = [], 0, 0
        self.chunk += 1
        return table

    def finish(self, skipped: int = 0) -> Iterator[pa.Table]:
        """The shard's last chunk(s): the remaining rows and a CONTROL_END row, which carries how many chunks
        the shard has and how many of its members were not images (so even an empty tar reports itself)."""
        if self.shard.only is None:
            self._control(CONTROL_END)
            chunks = self.chunk + 1 if self.chunked else 1
            yield self._emit(self.chunk if self.chunked else -1, chunks, chunks, skipped)
            return
        targets = sorted(self.merge) or [-1]
        for i, target in enumerate(targets):
            self.rows = self.merge.get(target, [])
            if i == len(targets) - 1:
                self._control(CONTROL_END)
            yield self._emit(target, -1, len(targets), skipped)

    def failure(self, reason: str) -> pa.Table:
        """The one-row block that says the whole shard failed this time (the driver retries it)."""
        self.rows, self.decoded = [], []
        self._control(CONTROL_FAILURE, reason)
        return self._emit(-1)


def read_shard(shard: Shard, s: ReadSettings) -> Iterator[pa.Table]:
    """The shard's decoded chunks; a failure of the whole shard becomes one `_failure` block, never an exception.

    Tar and Parquet files are read as a stream; a transient error in the middle starts the file again
    (within the retry window) and skips the chunks already handed on.
    """
    done = 0
    start = time.monotonic()
    while True:
        try:
            for i, chunk in enumerate(_chunks(shard, s)):
                if i >= done:
                    done += 1
                    yield chunk
            return
        except Exception as err:
            if is_transient(err) and time.monotonic() - start < s.retry_window_s:
                time.sleep(min(20.0, 1.0 + time.monotonic() - start))
                continue
            yield ChunkBuilder(shard, s, chunked=False).failure(_reason(err))
            return


def _reason(err: BaseException) -> str:
    if isinstance(err, TransientExhausted):
        return str(err)
    kind = "transient" if is_transient(err) else "unexpected"
    return f"{kind} {type(err).__name__}: {err}"


def _chunks(shard: Shard, s: ReadSettings) -> Iterator[pa.Table]:
    fs = s.fs()
    if shard.kind == "files":
        yield from _read_files(fs, shard, s)
    elif shard.kind == "webdataset":
        yield from _read_tar(fs, shard, s)
    elif shard.kind == "parquet":
        yield from _read_parquet(fs, shard, s)
    else:
        raise ValueError(f"unknown shard kind {shard.kind}")


# -- folders ---------------------------------------------------------------------------------------


def fetch(fs, paths: list[str], window_s: float) -> list:
    """The bytes of each path, or the permanent exception it raised; transient errors are retried for the
    window (then TransientExhausted propagates: the shard is retried as a whole). Never globs a path."""
    if getattr(fs, "async_impl", False):
        from fsspec.asyn import sync

        return sync(fs.loop, _fetch_async, fs, paths, window_s)
    return [_fetch_one(lambda p=p: _read_local(fs, p), p, window_s) for p in paths]


def _read_local(fs, path: str) -> bytes:
    with fs.open(path, "rb") as f:
        return f.read()


def _fetch_one(fn, path: str, window_s: float):
    try:
        return retrying(fn, window_s, f"reading {storable(path)}")
    except TransientExhausted:
        raise
    except Exception as err:  # permanent: a read_error row
        return err


async def _fetch_async(fs, paths: list[str], window_s: float) -> list:
    loop = asyncio.get_running_loop()

    async def one(path: str):
        start, attempt = loop.time(), 0
        while True:
            try:
                return await fs._cat_file(path)
            except Exception as err:
                attempt += 1
                waited = loop.time() - start
                if not is_transient(err):
                    return err
                if waited >= window_s:
                    raise TransientExhausted(f"reading {storable(path)}: {type(err).__name__}: {err} (transient; "
                                             f"{attempt} tries over {waited:.0f}s)") from err
                await asyncio.sleep(min(20.0, 0.5 * 2 ** min(attempt, 6)) * (0.5 + 0.5 * (hash(path) % 2)))

    return await asyncio.gather(*(one(p) for p in paths))


def _read_files(fs, shard: Shard, s: ReadSettings) -> Iterator[pa.Table]:
    rows = ChunkBuilder(shard, s, chunked=False)
    sizes = shard.sizes or (-1,) * len(shard.paths)
    todo = [(p, size) for p, size in zip(shard.paths, sizes)
            if shard.only is None or relative_id(p, s.root) in shard.only]  # folder ids never repeat
    for i in range(0, len(todo), s.fetch_batch):
        group = todo[i:i + s.fetch_batch]
        wanted = [p for p, size in group if size <= s.max_bytes]
        got = dict(zip(wanted, fetch(fs, wanted, s.retry_window_s)))
        for path, size in group:
            data, err = got.get(path), None
            if size > s.max_bytes:
                data, err = None, f"file is {size} bytes, over input.max_bytes ({s.max_bytes}); not read"
            elif isinstance(data, BaseException):
                data, err = None, f"{type(data).__name__}: {data}"
            elif len(data) > s.max_bytes:
                data, err = None, f"file is {len(data)} bytes, over input.max_bytes ({s.max_bytes})"
            yield from rows.add(relative_id(path, s.root), s.shown(path), data, err)
    yield from rows.finish()


# -- WebDataset tars -------------------------------------------------------------------------------


def _read_tar(fs, shard: Shard, s: ReadSettings) -> Iterator[pa.Table]:
    """Samples are consecutive members sharing a key (dir/KEY.ext). Only what is used is read: images up to
    input.max_bytes, .json/.txt up to 1 MiB; every other member is skipped by seeking past it (counted)."""
    tar_path = shard.paths[0]
    rel = relative_id(tar_path, s.root)
    shown = s.shown(tar_path)
    image_exts = set(s.extensions)
    lifted = {f.name: f.type for f in s.passthrough if f.name not in ("caption", "json")}
    rows = ChunkBuilder(shard, s, chunked=True)
    skipped = 0
    sample: dict = {}

    def emit(smp: dict) -> Iterator[pa.Table]:
        nonlocal skipped
        if not smp.get("images"):  # json/txt without an image: its members count as skipped
            skipped += smp["members"]
            return
        meta = smp.get("json")
        extra = {"caption": smp.get("txt"), "json": meta}
        if lifted:
            parsed = parse_json(meta)
            extra.update({c: coerce_json_value(parsed.get(c), t) for c, t in lifted.items()})
        for n, (member, ext, data, err) in enumerate(smp["images"]):
            image_id = f"{rel}/{storable(smp['key'])}" + ("" if n == 0 else f".{storable(ext)}")
            yield from rows.add(image_id, f"{shown}#{storable(member)}", data, err, extra)

    try:
        with fs.open(tar_path, "rb", block_size=8 << 20) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = tar_key(member.name)
                if sample and key != sample["key"]:
                    yield from emit(sample)
                    sample = {}
                if not sample:
                    sample = {"key": key, "members": 0, "images": []}
                sample["members"] += 1
                if ext in image_exts:
                    if member.size > s.max_bytes:
                        sample["images"].append((member.name, ext, None, f"tar member is {member.size} bytes, over "
                                                                         f"input.max_bytes ({s.max_bytes}); not read"))
                    else:
                        sample["images"].append((member.name, ext, tar.extractfile(member).read(), None))
                elif ext in ("json", "txt", "caption") and member.size <= META_MAX_BYTES:
                    text = tar.extractfile(member).read().decode("utf-8", "replace")
                    sample["json" if ext == "json" else "txt"] = text
                else:
                    skipped += 1
                    sample["members"] -= 1
            if sample:
                yield from emit(sample)
    except (tarfile.TarError, EOFError, OSError, ValueError) as err:
        if isinstance(err, OSError) and is_transient(err):
            raise
        # The shard is damaged past this point: one failed row says so, and the counts show it.
        yield from rows.add(f"{rel}/<unreadable>", shown, None, f"tar shard unreadable: {type(err).__name__}: {err}")
    yield from rows.finish(skipped)


def parse_json(text: Optional[str]) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


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
        return value if isinstance(value, int) and -2 ** 63 <= value < 2 ** 63 else None
    if pa.types.is_floating(type_):
        return float(value) if isinstance(value, (int, float)) else None
    return None


# -- Parquet -----------------------------------------------------------------------------------


def _read_parquet(fs, shard: Shard, s: ReadSettings) -> Iterator[pa.Table]:
    """img2dataset-style Parquet: one row per sample, the image bytes in input.image_column (binary, or a
    struct with `bytes` as Hugging Face datasets store it), the key in `key`. Read with bounded buffers,
    PARQUET_BATCH rows at a time. A row without image bytes counts as skipped; a file that cannot be
    opened is one read_error row; a wrong image column makes every row a read_error with the reason."""
    import pyarrow.parquet as pq

    path = shard.paths[0]
    rel = relative_id(path, s.root)
    shown = s.shown(path)
    rows = ChunkBuilder(shard, s, chunked=True)
    try:
        f = fs.open(path, "rb", block_size=8 << 20)
        pf = pq.ParquetFile(f, pre_buffer=False, buffer_size=1 << 20)
    except Exception as err:
        if is_transient(err):
            raise
        yield from rows.add(rel, shown, None, f"parquet shard unreadable: {type(err).__name__}: {err}")
        yield from rows.finish()
        return
    with f:
        schema = pf.schema_arrow
        problem = _image_column_problem(schema, s.image_column, shown)
        image_type = schema.field(s.image_column).type if not problem else None
        if image_type is not None and (pa.types.is_binary(image_type) or pa.types.is_dictionary(image_type)):
            # Kept as a dictionary when the file has one: one large value repeated on every row (a bomb) is
            # then never materialised row by row beyond what the batch takes.
            pf = pq.ParquetFile(f, pre_buffer=False, buffer_size=1 << 20, read_dictionary=[s.image_column])
        key_col = "key" if "key" in schema.names else None
        present = [p for p in s.passthrough if p.name in schema.names]
        if problem:
            cols = [key_col] if key_col else []
        else:
            cols = [s.image_column] + ([key_col] if key_col else [])
        cols = list(dict.fromkeys(cols + [p.name for p in present]))
        skipped, row = 0, 0
        try:
            for rg in range(pf.num_row_groups):
                too_big, per_row = _row_group_size(pf, rg, s) if not problem else (None, 0)
                group_cols = [c for c in cols if c != s.image_column] if too_big else cols
                if not group_cols:  # nothing to read in this group: its rows fail by number
                    batches = [pa.RecordBatch.from_pydict({"_": [None] * pf.metadata.row_group(rg).num_rows})]
                else:
                    size = max(1, min(PARQUET_BATCH, PARQUET_BATCH_BYTES // max(per_row, 1)))
                    batches = pf.iter_batches(batch_size=size, row_groups=[rg], columns=group_cols)
                for batch in batches:
                    images = batch.column(s.image_column) if s.image_column in batch.schema.names else None
                    data = batch.drop_columns([s.image_column]).to_pydict() if images is not None \
                        else batch.to_pydict()
                    for i in range(batch.num_rows):
                        key = data[key_col][i] if key_col and key_col in data else None
                        key = storable(key.decode("utf-8", "surrogateescape")) if isinstance(key, bytes) \
                            else (str(key) if key is not None else f"{row:09d}")
                        row += 1
                        extra = {p.name: _cast(data[p.name][i], p.type) for p in present if p.name in data}
                        image_id = f"{rel}/{key}"
                        if problem or too_big:
                            yield from rows.add(image_id, f"{shown}#{key}", None, problem or too_big, extra)
                            continue
                        img = images[i].as_py()  # one value at a time (a dictionary's too)
                        if isinstance(img, dict):
                            img = img.get("bytes")
                        if img is None:
                            skipped += 1
                            continue
                        err = None
                        if isinstance(img, str):
                            img = img.encode("latin-1", "replace")
                        if len(img) > s.max_bytes:
                            img, err = None, f"value is {len(img)} bytes, over input.max_bytes ({s.max_bytes})"
                        yield from rows.add(image_id, f"{shown}#{key}", img, err, extra)
        except Exception as err:
            if is_transient(err):
                raise
            yield from rows.add(f"{rel}/<unreadable>", shown, None,
                                f"parquet shard unreadable after row {row}: {type(err).__name__}: {err}")
        yield from rows.finish(skipped)


def _image_column_problem(schema: pa.Schema, column: str, shown: str) -> Optional[str]:
    """Why this file's image column cannot be read as image bytes (None when it can)."""
    if column not in schema.names:
        return f"{shown} has no image column '{column}' (input.image_column); columns: {schema.names}"
    t = schema.field(column).type
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
        t = t.field("bytes").type
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return None
    return f"{shown}: image column '{column}' holds {t}, not image bytes (input.image_column)"


def _row_group_size(pf, rg: int, s: ReadSettings) -> tuple[Optional[str], int]:
    """(why the row group is refused unread, or None; its image bytes per row). A row group whose image
    values average more than input.max_bytes is refused (its rows fail); others are read in batches sized
    to their values."""
    meta = pf.metadata.row_group(rg)
    idx = [i for i in range(meta.num_columns) if meta.column(i).path_in_schema.split(".")[0] == s.image_column]
    size = sum(meta.column(i).total_uncompressed_size for i in idx)
    per_row = size // max(meta.num_rows, 1)
    if meta.num_rows and per_row > s.max_bytes:
        return (f"row group {rg} holds {size} bytes of images in {meta.num_rows} rows, over input.max_bytes "
                f"({s.max_bytes}) each; not read"), per_row
    if size > max(ROW_GROUP_MAX_BYTES, s.max_bytes):
        return (f"row group {rg} holds {size} bytes of images, more than a read task buffers "
                f"({max(ROW_GROUP_MAX_BYTES, s.max_bytes)}); not read: rewrite the file with smaller row groups "
                "(e.g. pyarrow row_group_size=100)"), per_row
    return None, per_row


def _cast(value, type_: pa.DataType):
    """A pass-through value as the column's type (from the first file); a value that does not fit is null."""
    if value is None:
        return None
    try:
        return pa.scalar(value, type_).as_py()
    except (pa.ArrowException, ValueError, TypeError, OverflowError):
        return None


# -- the output columns a format adds --------------------------------------------------------------


def passthrough_fields(fmt: str, fs, first: str, names: tuple[str, ...], extensions: tuple[str, ...],
                       image_column: str, shown: str) -> list[pa.Field]:
    """The pass-through output columns, from the first readable shard file: webdataset's caption/json plus
    lifted json fields (types from its first samples), Parquet's own column types.

    Raises InputError for a setting that file shows to be wrong (no such image column or pass-through
    column: a typo, refused before any work), other errors when the file cannot be read (the caller tries
    the next one)."""
    from resnet_batch.errors import InputError

    if fmt == "webdataset":
        types, seen, n = json_field_types(fs, first, names, extensions)
        missing = [c for c in names if c not in seen]
        if missing:
            raise InputError(f"input.passthrough_columns {missing} not found in the json of the first {n} samples "
                             f"of {shown}; fields seen: {sorted(seen)}")
        return list(WDS_FIELDS) + [pa.field(c, types[c]) for c in names]
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with fs.open(first, "rb") as f:
            schema = pq.ParquetFile(f).schema_arrow
        if image_column not in schema.names:
            raise InputError(f"{shown} has no image column '{image_column}' (input.image_column); "
                             f"columns: {schema.names}")
        missing = [c for c in names if c not in schema.names]
        if missing:
            raise InputError(f"input.passthrough_columns {missing} not in {shown}; columns: {schema.names}")
        return [schema.field(c) for c in names]
    return []


def json_field_types(fs, tar_path: str, names: tuple[str, ...], extensions: tuple[str, ...],
                     samples: int = JSON_PEEK_SAMPLES) -> tuple[dict[str, pa.DataType], set[str], int]:
    """Arrow types for json fields, from the first `samples` samples of one tar (read as a stream, stopping
    early); also every field name seen and how many samples were looked at.

    bool -> bool, int -> int64, float (or int and float) -> float64, str -> string; lists, objects, mixed
    or always-null fields -> string (JSON text).
    """
    seen: dict[str, set] = {n: set() for n in names}
    fields: set[str] = set()
    n = 0
    with fs.open(tar_path, "rb", block_size=1 << 20) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            if not member.isfile() or tar_key(member.name)[1] != "json" or member.size > META_MAX_BYTES:
                continue
            meta = parse_json(tar.extractfile(member).read().decode("utf-8", "replace"))
            fields.update(meta)
            for name in names:
                if meta.get(name) is not None:
                    seen[name].add(type(meta[name]))
            n += 1
            if n >= samples or not names:
                break
    return {name: _arrow_type(kinds) for name, kinds in seen.items()}, fields, n


def _arrow_type(kinds: set) -> pa.DataType:
    if kinds == {bool}:
        return pa.bool_()
    if kinds == {int}:
        return pa.int64()
    if kinds and kinds <= {int, float}:
        return pa.float64()
    return pa.string()


def check_passthrough_names(names: tuple[str, ...], fmt: str) -> None:
    """Pass-through names must not shadow output columns (refused before any work)."""
    from resnet_batch.errors import InputError

    taken = [c for c in names if c in OUTPUT_SCHEMA.names]
    if taken:
        raise InputError(f"input.passthrough_columns {taken} clash with output columns of the same name "
                         f"{list(OUTPUT_SCHEMA.names)}")
    if fmt == "webdataset" and (clash := [c for c in names if c in ("caption", "json")]):
        raise InputError(f"input.passthrough_columns: {clash} are always output columns for webdataset input")
    if fmt == "folder" and names:
        raise InputError("input.passthrough_columns applies to webdataset and parquet input only")


# -- Ray Data ----------------------------------------------------------------------------------------


class ShardDatasource(Datasource):
    """One read task per shard (a window of the plan): fetch, decode, yield the shard's chunks."""

    def __init__(self, shards: list[Shard], settings: ReadSettings):
        self.shards, self.settings = shards, settings

    def estimate_inmemory_data_size(self) -> Optional[int]:
        return None

    def get_name(self) -> str:
        return "ReadShards"

    def get_read_tasks(self, parallelism: int, per_task_row_limit: Optional[int] = None,
                       data_context=None) -> list[ReadTask]:
        s = self.settings
        tasks = []
        for shard in self.shards:
            meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=None)
            tasks.append(ReadTask(lambda shard=shard: read_shard(shard, s), meta))
        return tasks

