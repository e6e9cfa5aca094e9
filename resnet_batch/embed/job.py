"""job module: the state of one embed run while it lasts, shared by its steps (plan, dispatch, reconcile, report)."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from resnet_batch.cluster import worker_uri
from resnet_batch.config import JobConfig
from resnet_batch.decode import PreprocessSpec
from resnet_batch.embed.progress import Progress
from resnet_batch.embed.report import RunStats
from resnet_batch.output.ledger import LedgerWriter
from resnet_batch.output.state import OutputState, stamp
from resnet_batch.output.store import OutputStore, PartSettings
from resnet_batch.schema import output_schema, with_provenance


@dataclass(eq=False)
class Job:
    """What one run knows (its setup) and what it has done so far (counters, failures, the ledger it writes)."""

    cfg: JobConfig
    store: OutputStore
    provenance: dict
    spec: PreprocessSpec
    state_dict: Any
    weights: Any
    t_start: float
    marks: dict  # start-up steps, seconds after the command began
    progress: Progress
    embedder: Optional[Callable] = None
    start_ray: Callable[[], None] = lambda: None  # called once, from the main thread, when Ray is first needed
    lock_check: Callable[[], None] = lambda: None  # raises LockLost once the output lock is no longer this run's
    stats: RunStats = field(default_factory=RunStats)
    sync: dict = field(default_factory=dict)
    failures: list = field(default_factory=list)
    ledger: Optional[LedgerWriter] = None
    unpublished: bool = False
    merge_chunks: dict = field(default_factory=dict)  # --retry-failed: (shard, chunk) -> the shard's chunks
    done_before: int = 0  # images in parts that were already complete when this run started its work
    gpu: Optional[bool] = None  # see dispatch.use_gpu
    early_actors: list = field(default_factory=list)  # see dispatch.early_actors: the first pool takes them
    startup_s: float = 0.0  # seconds to build the pool
    pipeline_s: float = 0.0  # seconds of the pipeline
    driver_bytes: int = 0  # what the shards' records brought back to the driver
    actor_info: dict = field(default_factory=dict)  # every actor that came up: actor id -> node, pid, device
    listing: dict = field(default_factory=dict)  # how a first run's input was listed: tasks (0: by this process)
    read_stats: dict = field(default_factory=dict)  # peak read tasks in flight, share of blocks embedded on their node
    recovered: list = field(default_factory=list)  # records the last current_ledger() read from parts the ledger lacked

    def ensure_ray(self) -> None:
        """Start (or join) Ray the first time the run needs it."""
        import ray

        if not ray.is_initialized():
            self.start_ray()

    def ensure_ledger(self, run_no: int) -> None:
        if self.ledger is None:
            self.ledger = LedgerWriter(self.store, run_no)

    def unpublish(self) -> None:
        if not self.unpublished:
            self.store.unpublish()
            self.unpublished = True

    def part_settings(self, state: OutputState, run_no: int) -> PartSettings:
        schema = with_provenance(output_schema(state.passthrough_fields, self.cfg.output.embedding_dtype),
                                 self.provenance)
        o = self.cfg.output
        return PartSettings(worker_uri(o.uri), dict(o.storage_options), schema, None if o.compression == "none" else o.compression,
                            o.embedding_dtype, self.cfg.compute.retry_window_s, run_no)

    def run_entry(self, run_no: int) -> dict:
        m = self.cfg.model
        return {"run": run_no, "started": stamp(), "status": "running", "host": socket.gethostname(),
                "pid": os.getpid(), "weights_id": self.provenance["weights_id"], "precision": m.precision,
                "embedding_dtype": self.cfg.output.embedding_dtype}
