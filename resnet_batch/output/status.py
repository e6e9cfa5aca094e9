"""status module: `resnet-batch status OUTPUT`: what an output holds, without running anything.

Complete or not (and whether a run holds it now), images ok / failed / skipped, the history of runs, and
the most common failure reasons with a few image ids each; `--failed` lists every failed image. Exit 0
complete, 1 incomplete, 2 not an output.
"""
from __future__ import annotations

import json
import time
from typing import Optional

import pyarrow as pa
import pyarrow.compute as pc

from resnet_batch.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from resnet_batch.output.ledger import read_ledger, totals
from resnet_batch.output.lock import STALE_S, OutputLock, alive_here
from resnet_batch.output.failures import read_failures
from resnet_batch.output.state import load
from resnet_batch.text import printable
from resnet_batch.output.store import (INCOMPLETE_REPORT_FILE, PROVENANCE_FILE, REPORT_FILE, SUCCESS_FILE, OutputStore,
                                 read_parquet)


def output_status(uri: str, storage_options: Optional[dict] = None) -> Optional[dict]:
    """Everything `status` shows, as a dict; None when `uri` is not a resnet-batch output."""
    store = OutputStore(uri, dict(storage_options or {}), retry_window_s=30.0)
    names = store.names()
    if not store.is_output(names):
        return None
    state = load(store)
    holder = OutputLock(store).read() if "_lock" in names else None
    live = holder is not None and time.time() - holder.heartbeat < STALE_S and alive_here(holder)
    ledger = read_ledger(store)
    parts = store.parts(names)
    present = ledger.filter(pc.or_(pc.equal(ledger.column("part"), ""),
                                   pc.is_in(ledger.column("part"), pa.array(list(parts), pa.string()))))
    report = store.read_json(REPORT_FILE) if SUCCESS_FILE in names else store.read_json(INCOMPLETE_REPORT_FILE)
    counts = report.get("counts") if isinstance(report, dict) else None
    counts = counts if isinstance(counts, dict) else {**totals(present), "inputs": None}
    provenance = store.read_json(PROVENANCE_FILE) or {}
    provenance = provenance if isinstance(provenance, dict) else {}
    runs = [dict(r) for r in (state.runs if state and isinstance(state.runs, list) else []) if isinstance(r, dict)]
    last = dict(runs[-1]) if runs else {}
    for r in runs[:-1] if live else runs:  # a run that no live lock backs was killed or lost
        if r.get("status") == "running":
            r["status"] = "interrupted"
    if SUCCESS_FILE in names and not live:
        verdict = "complete"
    elif live:
        verdict = "running"
    else:
        verdict = "incomplete"
    return {
        "output": store.display(),
        "status": verdict,
        "complete": verdict == "complete",
        "held_by": holder.__dict__ if live else None,
        "stale_lock": holder.__dict__ if holder is not None and not live else None,
        "input": state.input if state else None,
        "format": state.format if state else None,
        "counts": {k: counts.get(k) for k in ("inputs", "ok", "failed", "skipped")},
        "parts": len(parts),
        "model": {k: provenance.get(k) for k in ("weights_id", "weights_sha256", "precision")},
        "runs": runs,
        "last_run_finished": last.get("status") not in (None, "running") or live,
        "failures": read_failures(store, present),
        "ledger_rows": len(present),
    }


def _t(value) -> str:
    """A field read from the output's own files (which anyone could have written), safe to print: any type,
    terminal controls escaped."""
    return printable("" if value is None else str(value))


