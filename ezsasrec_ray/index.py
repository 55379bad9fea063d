"""Which retrieval index answers a stage: exact (host or device) or approximate (FAISS).

Every backend is a :class:`.topk.TopK` (index once, query with histories, exclusions and
candidates; :meth:`~.topk.TopK.is_exact` says which kind). :class:`FaissTopK` is the
approximate one, for catalogs of millions of items: an HNSW or IVF index proposes candidates,
which are then re-scored exactly, the user's exclusions removed, and sorted by the tie rule of
the exact index.

Inner product as Euclidean distance (Bachrach et al., 2014): item v becomes
``[v, sqrt(R**2 - |v|**2)]`` (R the largest item norm: every item on one sphere) and the query
``[R u / |u|, 0]``; the nearest items are then exactly those of largest ``u . v``. On a trained
SASRec (Beauty, 54k items) an HNSW index built on the inner product itself found half of the
exact top 10 at any ``efSearch`` (its graph links every item to the few of largest norm),
0.985 with this transform at ``efSearch`` 256 (benchmarks/RESULTS.md, "approximate
retrieval"). So every item returned carries its exact score and
the list is in exact order; only an item FAISS did not propose can be missing (recall@k
against exact: :func:`recall_at_k`, ``ezsasrec score --check-recall``).

The options (``--index``, ``--ef-search``, ``--nprobe``) are declared here once and taken by
the configs of ``ezsasrec score`` and ``ezsasrec serve`` (:func:`index_option`).
"""

from __future__ import annotations

import importlib.util
import math
import time

import numpy as np

from .errors import EzSASRecError
from .options import option
from .topk import _EXTRA, TopK, _sorted_desc

INDEXES = ("exact", "faiss-hnsw", "faiss-ivf")
HNSW_M = 32  # links per node: FAISS's usual choice for recall >= 0.9 at d 32-128
HNSW_EF_CONSTRUCTION = 80
IVF_TRAIN_PER_LIST = 64  # training points per inverted list (FAISS wants at least 39)

_OPTIONS = {
    "index": ("exact", "retrieval index: exact, or approximate for catalogs of millions "
                       "(faiss-hnsw, faiss-ivf: candidates re-scored exactly; needs faiss-cpu, "
                       "pip install 'ezsasrec_ray[ann]')", {"choices": INDEXES}),
    "ef_search": (128, "faiss-hnsw: candidates explored per query (more: better recall, "
                       "slower)", {"min": 1}),
    "nprobe": (32, "faiss-ivf: inverted lists searched per query (more: better recall, "
                   "slower)", {"min": 1}),
}


def index_option(name: str):
    """A fresh dataclass field for option ``name`` (one definition, several configs)."""
    default, help_text, limits = _OPTIONS[name]
    return option(default, help_text, **limits)


def check_available(kind: str) -> None:
    """A one-line error before any work when a FAISS index is asked for without FAISS."""
    if kind != "exact" and importlib.util.find_spec("faiss") is None:
        raise EzSASRecError(f"--index {kind} needs FAISS: pip install faiss-cpu (or "
                            "'ezsasrec_ray[ann]')")


def make_index(item_table, *, index: str = "exact", ef_search: int = 128, nprobe: int = 32,
               device_scan: bool = False, threads: int | None = None, **topk_options) -> TopK:
    """The TopK of a stage: exact on the host, exact on a TF device, or FAISS."""
    if index == "exact":
        if device_scan:
            from .topk_device import DeviceTopK

            return DeviceTopK(item_table, **topk_options)
        return TopK(item_table, **topk_options)
    check_available(index)
    return FaissTopK(item_table, kind=index, ef_search=ef_search, nprobe=nprobe,
                     threads=threads, **topk_options)


