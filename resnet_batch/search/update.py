"""update module: `resnet-batch index` over an index it built before: the index follows its embeddings.

On a new folder, a build (build). On an existing index, under the folder's lock: what changed since the
last build or update (changes), then update in place or rebuild (spec.decide), published as a new
generation (folder): readers see the index before or after, never a mix.

An update takes the rows that left out of the FAISS index (`remove_ids`) and out of the id map, adds the rows
that arrived with fresh 64-bit ids from `next_id` (an id is never used twice), and appends their re-ranking
codes as a new segment; the codes of removed rows stay in their segments, skipped by the row map, until more
than COMPACT_DEAD of the stored rows are dead and the live ones are written again as one segment. The lists,
projection and codes are kept (no retraining); nprobe is tuned again only when the count moved more than
RETUNE_DRIFT since it was tuned (or the recall target changed), against exact search over the stored vectors.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import pyarrow as pa

from resnet_batch.cluster import worker_uri
from resnet_batch.search.embeddings import CHUNK_ROWS, Part
from resnet_batch.errors import SimilarityIndexError
from resnet_batch.search.index import (IDS_SCHEMA, Refiner, local_folder, normalize, ranged_files, read_meta,
                                       refined_search, rows_in)
from resnet_batch.search.build import (TUNE_K, BuildSource, IdMapWriter, add_parts, build_index, build_into,
                                      fold_folders, history_entry, image_roots, LOG, tune_index)
from resnet_batch.search.changes import Changes, find_changes
from resnet_batch.search.coders import read_coder
from resnet_batch.search.folder import UPDATE_PREFIX, Staging
from resnet_batch.search.lists import ListsUpdate
from resnet_batch.search.layout import (INDEX_FORMATS, HASH_FILE, IDS_FILE, INDEX_FILE, LISTS_FILE, META_FILE,
                                       REFINE_FILE, REFINE_ROWS_FILE, RefineRows, coder_file, generation_dir,
                                       faiss_stdout_to_stderr, hashes_by_row, index_layout, map_rows, open_refine_rows,
                                       read_faiss_index, write_id_lookup)
from resnet_batch.search.spec import IndexOptions, decide
from resnet_batch.storage import filesystem, protocols
from resnet_batch.search.tuning import ExactTopK

COMPACT_DEAD = 0.25  # re-ranking rows are compacted once more than this share of the stored ones are dead
RETUNE_DRIFT = 0.25  # nprobe is tuned again once the count moved by more than this share since it was tuned


@dataclass(frozen=True)
class Outcome:
    """What `resnet-batch index` did: built (a new folder), rebuilt, updated, or nothing (current), and why."""

    action: str  # built | rebuilt | updated | current
    reason: str
    meta: dict
    added: int = 0
    removed: int = 0
    kept: int = 0
    notes: tuple = ()
    seconds: float = 0.0

    def line(self, out: str) -> str:
        """The one line the command prints."""
        m = self.meta
        if self.action == "current":
            return (f"index is current: {m['count']:,} images, no part of the embeddings changed since its "
                    f"{m['history'][-1]['action'] if m.get('history') else 'build'} -> {out}")
        if self.action == "updated":
            return (f"updated index: +{self.added:,} added, -{self.removed:,} removed, {self.kept:,} kept "
                    f"({m['count']:,} images); {'; '.join([self.reason, *self.notes])} -> {out} in {self.seconds:.1f} s")
        t = m["tuning"]
        quality = "exact" if m["kind"] == "flat" else (f"nprobe={m['nprobe']}: recall@10 {t['recall_at_10']:.3f} on "
                                                       f"{t['queries']} queries (target {t['target_recall']})")
        built = (f"indexed {m['count']} images ({m['factory']}, {quality}) in {m['build_s']:.1f} s -> {out} "
                 f"({sum(m['files'].values()) / 2**20:.1f} MiB)")
        return built if self.action == "built" else f"rebuilt index: {self.reason}; {built}"


def index_embeddings(uris: Sequence[str], out: str, given: Optional[dict] = None, *, rebuild: bool = False,
                     storage_options: Optional[dict] = None, log: Callable[[str], None] = LOG.info,
                     scale=None) -> Outcome:
    """Index the embeddings under `uris` into `out`: a new index, or the one there brought up to date (options
    not `given` are the ones it recorded); `rebuild` builds it again whatever changed. With `scale` (a
    scaleout.ScaleOut), builds and rebuilds run as Ray tasks (an update reads only the changed parts: one
    process)."""
    from resnet_batch.output.lock import OutputLock
    from resnet_batch.output.store import OutputStore

    opts = dict(storage_options or {})
    # Under the folder's lock from the start: two first builds racing into one new folder would publish a mix.
    # Every step that changes what readers see checks first that the lock is still this run's (lock.ensure):
    # a run whose lock was taken over (paused past the stale limit) stops with LockLost, exit 1.
    with OutputLock(OutputStore(out, opts), on_takeover=log) as lock:
        if existing_meta(out, opts) is None:
            if scale is not None:
                from resnet_batch.search.scaleout import build_index_ray

                meta = build_index_ray(uris, out, IndexOptions.given(**(given or {})), scale, storage_options=opts,
                                       log=log, guard=lock.ensure)
            else:
                meta = build_index(uris, out, storage_options=opts, log=log, guard=lock.ensure,
                                   **IndexOptions.given(**(given or {})).as_dict())
            return Outcome("built", "new index", meta)
        previous = read_meta(out, opts)  # again, under the lock
        options = IndexOptions.given(previous.get("options"), **(given or {}))
        options.check()
        target = Target(tuple(uris), out, opts, previous, options, log, scale, lock.ensure)
        if rebuild:
            return _rebuild(target, "--rebuild asked")
        if not previous.get("part_stamps"):
            return _rebuild(target, "the index records no part stamps (built before updates were possible)")
        remote = _remote(out, opts)  # an index on object storage: its re-ranking rows are read by range, not copied
        folder = local_folder(out, previous, opts, skip=ranged_files(index_layout(previous)) if remote else frozenset())
        ids = pa.ipc.open_file(pa.memory_map(os.path.join(folder, index_layout(previous)["ids"]))).read_all()
        changes = find_changes(uris, previous, ids, out, opts)
        if changes.after == 0:
            raise SimilarityIndexError(f"no embeddings with status 'ok' under {', '.join(uris)}")
        decision = decide(previous, changes.after, changes.kept, options)
        if decision.rebuild:
            return _rebuild(target, decision.reason)
        retune = retune_reason(previous, changes.after, options)
        if not changes.any and not retune:
            return Outcome("current", "no part changed", previous)
        return _update(target, folder, ids, changes, decision.reason, retune, remote)


@dataclass(frozen=True)
class Target:
    """An existing index being brought up to date: the embeddings, the folder, its index.json, the options."""

    uris: tuple
    out: str
    opts: dict
    previous: dict  # index.json as it was
    options: IndexOptions
    log: Callable[[str], None]
    scale: object = None  # scaleout.ScaleOut: rebuild with Ray tasks
    guard: Optional[Callable[[], None]] = None  # the folder lock's ensure(), before each publishing step

    @property
    def generation(self) -> int:
        """The generation this run publishes."""
        return int(self.previous.get("generation", 0)) + 1


def existing_meta(out: str, opts: dict) -> Optional[dict]:
    """index.json of the index at `out` when it is one that can be updated (else None: build as new)."""
    import json

    fs, root = filesystem(out, opts)
    try:
        with fs.open(f"{root}/{META_FILE}", "rb") as f:
            meta = json.loads(f.read())
    except (FileNotFoundError, ValueError):
        return None
    return meta if meta.get("format") in INDEX_FORMATS else None


def retune_reason(previous: dict, after: int, options: IndexOptions) -> Optional[str]:
    """Why nprobe must be tuned again (None: the tuned value still holds)."""
    if previous["kind"] != "ivf":
        return None
    tuned = int(previous.get("tuned_count") or previous["count"])
    if options.target_recall != previous["tuning"]["target_recall"]:
        return f"--target-recall {previous['tuning']['target_recall']} -> {options.target_recall}"
    if abs(after - tuned) > RETUNE_DRIFT * tuned:
        return f"{after:,} vectors, {tuned:,} when it was tuned"
    return None


def _rebuild(target: Target, reason: str) -> Outcome:
    """A full build (training included), published as the next generation."""
    with Staging(target.out, target.opts, prefix=UPDATE_PREFIX, guard=target.guard) as stage:
        if target.scale is not None:
            from resnet_batch.search.scaleout import build_into_ray

            meta = build_into_ray(stage, target.uris, target.options, target.scale, target.opts, target.log)
        else:
            source = BuildSource.scan(target.uris, target.options, target.opts)
            meta = build_into(stage, source, target.options, target.opts, target.log)
        meta["generation"] = target.generation
        folder = generation_dir(meta["generation"])
        coder = coder_file(meta["spec"]["refine_code"])
        refine = {"coder": f"{folder}/{coder}", "segments": [[f"{folder}/{REFINE_FILE}", meta["count"]]],
                  "rows": None}
        meta["layout"] = {"index": f"{folder}/{INDEX_FILE}", "ids": f"{folder}/{IDS_FILE}",
                          "refine": refine if meta["spec"]["refine"] else None, "hash": f"{folder}/{HASH_FILE}",
                          **({"lists": f"{folder}/{LISTS_FILE}"} if os.path.exists(stage.path(LISTS_FILE)) else {})}
        meta["history"] = [*target.previous.get("history", []),
                           history_entry(meta, "rebuild", reason, meta["build_s"])]
        stage.publish_generation(meta, target.previous)
    return Outcome("rebuilt", reason, meta)


def _remote(out: str, opts: dict) -> Optional[tuple]:
    """(fs, root) of an index folder on object storage, None for a local or shared one."""
    fs, root = filesystem(out, opts)
    return None if "file" in protocols(fs) else (fs, root)


def _update(target: Target, folder: str, ids: pa.Table, changes: Changes, reason: str,
            retune: Optional[str], remote: Optional[tuple] = None) -> Outcome:
    """Take the changes into the existing index (no training) and publish it as the next generation. `remote`:
    (fs, root) of an index on object storage, whose re-ranking rows are read by range (those a compaction or a
    tuning needs), never copied whole."""
    import faiss

    t0 = time.perf_counter()
    out, previous, generation = target.out, target.previous, target.generation
    layout = index_layout(previous)
    index = read_faiss_index(os.path.join(folder, layout["index"]), bool(layout.get("lists")), mmap_codes=False)
    # Lists on disk stay on disk: the previous file is only read, this generation's written beside its index.faiss
    # (lists.py); lists inside index.faiss (a single-process build's: its codes are in memory anyway) are edited.
    on_disk = ListsUpdate(index) if layout.get("lists") else None
    if on_disk is None and len(changes.removed):
        _check_removed(index.remove_ids(faiss.IDSelectorBatch(changes.removed)), changes, out)
    number = {p.uri: i for i, p in enumerate(changes.parts)}
    kept = _kept_rows(ids, changes, previous["part_uris"], number)
    arriving = [(p.fs, Part(p.uri, p.path, -1, len(changes.added[p.uri])), number[p.uri], changes.added[p.uri])
                for p in changes.parts if p.uri in changes.added]
    decoder = read_coder(os.path.join(folder, layout["refine"]["coder"])) if layout["refine"] else None
    with Staging(out, target.opts, prefix=UPDATE_PREFIX, guard=target.guard) as stage:
        with IdMapWriter(stage.path(IDS_FILE), stage.path(REFINE_FILE), decoder) as sink:
            sink.write(kept)
            next_id, _ = add_parts(arriving, index, sink, int(previous["next_id"]))
        if on_disk is not None:
            _check_removed(on_disk.write(stage.path(LISTS_FILE), changes.removed), changes, out)
        if index.ntotal != changes.after:
            raise SimilarityIndexError(f"the index at {out} holds {index.ntotal} vectors after the update, its "
                                       f"embeddings {changes.after}; rebuild it with --rebuild")
        new_ids = pa.ipc.open_file(pa.memory_map(stage.path(IDS_FILE))).read_all()
        write_id_lookup(stage.path(HASH_FILE), _hashes_after(folder, layout, ids, changes, new_ids))
        notes, refine, codes, compacted = [], None, None, False
        if decoder is not None:
            refine, codes, compacted = _refine_rows_after(layout["refine"], folder, stage, generation, ids, changes,
                                                          decoder.sa_code_size(), remote)
            notes += ["re-ranking rows compacted"] if compacted else []
        with faiss_stdout_to_stderr():
            faiss.write_index(index, stage.path(INDEX_FILE))  # on-disk lists: their file's name, not their codes
        tuned = _tuning_after(previous, index, codes, decoder, new_ids, target.options, retune)
        notes += [note] if (note := tuned.pop("note")) else []
        protos, common = fold_folders(new_ids.column("path"), set(), None)
        found = {"protocols": sorted(protos), "common": common}
        folder_g = generation_dir(generation)
        meta = {**previous, **tuned, "generation": generation, "count": int(index.ntotal), "next_id": next_id,
                "options": target.options.as_dict(), "sources": [worker_uri(u) for u in target.uris],
                "parts": len(changes.parts),
                "part_uris": [p.uri for p in changes.parts], "part_stamps": [p.stamp for p in changes.parts],
                "image_roots": image_roots(target.uris, target.opts, found),
                "layout": {"index": f"{folder_g}/{INDEX_FILE}", "ids": f"{folder_g}/{IDS_FILE}", "refine": refine,
                           "hash": f"{folder_g}/{HASH_FILE}",
                           **({"lists": f"{folder_g}/{LISTS_FILE}"} if on_disk is not None else {})},
                "updated_at": time.time(), "update_s": round(time.perf_counter() - t0, 3)}
        counts = {"added": changes.added_count, "removed": len(changes.removed), "kept": changes.kept}
        meta["history"] = [*previous.get("history", []),
                           history_entry(meta, "update", reason, meta["update_s"], retuned=retune, compacted=compacted,
                                         **counts)]
        stage.publish_generation(meta, previous)
    return Outcome("updated", reason, meta, notes=tuple(notes), seconds=meta["update_s"], **counts)


def _check_removed(count: int, changes: Changes, out: str) -> None:
    if count != len(changes.removed):
        raise SimilarityIndexError(f"the index at {out} does not hold every id its id map lists; rebuild it "
                                   "with --rebuild")


def _hashes_after(folder: str, layout: dict, ids: pa.Table, changes: Changes, new_ids: pa.Table) -> np.ndarray:
    """The image_id hashes of the updated id map, in row order: the kept rows' from the previous lookup (numpy,
    no Python object per row), the added rows' computed (they are few)."""
    from resnet_batch.search.layout import id_hashes

    if layout.get("hash"):
        keep = np.ones(len(ids), dtype=bool)
        keep[changes.removed_rows] = False
        kept = hashes_by_row(os.path.join(folder, layout["hash"]), len(ids))[keep]
    else:  # an index from before the lookup file: every row once
        kept = id_hashes(ids.column("image_id").to_pylist())[np.isin(np.arange(len(ids)), changes.removed_rows,
                                                                     invert=True)]
    added = new_ids.column("image_id").slice(len(kept)).to_pylist()
    return np.concatenate([kept, id_hashes(added)])


