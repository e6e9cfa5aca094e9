"""listing module: the input root listed as a stream of entry pages, its format, and shards cut as entries arrive.

Nothing here holds the whole listing: `list_entries` yields pages of (path, size, mtime_ns, etag) as the
store returns them (S3 prefixes are walked concurrently, one delimiter level at a time), and `ShardCutter`
turns them into shards as they come, so a run over 100M objects starts embedding after the first page.
Paths are relative to the input root and kept as bytes, so that names that are not valid UTF-8 survive.
"""
from __future__ import annotations

import asyncio
import os
import posixpath
import queue
import random
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional

import pyarrow as pa

from resnet_batch.config import InputConfig
from resnet_batch.embed.input_listing import InputListing  # noqa: F401 (the plan's type)
from resnet_batch.embed.inventory import inventory_listing
from resnet_batch.errors import InputError  # noqa: F401 (re-exported)
from resnet_batch.retry import is_transient, retrying
from resnet_batch.schema import ENTRY_SCHEMA  # noqa: F401 (the listing's pages)
from resnet_batch.storage import S3_PROTOCOLS, endpoint_of, explain, filesystem, is_s3, protocols

PAGE = 1000  # entries per page from the local and generic walkers (S3 pages are the store's own)
S3_CONCURRENCY = 32  # prefixes listed at once
DETECT_ENTRIES = 1000  # input.format=auto decides after this many entries (or at the end)
SKIPPED_EXAMPLES = 1000



@dataclass(frozen=True)
class InputFormat:
    """Everything format-specific in one record: what a shard is, which files it takes, which keys shape it."""

    name: str
    shard_kind: str
    layout_keys: tuple[str, ...]  # input settings a resume or sync must keep

    def wanted(self, cfg: InputConfig) -> set[str]:
        return set(cfg.extensions) if self.name == "folder" else {"tar" if self.name == "webdataset" else "parquet"}


FORMATS = {
    "folder": InputFormat("folder", "files", ("format", "extensions", "images_per_shard", "limit")),
    "webdataset": InputFormat("webdataset", "webdataset", ("format", "extensions", "passthrough_columns",
                                                           "images_per_shard")),
    "parquet": InputFormat("parquet", "parquet", ("format", "image_column", "passthrough_columns",
                                                  "images_per_shard")),
}


@dataclass(frozen=True)
class Shard:
    """One unit of work: a group of image files, or one WebDataset tar / Parquet file (written as one or more
    parts of at most images_per_shard images). `only` (--retry-failed) restricts it to these image_ids, each
    mapped to the chunk whose part holds it."""

    index: int
    kind: str  # "files" | "webdataset" | "parquet"
    paths: tuple[str, ...]  # full filesystem paths (no protocol)
    sizes: tuple[int, ...] = ()  # bytes of each path, from the listing (-1: unknown)
    only: Optional[dict] = None