class FaissTopK(TopK):
    """:class:`.topk.TopK` answered from a FAISS index (``kind`` faiss-hnsw or faiss-ivf).

    ``build_seconds`` and ``index_bytes`` (its vectors and graph or lists, from their sizes)
    say what building it cost. ``threads``: FAISS's
    OpenMP threads (1 where the caller runs several queries at once on its own threads).
    Target ranks (evaluation) stay exact."""

    def __init__(self, item_table, *, kind: str = "faiss-hnsw", ef_search: int = 128,
                 nprobe: int = 32, threads: int | None = None, **topk_options):
        import faiss

        super().__init__(item_table, **topk_options)
        if threads:
            faiss.omp_set_num_threads(int(threads))
        self.kind, self.ef_search, self.nprobe = kind, int(ef_search), int(nprobe)
        started = time.perf_counter()
        norms = np.linalg.norm(self.vectors.astype(np.float64), axis=1)
        self.radius = float(norms.max()) if norms.size and norms.max() > 0 else 1.0
        lift = np.sqrt(np.maximum(self.radius**2 - norms**2, 0.0))[:, None]
        self.faiss_index = _build(kind, np.hstack([self.vectors, lift]).astype(np.float32),
                                  nprobe)
        self.build_seconds = time.perf_counter() - started
        self.index_bytes = _index_bytes(self.faiss_index, kind)

    def is_exact(self):
        return False

    def _top_rows(self, users, k, histories):
        """FAISS's best k + 16 + (row's exclusions) per row, exclusions dropped, re-scored
        exactly -> (B, min(k, n)) keys sorted descending."""
        import faiss

        excluded = 0 if histories is None else histories.shape[1]
        fetch = min(self.items.size, k + _EXTRA + excluded)  # room for the excluded ones
        params = (faiss.SearchParametersHNSW(efSearch=max(self.ef_search, fetch))
                  if self.kind == "faiss-hnsw" else faiss.SearchParametersIVF(nprobe=self.nprobe))
        _, positions = self.faiss_index.search(self._queries(users), fetch,
                                               params=params)  # (B, fetch), -1 when fewer
        items = np.where(positions >= 0, self.items[np.maximum(positions, 0)], 0)
        if histories is not None:  # (B, fetch, H) comparisons: both small
            items[(items[:, :, None] == histories[:, None, :]).any(axis=2)] = 0
        keys = _sorted_desc(self._exact_keys(users, items))
        return keys[:, : min(k, self.items.size)]


    def _queries(self, users):
        """(B, d) -> (B, d + 1): on the items' sphere, 0 in the lifted coordinate."""
        norms = np.linalg.norm(users, axis=1, keepdims=True)
        scaled = users * (self.radius / np.where(norms > 0, norms, 1.0))
        return np.hstack([scaled, np.zeros((len(users), 1))]).astype(np.float32)


def _build(kind: str, vectors: np.ndarray, nprobe: int):
    """A Euclidean FAISS index over vectors (n, d) float32; ids are row positions."""
    import faiss

    n, d = vectors.shape
    if kind == "faiss-hnsw":
        index = faiss.IndexHNSWFlat(d, HNSW_M, faiss.METRIC_L2)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    elif kind == "faiss-ivf":
        nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist, faiss.METRIC_L2)
        sample = np.random.default_rng(0).permutation(n)[: IVF_TRAIN_PER_LIST * nlist]
        index.train(vectors[np.sort(sample)])
        index.nprobe = nprobe
    else:
        raise EzSASRecError(f"--index: unknown index {kind!r}; choose from {', '.join(INDEXES)}")
    if n:
        index.add(vectors)
    return index


def _index_bytes(index, kind: str) -> int:
    """Memory of a FAISS index's arrays (without serializing it: no second copy)."""
    vectors = index.ntotal * index.d * 4
    if kind == "faiss-hnsw":
        graph = index.hnsw
        return int(vectors + graph.neighbors.size() * 4 + graph.offsets.size() * 8
                   + graph.levels.size() * 4)
    return int(vectors + index.ntotal * 8 + index.nlist * index.d * 4)  # ids, centroids


def recall_counts(approximate, exact) -> tuple[int, int]:
    """(B, k) int lists, 0 = none -> (exact items the approximate lists hold, exact items)."""
    approximate, exact = np.asarray(approximate), np.asarray(exact)
    found = (exact[:, :, None] == approximate[:, None, :]).any(axis=2) & (exact > 0)
    return int(found.sum()), int((exact > 0).sum())


def recall_at_k(approximate, exact) -> float:
    """Share of the exact top-k items (B, k) int, 0 = none, that the approximate lists hold."""
    found, total = recall_counts(approximate, exact)
    return found / total if total else 1.0
