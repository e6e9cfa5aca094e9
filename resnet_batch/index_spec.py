"""index_spec module: which FAISS index to build for a count of vectors and a memory budget (pure, no FAISS).

The rules (FAISS's guidelines, as autofaiss applies them):
- up to `flat_max` vectors, and while the raw vectors fit the budget: exact search (`Flat`);
- above: an inverted file with nlist ~ 4*sqrt(n) lists (a power of two, at least 39 training vectors per list),
  k-means trained on a sample of 40*nlist vectors, searched with an `nprobe` tuned after the build to a recall
  target (see tuning.py);
- optional PCA (an uncentred projection, so inner products = cosines stay unbiased): by default the smallest
  of 64, 128, ... dim/2 dimensions that keeps PCA_VARIANCE of the training sample's variance, else none;
- codes: the most accurate that fit half the memory budget: SQ8 (1 byte a dimension), SQ4, then PQ with
  4, 8, 16 ... dimensions a byte. The other half is for training and the chunks in flight;
- re-ranking: the REFINE_K_FACTOR x k best candidates by code are re-scored with float16 full-dimension
  offsets from the mean, kept on disk (memory-mapped, not in the memory budget): embeddings crowd around
  their mean so tightly that 8-bit codes of the full vectors rank their 10th and 11th neighbours no better
  than the projection does.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

from resnet_batch.errors import SimilarityIndexError
from resnet_batch.schema import EMBEDDING_DIM

FLAT_MAX = 50_000  # up to this many vectors the index is exact
IVF_MIN = 1_000  # fewer vectors cannot train an inverted file
KINDS = ("auto", "flat", "ivf")
DEFAULT_MAX_MEMORY = 4 * 2**30
PCA_AUTO = -1  # --pca auto: chosen from the training sample's spectrum (resolve_pca)
PCA_VARIANCE = 0.99  # the share of variance an automatic projection must keep
ID_BYTES = 8  # every stored vector carries its 64-bit id
REFINE_K_FACTOR = 4  # candidates re-scored per result
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_bytes(text: str) -> int:
    """'4G', '512M', '1.5g', '1000000' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", str(text).lower())
    if not m:
        raise SimilarityIndexError(f"not a memory size: {text!r} (e.g. 4G, 512M)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def code_bytes(code: str, dim: int) -> int:
    """Bytes one vector's code takes: Flat 4/dim, SQ8 1, SQ4 1/2, PQm m."""
    if code == "Flat":
        return 4 * dim
    if code == "SQ8":
        return dim
    if code == "SQ4":
        return (dim + 1) // 2
    if m := re.fullmatch(r"PQ(\d+)", code):
        return int(m.group(1))
    raise ValueError(f"unknown code {code!r}")


@dataclass(frozen=True)
class IndexSpec:
    """The index to build: kind, input and stored dimensions, lists, codes, and the training sample's size."""

    kind: str  # flat | ivf
    dim: int  # input dimensions
    pca: int  # stored dimensions after the projection (0: no projection)
    nlist: int  # inverted lists (0 for flat)
    code: str  # Flat | SQ8 | SQ4 | PQ<m>
    train_size: int  # vectors sampled for training (0: none)
    refine: int = 0  # candidates per result re-scored with full-dimension float16 vectors (0: none)

    @property
    def stored_dim(self) -> int:
        return self.pca if self.pca > 0 else self.dim

    @property
    def factory(self) -> str:
        """A readable description in faiss.index_factory's vocabulary (the build composes the index itself)."""
        if self.kind == "flat":
            return "IDMap2,Flat"
        pca = {PCA_AUTO: "PCAauto,", 0: ""}.get(self.pca, f"PCA{self.pca},")
        return f"{pca}IVF{self.nlist},{self.code}" + (",Refine(FP16)" if self.refine else "")

    def bytes_per_vector(self) -> int:
        """Bytes a vector takes in memory (its code and id); the re-ranking store adds 2 x dim on disk."""
        return code_bytes(self.code, self.stored_dim) + ID_BYTES

    def as_dict(self) -> dict:
        return {**asdict(self), "factory": self.factory}

    @classmethod
    def choose(cls, n: int, *, kind: str = "auto", dim: int = EMBEDDING_DIM, max_memory: int = DEFAULT_MAX_MEMORY,
               pca: int | None = None, flat_max: int = FLAT_MAX) -> "IndexSpec":
        """The spec for n vectors of `dim` dimensions within `max_memory` bytes (pca None: the default)."""
        if kind not in KINDS:
            raise SimilarityIndexError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)}")
        if kind == "auto":
            fits = n * (4 * dim + ID_BYTES) <= max_memory // 2
            kind = "flat" if (n <= max(flat_max, IVF_MIN - 1) and fits) or n < IVF_MIN else "ivf"
        if kind == "flat":
            if n * (4 * dim + ID_BYTES) > max_memory:
                raise SimilarityIndexError(f"an exact index of {n} vectors needs {_gib(n * (4 * dim + ID_BYTES))}, "
                                           f"over --max-memory {_gib(max_memory)}; use --kind ivf")
            return cls("flat", dim, 0, 0, "Flat", 0)
        if n < IVF_MIN:
            raise SimilarityIndexError(f"an IVF index needs at least {IVF_MIN} vectors to train, got {n}; "
                                       "use --kind flat")
        out = PCA_AUTO if pca is None else pca
        if out < PCA_AUTO or out > dim:
            raise SimilarityIndexError(f"--pca must be auto, 0 (none) or 1..{dim}, got {out}")
        out = 0 if out == dim else out
        stored = dim if out == PCA_AUTO else out or dim  # auto is sized for the worst case: no projection
        nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
        nlist = int(max(16, min(65536, nlist, 2 ** math.floor(math.log2(n / 39)))))
        budget = max_memory // 2
        for code in _codes(stored):
            if n * (code_bytes(code, stored) + ID_BYTES) <= budget:
                break
        else:
            smallest = n * (code_bytes(code, stored) + ID_BYTES)
            raise SimilarityIndexError(f"{n} vectors need at least {_gib(2 * smallest)} of --max-memory "
                                       f"(codes {code}: {_gib(smallest)}, as much again to build); "
                                       f"got {_gib(max_memory)}")
        pq_min = 256 * 39 if code.startswith("PQ") else 0  # 256 centroids per sub-space
        train = int(min(n, max(40 * nlist, pq_min), TRAIN_MAX))
        return cls("ivf", dim, out, nlist, code, train, REFINE_K_FACTOR)


PCA_TRAIN_MAX = 32_768  # vectors the projection is fitted on (a sub-sample of the training sample)
TRAIN_MAX = 1_000_000


def _codes(dim: int) -> list[str]:
    """Codes from the most to the least accurate for `dim` stored dimensions."""
    codes = ["SQ8", "SQ4"]
    for per_byte in (4, 8, 16, 32):
        if dim % per_byte == 0:
            codes.append(f"PQ{dim // per_byte}")
    return codes


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def resolve_pca(variance_kept: list[float], dim: int) -> int:
    """--pca auto: the smallest of 64, 128, ... dim/2 dimensions whose projection keeps PCA_VARIANCE of the
    variance (variance_kept[d-1]: the share kept by d dimensions), else 0 (no projection)."""
    d = 64
    while d <= dim // 2:
        if variance_kept[d - 1] >= PCA_VARIANCE:
            return d
        d *= 2
    return 0
