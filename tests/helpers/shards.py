"""shards module: an input cut into shards all at once, as the job's planner would cut it (for the tests)."""
from __future__ import annotations

from resnet_batch.config import InputConfig
from resnet_batch.embed.listing import InputListing, Shard, ShardCutter, Skipped, list_entries
from resnet_batch.embed.plan import detect


def list_shards(cfg: InputConfig) -> tuple[str, InputListing, list[Shard], Skipped]:
    """The whole input cut into shards at once, in memory (runs stream instead)."""
    listing = list_entries(cfg)
    fmt, pages = detect(cfg, listing)
    shards: list[Shard] = []
    cutter = ShardCutter(cfg, fmt, listing.root, 0, lambda shard, entries: shards.append(shard))
    for page in pages:
        cutter.add(page)
        if cutter.stopped:
            break
    cutter.finish()
    return fmt, listing, shards, cutter.skipped
