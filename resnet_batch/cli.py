"""cli module: the `resnet-batch` command (embed, sample-data) and its error handling."""
from __future__ import annotations

import argparse
import re
import sys
import traceback
from typing import Optional

from resnet_batch import __version__

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_embed_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML run config (see configs/)")
    p.add_argument("--set", "-o", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config key, e.g. -o model.precision=fp32 (repeatable; value read as YAML)")
    p.add_argument("--input", help="shorthand for -o input.uri=...")
    p.add_argument("--output", help="shorthand for -o output.uri=...")
    p.add_argument("--fresh", action="store_true", help="delete what an earlier run wrote to the output, start over")
    p.add_argument("--retry-failed", action="store_true", help="re-process only the images recorded as failed")
    p.add_argument("--quiet", action="store_true", help="no progress bars or progress lines")


def embed_main(args: argparse.Namespace) -> int:
    """Load and validate the config, run the job, print the summary; returns the exit code."""
    from resnet_batch.config import ConfigError, load_config

    overrides = list(args.overrides)
    if args.input:
        overrides.append(f"input.uri={args.input}")
    if args.output:
        overrides.append(f"output.uri={args.output}")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    from resnet_batch.listing import InputError
    from resnet_batch.provenance import ProvenanceMismatch
    from resnet_batch.report import summary
    from resnet_batch.runner import run
    from resnet_batch.weights import WeightsUnavailableError
    from resnet_batch.writer import OutputError

    try:
        report = run(cfg, fresh=args.fresh, retry_failed=args.retry_failed, progress=not args.quiet)
    except (InputError, WeightsUnavailableError, ProvenanceMismatch, OutputError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as err:  # a failure mid-run: finished shards are already safe in the output
        traceback.print_exc()
        print(f"error: the run failed: {_one_line(err)}\n"
              f"finished shards are kept in {cfg.output.uri}; rerun the same command to resume", file=sys.stderr)
        return EXIT_FAILED
    print(summary(report, _examples(cfg)))
    return EXIT_OK if report["complete"] else EXIT_FAILED


def _one_line(err: BaseException) -> str:
    """An error in one line; for a Ray error that carries a worker's traceback, the worker's own exception."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    name = type(err).__name__
    if len(lines) > 1 and re.match(r"[A-Za-z_][\w.]*(Error|Exception): ", lines[-1]):
        return f"{name}: {lines[-1]}"
    return f"{name}: {lines[0]}" if lines else name


def _examples(cfg, n: int = 3) -> list[tuple[str, str, float]]:
    """A few top-1 labels from the output, for the summary."""
    from resnet_batch.writer import OutputStore

    store = OutputStore(cfg.output.uri, dict(cfg.output.storage_options))
    parts = sorted(store.done_parts())
    if not parts:
        return []
    t = store.read_part(int(parts[0][5:11]), ["image_id", "status", "topk_labels", "topk_probs"])
    out = []
    for row in t.to_pylist():
        if row["status"] == "ok":
            out.append((row["image_id"], row["topk_labels"][0], row["topk_probs"][0]))
        if len(out) == n:
            break
    return out


def sample_data_main(args: argparse.Namespace) -> int:
    from resnet_batch.sample_data import make_sample_photos

    paths = make_sample_photos(args.out, args.n, per_folder=args.per_folder, seed=args.seed)
    print(f"wrote {len(paths)} JPEG photos under {args.out}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resnet-batch", description=__doc__)
    parser.add_argument("--version", action="version", version=f"resnet-batch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("embed", help="classify and embed images into Parquet (resumes by default)")
    add_embed_arguments(p)
    p.set_defaults(func=embed_main)
    p = sub.add_parser("sample-data", help="write realistic sample JPEGs made from scikit-image's photos")
    p.add_argument("--out", required=True)
    p.add_argument("-n", type=int, default=200)
    p.add_argument("--per-folder", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=sample_data_main)
    from resnet_batch.search_cli import register  # index, similar, neighbors, gallery
    register(sub)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
