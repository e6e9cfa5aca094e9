"""report module: what a run did, from the per-chunk records: counts, per-stage seconds, per actor and node,
where the time went (model-, input- or write-bound, with the numbers), failures by reason, and the summary."""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Optional


from resnet_batch.schema import DEVICE_NO_CUDA

JUDGE_MIN_S = 20.0  # a steady window shorter than this is too short to say what limits the run
JUDGE_MIN_PARTS = 4
BUSY = 0.8


@dataclass
class RunStats:
    """Counters the driver accumulates from the chunk records of this run."""

    images: int = 0
    ok: int = 0
    parts: int = 0
    decode_s: float = 0.0
    model_s: float = 0.0
    write_s: float = 0.0
    bytes: int = 0
    copied: int = 0
    dropped: int = 0
    actors: dict = field(default_factory=dict)  # actor id -> {node, pid, device, images, model_s, write_s}
    t0: float = field(default_factory=time.perf_counter)
    first: Optional[tuple[float, int]] = None  # (time, images) at the first record
    last: float = 0.0
    steady_model_s: float = 0.0  # model/write seconds of the records after the first one
    steady_write_s: float = 0.0

    def absorb(self, r: dict) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = (now, r["rows"])
        else:
            self.steady_model_s += r["model_s"]
            self.steady_write_s += r["write_s"]
        self.last = now
        self.images += r["rows"]
        self.ok += r["ok"]
        self.parts += bool(r["part"])
        self.decode_s += r["decode_s"]
        self.model_s += r["model_s"]
        self.write_s += r["write_s"]
        self.bytes += r["bytes"]
        a = self.actors.setdefault(r["actor"], {"node": r["node"], "pid": r["pid"], "device": r["device"],
                                                "images": 0, "parts": 0, "model_s": 0.0, "write_s": 0.0})
        a["images"] += r["rows"]
        a["parts"] += bool(r["part"])
        a["model_s"] += r["model_s"]
        a["write_s"] += r["write_s"]

    @property
    def failed(self) -> int:
        return self.images - self.ok

    def window(self) -> float:
        return self.last - self.first[0] if self.first else 0.0

    def steady_img_per_s(self) -> Optional[float]:
        """Throughput after the first result arrived (start-up excluded)."""
        w = self.window()
        return (self.images - self.first[1]) / w if self.first and w > 0 else None

    def per_node(self) -> dict[str, int]:
        nodes: collections.Counter = collections.Counter()
        for a in self.actors.values():
            nodes[a["node"]] += a["images"]
        return dict(nodes)

    def devices(self) -> str:
        return "+".join(sorted({a["device"] for a in self.actors.values()})) or "none"


def stages(stats: RunStats, actors: int) -> dict:
    """Where the time went, and what limited the run (only when it did enough work to judge)."""
    actors = max(actors, 1)
    window = stats.window()
    out = {"decode_s": round(stats.decode_s, 3), "model_s": round(stats.model_s, 3), "write_s": round(stats.write_s, 3),
           "model_actors": actors, "steady_window_s": round(window, 3), "model_busy_fraction": None,
           "write_busy_fraction": None, "verdict": None}
    if window < JUDGE_MIN_S or stats.parts < JUDGE_MIN_PARTS:
        out["verdict"] = "too little work to judge" if stats.images else "nothing to do"
        return out
    model_busy = min(stats.steady_model_s / (window * actors), 1.0)
    write_busy = min(stats.steady_write_s / (window * actors), 1.0)
    out["model_busy_fraction"], out["write_busy_fraction"] = round(model_busy, 3), round(write_busy, 3)
    if model_busy >= BUSY:
        out["verdict"] = "model-bound"
    elif write_busy >= BUSY or write_busy > model_busy:
        out["verdict"] = "write-bound"
    else:
        out["verdict"] = "input-bound"
    return out


ADVICE = {
    "model-bound": "the model actors were busy: add GPUs (compute.max_actors, gpu nodes) to go faster",
    "input-bound": "the model actors waited for decoded images: add CPU nodes or decode CPUs, or try "
                   "compute.gpu_decode",
    "write-bound": "the actors spent their time writing parts: the output store is the limit (more actors "
                   "spread the writes; check the store's throughput)",
}


def actor_rows(started: dict, worked: dict) -> list[dict]:
    """Every model actor that came up (those that got no work too), with what it did."""
    out = {k: {"node": i["node"], "pid": i["pid"], "device": i["device"], "images": 0, "parts": 0}
           for k, i in started.items()}
    for k, a in worked.items():
        out[k] = {f: a[f] for f in ("node", "pid", "device", "images", "parts")}
    return [{"actor": k, **v} for k, v in sorted(out.items())]


def peak_rss() -> int:
    """This process's peak resident memory in bytes."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def shard_desc(shard, state) -> str:
    """A shard in a person's words: its file, or how many files from which first one."""
    from resnet_batch.embed.listing import relative_id

    first = relative_id(shard.paths[0], state.root) if shard.paths else "?"
    return first if len(shard.paths) == 1 else f"{len(shard.paths)} files from {first}"


