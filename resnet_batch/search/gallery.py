"""gallery module: a self-contained static HTML page of sample query images, their top-5 labels and neighbours."""
from __future__ import annotations

import base64
import html
import io
import os
import posixpath
import urllib.parse
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageOps

from resnet_batch.decode import open_image
from resnet_batch.errors import SimilarityIndexError
from resnet_batch.search.embeddings import input_root
from resnet_batch.search.index import SimilarityIndex
from resnet_batch.search.neighbors import read_neighbors
from resnet_batch.search.similar import similar_to_id
from resnet_batch.output.store import read_parquet, write_file
from resnet_batch.storage import filesystem

MAX_IMAGE_BYTES = 50 * 2**20  # a thumbnail's source is refused above this many bytes


class ImageRoots:
    """Where the gallery may read images: the roots the caller names (`--image-root`), else the input roots that
    the embed outputs record in their own `_state.json`. Never what the index folder says (index.json's
    `image_roots`, the id map's paths): an index is data someone else may have written, and one naming /etc or
    an internal URL must get an error tile, not a fetch."""

    def __init__(self, roots: Sequence[tuple[str, str]], source: str):
        self.roots = [(_family(protocol), _normal(protocol, root)) for protocol, root in roots]
        self.source = source

    @classmethod
    def given(cls, uris: Sequence[str]) -> "ImageRoots":
        """The roots the caller names (local paths or URLs)."""
        from fsspec.core import split_protocol

        return cls([((split_protocol(u)[0] or "file"), split_protocol(u)[1]) for u in uris], "--image-root")

    @classmethod
    def of_outputs(cls, uris: Sequence[str], storage_options: Optional[dict] = None) -> "ImageRoots":
        """The input roots the embed outputs at `uris` record in their own `_state.json` (a single Parquet file,
        or a folder the embed job did not write, names none)."""
        found = [input_root(u, storage_options) for u in uris if isinstance(u, str)]
        return cls([(r["protocol"], r["root"]) for r in found if r], "the embed output's _state.json")

    def check(self, path: str) -> None:
        """Raise PermissionError unless `path` lies under an allowed root, with the same protocol."""
        from fsspec.core import split_protocol

        proto, bare = split_protocol(path)
        proto = proto or "file"
        where = _normal(proto, bare)
        for family, root in self.roots:
            if family == _family(proto) and (where == root or where.startswith(root.rstrip("/") + "/")):
                return
        if not self.roots:
            raise PermissionError("no input root is known (no --image-root, and no embed output's _state.json names "
                                  "one), so no image is read for thumbnails")
        shown = ", ".join(f"{f}://{r}" for f, r in self.roots)
        raise PermissionError(f"outside the input root ({shown}, from {self.source})")


def _family(protocol: str) -> str:
    return {"s3a": "s3", "local": "file"}.get(protocol, protocol)


def _normal(protocol: str, path: str) -> str:
    """A path with `..` resolved (and symlinks, for local files) so that a prefix test means "inside"."""
    if _family(protocol) == "file":
        return os.path.realpath(path)
    return posixpath.normpath("/" + path)[1:]


@dataclass(frozen=True)
class Tile:
    """One picture on the page: an image, its caption numbers, and its thumbnail (or why there is none)."""

    image_id: str
    label: Optional[str]
    score: Optional[float]  # cosine similarity to the query; None for the query itself
    src: Optional[str]  # data: URI of the thumbnail
    error: Optional[str] = None
    labels: tuple = ()  # a query's top-k (label, probability) pairs, from its embed part; () when unread


def thumbnail_uri(path: str, size: int, storage_options: Optional[dict] = None, *, max_pixels: int,
                  max_bytes: int = MAX_IMAGE_BYTES) -> str:
    """A JPEG thumbnail (longest side `size`, EXIF orientation applied) of the image at `path`, as a data: URI;
    refused above `max_bytes` or `max_pixels` (the embed job's own pixel cap)."""
    import fsspec

    with fsspec.open(path, "rb", **(storage_options or {})) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"over {max_bytes} bytes, not read")
    with open_image(data, max_pixels) as (im, _, _, _):
        im.draft("RGB", (size, size))  # JPEG: decode at a reduced size directly
        im = ImageOps.exif_transpose(im).convert("RGB")
        im.thumbnail((size, size), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=82)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class _Thumbs:
    """Thumbnails by image_id, made once each; a failure becomes the tile's error, not a broken <img>."""

    def __init__(self, index: SimilarityIndex, size: int, storage_options: Optional[dict], roots: ImageRoots):
        self.index, self.size, self.storage_options, self.cache = index, size, storage_options, {}
        self.roots = roots
        self.max_pixels = int(index.provenance.get("preprocessing", {}).get("max_pixels", 100_000_000))

    def tile(self, image_id: str, score: Optional[float]) -> Tile:
        row = self.index.row(self.index.faiss_id(image_id))
        if image_id not in self.cache:
            try:
                self.roots.check(row["path"])
                self.cache[image_id] = (thumbnail_uri(row["path"], self.size, self.storage_options,
                                                      max_pixels=self.max_pixels), None)
            except Exception as err:  # missing, unreadable, refused: say so on the page
                self.cache[image_id] = (None, f"{type(err).__name__}: {err}")
        src, error = self.cache[image_id]
        return Tile(image_id, row["label"], score, src, error)