def storable(name: str) -> str:
    """A file name as text that Arrow and JSON can hold: bytes that are not UTF-8 (kept by Python as
    surrogates) become \\xNN escapes. Valid names are unchanged."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def raw(name: str) -> bytes:
    """The bytes of a file name (the inverse of how Python decoded it)."""
    return name.encode("utf-8", "surrogateescape")


def from_raw(data: bytes) -> str:
    """A file name for the filesystem APIs from its bytes."""
    return data.decode("utf-8", "surrogateescape")


def relative_id(path: str, root: str) -> str:
    """The stable image_id part for a path: relative to the input root, POSIX separators, storable text."""
    return storable(posixpath.relpath(path, root) if path != root else posixpath.basename(path))


def extension(path: str) -> str:
    """The lower-case extension; gzipped tars (`.tar.gz`, `.tgz`) count as `tar`."""
    base = posixpath.basename(path).lower()
    if base.endswith((".tar.gz", ".tgz")):
        return "tar"
    return base.rsplit(".", 1)[-1] if "." in base else ""


def tar_key(name: str) -> tuple[str, str]:
    """WebDataset member naming: dir/KEY.ext, the first dot of the basename splits key and extension."""
    d, base = posixpath.split(name)
    key, _, ext = base.partition(".")
    return posixpath.join(d, key), ext.lower()


def detect_format(paths: Iterable[str], extensions: tuple[str, ...]) -> str:
    """auto: tars mean WebDataset, .parquet files mean Parquet shards, else a folder of images."""
    exts = {extension(p) for p in paths}
    if "tar" in exts:
        return "webdataset"
    if "parquet" in exts and not exts & set(extensions):
        return "parquet"
    return "folder"


def hidden(rel: str) -> bool:
    """Dot-files and anything in a dot-folder (.DS_Store, ._IMG_0001.jpg, .git/) are not input."""
    return any(part.startswith(".") for part in rel.split("/"))


# -- listing ------------------------------------------------------------------------------------


def list_entries(cfg: InputConfig, retry_window_s: float = 300.0) -> InputListing:
    """Start listing the input root: pages of entries as the store returns them (not sorted across folders).

    A root that is one file lists as that file (the root becomes its folder). Raises InputError when the
    root cannot be listed at all; a transient failure later in the walk is retried for `retry_window_s`.
    """
    if cfg.inventory:  # a file list instead of a listing (see inventory.py)
        return inventory_listing(cfg.inventory, dict(cfg.storage_options), cfg.uri)
    fs, root = filesystem(cfg.uri, dict(cfg.storage_options))
    protocol = protocols(fs)[0]
    try:
        if fs.isfile(root):
            info = fs.info(root)
            folder = posixpath.dirname(root)
            page = _page([(posixpath.basename(root), info)])
            return InputListing(folder, protocol, iter([page]))
        if not fs.isdir(root) and not is_s3(cfg.uri):
            raise InputError(f"input not found: {cfg.uri} (input.uri)")
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(f"input not found: {cfg.uri} (input.uri)") from None
    except Exception as err:  # access denied, unreachable endpoint, ...: say so, without a traceback
        raise InputError(explain(err, cfg.uri, "input", endpoint_of(fs) if is_s3(cfg.uri) else "")) from None
    if "file" in protocols(fs):
        pages = _local_pages(root)
    elif set(protocols(fs)) & set(S3_PROTOCOLS):
        return InputListing(root, protocol, _s3_pages(fs, root, retry_window_s), prefix_uri=cfg.uri)
    else:
        pages = _walk_pages(fs, root, retry_window_s)
    return InputListing(root, protocol, pages)


def _page(items: list[tuple[str, dict]]) -> pa.Table:
    """A page from (relative path, fsspec-style info) pairs."""
    etags = [i.get("ETag") or i.get("etag") for _, i in items]
    mtimes = [i.get("mtime_ns") for _, i in items]
    return pa.table({
        "path": [raw(rel) for rel, _ in items],
        "size": [i.get("size") for _, i in items],
        "mtime_ns": mtimes,
        "etag": [e.strip('"').encode() if isinstance(e, str) else e for e in etags],
    }, schema=ENTRY_SCHEMA)


def _local_pages(root: str) -> Iterator[pa.Table]:
    """Depth-first with sorted entries per folder (a stable order), one stat per file from scandir."""
    batch: list[tuple[str, dict]] = []
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        try:
            with os.scandir(os.path.join(root, rel_dir) if rel_dir else root) as it:
                entries = sorted(it, key=lambda e: e.name)
        except (PermissionError, FileNotFoundError, NotADirectoryError):
            continue  # a folder that vanished or cannot be read: its files are simply not input
        subdirs = []
        for e in entries:
            rel = f"{rel_dir}/{e.name}" if rel_dir else e.name
            try:
                if e.is_dir(follow_symlinks=False):
                    subdirs.append(rel)
                elif e.is_file():
                    st = e.stat()
                    batch.append((rel, {"size": st.st_size, "mtime_ns": st.st_mtime_ns}))
            except OSError:
                continue
            if len(batch) >= PAGE:
                yield _page(batch)
                batch = []
        stack.extend(reversed(subdirs))
    if batch:
        yield _page(batch)


def _walk_pages(fs, root: str, window_s: float) -> Iterator[pa.Table]:
    """Any other fsspec filesystem: one page per folder of fs.walk (detail=True gives size and version)."""
    for folder, _, files in retrying(lambda: list(fs.walk(root, detail=True)), window_s, f"listing {root}"):
        items = []
        for name, info in sorted(files.items()):
            rel = posixpath.relpath(posixpath.join(folder, name), root)
            mtime = info.get("mtime") or info.get("LastModified")
            items.append((rel, {"size": info.get("size"), "ETag": info.get("ETag"),
                                "mtime_ns": int(mtime * 1e9) if isinstance(mtime, (int, float)) else None}))
        if items:
            yield _page(items)


def _s3_pages(fs, root: str, window_s: float) -> Iterator[pa.Table]:
    """ListObjectsV2 pages, one delimiter level at a time: the sub-prefixes of every level are listed
    concurrently (S3_CONCURRENCY at once), and each page is handed over as soon as it arrives."""
    bucket, key, _ = fs.split_path(root)
    prefix = f"{key.rstrip('/')}/" if key else ""
    out: queue.Queue = queue.Queue(maxsize=64)
    done = object()
    stop = threading.Event()

    async def page(kwargs: dict) -> dict:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + window_s
        attempt = 0
        while True:
            try:
                return await fs._call_s3("list_objects_v2", **kwargs)
            except Exception as err:
                attempt += 1
                if not is_transient(err) or loop.time() >= deadline:
                    raise
                await asyncio.sleep(random.uniform(0, min(20.0, 0.5 * 2 ** attempt)))

    async def put(item) -> None:
        while not stop.is_set():
            try:
                out.put_nowait(item)
                return
            except queue.Full:
                await asyncio.sleep(0.05)

    async def walk(p: str, limit: asyncio.Semaphore) -> None:
        kwargs = dict(Bucket=bucket, Prefix=p, Delimiter="/", **fs.req_kw)
        subs: list[str] = []
        while not stop.is_set():
            async with limit:
                resp = await page(kwargs)
            items = [(c["Key"][len(prefix):], {"size": c.get("Size"), "ETag": c.get("ETag")})
                     for c in resp.get("Contents", ()) if not c["Key"].endswith("/")]
            if items:
                await put(_page(items))
            subs.extend(c["Prefix"] for c in resp.get("CommonPrefixes", ()))
            if not resp.get("IsTruncated"):
                break
            kwargs["ContinuationToken"] = resp["NextContinuationToken"]
        await asyncio.gather(*(walk(s, limit) for s in subs))

    async def main() -> None:
        try:
            await walk(prefix, asyncio.Semaphore(S3_CONCURRENCY))
            await put(done)
        except BaseException as err:  # handed to the consumer, raised there
            await put(err)

    future = asyncio.run_coroutine_threadsafe(main(), fs.loop)
    try:
        while True:
            item = out.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        future.cancel()


# -- listing in tasks ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PrefixLister:
    """Some prefixes of an S3 input, listed by whoever calls it (a Ray task): pages of ENTRY_SCHEMA, relative
    to the input root. A unit is (prefix, deep): deep lists everything under the prefix in one flat
    ListObjectsV2 stream, else only the keys directly in it (its sub-prefixes are units of their own)."""

    uri: str
    storage_options: dict
    units: tuple[tuple[str, bool], ...]
    retry_window_s: float = 300.0

    def __call__(self) -> Iterator[pa.Table]:
        from fsspec.asyn import sync

        fs, root = filesystem(self.uri, dict(self.storage_options))
        bucket, key, _ = fs.split_path(root)
        base = f"{key.rstrip('/')}/" if key else ""
        for prefix, deep in self.units:
            kwargs = dict(Bucket=bucket, Prefix=prefix, **fs.req_kw)
            if not deep:
                kwargs["Delimiter"] = "/"
            while True:
                resp = retrying(lambda: sync(fs.loop, fs._call_s3, "list_objects_v2", **kwargs), self.retry_window_s,
                                f"listing s3://{bucket}/{prefix}")
                items = [(c["Key"][len(base):], {"size": c.get("Size"), "ETag": c.get("ETag")})
                         for c in resp.get("Contents", ()) if not c["Key"].endswith("/")]
                if items:
                    yield _page(items)
                if not resp.get("IsTruncated"):
                    break
                kwargs["ContinuationToken"] = resp["NextContinuationToken"]


def s3_units(uri: str, storage_options: dict, want: int, retry_window_s: float = 300.0,
             max_depth: int = 3) -> list[tuple[str, bool]]:
    """The input's prefixes cut into about `want` listing units, one delimiter level at a time from the root
    (the driver lists only the levels it opens; the keys of a level stay a unit of their own)."""
    from fsspec.asyn import sync

    fs, root = filesystem(uri, dict(storage_options))
    bucket, key, _ = fs.split_path(root)
    deep: list[str] = [f"{key.rstrip('/')}/" if key else ""]
    flat: list[str] = []
    for _ in range(max_depth):
        if len(deep) + len(flat) >= want:
            break
        opened, deep = deep, []
        for prefix in opened:
            kwargs = dict(Bucket=bucket, Prefix=prefix, Delimiter="/", **fs.req_kw)
            files = False
            while True:
                resp = retrying(lambda: sync(fs.loop, fs._call_s3, "list_objects_v2", **kwargs), retry_window_s,
                                f"listing s3://{bucket}/{prefix}")
                files = files or bool(resp.get("Contents"))
                deep.extend(c["Prefix"] for c in resp.get("CommonPrefixes", ()))
                if not resp.get("IsTruncated"):
                    break
                kwargs["ContinuationToken"] = resp["NextContinuationToken"]
            if files:
                flat.append(prefix)
        if not deep:
            break
    return [(p, False) for p in flat] + [(p, True) for p in deep]


def listing_tasks(uri: str, storage_options: dict, tasks: int, retry_window_s: float = 300.0) -> list[PrefixLister]:
    """The S3 input's listing cut into `tasks` listers (units dealt round-robin, each lister a Ray task)."""
    units = s3_units(uri, storage_options, 4 * tasks, retry_window_s)
    groups = [tuple(units[i::tasks]) for i in range(tasks)]
    return [PrefixLister(uri, dict(storage_options), g, retry_window_s) for g in groups if g]