# -- the summary ---------------------------------------------------------------------------------------


def summary(report: dict, printable=str) -> str:
    """What a person reads at the end of a run: counts, what failed and why, the speed and what limited
    it, where the output is and what to run next."""
    c, st, out = report["counts"], report["stages"], report["output"]
    this = c["this_run"]
    status = "complete" if report["complete"] else "INCOMPLETE"
    lines = [f"resnet-batch: {status} -> {out}",
             f"  images: {c['ok']:,} ok, {c['failed']:,} failed, {c['skipped']:,} skipped (of {c['inputs']:,} "
             f"inputs)"]
    sync = report.get("sync") or {}
    if this["images"] and not this["ok"]:  # a night whose every photo failed embedded nothing
        done = f"none embedded: all {this['failed']:,} failed"
    else:
        done = f"{this['ok']:,} embedded" + (f", {this['failed']:,} failed" if this["failed"] else "")
    changes = [done] + [f"{sync[k]:,} {label}" for k, label in
                                                   (("reused", "reused (moved or copied)"),
                                                    ("deleted", "removed (deleted)"),
                                                    ("changed", "changed"))
                                                   if sync.get(k)]
    lines.append(f"  this run: {', '.join(changes)}; {c['done_before']:,} already done")
    if this["images"]:
        lines.append(f"  speed: {report['img_per_s'] or 0:,.1f} img/s on {report['device']} "
                     f"(steady {report['steady_img_per_s'] or 0:,.1f}; wall {report['seconds']['wall']:.1f}s, first "
                     f"result after {report['seconds']['first_result']:.1f}s)")
        verdict = st["verdict"]
        if st["model_busy_fraction"] is not None:
            lines.append(f"  time: decode {st['decode_s']:.1f} CPU-s, model {st['model_s']:.1f}s, write "
                         f"{st['write_s']:.1f}s over {st['model_actors']} actor(s); model busy "
                         f"{st['model_busy_fraction']:.0%}, writing {st['write_busy_fraction']:.0%}: {verdict}")
            lines.append(f"    {ADVICE[verdict]}")
        else:
            lines.append(f"  time: decode {st['decode_s']:.1f} CPU-s, model {st['model_s']:.1f}s, write "
                         f"{st['write_s']:.1f}s ({verdict})")
    no_cuda = [a for a in report["actors"] if a["device"] == DEVICE_NO_CUDA]
    if no_cuda:
        lines.append(f"  warning: {len(no_cuda)} model actor(s) were given a GPU but their torch sees no CUDA device, "
                     f"so they ran on the CPU ({sum(a['images'] for a in no_cuda)} images); "
                     "compute.device=cuda makes this an error")
    if len(report["per_node"]) > 1:
        short = len({node[:12] for node in report["per_node"]}) == len(report["per_node"])
        lines.append("  per node: " + ", ".join(f"{node[:12] if short else node}={n:,}"
                                                for node, n in sorted(report["per_node"].items())))
    for g in report.get("failures", [])[:5]:
        ids = ", ".join(printable(i) for i in g["examples"])
        lines.append(f"  {g['count']:,} × {g['status']}: {printable(g['reason'] or '')[:100]} (e.g. {ids})")
    if c["failed"]:
        lines.append(f"  all failures: resnet-batch status {report['output_arg']} --failed")
    for f in report.get("failed_shards", [])[:5]:
        lines.append(f"  shard {f['shard']} failed {f['attempts']} times: {printable(f['reason'])[:200]}")
    if report.get("labels"):
        lines.append(f"  labels (top {len(report['labels'][0]['labels'])} of {len(report['labels'])} images):")
        for r in report["labels"]:
            lines.append(f"    {printable(r['image_id'])}: " + ", ".join(
                f"{printable(label)} {p:.2f}" for label, p in zip(r["labels"], r["probs"])))
    if str(report["provenance"].get("weights_id", "")).startswith("random"):
        lines.append("  note: random weights (model.weights=random): labels are not meaningful, embeddings are "
                     "only self-consistent")
    if report["complete"] and not c["ok"]:
        lines.append("  nothing to index: no image of this output was embedded")
    elif report["complete"]:
        index = report.get("next_index") or {"uri": report["output_arg"].rstrip("/") + "-index", "exists": False}
        then = ("updates the index there with what changed" if index["exists"] else
                "builds the index there; the same command after a later run updates it")
        lines.append(f"  next: resnet-batch index --embeddings {report['output_arg']} --out {index['uri']}  ({then})")
    else:
        lines.append("  rerun the same command to finish (done parts are kept)")
    if report.get("ray_logs"):
        lines.append(f"  Ray's logs: {report['ray_logs']}")
    return "\n".join(lines)