def pick_queries(index: SimilarityIndex, n: int, seed: int) -> list[str]:
    """A seeded sample of n indexed image_ids, in image_id order."""
    ids = index.ids.column("image_id").to_pylist()
    picked = np.random.default_rng(seed).choice(len(ids), size=min(n, len(ids)), replace=False)
    return sorted(ids[i] for i in picked)


def neighbours_of(index: SimilarityIndex, queries: list[str], k: int, neighbors_uri: Optional[str],
                  storage_options: Optional[dict]) -> dict[str, list[tuple[str, float]]]:
    """query -> [(neighbour id, score)], from a neighbours table when given, else searched in the index."""
    if neighbors_uri is None:
        return {q: [(m.image_id, m.score) for m in similar_to_id(index, q, k)] for q in queries}
    table = read_neighbors(neighbors_uri, storage_options)
    table = table.filter(pc.is_in(table.column("image_id"), value_set=pa.array(queries, pa.string())))
    found = {r["image_id"]: list(zip(r["neighbor_ids"], r["scores"]))[:k] for r in table.to_pylist()}
    missing = [q for q in queries if q not in found]
    if missing:
        raise SimilarityIndexError(f"{len(missing)} sampled images are not in the neighbours table {neighbors_uri} "
                         f"(e.g. {missing[0]!r}); was it made from this index?")
    return found


def top_labels(index: SimilarityIndex, image_ids: list[str], storage_options: Optional[dict] = None) -> dict:
    """image_id -> its top-k ((label, probability), ...) as the embed job wrote them, read from the embed parts the
    index records (the id map keeps only the top-1): one read of three columns per part. A part that cannot be read
    (moved, gone) leaves its images out; their tiles show the index's top-1 label."""
    uris = index.meta.get("part_uris") or []
    by_part: dict[int, list[str]] = {}
    for image_id in image_ids:
        by_part.setdefault(int(index.row(index.faiss_id(image_id))["part"]), []).append(image_id)
    out: dict[str, tuple] = {}
    for part, ids in sorted(by_part.items()):
        try:
            fs, path = filesystem(uris[part], dict(storage_options or {}))
            table = read_parquet(fs, path, ["image_id", "topk_labels", "topk_probs"])
        except Exception:  # the page shows less, never fails, for a part that moved since the index was built
            continue
        table = table.filter(pc.is_in(table.column("image_id"), value_set=pa.array(ids, pa.string())))
        for r in table.to_pylist():
            out[r["image_id"]] = tuple(zip(r["topk_labels"] or [], (float(p) for p in r["topk_probs"] or [])))
    return out


def image_roots_for(index: SimilarityIndex, image_roots: Optional[Sequence[str]] = None,
                    embeddings: Optional[Sequence[str]] = None,
                    storage_options: Optional[dict] = None) -> ImageRoots:
    """Where thumbnails may be read: `image_roots` when the caller names them; else the input roots recorded in
    the `_state.json` of the embed outputs `embeddings` (default: those the index was built from)."""
    if image_roots:
        return ImageRoots.given(image_roots)
    sources = embeddings or index.meta.get("sources")
    return ImageRoots.of_outputs(sources if isinstance(sources, list) else [], storage_options)


def build_gallery(index: SimilarityIndex, *, n: int = 12, k: int = 8, seed: int = 0, thumb: int = 160,
                  neighbors_uri: Optional[str] = None, storage_options: Optional[dict] = None,
                  image_roots: Optional[Sequence[str]] = None, embeddings: Optional[Sequence[str]] = None) -> list:
    """[(query Tile, [neighbour Tiles])] for a seeded sample of n queries, each query with its top-k labels;
    thumbnails read only under the roots `image_roots_for` allows."""
    from dataclasses import replace

    queries = pick_queries(index, n, seed)
    found = neighbours_of(index, queries, k, neighbors_uri, storage_options)
    labels = top_labels(index, queries, storage_options)
    thumbs = _Thumbs(index, thumb, storage_options, image_roots_for(index, image_roots, embeddings, storage_options))
    return [(replace(thumbs.tile(q, None), labels=labels.get(q, ())), [thumbs.tile(i, s) for i, s in found[q]])
            for q in queries]


