"""report module: per-stage timing while the job runs, the reconciled run report, the success marker, the summary."""
from __future__ import annotations

import collections
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import pyarrow as pa
import pyarrow.compute as pc

from resnet_batch.listing import Listing
from resnet_batch.reader import SHARD_END
from resnet_batch.schema import DEVICE_NO_CUDA, STATUS_OK
from resnet_batch.writer import INCOMPLETE_REPORT_FILE, REPORT_FILE, SUCCESS_FILE, OutputStore


@dataclass
class RunStats:
    """Counters the driver accumulates from result batches (thread-safe for the writer threads)."""

    shards_total: int = 0
    shards_before: int = 0
    shards_written: int = 0
    rows: int = 0
    ok: int = 0
    decode_s: float = 0.0
    device_decode_s: float = 0.0
    model_s: float = 0.0
    write_s: float = 0.0
    startup_s: float = 0.0
    first_result_s: float = 0.0
    pipeline_s: float = 0.0
    wall_s: float = 0.0
    gpu_requested: bool = False
    actors: dict = field(default_factory=dict)  # "node:pid" -> {"node", "device", "images"}
    _t0: float = field(default_factory=time.perf_counter)
    _first: Optional[tuple[float, int]] = None
    _last: float = 0.0
    _last_print: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def absorb(self, table: pa.Table, now: float) -> None:
        rows = table.filter(pc.not_equal(table.column("status"), SHARD_END))
        if not self.rows:
            self._first = (now, len(rows))
        self._last = now
        self.rows += len(rows)
        self.ok += pc.sum(pc.equal(rows.column("status"), STATUS_OK)).as_py() or 0
        self.decode_s += pc.sum(rows.column("_decode_s")).as_py() or 0.0
        if "_device_decode_s" in rows.column_names:  # gpu_decode: decoding done inside the model actors
            self.device_decode_s += pc.sum(rows.column("_device_decode_s")).as_py() or 0.0
        self.model_s += pc.sum(rows.column("_model_s")).as_py() or 0.0
        for (worker, node, device), n in collections.Counter(
                zip(*(rows.column(c).to_pylist() for c in ("_worker", "_node", "_device")))).items():
            actor = self.actors.setdefault(worker, {"node": node, "device": device, "images": 0})
            actor["images"] += n

    def per_node(self) -> dict[str, int]:
        """Images embedded by each node's actors."""
        nodes: collections.Counter = collections.Counter()
        for a in self.actors.values():
            nodes[a["node"]] += a["images"]
        return dict(nodes)

    def devices(self) -> str:
        """What the model actors really ran on: "cuda", "cpu", or a mix such as "cpu (no CUDA)+cuda"."""
        return "+".join(sorted({a["device"] for a in self.actors.values()})) or "none"

    def first_result_at(self) -> Optional[float]:
        """perf_counter time of the first result batch (None when none came)."""
        return self._first[0] if self._first else None

    def steady_img_per_s(self) -> Optional[float]:
        """Throughput after the first result arrived (start-up excluded)."""
        if self._first is None or self._last <= self._first[0]:
            return None
        return (self.rows - self._first[1]) / (self._last - self._first[0])

    def wrote_part(self, seconds: float) -> None:
        with self._lock:
            self.shards_written += 1
            self.write_s += seconds

    def report_progress(self, enabled: bool, every_s: float = 10.0) -> None:
        now = time.perf_counter()
        if not enabled or now - self._last_print < every_s:
            return
        self._last_print = now
        done = self.shards_before + self.shards_written
        rate = self.rows / max(now - self._t0, 1e-9)
        todo = self.shards_total - done
        eta = ""
        if self.shards_written and todo:
            per_shard = (now - self._t0) / self.shards_written
            eta = f", ETA {_hms(per_shard * todo)}"
        print(f"[resnet-batch] shards {done}/{self.shards_total}, images {self.rows:,} "
              f"({self.rows - self.ok} failed), {rate:.1f} img/s{eta}", file=sys.stderr, flush=True)


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def bottleneck(stats: RunStats) -> dict:
    """Where the time went, and whether the model actors were waiting for decoded images."""
    actors = max(len(stats.actors), 1)
    # Busy share of the steady window (first result -> last result), so start-up does not count as starving.
    window = stats._last - stats._first[0] if stats._first else 0.0
    if window > 0 and stats.rows > stats._first[1]:
        busy = stats.model_s * (stats.rows - stats._first[1]) / stats.rows / (window * actors)
    else:
        busy = stats.model_s / max(stats.pipeline_s * actors, 1e-9)
    return {
        "decode_s": round(stats.decode_s, 3),
        "device_decode_s": round(stats.device_decode_s, 3),  # part of model_s when compute.gpu_decode
        "model_s": round(stats.model_s, 3),
        "write_s": round(stats.write_s, 3),
        "model_actors": actors,
        "model_busy_fraction": round(min(busy, 1.0), 3),
        "verdict": "model-bound" if busy >= 0.8 else "starved by decode or I/O (add CPUs / decode tasks)",
    }


