"""reconcile module: the end of a run: the folder checked against the manifest (every current image exactly
once), the run's report gathered and written, `_SUCCESS` only when everything balances; and the ledger as the
parts stand."""
from __future__ import annotations

import time

import pyarrow as pa
import pyarrow.compute as pc

from resnet_batch.embed.job import Job
from resnet_batch.embed.listing import FORMATS
from resnet_batch.embed.plan import complete_shards
from resnet_batch.embed.report import actor_rows, peak_rss, shard_desc, stages
from resnet_batch.errors import RunFailed
from resnet_batch.output.failures import read_failures
from resnet_batch.output.ledger import compact, read_ledger, recover, records_table
from resnet_batch.output.samples import sample_labels
from resnet_batch.output.state import OutputState, save, stamp
from resnet_batch.output.store import INCOMPLETE_REPORT_FILE, REPORT_FILE, SUCCESS_FILE


def finish(job: Job, state: OutputState, run_no: int, expected: dict[int, int], skipped, listed: int) -> dict:
    """Reconcile the folder with the manifest, write the report, _SUCCESS only when everything balances."""
    store = job.store
    if job.ledger is not None:
        job.ledger.flush()
    ledger, parts = current_ledger(job)
    if job.recovered:  # records a killed driver never logged, read from the parts: logged now
        job.ensure_ledger(run_no)
        for record in job.recovered:
            job.ledger.add(record)
        job.ledger.flush()
    done, by_shard = complete_shards(ledger)
    stale = [n for n, (s, _) in parts.items() if s not in expected]
    for n in stale:  # parts of shards the manifest no longer has (an interrupted sync's leftovers)
        store.remove(n)
    missing = sorted(s for s in expected if s not in done)
    kinds = FORMATS[state.format]
    mismatched = [f"shard {s}: {by_shard[s]['rows']} rows for {n} files" for s, n in expected.items()
                  if kinds.name == "folder" and s in done and by_shard[s]["rows"] != n]
    totals = {k: sum(by_shard[s][k] for s in expected if s in by_shard) for k in ("rows", "ok", "failed",
                                                                                  "skipped")}
    skipped_total = skipped.count + totals["skipped"]
    complete = not missing and not mismatched and not job.failures
    report = run_report(job, state, run_no, complete, totals, skipped, skipped_total, expected, missing, mismatched,
                        ledger)
    if complete:
        store.write(REPORT_FILE, report)
        store.write(SUCCESS_FILE, {"inputs": report["counts"]["inputs"], "ok": totals["ok"],
                                        "failed": totals["failed"], "skipped": skipped_total})
        store.remove(INCOMPLETE_REPORT_FILE)
    else:
        store.write(INCOMPLETE_REPORT_FILE, report)
    entry = state.run(run_no)
    entry.update(finished=stamp(), status="complete" if complete else "incomplete",
                 embedded=job.stats.images, failed=job.stats.failed, reused=job.sync.get("reused", 0),
                 removed=job.sync.get("removed", 0), wall_s=report["seconds"]["wall"],
                 img_per_s=report["img_per_s"])
    save(store, state)
    compact(store, run_no)
    if job.failures:
        names = "; ".join(f"shard {f.shard.index} ({shard_desc(f.shard, state)}): {f.reason}"
                          for f in job.failures[:5])
        err = RunFailed(f"{len(job.failures)} shard(s) failed {job.cfg.compute.max_attempts} times: {names}")
        err.report = report
        raise err
    return report


def current_ledger(job: Job) -> tuple[pa.Table, dict]:
    """The ledger, with records recovered for parts that a killed driver never logged; and the parts."""
    names = job.store.names()
    parts = job.store.parts(names)
    ledger = read_ledger(job.store)
    logged = set(pc.filter(ledger.column("part"), pc.not_equal(ledger.column("part"), "")).to_pylist())
    missing = sorted(n for n in parts if n not in logged)
    job.recovered = recover(job.store, missing, job.provenance) if missing else []
    if missing:
        ledger = read_ledger_with(ledger, job.recovered)
    present = pc.or_(pc.equal(ledger.column("part"), ""), pc.is_in(ledger.column("part"),
                                                                     pa.array(list(parts), pa.string())))
    return ledger.filter(present), parts


