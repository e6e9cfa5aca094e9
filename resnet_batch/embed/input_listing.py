"""input_listing module: an input root being listed (a walk of the store or an inventory's file list) as pages
of ENTRY_SCHEMA rows; the one type both kinds of listing hand to the plan."""
from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa

from resnet_batch.storage import display_path


@dataclass
class InputListing:
    """An input root being listed: where it is, and its pages (consumed once)."""

    root: str  # filesystem path of the root (no protocol)
    protocol: str
    pages: Iterator[pa.Table]  # ENTRY_SCHEMA
    prefix_uri: str = ""  # an S3 prefix (not one object): can be listed by Ray tasks instead (listing.in_tasks)
    tasks: int = 0  # Ray tasks listing it (0: this process lists it)

    def display(self, rel: str = "") -> str:
        return display_path(self.protocol, posixpath.join(self.root, rel) if rel else self.root)
