"""Test driver: the `resnet-batch embed` command with the device-like stand-in model (tests only).

    python -m tests.helpers.standin_cli BATCH_S embed ARGS...

Everything is the real command (config, overrides, the runner, the actor pool, the report, the exit code)
except the model: each batch takes BATCH_S seconds with the GIL released, as on a device, and costs no CPU.
For tests about scheduling (autoscaling, lost nodes) whose runs must last a while without burning the CPU
the rest of the suite needs. The stand-in is pickled by value, so the cluster's workers need no PYTHONPATH.
"""
from __future__ import annotations

import functools
import sys


def main(argv: list[str]) -> int:
    batch_s, args = float(argv[0]), argv[1:]
    import ray.cloudpickle

    import resnet_batch.embed.runner as runner
    import tests.helpers.standin as standin
    from resnet_batch.cli import main as cli

    ray.cloudpickle.register_pickle_by_value(standin)
    runner.run = functools.partial(runner.run, embedder=standin.DeviceStandIn(batch_s))
    return cli(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