def finalize(cfg, store: OutputStore, listing: Listing, provenance: dict, stats: RunStats, config: dict) -> dict:
    """Reconcile every part against the plan; write the run report, and _SUCCESS only when it balances."""
    done = store.done_parts()
    counts = collections.Counter()
    missing = []
    mismatched = []
    for shard in listing.shards:
        name = store.part_name(shard.index)
        if name not in done:
            missing.append(name)
            continue
        ps = store.part_stats(name)
        counts.update({k: ps.get(k, 0) for k in ("rows", "ok", "failed", "skipped")})
        if shard.kind == "files" and ps.get("rows") != len(shard.paths):
            mismatched.append(f"{name}: {ps.get('rows')} rows for {len(shard.paths)} files")
    skipped = len(listing.skipped) + counts["skipped"]
    inputs = counts["rows"] + skipped
    complete = not missing and not mismatched and counts["ok"] + counts["failed"] == counts["rows"]
    img_s = stats.rows / stats.pipeline_s if stats.pipeline_s else None
    report = {
        "output": store.display(),
        "complete": complete,
        "counts": {"inputs": inputs, "ok": counts["ok"], "failed": counts["failed"], "skipped": skipped,
                   "this_run": {"images": stats.rows, "ok": stats.ok, "failed": stats.rows - stats.ok}},
        "shards": {"total": len(listing.shards), "done_before": stats.shards_before,
                   "written": stats.shards_written, "missing": missing[:20], "mismatched": mismatched[:20]},
        "skipped_files": listing.skipped[:1000],
        "seconds": {"wall": round(stats.wall_s, 3), "startup": round(stats.startup_s, 3),
                    "first_result": round(stats.first_result_s, 3), "pipeline": round(stats.pipeline_s, 3)},
        "img_per_s": round(img_s, 2) if img_s else None,
        "steady_img_per_s": round(steady, 2) if (steady := stats.steady_img_per_s()) else None,
        "device": stats.devices(),
        "gpu_requested": stats.gpu_requested,
        "actors": [{"worker": w, **a} for w, a in sorted(stats.actors.items())],
        "stages": bottleneck(stats),
        "per_node": stats.per_node(),
        "provenance": provenance,
        "config": config,
    }
    if complete:  # the final report and the marker only when everything reconciles
        store.write_json(REPORT_FILE, report)
        store.write_json(SUCCESS_FILE, {"inputs": inputs, "ok": counts["ok"], "failed": counts["failed"],
                                        "skipped": skipped})
        store.remove(INCOMPLETE_REPORT_FILE)
    else:
        store.write_json(INCOMPLETE_REPORT_FILE, report)
    return report


def summary(report: dict, examples: Optional[list[tuple[str, str, float]]] = None) -> str:
    """A few lines for the terminal at the end of a run."""
    c = report["counts"]
    st = report["stages"]
    lines = [
        f"resnet-batch: {'complete' if report['complete'] else 'INCOMPLETE'} -> {report['output']}",
        f"  images: {c['ok']} ok, {c['failed']} failed, {c['skipped']} skipped (of {c['inputs']} inputs); "
        f"this run {c['this_run']['images']} images",
        f"  speed: {report['img_per_s'] or 0:.1f} img/s on {report['device']} "
        f"(steady {report['steady_img_per_s'] or 0:.1f}) "
        f"(wall {report['seconds']['wall']:.1f}s, first result after {report['seconds']['first_result']:.1f}s)",
        f"  time: decode {st['decode_s']:.1f}s, model {st['model_s']:.1f}s, write {st['write_s']:.1f}s "
        f"({st['model_actors']} actor(s), model busy {st['model_busy_fraction']:.0%}: {st['verdict']})",
    ]
    no_cuda = [a for a in report["actors"] if a["device"] == DEVICE_NO_CUDA]
    if no_cuda:
        lines.append(f"  warning: {len(no_cuda)} model actor(s) were given a GPU but their torch sees no CUDA device, "
                     f"so they ran on the CPU ({sum(a['images'] for a in no_cuda)} images); "
                     "compute.device=cuda makes this an error")
    if len(report["per_node"]) > 1:
        short = len({node[:12] for node in report["per_node"]}) == len(report["per_node"])  # as `ray list nodes`
        lines.append("  per node: " + ", ".join(f"{node[:12] if short else node}={n}"
                                                for node, n in sorted(report["per_node"].items())))
    if str(report["provenance"].get("weights_id", "")).startswith("random"):
        lines.append("  note: random weights (model.weights=random): labels are not meaningful, embeddings are "
                     "only self-consistent")
    for image_id, label, prob in examples or []:
        lines.append(f"  e.g. {image_id}: {label} ({prob:.2f})")
    if not report["complete"]:
        lines.append(f"  missing shards: {report['shards']['missing'][:5]}; rerun the same command to resume")
    return "\n".join(lines)
