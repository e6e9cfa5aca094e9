"""search_cli module: the `index`, `similar`, `neighbors` and `gallery` subcommands of `resnet-batch`."""
from __future__ import annotations

import argparse
import json
import os
import sys

from resnet_batch.cli import EXIT_OK, EXIT_USAGE

INDEX_ENV = "RESNET_BATCH_INDEX"  # default --index for `similar`, `neighbors`, `gallery`


def _storage_options(text: str | None) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--storage-options is not JSON: {err}") from None
    if not isinstance(value, dict):
        raise ValueError("--storage-options must be a JSON object, e.g. '{\"anon\": false}'")
    return value


def _index_uri(args: argparse.Namespace) -> str:
    uri = args.index or os.environ.get(INDEX_ENV)
    if not uri:
        raise ValueError(f"no index: pass --index URI or set {INDEX_ENV}")
    return uri


def _errors():
    """The exceptions that are the user's to fix: reported in one line, exit code 2."""
    from resnet_batch.decode import DecodeError
    from resnet_batch.provenance import ProvenanceMismatch
    from resnet_batch.weights import WeightsUnavailableError

    return ValueError, KeyError, FileNotFoundError, ProvenanceMismatch, DecodeError, WeightsUnavailableError


def _guarded(fn):
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except _errors() as err:
            print(f"error: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
            return EXIT_USAGE
    return run


@_guarded
def index_main(args: argparse.Namespace) -> int:
    from resnet_batch.index import build_index

    options = _storage_options(args.storage_options)
    index = build_index(args.embeddings, kind=args.kind, flat_max=args.flat_max, storage_options=options,
                        seed=args.seed)
    index.save(args.out, options)
    m = index.meta
    print(f"indexed {m['count']} images ({m['kind']}: {m['factory']}{', ' + m['search'] if m['search'] else ''}) "
          f"in {m['build_s']:.1f} s -> {args.out} ({m['index_bytes'] / 2**20:.1f} MiB)")
    return EXIT_OK


@_guarded
def similar_main(args: argparse.Namespace) -> int:
    from resnet_batch.index import SimilarityIndex
    from resnet_batch.similar import QueryEmbedder, format_matches, similar_to_id, similar_to_image

    if (args.image is None) == (args.id is None):
        raise ValueError("give exactly one of IMAGE_PATH or --id IMAGE_ID")
    options = _storage_options(args.storage_options)
    index = SimilarityIndex.load(_index_uri(args), options)
    if args.id is not None:
        found = similar_to_id(index, args.id, args.k)
    else:
        found = similar_to_image(index, QueryEmbedder(index.provenance, weights=args.weights,
                                                      storage_options=options), args.image, args.k)
    if args.json:
        print(json.dumps([m.__dict__ for m in found], indent=2))
    else:
        print(format_matches(found))
    return EXIT_OK


@_guarded
def neighbors_main(args: argparse.Namespace) -> int:
    from resnet_batch.neighbors import NeighborsConfig, run_neighbors

    cfg = NeighborsConfig(index=_index_uri(args), out=args.out, k=args.k, threshold=args.threshold,
                          embeddings=tuple(args.embeddings or ()), actors=args.actors,
                          storage_options=_storage_options(args.storage_options),
                          cpus_per_actor=args.cpus_per_actor, ray_address=args.ray_address)
    r = run_neighbors(cfg, progress=not args.quiet)
    print(f"neighbours of {r['images']} images (k={cfg.k}) in {r['parts']} parts -> {cfg.out}; "
          f"{r['near_duplicate_groups']} near-duplicate groups (score >= {cfg.threshold}) holding "
          f"{r['images_in_groups']} images; {r['failed_rows_skipped']} failed rows skipped; {r['wall_s']:.1f} s")
    return EXIT_OK


@_guarded
def gallery_main(args: argparse.Namespace) -> int:
    from resnet_batch.gallery import write_gallery
    from resnet_batch.index import SimilarityIndex

    options = _storage_options(args.storage_options)
    index = SimilarityIndex.load(_index_uri(args), options)
    s = write_gallery(index, args.out, storage_options=options, n=args.n, k=args.k, seed=args.seed,
                      thumb=args.thumb, neighbors_uri=args.neighbors)
    missing = f", {s['unavailable']} images unavailable" if s["unavailable"] else ""
    print(f"wrote {args.out}: {s['queries']} queries, {s['thumbnails']} thumbnails{missing} ({s['bytes']} bytes)")
    return EXIT_OK


def add_neighbors_arguments(p: argparse.ArgumentParser) -> None:
    """The `neighbors` options (shared with jobs/neighbors.py)."""
    p.add_argument("--index", help=f"index folder (local path or s3://...); default ${INDEX_ENV}")
    p.add_argument("--out", required=True, help="output folder for the neighbours Parquet table")
    p.add_argument("-k", type=int, default=10, help="neighbours per image (default 10)")
    p.add_argument("--threshold", type=float, default=0.95,
                   help="cosine similarity at or above which two images count as near duplicates (default 0.95)")
    p.add_argument("--embeddings", action="append", metavar="URI",
                   help="query with these embeddings (default: the ones the index was built from)")
    p.add_argument("--actors", type=int, default=1, help="index actors (each loads the index once)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--ray-address", help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)")
    p.add_argument("--storage-options", help="fsspec options as JSON, for every URI")
    p.add_argument("--quiet", action="store_true")


def register(subparsers) -> None:
    """Add the similarity-search subcommands to the `resnet-batch` parser."""
    from resnet_batch.index import FLAT_MAX, KINDS

    p = subparsers.add_parser("index", help="build a FAISS cosine index over embed output(s)")
    p.add_argument("--embeddings", action="append", required=True, metavar="URI",
                   help="embed output folder or Parquet file (repeatable; all must share one provenance)")
    p.add_argument("--out", required=True, help="index folder to write (local path or s3://...)")
    p.add_argument("--kind", choices=KINDS, default="auto",
                   help="auto: exact flat up to --flat-max vectors, IVF-PQ above (default auto)")
    p.add_argument("--flat-max", type=int, default=FLAT_MAX)
    p.add_argument("--seed", type=int, default=0, help="training sample and k-means seed")
    p.add_argument("--storage-options", help="fsspec options as JSON, for every URI")
    p.set_defaults(func=index_main)

    p = subparsers.add_parser("similar", help="the indexed images nearest to a new image or to an indexed id")
    p.add_argument("image", nargs="?", metavar="IMAGE_PATH", help="a new image (local path or URL)")
    p.add_argument("--id", help="an indexed image_id (excluded from its own results)")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--index", help=f"index folder; default ${INDEX_ENV}")
    p.add_argument("--weights", help="checkpoint to embed with when the index's is elsewhere (hash-checked)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--storage-options", help="fsspec options as JSON, for every URI")
    p.set_defaults(func=similar_main)

    p = subparsers.add_parser("neighbors", help="Ray job: top-k neighbours of every image + near-duplicate groups")
    add_neighbors_arguments(p)
    p.set_defaults(func=neighbors_main)

    p = subparsers.add_parser("gallery", help="a self-contained HTML page of sample images and their neighbours")
    p.add_argument("--index", help=f"index folder; default ${INDEX_ENV}")
    p.add_argument("--out", required=True, help="HTML file to write")
    p.add_argument("--neighbors", help="neighbours table from `resnet-batch neighbors` (default: search the index)")
    p.add_argument("-n", type=int, default=12, help="sampled query images")
    p.add_argument("-k", type=int, default=8, help="neighbours shown per query")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--thumb", type=int, default=160, help="thumbnail size in pixels")
    p.add_argument("--storage-options", help="fsspec options as JSON, for every URI")
    p.set_defaults(func=gallery_main)
