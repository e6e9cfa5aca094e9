"""coders module: the re-ranking codes' coders, and how they are written, read and sent to tasks.

Re-ranking re-scores a query's best candidates by code with a finer copy of each vector: its offset from the
mean (photo embeddings crowd around it, so the offsets carry what tells neighbours apart). Two codes:

- FP16 (the default, 4 KiB a vector): the full 2048-d offset as float16. A FAISS coder (centre, then float16
  scalar quantizer; `build._trained_refiner` trains either), stored as `refine.faiss`.
- TC1024 (1 KiB a vector): transform coding. The offset is rotated onto its principal directions (fitted on
  the training sample); the top components are kept as float16, the next in fewer bits each (uniform bins over
  each component's range in the sample), the rest dropped: bits go where the variance is (`TC_PLAN`).
  Neighbours differ in the many small components as well as the large ones, so a uniform code loses them
  (8 bits of every rotated component, 2 KiB, ranks worse than this), and a projection that keeps only the top
  components loses the small ones (PCA512 in float16, also 1 KiB, ranks worse too); docs/search.md has the
  measurements. Stored as `refine.coder` (a NumPy archive: the mean, the rotation, the tiers and ranges).

Both have the same interface: `sa_encode` (vectors -> uint8 rows), `sa_code_size()`, and what `index.Refiner`
reads to score candidates (the mean, the rotation or projection, the decoded offsets).
"""
from __future__ import annotations

import io

import numpy as np

from resnet_batch.search import layout
# The transform code's tiers, in order of variance: (components, bits a component, the share of the sample
# left outside each end of a component's range). 16 bits is float16; fewer are uniform bins over the range.
TC_PLAN = ((256, 16, 0.0), (512, 4, 0.005), (1024, 2, 0.03))
ENCODE_ROWS = 4096  # vectors rotated and coded at a time


