"""jobs module: the repository root and the embed job's configuration as the tests run it."""
from __future__ import annotations

from pathlib import Path

from resnet_batch.config import build_config

REPO = Path(__file__).resolve().parents[2]


def job_config(input_uri, output_uri, checkpoint_path, **sections):
    """A JobConfig for tests: the given checkpoint, fp32, small batches; sections override keys."""
    data = {
        "input": {"uri": str(input_uri), "images_per_shard": 8},
        "model": {"weights": str(checkpoint_path), "precision": "fp32"},
        "compute": {"batch_size": 8, "decode_batch_size": 4, "torch_threads": 1},
        "output": {"uri": str(output_uri)},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return build_config(data)
