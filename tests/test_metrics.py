"""Ranking metrics, coverage and the popularity / Markov baselines (ezsasrec_ray.metrics)."""

import math

import numpy as np
import pyarrow as pa
import pytest

from ezsasrec_ray.metrics import (
    MarkovBaseline,
    PopularityBaseline,
    coverage,
    rank_from_scores,
    ranking_metrics,
    sequence_arrays,
    top_k_from_scores,
)

# -----------------------------------------------------------------------------
# metrics


def test_ranking_metrics_by_hand():
    m = ranking_metrics([0, 1, 9, 10, 100])
    assert m["users"] == 5
    # HR@K: ranks < K.  K=1: {0}; 5: {0, 1}; 10: {0, 1, 9}; 20 and 50: {0, 1, 9, 10}
    assert m["HR@1"] == pytest.approx(1 / 5)
    assert m["HR@5"] == pytest.approx(2 / 5)
    assert m["HR@10"] == pytest.approx(3 / 5)
    assert m["HR@20"] == pytest.approx(4 / 5)
    assert m["HR@50"] == pytest.approx(4 / 5)
    # NDCG@K: 1 / log2(rank + 2) for ranks < K: rank 0 -> 1, 1 -> 1/log2(3) = 0.6309297536,
    # 9 -> 1/log2(11) = 0.2890648263, 10 -> 1/log2(12) = 0.2789429457; 100 never counts.
    assert m["NDCG@1"] == pytest.approx(1 / 5)
    assert m["NDCG@5"] == pytest.approx((1 + 0.6309297536) / 5)  # 0.3261859507
    assert m["NDCG@10"] == pytest.approx((1 + 0.6309297536 + 0.2890648263) / 5)  # 0.3839989160
    ndcg20 = (1 + 0.6309297536 + 0.2890648263 + 0.2789429457) / 5  # 0.4397875051
    assert m["NDCG@20"] == pytest.approx(ndcg20)
    assert m["NDCG@50"] == pytest.approx(ndcg20)
    # MRR over all users, no cut-off: (1 + 1/2 + 1/10 + 1/11 + 1/101) / 5 = 0.3401620162
    assert m["MRR"] == pytest.approx(0.3401620162)
    assert m["MRR"] == pytest.approx((1 + 1 / 2 + 1 / 10 + 1 / 11 + 1 / 101) / 5, rel=1e-12)
    assert m["NDCG@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(11)) / 5,
                                         rel=1e-12)


def test_ranking_metrics_custom_ks_and_edge_cases():
    m = ranking_metrics(np.array([3, 3]), ks=(3, 4))
    assert m == pytest.approx({"users": 2, "HR@3": 0.0, "NDCG@3": 0.0, "HR@4": 1.0,
                               "NDCG@4": 1 / math.log2(5), "MRR": 0.25})
    empty = ranking_metrics([], ks=(1,))
    assert empty["users"] == 0 and math.isnan(empty["HR@1"]) and math.isnan(empty["MRR"])
    with pytest.raises(ValueError):
        ranking_metrics([-1])


def test_coverage():
    top = np.array([[1, 2, 0], [2, 5, 0], [5, 1, 2]])
    assert coverage(top, 10) == pytest.approx(3 / 10)  # {1, 2, 5}; padding 0 ignored
    assert coverage(np.zeros((2, 3), int), 4) == 0.0
    assert coverage(np.array([[1, 2], [3, 4]]), 4) == 1.0
    with pytest.raises(ValueError):
        coverage(top, 0)


# -----------------------------------------------------------------------------
# training sequences

SEQS = [[1, 2, 3], [2, 3, 1], [1, 2, 4], [5]]
VALUES = np.array([1, 2, 3, 2, 3, 1, 1, 2, 4, 5])
OFFSETS = np.array([0, 3, 6, 9, 10])


def test_sequence_arrays_inputs():
    for seqs in [(VALUES, OFFSETS), SEQS, pa.array(SEQS), pa.array(SEQS, pa.large_list(pa.int64())),
                 pa.chunked_array([pa.array(SEQS[:2]), pa.array(SEQS[2:])])]:
        values, offsets = sequence_arrays(seqs)
        np.testing.assert_array_equal(values, VALUES)
        np.testing.assert_array_equal(offsets, OFFSETS)
    # a sliced ListArray with a null list and a null item
    sliced = pa.array([[9, 9], [1, None], None, [3]])[1:]
    values, offsets = sequence_arrays(sliced)
    assert values.tolist() == [1, 0, 3] and offsets.tolist() == [0, 2, 2, 3]
    with pytest.raises(ValueError):
        sequence_arrays((VALUES, np.array([0, 5, 3])))


