"""spec module: which FAISS index to build for a count of vectors and a memory budget (pure, no FAISS).

The rules (FAISS's guidelines, as autofaiss applies them):
- up to `flat_max` vectors, and while the raw vectors fit the budget: exact search (`Flat`);
- above: an inverted file with nlist ~ 4*sqrt(n) lists (a power of two, at least 39 training vectors per list),
  k-means trained on a sample of 40*nlist vectors, searched with an `nprobe` tuned after the build to a recall
  target (see tuning.py);
- optional PCA (an uncentred projection, so inner products = cosines stay unbiased): by default the smallest
  of 64, 128, ... dim/2 dimensions that keeps PCA_VARIANCE of the training sample's variance, else none;
- codes: follow the count and the recall target, not a fixed budget: SQ8 (1 byte a stored dimension) for a
  target of 0.9 or more (what reaches 0.95 recall@10 on photo embeddings after the projection), SQ4 below;
  with an explicit --max-memory, the most accurate that fit half of it: SQ8, SQ4, then PQ with 4, 8, 16 ...
  dimensions a byte (the other half is for training and the chunks in flight). `query_memory` says what a
  query node then needs;
- re-ranking: the REFINE_K_FACTOR x k best candidates by code are re-scored with finer codes of the
  vectors' offsets from the mean, kept on disk (memory-mapped, not in the memory budget): float16 of all
  dimensions (FP16, 4 KiB a vector, the default) or a 1 KiB transform code (TC1024; coders.py): embeddings
  crowd around their mean so tightly that 8-bit codes of the full vectors rank their 10th and 11th
  neighbours no better than the projection does.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Optional

from resnet_batch.errors import SimilarityIndexError
from resnet_batch.schema import EMBEDDING_DIM

FLAT_MAX = 50_000  # up to this many vectors the index is exact
IVF_MIN = 1_000  # fewer vectors cannot train an inverted file
KINDS = ("auto", "flat", "ivf")
DEFAULT_MAX_MEMORY = None  # no budget: the codes follow the count and the recall target (code_for_target)
SQ8_TARGET = 0.9  # recall targets from here on get 8-bit codes; lower ones 4-bit
PCA_AUTO = -1  # --pca auto: chosen from the training sample's spectrum (resolve_pca)
PCA_VARIANCE = 0.99  # the share of variance an automatic projection must keep
ID_BYTES = 8  # every stored vector carries its 64-bit id
REFINE_K_FACTOR = 4  # candidates re-scored per result
TUNE_QUERIES = 1000  # database rows nprobe is tuned on
REFINE_CODES = ("FP16", "TC1024")  # re-ranking codes (coders.py): 4 KiB a vector, 1 KiB a vector
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
    refine: int = 0  # candidates per result re-scored with the re-ranking codes (0: none)
    refine_code: str = "FP16"  # the re-ranking codes: REFINE_CODES

    @property
    def stored_dim(self) -> int:
        return self.pca if self.pca > 0 else self.dim

    @property
    def factory(self) -> str:
        """A readable description in faiss.index_factory's vocabulary (the build composes the index itself)."""
        if self.kind == "flat":
            return "IDMap2,Flat"
        pca = {PCA_AUTO: "PCAauto,", 0: ""}.get(self.pca, f"PCA{self.pca},")
        return f"{pca}IVF{self.nlist},{self.code}" + (f",Refine({self.refine_code})" if self.refine else "")

    def bytes_per_vector(self) -> int:
        """Bytes a vector takes in memory (its code and id); the re-ranking rows add theirs on disk."""
        return code_bytes(self.code, self.stored_dim) + ID_BYTES

    def as_dict(self) -> dict:
        return {**asdict(self), "factory": self.factory}

    def query_memory(self, n: int, id_map_bytes: int = 0, refine_bytes: int = 0) -> dict:
        """What a node serving n vectors of this spec needs: the lists (codes and ids; memory-mapped, to be held in
        the page cache for full speed), the coarse quantizer and projection (in the heap), the id map (mapped,
        paged in by lookups) and the re-ranking rows (on disk, read a few rows a query)."""
        lists = n * self.bytes_per_vector() if self.kind == "ivf" else n * (4 * self.dim + ID_BYTES)
        heap = self.nlist * self.stored_dim * 4 + (self.dim * self.pca * 4 if self.pca > 0 else 0)
        return {"lists_bytes": int(lists), "heap_bytes": int(heap), "id_map_bytes": int(id_map_bytes),
                "refine_bytes_on_disk": int(refine_bytes), "ram_bytes": int(lists + heap + id_map_bytes)}

    @classmethod
    def choose(cls, n: int, *, kind: str = "auto", dim: int = EMBEDDING_DIM,
               max_memory: Optional[int] = DEFAULT_MAX_MEMORY, pca: int | None = None, flat_max: int = FLAT_MAX,
               target_recall: float = 0.95, refine_code: str = "FP16") -> "IndexSpec":
        """The spec for n vectors of `dim` dimensions (pca None: the default): codes for `target_recall`, or
        the most accurate within `max_memory` bytes where a budget is given."""
        if kind not in KINDS:
            raise SimilarityIndexError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)}")
        if kind == "auto":
            fits = max_memory is None or n * (4 * dim + ID_BYTES) <= max_memory // 2
            kind = "flat" if (n <= max(flat_max, IVF_MIN - 1) and fits) or n < IVF_MIN else "ivf"
        if kind == "flat":
            if max_memory is not None and n * (4 * dim + ID_BYTES) > max_memory:
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
        if max_memory is None:
            code = code_for_target(target_recall)
        else:
            code = _within_budget(n, stored, max_memory)
        pq_min = 256 * 39 if code.startswith("PQ") else 0  # 256 centroids per sub-space
        train = int(min(n, max(40 * nlist, pq_min), TRAIN_MAX))
        return cls("ivf", dim, out, nlist, code, train, REFINE_K_FACTOR, refine_code)


