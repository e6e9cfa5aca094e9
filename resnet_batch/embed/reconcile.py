"""reconcile module: the end of a run: the folder checked against the manifest (every current image exactly
once), the report written, `_SUCCESS` only when everything balances; and the ledger as the parts stand."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from resnet_batch.embed.job import Job
from resnet_batch.embed.listing import FORMATS
from resnet_batch.embed.plan import complete_shards
from resnet_batch.embed.report import run_report, shard_desc
from resnet_batch.errors import RunFailed
from resnet_batch.output.ledger import compact, read_ledger, recover, records_table
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