# -----------------------------------------------------------------------------
# baselines
#
# SEQS: [1, 2, 3], [2, 3, 1], [1, 2, 4], [5]
#   popularity: 1 -> 3, 2 -> 3, 3 -> 2, 4 -> 1, 5 -> 1
#   pairs inside sequences: 1->2 (x2), 2->3 (x2), 3->1, 2->4; never across sequences
#   (3->2, 1->1, 4->5 must not appear).


def test_popularity_baseline():
    base = PopularityBaseline(6).fit((VALUES, OFFSETS))
    assert base.counts.tolist() == [0, 3, 3, 2, 1, 1, 0]
    s = base.scores(np.zeros((2, 4), int))
    assert s.shape == (2, 7) and np.isneginf(s[:, 0]).all()
    idx, _ = top_k_from_scores(s, 6)
    assert idx[0].tolist() == [1, 2, 3, 4, 5, 6]  # ties (1, 2), (4, 5): smaller index first
    histories = np.array([[0, 0, 1], [0, 2, 3]])
    # user 0: 1 seen; target 4 is beaten by 2, 3 -> 2. user 1: target 1 beats all -> 0
    assert rank_from_scores(s, np.array([4, 1]), histories).tolist() == [2, 0]
    # target 5 (count 1) ties with 4 (count 1, smaller index): 4 beats it
    assert rank_from_scores(s, np.array([5, 5]), histories).tolist() == [3, 2]


def test_markov_baseline_counts_pairs_within_sequences():
    base = MarkovBaseline(5).fit(pa.array(SEQS))
    assert base.indptr.tolist() == [0, 0, 1, 3, 4, 4, 4]
    assert [base.transitions(i)[0].tolist() for i in range(6)] == [[], [2], [3, 4], [1], [], []]
    assert [base.transitions(i)[1].tolist() for i in range(6)] == [[], [2], [2, 1], [1], [], []]
    ref = MarkovBaseline(5).fit((VALUES, OFFSETS))
    for name in ("indptr", "next_items", "pair_counts", "popularity"):
        np.testing.assert_array_equal(getattr(base, name), getattr(ref, name))


def test_markov_baseline_scores_and_ranks():
    base = MarkovBaseline(5).fit(SEQS)
    histories = np.array([[0, 1, 2], [0, 0, 5], [0, 0, 0]])  # last items: 2, 5 (none), none
    s = base.scores(histories)
    # popularity tie-break term: pop / (max pop + 1) = pop / 4
    pop = np.array([0, 3, 3, 2, 1, 1]) / 4
    np.testing.assert_allclose(s[0, 1:], pop[1:] + [0, 0, 2, 1, 0])  # 2->3 x2, 2->4 x1
    np.testing.assert_allclose(s[1, 1:], pop[1:])
    assert np.isneginf(s[:, 0]).all()
    np.testing.assert_array_equal(base.scores(np.array([2, 5, 0])), s)  # (B,) last items
    idx, _ = top_k_from_scores(s, 5)
    assert idx.tolist() == [[3, 4, 1, 2, 5], [1, 2, 3, 4, 5], [1, 2, 3, 4, 5]]
    # history of user 0 = {1, 2}: target 4 is beaten by 3 only; target 3 is first
    assert rank_from_scores(s, np.array([4, 3, 5]), histories).tolist() == [1, 2, 4]
    assert rank_from_scores(s, np.array([3, 2, 2]), histories).tolist() == [0, 1, 1]

    plain = MarkovBaseline(5, popularity_tiebreak=False).fit(SEQS)
    s = plain.scores(histories)
    assert s[0, 1:].tolist() == [0, 0, 2, 1, 0]
    idx, _ = top_k_from_scores(s, 5, histories=histories)
    # user 0: 3, 4 then the zero-score items by index (1, 2 seen); others: index order
    assert idx.tolist() == [[3, 4, 5, 0, 0], [1, 2, 3, 4, 0], [1, 2, 3, 4, 5]]


def test_baselines_feed_top_k_and_coverage():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 8, 50)
    values = rng.integers(1, 31, lengths.sum())
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    markov = MarkovBaseline(30).fit((values, offsets))
    histories = rng.integers(0, 31, (20, 5))
    idx, val = top_k_from_scores(markov.scores(histories), 10, histories=histories)
    assert ((idx > 0) & (idx <= 30)).all()
    assert not (idx[:, :, None] == histories[:, None, :]).any()
    assert 0 < coverage(idx, 30) <= 1
    assert (np.diff(val, axis=1) <= 0).all()


def test_baseline_input_checks():
    with pytest.raises(ValueError):
        PopularityBaseline(3).fit(SEQS)  # item 4, 5 > 3
    with pytest.raises(RuntimeError):
        MarkovBaseline(5).scores(np.zeros((1, 2), int))
    with pytest.raises(ValueError):
        MarkovBaseline(5).fit(SEQS).scores(np.array([[7]]))
