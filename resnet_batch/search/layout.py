"""layout module: which files of an index folder hold the current index, and its re-ranking rows.

A fresh build writes its files at the top of the folder (format 2: the names below, no "layout" in
index.json). An update, or a rebuild over an existing index, writes a new *generation* `gen-NNNNNN/` and then
switches index.json (format 3), whose "layout" names the files in use:

  {"index": "gen-000002/index.faiss", "ids": "gen-000002/ids.arrow",
   "refine": {"coder": "refine.faiss", "segments": [["refine.f16", 3000], ["gen-000002/refine.f16", 120]],
              "rows": "gen-000002/refine.rows"}}

The re-ranking rows are append-only segments: the build's file, then each update's added rows. A removal
leaves its row in place; `rows` (int64, one per id-map row) then says where each id-map row's code is, until a
compaction writes the live rows again as one segment (and `rows` goes). Files of a generation never change
after it is published, so readers that hold one keep a consistent index while the next is written.
"""
from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import re
from typing import Optional

import numpy as np

INDEX_FILE = "index.faiss"
IDS_FILE = "ids.arrow"
META_FILE = "index.json"  # written last: an index folder without it is incomplete
REFINE_FILE = "refine.f16"
REFINE_SQ_FILE = "refine.faiss"  # the re-ranking coder: a FAISS one (FP16 codes)
TC_CODER_FILE = "refine.coder"  # or a transform coder (TC1024 codes; coders.py)
REFINE_ROWS_FILE = "refine.rows"  # (after removals) int64 per id-map row: its row in the re-ranking segments
HASH_FILE = "ids.hash"  # the id map's image_id hashes, sorted, then the row of each: lookups without a dict
LISTS_FILE = "lists.ivfdata"  # (a scaled-out build) the inverted lists on disk, beside the index.faiss naming them
FORMAT = 2  # index.json "format" of a fresh build (files at the top); 1 was ids.parquet + positions
FORMAT_LAYOUT = 3  # an updated or rebuilt index: index.json "layout" names the files (in generation folders)
INDEX_FORMATS = (FORMAT, FORMAT_LAYOUT)
DATA_FILES = (INDEX_FILE, IDS_FILE, REFINE_FILE, REFINE_SQ_FILE, TC_CODER_FILE, REFINE_ROWS_FILE, LISTS_FILE, HASH_FILE)
_GENERATION_RE = re.compile(r"^gen-(\d{6})$")


def generation_dir(generation: int) -> str:
    """The folder of a generation's files: gen-000003."""
    return f"gen-{generation:06d}"


def generation_of(name: str) -> Optional[int]:
    """The generation number of a folder name gen-NNNNNN (None for anything else)."""
    m = _GENERATION_RE.match(name)
    return int(m.group(1)) if m else None


@contextlib.contextmanager
def faiss_stdout_to_stderr(drop: bool = False):
    """FAISS's C++ code prints notes about on-disk lists ("resizing ...", "updating ondisk filename ...") on
    file descriptor 1: send them to stderr while it runs (or, `drop`, nowhere: every reader opening an index
    would print one), so that a command's stdout stays its result."""
    import ctypes
    import sys

    flush_c = ctypes.CDLL(None).fflush  # C's stdout is buffered (fully, into a pipe): flushed before each switch,
    sys.stdout.flush()                  # or FAISS's lines would reach the real stdout at exit
    flush_c(None)
    saved = os.dup(1)
    try:
        if drop:
            with open(os.devnull, "wb") as null:
                os.dup2(null.fileno(), 1)
        else:
            os.dup2(2, 1)
        yield
    finally:
        flush_c(None)
        os.dup2(saved, 1)
        os.close(saved)


