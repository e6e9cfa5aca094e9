"""Ray job entrypoint: `python jobs/embed.py --config configs/....yaml [-o key=value ...]`.

Run locally, or on a cluster with
`ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/embed.py --config ...`.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the package, in --working-dir

from resnet_batch.cli import add_embed_arguments, embed_main  # noqa: E402
from resnet_batch import logs  # noqa: E402
from resnet_batch.cluster import stop_ray  # noqa: E402

if __name__ == "__main__":
    from resnet_batch.errors import honour_interrupts

    honour_interrupts()
    parser = argparse.ArgumentParser(description="resnet-batch embed job")
    add_embed_arguments(parser)
    args = parser.parse_args()
    logs.setup(verbose=args.verbose, quiet=args.quiet)
    try:
        sys.exit(embed_main(args))
    finally:
        stop_ray()