def _tuning_after(previous: dict, index, codes, decoder, ids: pa.Table, options: IndexOptions,
                  retune: Optional[str]) -> dict:
    """nprobe, its tuning record and the count it was tuned at, after an update (index.json keys), and a note
    for the printed line: tuned again when `retune` says why, else kept as it was."""
    kept = {"nprobe": previous["nprobe"], "tuning": previous["tuning"], "tuned_count": previous.get("tuned_count")}
    if not retune:
        return {**kept, "note": f"nprobe {previous['nprobe']} kept" if previous["nprobe"] else None}
    t = _retune(index, codes, Refiner(decoder), ids, previous["spec"], options)
    return {"nprobe": t.nprobe, "tuning": t.as_dict(), "tuned_count": int(index.ntotal),
            "note": f"nprobe tuned again: {previous['nprobe']} -> {t.nprobe}, recall@{TUNE_K} {t.recall:.3f} "
                    f"({retune})"}


def _kept_rows(ids: pa.Table, changes: Changes, old_uris: list[str], number: dict[str, int]) -> pa.Table:
    """The id-map rows that stay, their part numbers moved to the new part list."""
    keep = np.ones(len(ids), dtype=bool)
    keep[changes.removed_rows] = False
    moved = np.array([number.get(uri, -1) for uri in old_uris], dtype=np.int32)
    kept = ids.filter(pa.array(keep))
    parts = moved[kept.column("part").to_numpy()]
    if (parts < 0).any():
        raise SimilarityIndexError("internal: a kept row's part is gone")
    return kept.set_column(IDS_SCHEMA.get_field_index("part"), IDS_SCHEMA.field("part"), pa.array(parts))