def read_faiss_index(path: str, on_disk_lists: bool, mmap_codes: bool = True):
    """A FAISS index file: inverted lists in a LISTS_FILE beside it (a scaled-out build; found in the file's own
    folder wherever the folder was moved or cached), or lists and flat codes memory-mapped from the file."""
    import faiss

    if on_disk_lists:  # the on-disk lists map their file themselves (with IO_FLAG_MMAP as well FAISS crashes),
        # read-only: a published generation's lists are never written (an update writes its own, lists.py), and
        # without the flag FAISS maps them writable, which a read-only mount or cache refuses
        with faiss_stdout_to_stderr(drop=True):
            return faiss.read_index(path, faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
    return faiss.read_index(path, faiss.IO_FLAG_MMAP if mmap_codes else 0)


def id_hashes(image_ids: list) -> np.ndarray:
    """64-bit hashes of image ids that are the same in every process (Python's hash() of a str is salted per
    process, and a scaled-out build hashes its parts in Ray workers)."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(s.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                                       "little", signed=True) for s in image_ids), np.int64, len(image_ids))


def coder_file(refine_code: str) -> str:
    """The file an index's re-ranking coder is stored in, for its spec's refine_code."""
    return TC_CODER_FILE if refine_code == "TC1024" else REFINE_SQ_FILE


def index_layout(meta: dict) -> dict:
    """The files of the index that index.json describes (a fresh build's, where it records no layout)."""
    if "layout" in meta:
        return meta["layout"]
    refine = None
    if REFINE_FILE in meta["files"]:
        coder = coder_file(meta["spec"].get("refine_code", "FP16"))
        refine = {"coder": coder, "segments": [[REFINE_FILE, int(meta["count"])]], "rows": None}
    return {"index": INDEX_FILE, "ids": IDS_FILE, "refine": refine,
            **({"lists": LISTS_FILE} if LISTS_FILE in meta["files"] else {}),
            **({"hash": HASH_FILE} if HASH_FILE in meta["files"] else {})}


def write_id_lookup(path: str, hashes: np.ndarray) -> None:
    """The lookup from image_id to id-map row: `hashes` (layout.id_hashes of each row's image_id, in row order)
    sorted, then each one's row; both int64, memory-mapped by readers (no Python object per id)."""
    order = np.argsort(hashes, kind="stable")
    with open(path, "wb") as f:
        f.write(np.ascontiguousarray(hashes[order], dtype=np.int64).tobytes())
        f.write(order.astype(np.int64).tobytes())


def open_id_lookup(path: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(sorted hashes, their rows), memory-mapped."""
    both = np.memmap(path, dtype=np.int64, mode="r", shape=(2, n)) if n else np.zeros((2, 0), np.int64)
    return both[0], both[1]


def hashes_by_row(path: str, n: int) -> np.ndarray:
    """The image_id hashes of an id map in row order, from its lookup file."""
    sorted_hashes, rows = open_id_lookup(path, n)
    out = np.empty(n, dtype=np.int64)
    out[rows] = sorted_hashes
    return out


def map_rows(path: str, shape: tuple[int, int], dtype=np.uint8) -> np.ndarray:
    """A read-only memory map of fixed-size rows, read at random: no readahead, so a query pages in the rows
    it reads (4 KiB each), not 128 KiB around each (which would page the whole file in after a few thousand)."""
    rows = np.memmap(path, dtype=dtype, mode="r", shape=shape)
    if shape[0]:
        rows._mmap.madvise(mmap.MADV_RANDOM)
    return rows


class RefineRows:
    """The re-ranking codes of the id map's rows (row i of the id map -> codes[i]) when they are spread over
    segments and (after removals) found through a row map: indexed like the plain array it stands for."""

    def __init__(self, segments: list[np.ndarray], row_map: Optional[np.ndarray]):
        self.segments = [s for s in segments if len(s)]
        self.starts = np.cumsum([0] + [len(s) for s in self.segments])
        self.row_map = row_map
        self.row_bytes = segments[0].shape[1]

    @property
    def stored(self) -> int:
        """Rows in the segments, the dead ones (removed since the last compaction) included."""
        return int(self.starts[-1])

    def __len__(self) -> int:
        return self.stored if self.row_map is None else len(self.row_map)

    def positions(self, rows: np.ndarray) -> np.ndarray:
        """Where id-map rows are in the segments (as one sequence)."""
        rows = np.asarray(rows, dtype=np.int64)
        return rows if self.row_map is None else np.asarray(self.row_map[rows], dtype=np.int64)

    def __getitem__(self, rows):
        if np.isscalar(rows):
            return self[np.array([rows])][0]
        pos = self.positions(rows)
        out = np.empty((len(pos), self.row_bytes), dtype=np.uint8)
        which = np.searchsorted(self.starts, pos, side="right") - 1
        for s in np.unique(which):
            sel = which == s
            out[sel] = self.segments[s][pos[sel] - self.starts[s]]
        return out


class RangeRows:
    """Fixed-size rows of a file on object storage, read by byte range and cached per node by range.

    The cache is a sparse local file of the remote file's size plus one byte a block saying which blocks it holds
    (both memory-mapped, shared by every process of the node): a query fetches only the blocks of the rows it
    reads (one ranged GET per run of adjacent missing blocks, all of a query's at once), never the whole file.
    A block is written before it is marked, and a block's bytes never change (a generation's files are never
    rewritten), so processes filling the same block at once write the same bytes."""

    BLOCK = 64 << 10  # bytes fetched at least: 16 rows of 4 KiB, 64 of 1 KiB

    def __init__(self, fs, path: str, shape: tuple[int, int], cache: str):
        self.fs, self.path, self.shape = fs, path, shape
        self.row_bytes = shape[1]
        self.size = shape[0] * shape[1]
        self.blocks = -(-self.size // self.BLOCK)
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        self.data_path, self.have_path = cache, cache + ".have"
        for file, size in ((self.data_path, self.size), (self.have_path, self.blocks)):
            with open(file, "ab") as f:  # created sparse, never shrunk
                if f.tell() < size:
                    f.truncate(size)
        self.have = np.memmap(self.have_path, dtype=np.uint8, mode="r+", shape=(max(1, self.blocks),))
        self.data = np.memmap(self.data_path, dtype=np.uint8, mode="r+", shape=(max(1, self.size),))

    def __len__(self) -> int:
        return self.shape[0]

    def cached_blocks(self) -> int:
        return int(self.have[:self.blocks].sum())

    def __getitem__(self, rows):
        if np.isscalar(rows):
            return self[np.array([rows])][0]
        rows = np.asarray(rows, dtype=np.int64)
        starts = rows * self.row_bytes
        need = np.unique(np.concatenate([starts // self.BLOCK, (starts + self.row_bytes - 1) // self.BLOCK]))
        missing = need[self.have[need] == 0] if len(need) else need
        if len(missing):
            self._fetch(missing)
        out = np.empty((len(rows), self.row_bytes), dtype=np.uint8)
        for i, s in enumerate(starts.tolist()):
            out[i] = self.data[s:s + self.row_bytes]
        return out

    def _fetch(self, blocks: np.ndarray) -> None:
        """Runs of adjacent blocks, each one ranged read, all at once (fsspec's cat_ranges: concurrent on s3fs)."""
        runs = np.split(blocks, np.flatnonzero(np.diff(blocks) != 1) + 1)
        starts = [int(r[0]) * self.BLOCK for r in runs]
        ends = [min(self.size, (int(r[-1]) + 1) * self.BLOCK) for r in runs]
        for run, start, data in zip(runs, starts, self.fs.cat_ranges([self.path] * len(runs), starts, ends)):
            if isinstance(data, BaseException):  # fsspec returns a range's error in its place: raise it as it is
                raise data
            self.data[start:start + len(data)] = np.frombuffer(data, dtype=np.uint8)
            self.have[run] = 1


def open_refine_rows(folder: str, refine: dict, row_bytes: int, n: int, remote=None):
    """The re-ranking codes a layout names, memory-mapped: the plain array for one segment in id-map order
    (a fresh build), else a RefineRows over the segments and the row map. `remote` (fs, root): the segments
    stay on object storage and are read by range into a per-node cache in `folder` (RangeRows)."""
    import os

    def segment(name: str, rows: int):
        if remote is None:
            return map_rows(os.path.join(folder, name), (rows, row_bytes))
        fs, root = remote
        return RangeRows(fs, f"{root.rstrip('/')}/{name}", (rows, row_bytes), os.path.join(folder, name + ".ranges"))

    segments = [segment(name, rows) for name, rows in refine["segments"] if rows]
    row_map = map_rows(os.path.join(folder, refine["rows"]), (n,), np.int64) if refine.get("rows") else None
    if row_map is None and len(segments) == 1:
        return segments[0]
    return RefineRows(segments, row_map)
