"""Ray job entrypoint: `python jobs/neighbors.py --index URI --out URI [-k 10] [--threshold 0.95]`.

Writes every indexed image's top-k neighbours (itself excluded) as Parquet, plus near-duplicate groups.
On a cluster: `ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/neighbors.py ...`.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the package, in --working-dir

from resnet_batch import logs  # noqa: E402
from resnet_batch.cluster import stop_ray  # noqa: E402
from resnet_batch.search.cli import add_neighbors_arguments, neighbors_main  # noqa: E402

if __name__ == "__main__":
    from resnet_batch.errors import honour_interrupts

    honour_interrupts()
    parser = argparse.ArgumentParser(description="resnet-batch neighbours job")
    add_neighbors_arguments(parser)
    parser.add_argument("--verbose", action="store_true", help="show details (debug lines) too")
    args = parser.parse_args()
    logs.setup(verbose=args.verbose, quiet=args.quiet)
    try:
        sys.exit(neighbors_main(args))
    finally:
        stop_ray()