def _refine_rows_after(refine: dict, folder: str, stage: Staging, generation: int, ids: pa.Table,
                       changes: Changes, row_bytes: int, remote: Optional[tuple] = None) -> tuple[dict, object, bool]:
    """The re-ranking layout after the update (the staged segment of added rows after the old ones, a row map
    past removals, or one compacted segment), the codes of the new id map's rows, and whether it compacted.
    Only a compaction and a tuning read old rows (by range from object storage: `remote`)."""
    folder_g = generation_dir(generation)
    old = open_refine_rows(folder, refine, row_bytes, len(ids), remote=remote)
    keep = np.ones(len(ids), dtype=bool)
    keep[changes.removed_rows] = False
    kept_at = old.positions(np.flatnonzero(keep)) if isinstance(old, RefineRows) else np.flatnonzero(keep)
    segments = [[name, rows] for name, rows in refine["segments"] if rows]
    stored = sum(rows for _, rows in segments)
    added = changes.added_count
    positions = np.concatenate([kept_at, stored + np.arange(added)]).astype(np.int64)
    arrays = list(old.segments) if isinstance(old, RefineRows) else [old]  # as opened: mapped, or read by range
    if added:
        segments.append([f"{folder_g}/{REFINE_FILE}", added])
        arrays.append(map_rows(stage.path(REFINE_FILE), (added, row_bytes)))
    else:
        os.remove(stage.path(REFINE_FILE))  # empty
    codes = RefineRows(arrays, positions)
    if stored + added - len(positions) > COMPACT_DEAD * (stored + added):
        compact = stage.path(REFINE_FILE + ".compact")
        with open(compact, "wb") as f:
            for start in range(0, len(positions), CHUNK_ROWS):
                f.write(codes[np.arange(start, min(start + CHUNK_ROWS, len(positions)))].tobytes())
        os.replace(compact, stage.path(REFINE_FILE))
        layout = {"coder": refine["coder"], "segments": [[f"{folder_g}/{REFINE_FILE}", len(positions)]], "rows": None}
        return layout, map_rows(stage.path(REFINE_FILE), (len(positions), row_bytes)), True
    rows = None
    if not np.array_equal(positions, np.arange(len(positions))):
        positions.tofile(stage.path(REFINE_ROWS_FILE))
        rows = f"{folder_g}/{REFINE_ROWS_FILE}"
    return {"coder": refine["coder"], "segments": segments, "rows": rows}, codes, False


def _retune(index, codes, refiner: Refiner, ids: pa.Table, spec: dict, options: IndexOptions):
    """nprobe tuned again as a build tunes it, on database rows of the updated index, against exact search over
    the stored full-dimension vectors (the re-ranking codes: float16, as re-ranking scores them)."""
    faiss_ids = ids.column("id").to_numpy()
    n = len(faiss_ids)
    rows = np.sort(np.random.default_rng(options.seed).choice(n, size=min(options.tune_queries, n), replace=False))
    queries = normalize(refiner.vectors(codes[rows]))
    exact = ExactTopK(queries, TUNE_K + 1)
    for start in range(0, n, CHUNK_ROWS):
        block = np.arange(start, min(start + CHUNK_ROWS, n))
        exact.add(refiner.vectors(codes[block]), faiss_ids[block])

    def search(q: np.ndarray, k: int):
        return refined_search(index, refiner, codes, lambda found: rows_in(faiss_ids, found), q, k, spec["refine"])

    return tune_index(index, search, faiss_ids[rows], queries, exact, spec["nlist"], options.target_recall)