FIRST_RUN_LISTERS = 16  # listing tasks of a first run over an S3 prefix, at most (two for each CPU of the cluster)
# A prefix of at most this many keys is listed by the driver alone (a few requests): starting listing tasks, each a
# Ray worker that imports s3fs, would cost more than the whole listing. Past it the driver's pages are dropped
# and the tasks list the prefix from the start.
DRIVER_LISTING_KEYS = 10_000
PAGES_IN_FLIGHT = 4  # pages a listing task may have waiting for the driver (Ray's generator backpressure)


def _lister_pages(lister: PrefixLister) -> Iterator[pa.Table]:
    """A Ray task (a streaming generator): the pages of one lister, handed over as they are parsed."""
    yield from lister()


def listed_within(listing: InputListing, entries: int) -> Optional[InputListing]:
    """The listing, read by this process, when it ends within `entries` entries (its pages kept, to be
    consumed as before); None when it goes on (the listing is closed: the caller lists again, in tasks or in
    batches). What a run that cannot know the library's size in advance uses to keep a small one small."""
    head, n, pages = [], 0, iter(listing.pages)
    for page in pages:
        head.append(page)
        n += len(page)
        if n > entries:
            getattr(pages, "close", lambda: None)()
            return None
    return InputListing(listing.root, listing.protocol, iter(head), prefix_uri=listing.prefix_uri)