def read_ledger_with(ledger: pa.Table, records: list[dict]) -> pa.Table:
    from resnet_batch.output.ledger import latest

    return latest(pa.concat_tables([ledger, records_table(records)]))


def run_report(job: Job, state, run_no: int, complete: bool, totals: dict, skipped, skipped_total: int,
               expected: dict, missing: list, mismatched: list, ledger: pa.Table) -> dict:
    """The run's report (`_report.json`): counts, shards, sync, start-up marks, speed, actors, failures, setup."""
    import os
    import socket

    from resnet_batch.cluster import ray_logs_dir
    from resnet_batch.config import redacted

    st = job.stats
    wall = time.perf_counter() - job.t_start
    pipeline, actors = job.pipeline_s, job.actor_info
    first = (st.first[0] - st.t0) if st.first else 0.0
    output_arg = job.cfg.output.uri if "://" in job.cfg.output.uri else job.store.display()
    report = {
        "output": job.store.display(),
        "output_arg": output_arg,
        "next_index": _next_index(output_arg, dict(job.cfg.output.storage_options)),
        "complete": complete,
        "run": run_no,
        "counts": {"inputs": totals["rows"] + skipped_total, "ok": totals["ok"], "failed": totals["failed"],
                   "skipped": skipped_total, "done_before": job.done_before,
                   "this_run": {"images": st.images, "ok": st.ok, "failed": st.failed}},
        "shards": {"total": len(expected), "parts_written": st.parts, "missing": missing[:20],
                   "mismatched": mismatched[:20]},
        "sync": job.sync,
        "listing": job.listing,
        "skipped_files": skipped.examples,
        "startup": {k: round(v, 3) for k, v in sorted(job.marks.items(), key=lambda kv: kv[1])},
        "seconds": {"wall": round(wall, 3), "startup": round(job.startup_s, 3),
                    "first_result": round(first, 3), "pipeline": round(pipeline, 3)},
        "img_per_s": round(st.images / pipeline, 2) if pipeline and st.images else None,
        "steady_img_per_s": round(v, 2) if (v := st.steady_img_per_s()) else None,
        "device": st.devices(),
        "gpu_requested": bool(job.gpu),
        "actors": actor_rows(actors, st.actors),
        "stages": stages(st, max(len(actors), len(st.actors), 1)),
        "per_node": st.per_node(),
        "reads": job.read_stats,
        "driver": {"pid": os.getpid(), "host": socket.gethostname(), "peak_rss_bytes": peak_rss(),
                   "bytes_received": job.driver_bytes,
                   "bytes_per_image": round(job.driver_bytes / st.images, 2) if st.images else None},
        "failures": read_failures(job.store, ledger),
        "labels": sample_labels(job.store, ledger, run_no),
        "ray_logs": ray_logs_dir(),
        "failed_shards": [{"shard": f.shard.index, "attempts": f.attempts, "reason": f.reason,
                           "what": shard_desc(f.shard, state)} for f in job.failures],
        "provenance": job.provenance,
        "config": redacted(job.cfg),
    }
    return report


def _next_index(output_arg: str, storage_options: dict) -> dict:
    """Where the summary suggests the index of this output (beside it, as the README's `OUT-index`), and whether
    one is there already (then `index` updates it)."""
    from resnet_batch.storage import filesystem

    uri = output_arg.rstrip("/") + "-index"
    try:
        fs, path = filesystem(uri, storage_options)
        exists = fs.exists(path + "/index.json")  # search/layout.META_FILE: an index's own description
    except Exception:  # unreachable or refused: the hint only says less
        exists = False
    return {"uri": uri, "exists": bool(exists)}
