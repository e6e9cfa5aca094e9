"""sync_bench: a night's sync plan over 1M and 10M synthetic manifest rows, inventory input: driver peak RSS and time.

For each size an output is made as a finished first night would leave it (manifest pieces, one complete
ledger record per shard, _state.json) together with tonight's S3 Inventory-style Parquet list: 1% new,
0.5% changed, 0.5% deleted (a fifth of the deleted ones reappear under a new name: moves). Then a fresh
process (the driver) plans the sync with the product's own function (`syncdiff.plan_sync`: listing and
manifest partitioned by path, a diff task per partition, moves per (size, ETag) partition, plan pieces
written by the tasks) and prints its peak RSS (ru_maxrss) and the time. The photos themselves are not
needed (an inventory lists objects without reading them), so the embedding of the new ones is not part of
this figure. For comparison the in-memory diff (`plan.diff`, the whole library in the driver) is measured
at the smallest size.

    python benchmarks/sync_bench.py --sizes 1000000 10000000

With --apply the plan is then applied in another fresh process with the product's `sync.apply` (the drops
read and applied per shard group by Ray tasks: the parts of the dropped photos, here absent, and the
manifest pieces that hold them), and that driver's peak RSS is printed; --deleted sets the share of
deleted photos, so that a night with many deletes can be set beside one with few:

    python benchmarks/sync_bench.py --sizes 1000000 --deleted 0.005 --apply --no-baseline
    python benchmarks/sync_bench.py --sizes 1000000 --deleted 0.1 --apply --no-baseline
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PER_SHARD = 1000
INPUT = "s3://photos/lib"  # never contacted: the inventory lists it


def make(work: Path, n: int, seed: int = 0, deleted_share: float = 0.005) -> None:
    """The output of a finished first night over n photos, and tonight's inventory."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from resnet_batch.output.ledger import records_table
    from resnet_batch.output.manifest import MANIFEST_SCHEMA, write_entries
    from resnet_batch.output.state import OutputState, save
    from resnet_batch.output.store import LEDGER_DIR, OutputStore

    rng = np.random.default_rng(seed)
    days = rng.integers(0, 3650, n)
    days.sort()
    keys = [f"{2015 + d // 365}/{(d % 365) // 31 + 1:02d}/{d % 31 + 1:02d}/IMG_{i:08d}.jpg" for i, d in enumerate(days)]
    sizes = rng.integers(1_500_000, 6_000_000, n)
    etags = [f"{i:08x}{s:024x}" for i, s in zip(range(n), sizes)]
    shards = np.arange(n) // PER_SHARD
    out = OutputStore(str(work / "out"), {})
    manifest = pa.table({"path": pa.array(keys, pa.string()).cast(pa.binary()), "size": sizes,
                         "mtime_ns": pa.nulls(n, pa.int64()), "etag": pa.array(etags, pa.string()).cast(pa.binary()),
                         "shard": shards}, schema=MANIFEST_SCHEMA)
    write_entries(out, manifest)
    del manifest
    last = int(shards[-1])
    records = [{"part": f"part-{s:06d}.parquet", "shard": s, "chunk": -1, "chunks": -1, "rows": PER_SHARD,
                "ok": PER_SHARD, "failed": 0, "skipped": 0, "run": 1, "written_at": 1.0} for s in range(last + 1)]
    out.write(f"{LEDGER_DIR}/l-0001-000000.parquet", records_table(records))
    save(out, OutputState(INPUT, "folder", "photos/lib", "s3", {}, "", last + 1,
                          runs=[{"run": 1, "status": "complete"}]))
    # tonight: 0.5% deleted (a fifth of them moved; --deleted), 0.5% changed, 1% new
    r = rng.random(n)
    deleted, changed = r < deleted_share, (r >= deleted_share) & (r < deleted_share + 0.005)
    moved = deleted & (rng.random(n) < 0.2)
    inv_keys = [k for k, d in zip(keys, deleted) if not d]
    inv_sizes = sizes[~deleted].tolist()
    inv_etags = [("c" + e[1:]) if c else e for e, c, d in zip(etags, changed, deleted) if not d]
    for i in np.flatnonzero(moved):
        inv_keys.append(f"moved/{keys[i]}"), inv_sizes.append(int(sizes[i])), inv_etags.append(etags[i])
    for j in range(n // 100):
        inv_keys.append(f"2026/12/06/NEW_{j:08d}.jpg"), inv_sizes.append(2_000_000 + j), inv_etags.append(f"n{j:031x}")
    inv = work / "inventory"
    inv.mkdir()
    m = len(inv_keys)
    step = 1_000_000
    for k, start in enumerate(range(0, m, step)):
        sl = slice(start, start + step)
        pq.write_table(pa.table({"bucket": pa.array(["photos"] * len(inv_keys[sl])),
                                 "key": pa.array(["lib/" + x for x in inv_keys[sl]]),
                                 "size": pa.array(inv_sizes[sl], pa.int64()),
                                 "last_modified_date": pa.array(np.full(len(inv_keys[sl]), 1_700_000_000_000),
                                                                pa.timestamp("ms")),
                                 "e_tag": pa.array(inv_etags[sl])}), inv / f"data-{k:04d}.parquet")
    (work / "night.json").write_text(json.dumps({"rows": n, "inventory_rows": m, "deleted": int(deleted.sum()),
                                                 "changed": int(changed.sum()), "moved": int(moved.sum()),
                                                 "new": n // 100}))


def plan(work: Path, cpus: int, per_partition: int) -> dict:
    """The driver: plan tonight's sync with the product's function, in this (fresh) process."""
    import ray

    from resnet_batch.embed import syncdiff

    syncdiff.ROWS_PER_PARTITION = per_partition  # the default unless --rows-per-partition says otherwise

    from resnet_batch.config import InputConfig
    from resnet_batch.embed.plan import complete_shards
    from resnet_batch.output.ledger import read_ledger
    from resnet_batch.output.state import load
    from resnet_batch.output.store import OutputStore

    t0 = time.perf_counter()
    store = OutputStore(str(work / "out"), {})
    state = load(store)
    done, _ = complete_shards(read_ledger(store))
    cfg = InputConfig(uri=INPUT, inventory=str(work / "inventory"), format="folder", images_per_shard=PER_SHARD)

    def start_ray():
        if not ray.is_initialized():
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})

    result = syncdiff.plan_sync(cfg, "folder", state.root, store, 2, state.next_shard, done, 60.0, start_ray)
    seconds = time.perf_counter() - t0
    return {"partitions": result.partitions, "counts": result.counts, "seconds": round(seconds, 1),
            "steps_s": result.seconds, "new_shards": result.next_shard - state.next_shard,
            "plan_pieces": result.pieces,
            "driver_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def apply(work: Path, cpus: int) -> dict:
    """A fresh driver applies the stored plan of run 2 (as sync_run does once the plan is committed):
    entries moved into the manifest, the drops applied per shard group by tasks, the manifest updated."""
    import ray

    from resnet_batch.embed import sync as syncing
    from resnet_batch.embed.syncdiff import move_entry_pieces
    from resnet_batch.output.store import OutputStore, PartSettings

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    t0 = time.perf_counter()
    store = OutputStore(str(work / "out"), {})
    entries, drops, copies = syncing.load_plan(store, 2)
    move_entry_pieces(store, 2)
    import pyarrow as pa

    part = PartSettings(store.uri, {}, pa.schema([]), "zstd", "float16", 60.0, 2)
    # no copies here: their source parts are not in this synthetic output (the drops' are not either: what is
    # measured is the drops reaching their shards and the manifest, never the driver)
    counts = syncing.apply(store, part, "folder", "photos/lib", "s3", entries, drops, [], {}, {},
                           lambda r: None)
    return {"seconds": round(time.perf_counter() - t0, 1), "dropped": counts["dropped"], "sources": len(drops),
            "driver_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def held(work: Path) -> dict:
    """For comparison, the earlier apply's driver: every drop of the plan read into one table, then grouped
    into per-shard id lists (what it handed to one drop task per shard)."""
    from resnet_batch.embed.listing import from_raw, storable
    from resnet_batch.embed.plan import DROPS_SCHEMA
    from resnet_batch.embed.sync import _groups
    from resnet_batch.embed.syncdiff import read_plan_pieces
    from resnet_batch.output.store import OutputStore

    import ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)  # as the applying driver has it
    t0 = time.perf_counter()
    drops = read_plan_pieces(OutputStore(str(work / "out"), {}), 2, "drops", DROPS_SCHEMA)
    ids = [sorted(storable(from_raw(p)) for p in g.column("path").to_pylist()) for _, g in _groups(drops, "shard")]
    return {"seconds": round(time.perf_counter() - t0, 1), "dropped": sum(map(len, ids)),
            "driver_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def in_memory(work: Path) -> dict:
    """The earlier way: the whole listing and manifest in the driver, one diff."""
    from resnet_batch.config import InputConfig
    from resnet_batch.embed.inventory import inventory_listing
    from resnet_batch.embed.plan import complete_shards, diff, select
    from resnet_batch.output.ledger import read_ledger
    from resnet_batch.output.manifest import read_manifest
    from resnet_batch.output.state import load
    from resnet_batch.output.store import OutputStore

    t0 = time.perf_counter()
    store = OutputStore(str(work / "out"), {})
    state = load(store)
    done, _ = complete_shards(read_ledger(store))
    cfg = InputConfig(uri=INPUT, inventory=str(work / "inventory"), format="folder", images_per_shard=PER_SHARD)
    current, _ = select(cfg, "folder", inventory_listing(cfg.inventory, {}, cfg.uri).pages)
    p = diff(cfg, "folder", state.root, current, read_manifest(store), done, state.next_shard)
    return {"counts": p.counts, "seconds": round(time.perf_counter() - t0, 1),
            "driver_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _child(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="Ray's CPUs for the diff tasks")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--rows-per-partition", type=int, default=None,
                    help="entries per diff partition (default: the product's ROWS_PER_PARTITION)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the in-memory diff at the smallest size")
    ap.add_argument("--deleted", type=float, default=0.005, help="share of the photos deleted tonight")
    ap.add_argument("--apply", action="store_true", help="then apply the plan in a fresh driver (its peak RSS)")
    ap.add_argument("--step", choices=["make", "plan", "memory", "apply", "held"], help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.step == "make":
        make(Path(a.dir), a.n, deleted_share=a.deleted)
        print(json.dumps({"made": a.n}))
        return
    if a.step == "plan":
        from resnet_batch.embed.syncdiff import ROWS_PER_PARTITION

        print(json.dumps(plan(Path(a.dir), a.cpus, a.rows_per_partition or ROWS_PER_PARTITION)))
        return
    if a.step == "apply":
        print(json.dumps(apply(Path(a.dir), a.cpus)))
        return
    if a.step == "held":
        print(json.dumps(held(Path(a.dir))))
        return
    if a.step == "memory":
        print(json.dumps(in_memory(Path(a.dir))))
        return
    base = Path(a.workdir or tempfile.mkdtemp(prefix="sync-bench-"))
    rows = []
    for n in a.sizes:
        work = base / (f"n{n}" if a.deleted == 0.005 else f"n{n}-d{a.deleted}")
        if not (work / "night.json").exists():
            work.mkdir(parents=True, exist_ok=True)
            t = time.perf_counter()
            _child("--step", "make", "--dir", str(work), "--n", str(n), "--deleted", str(a.deleted))
            print(f"{n:,} rows: fixture made in {time.perf_counter() - t:.0f} s", flush=True)
        got = _child("--step", "plan", "--dir", str(work), "--cpus", str(a.cpus),
                     *(["--rows-per-partition", str(a.rows_per_partition)] if a.rows_per_partition else []))
        night = json.loads((work / "night.json").read_text())
        rows.append((n, got))
        print(f"{n:>11,} rows  partitioned: {got['partitions']} partitions, {got['seconds']:.1f} s "
              f"(split {got['steps_s']['split']} / diff {got['steps_s']['diff']} / write {got['steps_s']['write']}), "
              f"driver peak RSS {got['driver_peak_rss_bytes'] / 2**20:,.0f} MiB; {got['counts']}; "
              f"{got['new_shards']} new shards; fixture {night}", flush=True)
        if a.apply:
            ap_ = _child("--step", "apply", "--dir", str(work), "--cpus", str(a.cpus))
            print(f"{n:>11,} rows  apply: {ap_['dropped']:,} drops in {ap_['sources']} shard-group pieces, "
                  f"{ap_['seconds']:.1f} s, driver peak RSS {ap_['driver_peak_rss_bytes'] / 2**20:,.0f} MiB", flush=True)
            old = _child("--step", "held", "--dir", str(work))
            print(f"{n:>11,} rows  (before: the drops in the driver, as the earlier apply held them: "
                  f"{old['dropped']:,} drops, driver peak RSS {old['driver_peak_rss_bytes'] / 2**20:,.0f} MiB)",
                  flush=True)
        if n == min(a.sizes) and not a.no_baseline:
            mem = _child("--step", "memory", "--dir", str(work))
            assert mem["counts"] == got["counts"], (mem["counts"], got["counts"])
            print(f"{n:>11,} rows  in-memory diff: {mem['seconds']:.1f} s, driver peak RSS "
                  f"{mem['driver_peak_rss_bytes'] / 2**20:,.0f} MiB (same counts)", flush=True)
    if len(rows) >= 2:
        (n0, a0), (n1, a1) = rows[0], rows[-1]
        ratio = a1["driver_peak_rss_bytes"] / a0["driver_peak_rss_bytes"]
        print(f"driver peak RSS at {n1:,} / at {n0:,}: {ratio:.2f}x "
              f"({a1['driver_peak_rss_bytes'] / 2**30:.2f} GiB at {n1:,}); goal <= 1.2x and <= 2 GiB")


if __name__ == "__main__":
    main()