def in_tasks(listing: InputListing, storage_options: dict, tasks: Optional[int] = None,
             retry_window_s: float = 300.0) -> InputListing:
    """The same listing, listed by Ray tasks (Ray must be running): the prefixes cut into `tasks` listers
    (default: two per CPU of the cluster, 2 to FIRST_RUN_LISTERS), each a streaming task that parses its own
    ListObjectsV2 pages (the driver's single event loop is no longer the limit) and hands them over as they
    arrive, a few at a time; the driver holds the pages in flight, never the listing. A listing that is not
    an S3 prefix, or one of at most DRIVER_LISTING_KEYS keys (the driver lists that much first), is returned
    as it is, listed by the driver."""
    import ray

    if not listing.prefix_uri:
        return listing
    if DRIVER_LISTING_KEYS:
        small = listed_within(listing, DRIVER_LISTING_KEYS)
        if small is not None:  # the driver's own listing is the whole listing
            return small
    if tasks is None:
        tasks = min(FIRST_RUN_LISTERS, max(2, int(2 * ray.cluster_resources().get("CPU", 1))))
    listers = listing_tasks(listing.prefix_uri, storage_options, tasks, retry_window_s)
    return InputListing(listing.root, listing.protocol, _task_pages(listers), prefix_uri=listing.prefix_uri,
                        tasks=len(listers))