def query_node_line(q: dict) -> str:
    """What a query node needs, in one line (the build prints it; index.json "query_node" records it)."""
    g = 2**30
    return (f"a query node needs {q['ram_bytes'] / g:.2f} GiB of memory for full speed: lists "
            f"{q['lists_bytes'] / g:.2f} GiB (memory-mapped), quantizer and projection {q['heap_bytes'] / g:.2f} GiB, "
            f"id map {q['id_map_bytes'] / g:.2f} GiB (memory-mapped); and {q['refine_bytes_on_disk'] / g:.2f} GiB of "
            "re-ranking rows on disk or object storage (a few rows read a query)")


def code_for_target(target_recall: float) -> str:
    """The codes a recall target needs when no budget is given: the coarse codes only pick the candidates that
    re-ranking then scores, so 8 bits a projected dimension reach 0.95 recall@10 (measured at 1M and 3M photo
    vectors, docs/search.md) whatever the count; 4 bits suffice for targets under SQ8_TARGET."""
    return "SQ8" if target_recall >= SQ8_TARGET else "SQ4"


def _within_budget(n: int, stored: int, max_memory: int) -> str:
    """The most accurate codes whose n vectors fit half of max_memory."""
    budget = max_memory // 2
    for code in _codes(stored):
        if n * (code_bytes(code, stored) + ID_BYTES) <= budget:
            return code
    smallest = n * (code_bytes(code, stored) + ID_BYTES)
    raise SimilarityIndexError(f"{n} vectors need at least {_gib(2 * smallest)} of --max-memory "
                               f"(codes {code}: {_gib(smallest)}, as much again to build); got {_gib(max_memory)}")


@dataclass(frozen=True)
class IndexOptions:
    """What `resnet-batch index` is asked for. index.json records them, and an update of that index uses the
    recorded ones where the command line gives none: the nightly command need not repeat how it was built."""

    kind: str = "auto"
    max_memory: Optional[int] = DEFAULT_MAX_MEMORY  # None: codes from the count and the recall target
    pca: int = PCA_AUTO  # stored dimensions, 0: none, PCA_AUTO: chosen from the spectrum (None reads as auto)
    flat_max: int = FLAT_MAX
    target_recall: float = 0.95
    tune_queries: int = TUNE_QUERIES
    seed: int = 0
    refine_code: str = "FP16"

    def __post_init__(self):
        if self.pca is None:
            object.__setattr__(self, "pca", PCA_AUTO)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def given(cls, recorded: Optional[dict] = None, **given) -> "IndexOptions":
        """The options given (None values: not given), else the recorded ones, else the defaults."""
        names = {f.name for f in fields(cls)}
        base = {k: v for k, v in (recorded or {}).items() if k in names}
        return cls(**{**base, **{k: v for k, v in given.items() if v is not None}})

    def check(self) -> None:
        if not 0 < self.target_recall <= 1:
            raise SimilarityIndexError(f"--target-recall must be in (0, 1], got {self.target_recall}")
        if self.refine_code not in REFINE_CODES:
            raise SimilarityIndexError(f"--refine-code must be one of {', '.join(REFINE_CODES)}, "
                                       f"got {self.refine_code!r}")


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


