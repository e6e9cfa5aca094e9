"""first_run module: a run into a new output: the listing streams into shards (each stored in the manifest)
while the first shards already run; the pass-through columns come from the first readable file."""
from __future__ import annotations

import logging
import posixpath

import pyarrow as pa

from resnet_batch.embed.dispatch import dispatch
from resnet_batch.embed.job import Job
from resnet_batch.embed.listing import FORMATS, in_tasks
from resnet_batch.embed.plan import StreamPlanner, detect, input_layout, no_input
from resnet_batch.embed.reconcile import finish
from resnet_batch.errors import InputError
from resnet_batch.output.state import OutputState, save, schema_to_text
from resnet_batch.output.store import PROVENANCE_FILE
from resnet_batch.storage import display_path, filesystem

log = logging.getLogger(__name__)


def first_run(job: Job, listing) -> dict:
    """A new output: the listing streams into shards, each stored in the manifest, then run. An S3 prefix is
    listed by Ray tasks (as a sync night's is), their pages cut into shards as they arrive."""
    from resnet_batch.embed.reader import check_passthrough_names
    from resnet_batch.embed.scheduler import ShardQueue
    from resnet_batch.redact import safe_uri

    cfg, store = job.cfg, job.store
    if listing.prefix_uri:
        job.ensure_ray()  # the run needs it anyway; the model actors start while the listing goes on
        listing = in_tasks(listing, dict(cfg.input.storage_options), retry_window_s=cfg.compute.retry_window_s)
    job.listing = {"tasks": listing.tasks}
    fmt, pages = detect(cfg.input, listing)
    check_passthrough_names(cfg.input.passthrough_columns, fmt)
    passthrough, pages = _passthrough(job, fmt, listing, pages)
    state = OutputState(safe_uri(cfg.input.uri), fmt, listing.root, listing.protocol, input_layout(cfg.input, fmt),
                        schema_to_text(tuple(passthrough)))
    run_no = state.next_run()
    state.runs.append(job.run_entry(run_no))
    store.write(PROVENANCE_FILE, job.provenance)
    save(store, state)
    queue = ShardQueue()
    planner = StreamPlanner(cfg.input, fmt, listing.root, pages, store, release=queue.put, close=queue.close)
    planner.start()
    dispatch(job, state, run_no, queue, planner=planner)
    if planner.error is not None:
        raise planner.error
    if planner.images == 0 and planner.shards == 0:
        store.remove(PROVENANCE_FILE)
        from resnet_batch.output.store import STATE_FILE

        store.remove(STATE_FILE)
        raise no_input(cfg.input, fmt, planner.listed)
    state.next_shard = planner.next_shard
    return finish(job, state, run_no, planner.expected, planner.skipped, planner.listed)


def _passthrough(job: Job, fmt: str, listing, pages):
    """The pass-through output columns, from the first shard file that can be read (buffered pages are
    handed on), or strings when none of the first five can."""
    names = job.cfg.input.passthrough_columns
    if fmt == "folder":
        return [], pages
    from resnet_batch.embed.listing import extension, from_raw, hidden
    from resnet_batch.embed.reader import WDS_FIELDS, passthrough_fields

    wanted = FORMATS[fmt].wanted(job.cfg.input)
    seen, candidates = [], []
    for page in pages:
        seen.append(page)
        candidates += [r for r in map(from_raw, page.column("path").to_pylist())
                       if not hidden(r) and extension(r) in wanted]
        if len(candidates) >= 5:
            break
    fs = filesystem(job.cfg.input.uri, dict(job.cfg.input.storage_options))[0]
    fields = None
    for rel in candidates[:5]:
        path = posixpath.join(listing.root, rel)
        try:
            fields = passthrough_fields(fmt, fs, path, names, job.cfg.input.extensions,
                                        job.cfg.input.image_column, display_path(listing.protocol, path))
            break
        except InputError:
            raise
        except Exception as err:
            log.warning(f"{display_path(listing.protocol, path)}: cannot read its columns ({type(err).__name__}: "
                        f"{err}); trying the next file")
    if fields is None:
        fields = (list(WDS_FIELDS) if fmt == "webdataset" else []) + [pa.field(n, pa.string()) for n in names]

    def again():
        yield from seen
        yield from pages

    return fields, again()