def _figure(t: Tile, cls: str, service: Optional[str] = None) -> str:
    caption = [f'<span class="id">{html.escape(t.image_id)}</span>']
    if t.score is not None:
        caption.insert(0, f'<span class="score">{t.score:.4f}</span>')
    if t.labels and t.score is None:
        caption.append('<span class="labels">' + "<br>".join(
            f'<span class="label">{html.escape(str(label))}</span> {p:.2f}' for label, p in t.labels) + "</span>")
    elif t.label and t.score is None:
        caption.append(f'<span class="label">{html.escape(t.label)}</span>')
    if t.src:
        pic = f'<img src="{t.src}" alt="{html.escape(t.image_id)}" loading="eager">'
    else:
        pic = f'<div class="missing">image unavailable: {html.escape(t.error or "")}</div>'
    if service:  # the query service answers "more like this" live
        query = urllib.parse.urlencode({"id": t.image_id, "k": 10})
        pic = f'<a href="{html.escape(service)}/v1/neighbors?{html.escape(query)}">{pic}</a>'
    return f'<figure class="{cls}">{pic}<figcaption>{"<br>".join(caption)}</figcaption></figure>'


_CSS = """body{font:14px system-ui,sans-serif;margin:1.5em;background:#fafafa;color:#222}
header p{color:#555;margin:.2em 0}section{display:flex;gap:1.2em;align-items:flex-start;padding:1em 0;
border-top:1px solid #ddd}figure{margin:0;width:160px}figure.query{width:200px}img{max-width:100%;display:block;
border-radius:4px}figcaption{font-size:12px;word-break:break-all;margin-top:.3em}.label{font-weight:600}
.score{font-variant-numeric:tabular-nums;font-weight:600}.nbrs{display:flex;flex-wrap:wrap;gap:.8em}
.missing{width:150px;height:100px;background:#eee;color:#a00;font-size:11px;padding:4px;overflow:hidden}"""


def render_html(entries: list, meta: dict, title: str = "resnet-batch: similar images",
                service: Optional[str] = None) -> str:
    """The page: a header describing the index, then one row per query (query, then its neighbours). With
    `service` (a `resnet-batch serve` URL), pictures link to their live neighbours and a form uploads a photo."""
    prov = meta.get("provenance") if isinstance(meta.get("provenance"), dict) else {}
    rows = [f'<section>{_figure(q, "query", service)}<div class="nbrs">'
            f'{"".join(_figure(t, "nbr", service) for t in nbrs)}</div></section>' for q, nbrs in entries]
    form = "" if not service else (
        f'<form action="{html.escape(service)}/v1/neighbors/image" method="post" enctype="multipart/form-data">'
        '<label>Find images like a photo: <input type="file" name="image" accept="image/*"></label> '
        '<button type="submit">search</button></form>')
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style></head><body><header><h1>{html.escape(title)}</h1>"
            f"<p>{_text(meta.get('count'))} images, {_text(meta.get('kind'))} index ({_text(meta.get('factory'))}), "
            f"cosine similarity; model {_text(prov.get('model'))}, weights {_text(prov.get('weights_id'))}, "
            f"{_text(prov.get('precision'))}.</p><p>Left: a sampled image with its top labels and their probabilities. Right: its nearest "
            f"images, best first, with scores.</p>{form}</header>\n" + "\n".join(rows) + "\n</body></html>\n")


def _text(value) -> str:
    """Any field of the index's own JSON, escaped for HTML whatever its type (index.json is data, not markup)."""
    return html.escape(str(value))


def write_gallery(index: SimilarityIndex, out: str, *, storage_options: Optional[dict] = None,
                  service: Optional[str] = None, **options) -> dict:
    """Build and write the page to `out` (local path or URL); returns counts for the caller to print."""
    entries = build_gallery(index, storage_options=storage_options, **options)
    page = render_html(entries, index.meta, service=service.rstrip("/") if service else None)
    fs, path = filesystem(out, dict(storage_options or {}))
    write_file(fs, path, page.encode())
    tiles = [t for q, nbrs in entries for t in (q, *nbrs)]
    return {"queries": len(entries), "thumbnails": sum(t.src is not None for t in tiles),
            "unavailable": sum(t.src is None for t in tiles), "bytes": len(page)}