GROWTH_LIMIT = 4  # an inverted file is retrained once the count is 4x (or a quarter of) what it was trained for


@dataclass(frozen=True)
class Decision:
    """Whether an existing index takes its changes in place or is built again, and why (one line)."""

    rebuild: bool
    reason: str


def decide(meta: dict, after: int, kept: int, options: IndexOptions) -> Decision:
    """Update an index (index.json `meta`) in place, or rebuild it, for `after` vectors of which `kept` were
    indexed before. Rebuilt when the spec the options choose for `after` is of another kind (the exact-search
    limit crossed either way, or the memory budget), when the projection asked changed, when the count left the
    range the lists were trained for (GROWTH_LIMIT), when most vectors would be new, or when the codes no
    longer fit the budget; otherwise the lists, projection and codes stay and only vectors move."""
    spec, before = meta["spec"], int(meta["count"])
    wanted = IndexSpec.choose(after, kind=options.kind, dim=spec["dim"], max_memory=options.max_memory,
                              pca=options.pca, flat_max=options.flat_max, target_recall=options.target_recall)
    if wanted.kind != spec["kind"]:
        return Decision(True, _crossing(spec["kind"], before, after, options))
    if spec["kind"] == "flat":
        return Decision(False, "exact search, nothing to retrain")
    ivf = f"IVF{spec['nlist']}"
    recorded_pca = IndexOptions.given(meta.get("options")).pca
    trained = int(meta.get("trained_count") or before)
    need = after * (code_bytes(spec["code"], spec["pca"] or spec["dim"]) + ID_BYTES)
    if options.pca != recorded_pca:
        return Decision(True, f"--pca changed ({_pca_text(recorded_pca)} -> {_pca_text(options.pca)})")
    built_code = spec.get("refine_code", "FP16")  # indexes from before the option: float16
    if options.refine_code != built_code:
        return Decision(True, f"--refine-code changed ({built_code} -> {options.refine_code})")
    if after > GROWTH_LIMIT * trained:
        return Decision(True, f"{after:,} vectors are over {GROWTH_LIMIT}x the {trained:,} that {ivf} was trained for")
    if after * GROWTH_LIMIT < trained:
        return Decision(True, f"{after:,} vectors are under 1/{GROWTH_LIMIT} of the {trained:,} that {ivf} was "
                              "trained for")
    if 2 * kept < after:
        return Decision(True, f"most vectors would be new ({kept:,} of {after:,} kept)")
    if options.max_memory is not None and need > options.max_memory // 2:
        return Decision(True, f"{spec['code']} codes of {after:,} vectors need {_gib(need)}, over half of "
                              f"--max-memory ({_gib(options.max_memory)})")
    return Decision(False, f"no retraining ({ivf} trained for {trained:,}, now {after:,})")


def _crossing(kind: str, before: int, after: int, options: IndexOptions) -> str:
    """Why the kind changes: asked for, the exact-search limit crossed, or the raw vectors over the budget."""
    if options.kind != "auto":
        return f"--kind {options.kind} asked (the index is {kind})"
    limit = max(options.flat_max, IVF_MIN - 1)
    if kind == "ivf":
        return f"{before:,} -> {after:,} vectors is within the exact-search limit ({limit:,})"
    if after > limit:
        return f"{before:,} -> {after:,} vectors crosses the exact-search limit ({limit:,})"
    return f"the raw vectors of {after:,} images are over half of --max-memory ({_gib(options.max_memory)})"


def _pca_text(pca: int) -> str:
    return {PCA_AUTO: "auto", 0: "none"}.get(pca, str(pca))