def _n(value, spec: str = ",") -> str:
    """A count or a figure; a field of another type is shown as text, not a traceback."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec)
    return _t(value if value is not None else 0)


def _when(value) -> str:
    try:
        return time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(float(value)))
    except (TypeError, ValueError, OverflowError, OSError):
        return _t(value)


def format_status(s: dict) -> str:
    """The status as a few lines for a person (every field from the output's files through printable())."""
    lines = [f"{_t(s['output'])}: {s['status']}"]
    if s["held_by"]:
        h = s["held_by"]
        lines.append(f"  a run holds it now: pid {_t(h.get('pid'))} on {_t(h.get('host'))}, started "
                     f"{_when(h.get('started'))}")
    elif not s["last_run_finished"]:
        lines.append("  the last run did not finish (killed or lost); rerun the same command to finish it")
    c = s["counts"]
    inputs = f" (of {_n(c['inputs'])} inputs)" if c.get("inputs") is not None else ""
    lines.append(f"  images: {_n(c['ok'] or 0)} ok, {_n(c['failed'] or 0)} failed, {_n(c['skipped'] or 0)} skipped"
                 f"{inputs}; {_n(s['parts'])} parts")
    if s["input"]:
        m = s["model"]
        lines.append(f"  input: {_t(s['input'])} ({_t(s['format'])}); weights {_t(m['weights_id'])}, "
                     f"{_t(m['precision'])}")
    runs = [r for r in s["runs"] if isinstance(r, dict)] if isinstance(s["runs"], list) else []
    if runs:
        lines.append("  runs:")
        for r in runs[-10:]:
            speed = f", {_n(r['img_per_s'], ',.1f')} img/s" if r.get("img_per_s") else ""
            wall = f" in {_n(r['wall_s'], '.0f')}s" if r.get("wall_s") is not None else ""
            lines.append(f"    #{_t(r.get('run'))} {_t(r.get('started', '?'))} {_t(r.get('status', '?'))}: "
                         f"{_n(r.get('embedded', 0))} embedded, {_n(r.get('reused', 0))} reused, "
                         f"{_n(r.get('removed', 0))} removed{wall}{speed}; {_t(r.get('weights_id'))} "
                         f"{_t(r.get('precision'))}")
    if s["failures"]:
        lines.append("  failures:")
        for g in s["failures"][:5]:
            ids = ", ".join(printable(i) for i in g["examples"])
            lines.append(f"    {_n(g['count'])} × {_t(g['status'])}: {printable(g['reason'] or '')[:100]} (e.g. {ids})")
        lines.append(f"  all of them: resnet-batch status {_t(s['output'])} --failed")
    return "\n".join(lines)


def failed_rows(uri: str, storage_options: Optional[dict] = None):
    """(image_id, status, error) of every failed image, part by part."""
    store = OutputStore(uri, dict(storage_options or {}), retry_window_s=30.0)
    ledger = read_ledger(store)
    parts = ledger.filter(pc.and_(pc.greater(ledger.column("failed"), 0), pc.not_equal(ledger.column("part"), "")))
    for name in sorted(parts.column("part").to_pylist()):
        try:
            t = read_parquet(store.fs, store.path(name), ["image_id", "status", "error"])
        except FileNotFoundError:
            continue
        t = t.filter(pc.not_equal(t.column("status"), "ok"))
        yield from zip(*(t.column(c).to_pylist() for c in ("image_id", "status", "error")))


def status_main(args) -> int:
    from resnet_batch.errors import UserError

    options = json.loads(args.storage_options) if args.storage_options else {}
    try:
        s = output_status(args.output, options)
    except UserError as err:
        print(f"error: {printable(str(err))}")
        return EXIT_USAGE
    except FileNotFoundError:
        s = None
    if s is None:
        print(f"{printable(args.output)}: not a resnet-batch output (no _provenance.json or _state.json)")
        return EXIT_USAGE
    if args.failed:
        for image_id, status, error in failed_rows(args.output, options):
            print(f"{printable(image_id)}\t{status}\t{printable(error or '')}")
    elif args.json:
        print(json.dumps(s, indent=2, sort_keys=True, default=str))
    else:
        print(format_status(s))
    return EXIT_OK if s["complete"] else EXIT_FAILED


def register(subparsers) -> None:
    p = subparsers.add_parser("status", help="what an embed output holds: complete?, counts, runs, failures")
    p.add_argument("output", metavar="OUTPUT", help="the embed output folder (local path or s3://...)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--failed", action="store_true", help="list every failed image: image_id, status, error")
    p.add_argument("--storage-options", help="fsspec options as JSON")
    p.set_defaults(func=status_main)
