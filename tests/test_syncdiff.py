"""The partitioned sync diff against the in-memory one on the same rows: the same drops, copies, new entries
and counts, whether its steps run in place (one partition) or as Ray tasks over several partitions."""
import numpy as np
import pyarrow as pa
import pytest

from resnet_batch.config import InputConfig
from resnet_batch.embed.listing import ENTRY_SCHEMA
from resnet_batch.embed.plan import COPIES_SCHEMA, DROPS_SCHEMA, diff
from resnet_batch.embed.syncdiff import (DiffSettings, Steps, entry_pieces, manifest_pieces, partitioned_diff,
                                         partitions_for, read_plan_pieces)
from resnet_batch.output.manifest import MANIFEST_SCHEMA, write_entries
from resnet_batch.output.store import OutputStore


def _night(n: int = 4000, per: int = 50, seed: int = 3):
    """A manifest of n entries (ETags, a few without) and tonight's listing: deletions, changes, new photos,
    moves, copies, and donors that share a size and ETag (ties broken by shard, then path)."""
    rng = np.random.default_rng(seed)
    paths = [f"album-{i // 37:04d}/IMG_{i:06d}.jpg".encode() for i in range(n)]
    sizes = rng.integers(1000, 5000, n)
    etags = [f"{i:032x}".encode() if i % 97 else None for i in range(n)]
    etags[11], sizes[11] = etags[10], sizes[10]  # two embedded rows with the same bytes
    shards = np.arange(n) // per
    manifest = pa.table({"path": paths, "size": sizes, "mtime_ns": np.full(n, 5), "etag": pa.array(etags, pa.binary()),
                         "shard": shards}, schema=MANIFEST_SCHEMA)
    keep = rng.random(n) > 0.02  # 2% deleted
    cur_paths, cur_sizes, cur_mtimes, cur_etags = [], [], [], []
    for i in range(n):
        if not keep[i]:
            continue
        size, etag, mtime = int(sizes[i]), etags[i], 5
        if i % 53 == 0:  # changed
            if etag is None:
                mtime = 6
            else:
                etag = b"changed-" + etag
        cur_paths.append(paths[i]), cur_sizes.append(size), cur_mtimes.append(mtime), cur_etags.append(etag)
    for i in np.flatnonzero(~keep)[:40]:  # moved: deleted here, same bytes under a new name
        if etags[i] is not None:
            cur_paths.append(b"moved/" + paths[i]), cur_sizes.append(int(sizes[i])), cur_mtimes.append(9)
            cur_etags.append(etags[i])
    for i in (10, 200, 201):  # copied: the original stays
        cur_paths.append(b"copies/" + paths[i]), cur_sizes.append(int(sizes[i])), cur_mtimes.append(9)
        cur_etags.append(etags[i])
    for k in range(150):  # new photos, some without ETags
        cur_paths.append(f"new/{k:05d}.jpg".encode()), cur_sizes.append(777 + k), cur_mtimes.append(3)
        cur_etags.append(None if k % 10 == 0 else f"new{k}".encode())
    cur_paths.append(b"notes.txt"), cur_sizes.append(1), cur_mtimes.append(1), cur_etags.append(b"x")
    current = pa.table({"path": cur_paths, "size": cur_sizes, "mtime_ns": cur_mtimes,
                        "etag": pa.array(cur_etags, pa.binary())}, schema=ENTRY_SCHEMA)
    done = set(range(int(shards.max()) + 1)) - {3}  # one shard unfinished: its rows are no donors
    return manifest, current, done


def _partitioned(tmp_path, manifest, current, done, partitions, steps, piece_entries=None):
    cfg = InputConfig(uri="/lib", images_per_shard=16)
    store = OutputStore(str(tmp_path / "out"), {})
    import resnet_batch.output.manifest as m

    old, m.PIECE_ENTRIES = m.PIECE_ENTRIES, piece_entries or m.PIECE_ENTRIES
    try:
        write_entries(store, manifest)
    finally:
        m.PIECE_ENTRIES = old
    s = DiffSettings(input=cfg, fmt="folder", root="/lib", output_uri=store.uri, output_options={},
                     retry_window_s=5.0, run=2, partitions=partitions, move_partitions=partitions)
    # the listing arrives in three batches, as the driver ships pages to split tasks
    batches = [current.slice(0, 1000), current.slice(1000, 2000), current.slice(3000)]
    result = partitioned_diff(s, steps, batches, manifest_pieces(store), done, next_shard=100)
    return cfg, store, result


