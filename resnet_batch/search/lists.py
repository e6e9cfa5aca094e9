"""lists module: an update of an index whose inverted lists are on disk writes them on disk again, as a new file.

A scaled-out build merges its partial indices into one `lists.ivfdata` (FAISS `OnDiskInvertedLists`) that readers
memory-map. An update must not turn them into lists held inside `index.faiss` (at 100M that file would be the
whole 25 GiB of codes, read into memory by the update and by every reader), nor write into the previous
generation's file (its readers map it). So the update:
1. opens the previous lists read-only (layout.read_faiss_index) and detaches them from the index, leaving an
   empty in-memory set in their place, which takes the arriving rows (few: a night's changes);
2. writes the lists of the new generation into its own file, list by list: the previous entries minus the
   removed ids, then the arriving ones (sizes first, so the file is laid out once, without holes, as
   `merge_ondisk` lays out a build's).
Memory holds one list at a time, the arriving rows and a byte an entry of the lists that lose some (which stay),
never the lists; the previous file is only read.
"""
from __future__ import annotations

from typing import Optional

import numpy as np


class ListsUpdate:
    """The previous generation's on-disk lists, detached from `index` (whose adds go to memory meanwhile),
    and what `write` makes of them: this generation's on-disk lists."""

    def __init__(self, index):
        import faiss

        self.index = index
        self.ivf = faiss.extract_index_ivf(index)
        previous = faiss.downcast_InvertedLists(self.ivf.invlists)
        if not isinstance(previous, faiss.OnDiskInvertedLists):
            raise TypeError("the index's inverted lists are not on disk")
        self.ivf.own_invlists = False  # replace_invlists must not free them: they are read below
        previous.this.acquire()  # freed (unmapped) with this object instead
        self.previous = previous
        self.previous_count = int(self.ivf.ntotal)
        arriving = faiss.ArrayInvertedLists(self.ivf.nlist, self.ivf.code_size)
        self.ivf.replace_invlists(arriving, True)
        arriving.this.disown()
        self._set_ntotal(0)

    def _set_ntotal(self, n: int) -> None:
        self.ivf.ntotal = n
        self.index.ntotal = n  # an IndexPreTransform counts its own

    def write(self, path: str, removed: np.ndarray) -> int:
        """This generation's lists into `path`: the previous entries but those whose id is in `removed`, then the
        ones added to the index since the detach; set as the index's lists. Returns how many entries left."""
        import faiss

        from resnet_batch.search.layout import faiss_stdout_to_stderr

        nlist, code_size = self.ivf.nlist, self.ivf.code_size
        arriving = self.ivf.invlists
        gone = np.unique(np.asarray(removed, dtype=np.int64))
        keep: list[Optional[np.ndarray]] = [None] * nlist  # a list's mask where it loses entries
        sizes = np.zeros(nlist, dtype=np.uint64)
        for lst in range(nlist):
            n = self.previous.list_size(lst)
            if n and len(gone):
                ids = _ids(self.previous, lst, n)
                at = np.searchsorted(gone, ids).clip(0, len(gone) - 1)
                mask = gone[at] != ids
                if not mask.all():
                    keep[lst] = mask
                    n = int(mask.sum())
            sizes[lst] = n + arriving.list_size(lst)
        total = int(sizes.sum())
        with faiss_stdout_to_stderr():  # FAISS prints "resizing ..." on stdout
            lists = faiss.OnDiskInvertedLists(nlist, code_size, path)
            lists.update_totsize(max(1, total * (8 + code_size)))
            lists.set_all_lists_sizes(faiss.swig_ptr(sizes))
        for lst in range(nlist):
            if not sizes[lst]:
                continue
            at = 0
            for source, mask in ((self.previous, keep[lst]), (arriving, None)):
                n = source.list_size(lst)
                if not n:
                    continue
                ids, codes = _ids(source, lst, n), _codes(source, lst, n, code_size)
                if mask is not None:
                    ids, codes = ids[mask], codes[mask]
                if len(ids):
                    lists.update_entries(lst, at, len(ids), faiss.swig_ptr(np.ascontiguousarray(ids)),
                                         faiss.swig_ptr(np.ascontiguousarray(codes)))
                    at += len(ids)
        left = self.previous_count + int(self.ivf.ntotal) - total
        self.ivf.replace_invlists(lists, True)  # frees the in-memory lists of the arriving rows
        lists.this.disown()
        self._set_ntotal(total)
        self.previous = None  # unmapped: the previous generation's file is not needed any more
        return left


def _ids(lists, lst: int, n: int) -> np.ndarray:
    import faiss

    return faiss.rev_swig_ptr(lists.get_ids(lst), n).copy()


def _codes(lists, lst: int, n: int, code_size: int) -> np.ndarray:
    import faiss

    return faiss.rev_swig_ptr(lists.get_codes(lst), n * code_size).reshape(n, code_size).copy()
