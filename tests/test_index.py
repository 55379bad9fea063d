"""The retrieval index of a stage (ezsasrec_ray.index): exact, device, and FAISS backends."""

import numpy as np
import pytest
from test_topk import all_scores, allowed_mask, assert_same, brute_top_k, float_data

from ezsasrec_ray import index as index_module
from ezsasrec_ray.errors import EzSASRecError
from ezsasrec_ray.index import FaissTopK, make_index, recall_at_k
from ezsasrec_ray.topk import TopK, exact_scores
from ezsasrec_ray.topk_device import DeviceTopK

pytest.importorskip("faiss")


def clustered(rng, num_users, num_items, dim, clusters=20):
    """Embeddings with cluster structure, as trained ones have (random ones have none)."""
    centers = rng.standard_normal((clusters, dim)).astype(np.float32)
    table = centers[rng.integers(0, clusters, num_items + 1)] + 0.3 * rng.standard_normal(
        (num_items + 1, dim)).astype(np.float32)
    users = centers[rng.integers(0, clusters, num_users)] + 0.3 * rng.standard_normal(
        (num_users, dim)).astype(np.float32)
    return users.astype(np.float32), table.astype(np.float32)


def test_make_index_picks_the_backend():
    table = np.ones((5, 2), np.float32)
    assert type(make_index(table)) is TopK and make_index(table).is_exact()
    assert type(make_index(table, device_scan=True)) is DeviceTopK
    for kind in ("faiss-hnsw", "faiss-ivf"):
        built = make_index(table, index=kind)
        assert isinstance(built, FaissTopK) and not built.is_exact()
        assert built.build_seconds >= 0 and built.index_bytes > 0


def test_missing_faiss_is_one_line(monkeypatch):
    monkeypatch.setattr(index_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EzSASRecError, match="--index faiss-ivf needs FAISS: pip install"):
        make_index(np.ones((5, 2), np.float32), index="faiss-ivf")


@pytest.mark.parametrize("kind", ["faiss-hnsw", "faiss-ivf"])
def test_small_catalog_fetched_whole_is_exact(kind):
    # fewer items than k + 16 + history: FAISS returns them all, so the answer is exact
    rng = np.random.default_rng(1)
    users, table = float_data(rng, 7, 30, 4)
    histories = rng.integers(0, 31, (7, 5))
    want = brute_top_k(all_scores(users, table), allowed_mask(7, 30, histories), 12)
    assert_same(FaissTopK(table, kind=kind)(users, 12, histories=histories), want)


@pytest.mark.parametrize("kind", ["faiss-hnsw", "faiss-ivf"])
def test_large_catalog_exact_scores_exact_order_no_excluded_item_and_high_recall(kind):
    rng = np.random.default_rng(2)
    users, table = clustered(rng, 200, 5000, 16)
    histories = rng.integers(0, 5001, (200, 20))
    exclude = [rng.integers(1, 5001, 5) if b % 2 else None for b in range(200)]
    approx = FaissTopK(table, kind=kind, exclude_items=np.arange(1, 100))
    exact = TopK(table, exclude_items=np.arange(1, 100))
    idx, scores = approx(users, 10, histories=histories, exclude=exclude)
    want_idx, _ = exact(users, 10, histories=histories, exclude=exclude)
    assert (idx > 99).all()  # the index-wide exclusions
    for b in range(200):  # nothing from the row's history or exclusions
        assert not set(idx[b]) & (set(histories[b]) | set(exclude[b] if b % 2 else []))
    np.testing.assert_array_equal(scores, exact_scores(users, table, idx))
    keys = [sorted(zip(-scores[b], idx[b])) for b in range(200)]  # exact order, tie rule
    assert all([(-s, i) for s, i in zip(scores[b], idx[b])] == keys[b] for b in range(200))
    assert recall_at_k(idx, want_idx) >= 0.95


def test_candidates_rows_stay_exact_with_faiss():
    rng = np.random.default_rng(3)
    users, table = clustered(rng, 4, 500, 8)
    candidates = [rng.integers(1, 501, 30), None, np.array([], int), rng.integers(1, 501, 3)]
    got = FaissTopK(table, kind="faiss-hnsw")(users, 5, candidates=candidates)
    want = TopK(table)(users, 5, candidates=candidates)
    for b in (0, 2, 3):
        np.testing.assert_array_equal(got[0][b], want[0][b])


def test_recall_at_k():
    exact = np.array([[1, 2, 3], [4, 5, 0]])
    assert recall_at_k(np.array([[3, 9, 1], [5, 0, 0]]), exact) == pytest.approx(3 / 5)
    assert recall_at_k(exact, exact) == 1.0
    assert recall_at_k(np.zeros((1, 2), int), np.zeros((1, 2), int)) == 1.0