def _compare(cfg, store, result, manifest, current, done):
    plan = diff(cfg, "folder", "/lib", current.filter(pa.array([p != b"notes.txt" for p in
                                                                current.column("path").to_pylist()])),
                manifest, done, next_shard=100)
    assert result.counts == plan.counts
    assert result.skipped.count == 1 and result.skipped.examples == ["notes.txt"]
    drops = read_plan_pieces(store, 2, "drops", DROPS_SCHEMA)
    assert sorted(drops.to_pylist(), key=lambda r: r["path"]) == sorted(plan.drops.to_pylist(), key=lambda r: r["path"])
    copies = read_plan_pieces(store, 2, "copies", COPIES_SCHEMA)
    key = lambda r: (r["path"], r["old_shard"], r["old_path"])  # noqa: E731
    assert sorted(map(key, copies.to_pylist())) == sorted(map(key, plan.copies.to_pylist()))
    assert len(copies) == plan.counts["reused"] > 40
    from resnet_batch.output.store import read_parquet

    entries = pa.concat_tables([read_parquet(store.fs, store.path(f"_sync/{n}")).cast(MANIFEST_SCHEMA)
                                for n, _ in entry_pieces(store, 2)])
    assert sorted(entries.column("path").to_pylist()) == sorted(plan.new_entries.column("path").to_pylist())
    shards = entries.column("shard").to_numpy()
    assert shards.min() >= 100 and result.next_shard == shards.max() + 1
    assert max(np.bincount(shards - 100)) <= cfg.images_per_shard
    by_path = dict(zip(entries.column("path").to_pylist(), shards.tolist()))
    for r in copies.to_pylist():  # a copy's shard is the shard of its entry
        assert by_path[r["path"]] == r["shard"]
    copy_shards = set(copies.column("shard").to_pylist())
    fresh_shards = {s for p, s in by_path.items() if p not in set(copies.column("path").to_pylist())}
    assert not copy_shards & fresh_shards  # copies and embeddings never share a shard
    # the new photos of one folder sit side by side: as few shards as their number needs (deleting that
    # folder later rewrites those parts only)
    new = [s for p, s in by_path.items() if p.startswith(b"new/")]
    assert len(set(new)) == -(-len(new) // cfg.images_per_shard) == 10
    assert result.expected == dict(zip(*np.unique(manifest.column("shard").to_numpy(), return_counts=True)))


def test_one_partition_in_place_matches_the_in_memory_diff(tmp_path):
    manifest, current, done = _night()
    cfg, store, result = _partitioned(tmp_path, manifest, current, done, 1, Steps(local=True))
    _compare(cfg, store, result, manifest, current, done)


@pytest.mark.ray
def test_partitions_in_ray_tasks_match_the_in_memory_diff(tmp_path, ray_local):
    manifest, current, done = _night()
    cfg, store, result = _partitioned(tmp_path, manifest, current, done, 4, Steps(local=False), piece_entries=500)
    assert result.partitions == 4
    _compare(cfg, store, result, manifest, current, done)
    # the drops come in one piece per shard group: ranges of whole manifest pieces that never overlap, so
    # each is applied by a task of its own and the driver never holds them
    from resnet_batch.embed.syncdiff import drop_manifest_entries, drop_sources
    from resnet_batch.output.manifest import piece_range, read_manifest
    from resnet_batch.output.store import read_parquet

    sources = drop_sources(store, 2)
    assert len(sources) == 4 and all(n.startswith("drops-0002-g") for n in sources), sources
    pieces = [piece_range(n) for n in store.list_dir("_manifest")]
    assert len(pieces) == 8
    spans = []
    for name in sources:
        shards = set(read_parquet(store.fs, store.path(f"_sync/{name}")).column("shard").to_pylist())
        held = [r for r in pieces if any(r[0] <= x <= r[1] for x in shards)]
        spans.append((min(r[0] for r in held), max(r[1] for r in held)))
    spans.sort()
    assert all(a[1] < b[0] for a, b in zip(spans, spans[1:])), spans  # no manifest piece in two groups
    drops = read_plan_pieces(store, 2, "drops", DROPS_SCHEMA)
    assert drop_manifest_entries(store, sources) == 8  # each piece lost some (2% deleted, every 53rd changed)
    assert drop_manifest_entries(store, sources) == 0  # idempotent
    left = read_manifest(store)
    assert len(left) == len(manifest) - len(drops)
    assert not set(drops.column("path").to_pylist()) & set(left.column("path").to_pylist())


def test_partitions_grow_with_the_size():
    assert [partitions_for(n, 1000) for n in (0, 999, 1000, 1001, 5000, 10**9)] == [1, 1, 1, 2, 8, 4096]


def test_dropped_entries_leave_only_the_pieces_that_hold_them(tmp_path):
    from resnet_batch.embed.syncdiff import drop_manifest_entries
    from resnet_batch.output.manifest import read_manifest

    manifest, _, _ = _night(n=3000, per=50)
    store = OutputStore(str(tmp_path / "out"), {})
    import resnet_batch.output.manifest as m

    old, m.PIECE_ENTRIES = m.PIECE_ENTRIES, 1000
    try:
        write_entries(store, manifest)  # 3 pieces of 20 shards
    finally:
        m.PIECE_ENTRIES = old
    before = {n: (tmp_path / "out" / "_manifest" / n).stat().st_mtime_ns for n in store.list_dir("_manifest")}
    assert len(before) == 3
    drops = manifest.filter(pa.array([s in (0, 1) and i % 2 == 0 for i, s in
                                      enumerate(manifest.column("shard").to_pylist())])).select(["shard", "path"])
    gone = drops.append_column("x", pa.array([1] * len(drops)))
    assert drop_manifest_entries(store, drops.cast(DROPS_SCHEMA)) == 1
    assert drop_manifest_entries(store, drops.cast(DROPS_SCHEMA)) == 0  # idempotent
    after = {n: (tmp_path / "out" / "_manifest" / n).stat().st_mtime_ns for n in store.list_dir("_manifest")}
    assert [n for n in before if before[n] != after[n]] == ["m-000000-000019.parquet"]  # one piece rewritten
    left = read_manifest(store)
    assert len(left) == len(manifest) - len(gone) == 3000 - 50
    assert not set(zip(drops.column("shard").to_pylist(), drops.column("path").to_pylist())) & \
        set(zip(left.column("shard").to_pylist(), left.column("path").to_pylist()))
