"""folder module: writing an index folder so that a reader never sees a mix of two indexes.

A fresh build stages its files, removes index.json, moves the files in and writes index.json last (a reader in
between finds no index, never half of one). An update or a rebuild over an existing index writes a new
generation folder that nothing references yet, then replaces index.json in one atomic write (a rename
locally, one PUT on an object store): readers see the old generation or the new one. The generation before
stays for the readers that read the old index.json a moment ago; older ones are removed.
"""
from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
from typing import Callable, Optional

from resnet_batch.search.layout import (DATA_FILES, FORMAT_LAYOUT, HASH_FILE, LISTS_FILE, META_FILE, REFINE_FILE, REFINE_SQ_FILE,
                                       TC_CODER_FILE, generation_dir, generation_of)
from resnet_batch.output.store import write_file
from resnet_batch.storage import filesystem, list_folder, protocols

UPDATE_PREFIX = ".update-"  # staging folders of updates and rebuilds in place (local)


def layout_files(layout: dict) -> list[str]:
    """Every file a layout names, relative to the index folder."""
    names = [layout["index"], layout["ids"], *(layout[key] for key in ("lists", "hash") if layout.get(key))]
    if refine := layout.get("refine"):
        names += [refine["coder"], *(name for name, rows in refine["segments"] if rows)]
        names += [refine["rows"]] if refine.get("rows") else []
    return names


class Staging:
    """Where a build or an update writes its files: a hidden folder in the index folder when local (moved in
    place by a rename), else a temp folder uploaded at the end. `guard` (the folder lock's `ensure`) is called
    before each step that changes what readers see or removes files (it raises LockLost once the lock is no
    longer this run's: another run owns the folder, and its files must not be replaced or removed)."""

    def __init__(self, out: str, opts: dict, prefix: str = ".build-", guard: Optional[Callable[[], None]] = None):
        self.out, self.fs, self.root = out, *filesystem(out, opts)
        self.guard = guard or (lambda: None)
        self.local = "file" in protocols(self.fs)
        if self.local:
            os.makedirs(self.root, exist_ok=True)
            self.dir = tempfile.mkdtemp(prefix=prefix, dir=self.root)
        else:
            self.dir = tempfile.mkdtemp(prefix="resnet-batch-index-")

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def _staged(self) -> list[str]:
        return [n for n in DATA_FILES if os.path.exists(self.path(n))]

    def publish(self, meta: dict) -> None:
        """A fresh build's files at the top of the folder, index.json last (the old one removed first)."""
        names = self._staged()
        meta["files"] = {n: os.path.getsize(self.path(n)) for n in names}
        old = posixpath.join(self.root, META_FILE)
        self.guard()
        if self.fs.exists(old):
            self.fs.rm(old)
        for stale in {REFINE_SQ_FILE, TC_CODER_FILE, REFINE_FILE, LISTS_FILE, HASH_FILE} - set(names):  # an earlier build's, not this one's
            if self.fs.exists(posixpath.join(self.root, stale)):
                self.fs.rm(posixpath.join(self.root, stale))
        for name in names:
            if self.local:
                os.replace(self.path(name), os.path.join(self.root, name))
            else:
                self.fs.put_file(self.path(name), posixpath.join(self.root, name))
        self.guard()
        write_file(self.fs, old, meta)

    def publish_generation(self, meta: dict, previous: dict) -> None:
        """The staged files as generation meta["generation"] (meta["layout"] names them under its folder, and
        may name files of earlier generations that it keeps using), then index.json in one atomic write; then
        the files that neither this generation nor `previous` (the index.json replaced) uses are removed."""
        folder = generation_dir(meta["generation"])
        names = self._staged()
        sizes = {**previous["files"], **{f"{folder}/{n}": os.path.getsize(self.path(n)) for n in names}}
        meta.update(format=FORMAT_LAYOUT, previous_files=sorted(previous["files"]),
                    files={name: sizes[name] for name in layout_files(meta["layout"])})
        target = posixpath.join(self.root, folder)
        self.guard()  # a run that lost the lock must not replace the winner's generation of the same number
        if self.local:
            shutil.rmtree(target, ignore_errors=True)  # left by an attempt killed before its switch
            os.rename(self.dir, target)
        else:
            for name in names:
                self.fs.put_file(self.path(name), posixpath.join(target, name))
        self.guard()
        write_file(self.fs, posixpath.join(self.root, META_FILE), meta)
        self.guard()  # what is unused is judged from this run's index.json: not if another run published since
        remove_unused(self.fs, self.root, set(meta["files"]) | set(previous["files"]), self.local)


def remove_unused(fs, root: str, keep: set[str], local: bool) -> list[str]:
    """Remove the index files of ours (top-level data files, generation folders, staging folders left by killed
    updates) that `keep` does not name; nothing else in the folder is touched. Returns what was removed."""
    removed = []
    fs.invalidate_cache(root)  # s3fs: a listing cached before this generation's uploads
    for path in list_folder(fs, root):
        name = posixpath.basename(path.rstrip("/"))
        if name in DATA_FILES and name not in keep:
            fs.rm(path)
            removed.append(name)
        elif generation_of(name) is not None:
            for inner in list_folder(fs, path):
                rel = f"{name}/{posixpath.basename(inner)}"
                if rel not in keep and posixpath.basename(inner) in DATA_FILES:
                    fs.rm(inner)
                    removed.append(rel)
            if local and not os.listdir(path):
                os.rmdir(path)
        elif local and name.startswith(UPDATE_PREFIX) and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(name)
    return removed