class TransformCoder:
    """Offsets from the mean, rotated onto their principal directions, coded in tiers (`TC_PLAN`)."""

    def __init__(self, mean: np.ndarray, rotation: np.ndarray, widths, bits, low: np.ndarray, step: np.ndarray):
        self.mean = np.ascontiguousarray(mean, dtype=np.float32)
        self.rotation = np.ascontiguousarray(rotation, dtype=np.float32)  # (kept components, dim): orthonormal rows
        self.widths = np.asarray(widths, dtype=np.int64)  # components of each tier, in order
        self.bits = np.asarray(bits, dtype=np.int64)  # bits a component in each tier (16: float16)
        self.low = np.asarray(low, dtype=np.float32)  # per component: its range's start (unused in float16)
        self.step = np.asarray(step, dtype=np.float32)  # per component: its bins' width
        self.tiers, start = [], 0  # (first component, last + 1, bits) of each tier
        for width, b in zip(self.widths, self.bits):
            self.tiers.append((start, start + int(width), int(b)))
            start += int(width)

    @classmethod
    def trained(cls, sample: np.ndarray, plan=TC_PLAN) -> "TransformCoder":
        """Fit the mean, the principal directions of the offsets and each tier's ranges on `sample`."""
        import torch

        plan = _within(plan, len(sample) // 2)
        centred = np.array(sample, dtype=np.float32)  # one copy, centred in place (memory: a build's sample)
        mean = centred.mean(axis=0)
        centred -= mean
        t = torch.from_numpy(centred)
        values, vectors = torch.linalg.eigh((t.T @ t).double() / len(centred))
        kept = sum(width for width, _, _ in plan)
        rotation = vectors.numpy()[:, np.argsort(values.numpy())[::-1][:kept]].T.astype(np.float32)
        rotated = centred @ rotation.T
        del t, centred
        low, step, start = np.zeros(kept, np.float32), np.ones(kept, np.float32), 0
        for width, bits, outside in plan:
            if bits != 16:
                if (width * bits) % 8:
                    raise ValueError(f"a tier of {width} components of {bits} bits does not fill whole bytes")
                for a in range(start, start + width, 128):  # a block of components at a time: small temporaries
                    b = min(a + 128, start + width)
                    lo, hi = np.quantile(rotated[:, a:b], [outside, 1 - outside], axis=0)
                    low[a:b] = lo
                    step[a:b] = np.maximum(hi - lo, 1e-12) / 2**bits
            start += width
        return cls(mean, rotation, [w for w, _, _ in plan], [b for _, b, _ in plan], low, step)

    def sa_code_size(self) -> int:
        return sum((b - a) * bits // 8 for a, b, bits in self.tiers)

    def rotate(self, x: np.ndarray) -> np.ndarray:
        """Vectors -> their offsets' kept components."""
        return (np.asarray(x, dtype=np.float32) - self.mean) @ self.rotation.T

    def sa_encode(self, x: np.ndarray) -> np.ndarray:
        if len(x) > ENCODE_ROWS:  # bounded temporaries whatever the chunk a build hands over
            return np.concatenate([self.sa_encode(x[s:s + ENCODE_ROWS]) for s in range(0, len(x), ENCODE_ROWS)])
        rotated = self.rotate(x)
        out = []
        for a, b, bits in self.tiers:
            part = rotated[:, a:b]
            if bits == 16:
                out.append(part.astype("<f2").view(np.uint8))
                continue
            levels = 2**bits
            q = np.clip(np.floor((part - self.low[a:b]) / self.step[a:b]), 0, levels - 1).astype(np.uint8)
            per_byte = 8 // bits
            packed = np.zeros((len(q), (b - a) // per_byte), np.uint8)
            for k in range(per_byte):  # component j goes to byte j // per_byte, bits (j % per_byte) * bits
                packed |= q[:, k::per_byte] << (k * bits)
            out.append(packed)
        return np.ascontiguousarray(np.concatenate(out, axis=1))

    def decode_rotated(self, codes: np.ndarray) -> np.ndarray:
        """Codes (uint8 rows) -> the kept components of the offsets they store (a bin's middle)."""
        codes = np.ascontiguousarray(codes, dtype=np.uint8)
        out, at = np.empty((len(codes), self.rotation.shape[0]), np.float32), 0
        for a, b, bits in self.tiers:
            size = (b - a) * bits // 8
            chunk = codes[:, at:at + size]
            at += size
            if bits == 16:
                out[:, a:b] = chunk.view("<f2")
                continue
            per_byte, mask = 8 // bits, 2**bits - 1
            q = np.empty((len(codes), b - a), np.float32)
            for k in range(per_byte):
                q[:, k::per_byte] = (chunk >> (k * bits)) & mask
            out[:, a:b] = self.low[a:b] + (q + 0.5) * self.step[a:b]
        return out

    def describe(self) -> str:
        return f"TC{self.sa_code_size()}"

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, mean=self.mean, rotation=self.rotation, widths=self.widths, bits=self.bits, low=self.low,
                 step=self.step)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "TransformCoder":
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return cls(z["mean"], z["rotation"], z["widths"], z["bits"], z["low"], z["step"])


def _within(plan, components: int) -> tuple:
    """The plan's tiers cut to the first `components` components: a sample of n vectors estimates about n/2
    principal directions and their ranges (beyond that the sample has little or no variance along them, and
    the ranges would clip every other vector). A small index's code is then smaller than 1 KiB."""
    out = []
    for width, bits, outside in plan:
        whole = 1 if bits == 16 else 8 // bits  # components that fill a byte
        width = min(width, components) // whole * whole
        if width:
            out.append((width, bits, outside))
        components -= width
    return tuple(out)


def coder_bytes(coder) -> bytes:
    """A coder as bytes (to send it to tasks, or to write it)."""
    if isinstance(coder, TransformCoder):
        return coder.to_bytes()
    import faiss

    return faiss.serialize_index(coder).tobytes()


def coder_from_bytes(data) -> object:
    """The coder `coder_bytes` wrote: a NumPy archive (a zip) is a TransformCoder, else a FAISS coder."""
    data = bytes(data)
    if data[:2] == b"PK":
        return TransformCoder.from_bytes(data)
    import faiss

    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


def write_coder(coder, path_of) -> None:
    """Write `coder` into a staged index folder (`path_of`: Staging.path), under layout.coder_file's name."""
    with open(path_of(layout.coder_file("TC1024" if isinstance(coder, TransformCoder) else "FP16")), "wb") as f:
        f.write(coder_bytes(coder))


def read_coder(path: str):
    with open(path, "rb") as f:
        return coder_from_bytes(f.read())