def _task_pages(listers: list[PrefixLister]) -> Iterator[pa.Table]:
    """Pages from the listers' tasks, whichever has one ready first; the tasks are cancelled when the
    consumer stops early (input.limit, a failed run)."""
    import ray

    # No CPU held: a lister waits for the driver whenever the shard queue is full (the reads are behind), and
    # listers holding CPUs then could keep the read tasks and the model actors from being placed.
    task = ray.remote(_lister_pages).options(num_cpus=0, num_returns="streaming", max_retries=0,
                                             _generator_backpressure_num_objects=PAGES_IN_FLIGHT)
    running = [task.remote(lister) for lister in listers]
    try:
        while running:
            ready, _ = ray.wait(running, num_returns=1)
            gen = ready[0]
            try:
                ref = next(gen)
            except StopIteration:
                running.remove(gen)
                continue
            try:
                yield ray.get(ref)
            except ray.exceptions.RayTaskError as err:  # the lister's own error (access denied, ...)
                raise err.as_instanceof_cause() from None
    finally:
        for gen in running:
            ray.cancel(gen)


# -- shards --------------------------------------------------------------------------------------


@dataclass
class Skipped:
    """Non-image files of the listing: how many, and the first few (relative ids) as examples."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, rels: list[str]) -> None:
        self.count += len(rels)
        room = SKIPPED_EXAMPLES - len(self.examples)
        if room > 0:
            self.examples.extend(rels[:room])


class ShardCutter:
    """Turns entry pages into shards as they arrive: folders in groups of images_per_shard files, tars and
    Parquet files one each. `on_shard(shard, entries)` receives every shard with its entries (ENTRY_SCHEMA)."""

    def __init__(self, cfg: InputConfig, fmt: str, root: str, next_index: int,
                 on_shard: Callable[[Shard, pa.Table], None]):
        self.cfg, self.format, self.root = cfg, FORMATS[fmt], root
        self.wanted = self.format.wanted(cfg)
        self.next_index, self.on_shard = next_index, on_shard
        self.skipped = Skipped()
        self.images = 0  # folder input: images put into shards
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.stopped = False  # input.limit reached

    def add(self, page: pa.Table) -> None:
        """Sort one page into selected entries (cut into shards) and skipped ones."""
        if self.stopped or not len(page):
            return
        rels = [from_raw(p) for p in page.column("path").to_pylist()]
        keep = [not hidden(r) and extension(r) in self.wanted for r in rels]
        self.skipped.add([storable(r) for r, k in zip(rels, keep) if not k])
        selected = page.filter(pa.array(keep, pa.bool_()))
        if self.format.name != "folder":
            for i in range(len(selected)):
                self._emit(selected.slice(i, 1))
            return
        if self.cfg.limit is not None:
            selected = selected.slice(0, max(0, self.cfg.limit - self.images - self.pending_rows))
            self.stopped = self.images + self.pending_rows + len(selected) >= self.cfg.limit
        self.pending.append(selected)
        self.pending_rows += len(selected)
        n = self.cfg.images_per_shard
        while self.pending_rows >= n:
            table = pa.concat_tables(self.pending)
            self._emit(table.slice(0, n))
            rest = table.slice(n)
            self.pending, self.pending_rows = [rest], len(rest)

    def finish(self) -> None:
        """The listing ended: the last, partial folder shard."""
        if self.pending_rows:
            self._emit(pa.concat_tables(self.pending))
        self.pending, self.pending_rows = [], 0

    def _emit(self, entries: pa.Table) -> None:
        entries = entries.combine_chunks()
        if self.format.name == "folder":
            self.images += len(entries)
        self.on_shard(shard_of(self.next_index, self.format.shard_kind, self.root, entries), entries)
        self.next_index += 1


def shard_of(index: int, kind: str, root: str, entries: pa.Table, only: Optional[dict] = None) -> Shard:
    """The Shard for these manifest entries (paths relative to `root`)."""
    paths = tuple(posixpath.join(root, from_raw(p)) for p in entries.column("path").to_pylist())
    sizes = tuple(-1 if s is None else s for s in entries.column("size").to_pylist())
    return Shard(index, kind, paths, sizes, only)
