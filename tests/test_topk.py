"""Exact streaming top-k and target ranks (ezsasrec_ray.topk) against brute-force numpy.

Most tests run the chunked fast pass (the one large batches take: chunk sizes, pilot
thresholds); the ``whole`` tests at the end run the few-users pass (one matmul over the
catalog), the one Serve's requests take."""

import contextlib
from functools import reduce

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ezsasrec_ray import topk
from ezsasrec_ray.topk import (
    DEFAULT_CHUNK_SIZE,
    EMPTY_KEY,
    TopK,
    decode_keys,
    encode_keys,
    exact_scores,
    rank_from_scores,
    sampled_ranks,
    target_ranks,
    top_k,
    top_k_from_scores,
)

CHUNKS = (1, 3, 7)  # and N + 5, added per test
WHOLE = topk._SMALL_BATCH_SCORES


@pytest.fixture(autouse=True, scope="module")
def chunked_fast_pass():
    """Every batch through the chunked pass (these tests' batches are all small)."""
    topk._SMALL_BATCH_SCORES = 0
    yield
    topk._SMALL_BATCH_SCORES = WHOLE


@contextlib.contextmanager
def whole_fast_pass():
    topk._SMALL_BATCH_SCORES = WHOLE
    try:
        yield
    finally:
        topk._SMALL_BATCH_SCORES = 0


# -----------------------------------------------------------------------------
# brute-force references


def int_data(rng, num_users, num_items, dim, lo=-2, hi=2):
    """Small-integer embeddings: every dot product is exact in float32, so BLAS, exact_scores
    and float64 agree, and ties are plentiful. Also duplicates some item rows."""
    users = rng.integers(lo, hi + 1, (num_users, dim)).astype(np.float32)
    table = rng.integers(lo, hi + 1, (num_items + 1, dim)).astype(np.float32)
    dup = rng.integers(1, num_items + 1, num_items // 3)
    table[dup] = table[rng.integers(1, num_items + 1)]
    return users, table


def float_data(rng, num_users, num_items, dim):
    """Gaussian embeddings, a third of the item rows duplicated (exact ties)."""
    users = rng.standard_normal((num_users, dim), dtype=np.float32)
    table = rng.standard_normal((num_items + 1, dim), dtype=np.float32)
    table[rng.integers(1, num_items + 1, num_items // 3)] = table[rng.integers(1, num_items + 1)]
    return users, table


def all_scores(users, table):
    """(B, N+1) float64 reference scores: exact_scores of every (user, item) pair."""
    items = np.tile(np.arange(table.shape[0]), (users.shape[0], 1))
    return exact_scores(users, table, items).astype(np.float64)


def allowed_mask(num_users, num_items, histories=None, exclude=None, candidates=None):
    """(B, N+1) bool: the items each user may get."""
    ok = np.ones((num_users, num_items + 1), bool)
    ok[:, 0] = False
    if candidates is not None:
        cand = np.zeros(num_items + 1, bool)
        cand[np.asarray(candidates, int)] = True
        ok &= cand
    if exclude is not None:
        ok[:, np.asarray(exclude, int)] = False
    if histories is not None:
        for b, row in enumerate(histories):
            ok[b, [h for h in row if 0 < h <= num_items]] = False
    return ok


def brute_top_k(scores, ok, k):
    """Per row: allowed items sorted by (score descending, index ascending), first k, padded."""
    num_users = scores.shape[0]
    idx = np.zeros((num_users, k), np.int32)
    val = np.full((num_users, k), -np.inf)
    for b in range(num_users):
        items = sorted(np.flatnonzero(ok[b]), key=lambda i: (-scores[b, i], i))[:k]
        idx[b, : len(items)] = items
        val[b, : len(items)] = scores[b, items]
    return idx, val


def brute_rank(scores, ok, targets):
    """Items allowed for the user (the target aside) that beat the target: (B,)."""
    ranks = []
    for b, t in enumerate(targets):
        s = scores[b]
        beats = (s > s[t]) | ((s == s[t]) & (np.arange(s.size) < t))
        beats &= ok[b]
        beats[t] = False
        ranks.append(int(beats.sum()))
    return np.array(ranks)


def assert_same(got, want):
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], np.asarray(want[1], np.float32))
    assert got[0].dtype == np.int32 and got[1].dtype == np.float32


# -----------------------------------------------------------------------------
# keys and exact scores


def test_keys_order_by_score_then_smaller_index():
    scores = np.array([1.5, -0.0, 0.0, -3.0, 1.5, np.inf, -np.inf, 1e-40, -1e-40, 2.0], np.float32)
    items = np.array([4, 2, 1, 9, 3, 7, 5, 6, 8, 10])
    keys = encode_keys(scores, items)
    order = np.argsort(keys)[::-1]
    want = sorted(range(len(items)), key=lambda i: (-float(scores[i]), items[i]))
    assert list(order) == want
    got_items, got_scores = decode_keys(keys)
    np.testing.assert_array_equal(got_items, items)
    np.testing.assert_array_equal(got_scores, scores + np.float32(0))  # -0.0 reads back as 0.0
    assert np.unique(keys).size == keys.size
    assert (keys > EMPTY_KEY).all()
    empty_items, empty_scores = decode_keys(np.array([EMPTY_KEY]))
    assert empty_items[0] == 0 and empty_scores[0] == -np.inf


def test_exact_scores_exact_for_integers_and_batch_independent():
    rng = np.random.default_rng(0)
    users, table = int_data(rng, 9, 50, 6, lo=-50, hi=50)
    items = rng.integers(0, 51, (9, 13))
    want = np.einsum("bd,bkd->bk", users.astype(np.float64), table[items].astype(np.float64))
    np.testing.assert_array_equal(exact_scores(users, table, items), want)

    users, table = float_data(rng, 9, 50, 33)
    full = exact_scores(users, table, items)
    for b in range(9):  # one row at a time, and one pair at a time: bit-identical
        np.testing.assert_array_equal(exact_scores(users[b : b + 1], table, items[b : b + 1]),
                                      full[b : b + 1])
        np.testing.assert_array_equal(exact_scores(np.repeat(users[b : b + 1], 13, 0), table,
                                                   items[b]), full[b])
    fast = np.einsum("bd,bkd->bk", users, table[items])  # float32: close, not always equal
    np.testing.assert_allclose(full, fast, rtol=1e-5, atol=1e-5)


def test_exact_scores_equal_a_float64_sum_in_index_order():
    # the compiled loop against the definition, written with numpy: bit-identical
    rng = np.random.default_rng(21)
    users, table = float_data(rng, 7, 300, 64)
    items = rng.integers(0, 301, (7, 40))
    want = np.zeros(items.shape, np.float64)
    for t in range(64):
        want += users[:, t, None].astype(np.float64) * table[items][:, :, t].astype(np.float64)
    np.testing.assert_array_equal(exact_scores(users, table, items), want.astype(np.float32))
    with pytest.raises(ValueError, match="row indices"):
        exact_scores(users, table, np.full((7, 1), 301))
    with pytest.raises(ValueError, match="d=64"):
        exact_scores(users, table[:, :8], items)


# -----------------------------------------------------------------------------
# top_k


@pytest.mark.parametrize("data", [int_data, float_data])
def test_top_k_matches_brute_force_for_every_chunk_size(data):
    rng = np.random.default_rng(1)
    for _trial in range(6):
        num_users, num_items = int(rng.integers(1, 9)), int(rng.integers(1, 60))
        users, table = data(rng, num_users, num_items, int(rng.integers(1, 6)))
        histories = rng.integers(0, num_items + 1, (num_users, 4))
        scores = all_scores(users, table)
        ok = allowed_mask(num_users, num_items, histories)
        for k in {0, 1, int(rng.integers(1, num_items + 3)), num_items + 2}:
            want = brute_top_k(scores, ok, k)
            for chunk in CHUNKS + (num_items + 5,):
                got = top_k(users, table, k, histories=histories, chunk_size=chunk)
                assert_same(got, want)


def test_top_k_ties_go_to_the_smaller_index():
    # items 2, 5, 7 have the same embedding, the best one; then 1 and 4 (equal), then the rest
    table = np.zeros((9, 2), np.float32)
    table[[2, 5, 7]] = [1.0, 1.0]
    table[[1, 4]] = [0.5, 0.5]
    table[[3, 6, 8]] = [-1.0, 0.0]
    users = np.array([[1.0, 1.0]], np.float32)
    for chunk in (1, 2, 3, 100):
        idx, val = top_k(users, table, 6, chunk_size=chunk)
        assert idx.tolist() == [[2, 5, 7, 1, 4, 3]]
        assert val.tolist() == [[2.0, 2.0, 2.0, 1.0, 1.0, -1.0]]


def test_top_k_float_results_identical_for_every_chunk_size_and_batch_split():
    rng = np.random.default_rng(2)
    users, table = float_data(rng, 40, 700, 24)
    histories = rng.integers(0, 701, (40, 30))
    want = brute_top_k(all_scores(users, table), allowed_mask(40, 700, histories), 25)
    for chunk in (1, 7, 64, 300, 705):
        index = TopK(table, chunk_size=chunk)
        assert_same(index(users, 25, histories=histories), want)
        one_by_one = [index(users[b : b + 1], 25, histories=histories[b : b + 1]) for b in range(40)]
        assert_same((np.vstack([r[0] for r in one_by_one]), np.vstack([r[1] for r in one_by_one])),
                    want)


def test_top_k_exact_where_blas_rounding_differs():
    # multiples of 0.1 are inexact in float32: the matmul and the exact scores differ in the
    # last bit for most pairs, and many pairs are (near-)tied. The exact order must still win.
    rng = np.random.default_rng(10)
    users = (rng.integers(-5, 6, (12, 20)) * 0.1).astype(np.float32)
    table = (rng.integers(-5, 6, (401, 20)) * 0.1).astype(np.float32)
    table[rng.integers(1, 401, 100)] = table[rng.integers(1, 401)]
    histories = rng.integers(0, 401, (12, 15))
    scores = all_scores(users, table)
    assert (users @ table.T != scores.astype(np.float32)).mean() > 0.2
    want = brute_top_k(scores, allowed_mask(12, 400, histories), 30)
    targets = rng.integers(1, 401, 12)
    want_ranks = brute_rank(scores, allowed_mask(12, 400, histories), targets)
    for chunk in (1, 13, 64, 405):
        index = TopK(table, chunk_size=chunk)
        assert_same(index(users, 30, histories=histories), want)
        singles = [index(users[b : b + 1], 30, histories=histories[b : b + 1]) for b in range(12)]
        assert_same((np.vstack([r[0] for r in singles]), np.vstack([r[1] for r in singles])),
                    want)
        np.testing.assert_array_equal(index.target_ranks(users, targets, histories=histories),
                                      want_ranks)


def test_top_k_exclusions_candidates_and_padding():
    rng = np.random.default_rng(3)
    users, table = int_data(rng, 6, 40, 3)
    table[0] = 100.0  # padding row would win every ranking if it were scored
    histories = rng.integers(0, 41, (6, 5))
    exclude = np.array([0, 3, 5, 5, 17])
    candidates = np.array([0, 1, 2, 3, 5, 8, 13, 21, 34, 40, 21])
    scores = all_scores(users, table)
    cases = [
        (dict(), allowed_mask(6, 40)),
        (dict(histories=histories), allowed_mask(6, 40, histories)),
        (dict(exclude_items=exclude), allowed_mask(6, 40, exclude=exclude)),
        (dict(candidates=candidates), allowed_mask(6, 40, candidates=candidates)),
        (dict(histories=histories, exclude_items=exclude, candidates=candidates),
         allowed_mask(6, 40, histories, exclude, candidates)),
    ]
    for kwargs, ok in cases:
        for chunk in (1, 3, 7, 45):
            idx, val = top_k(users, table, 12, chunk_size=chunk, **kwargs)
            assert_same((idx, val), brute_top_k(scores, ok, 12))
            real = idx[idx > 0]
            assert ok[np.nonzero(idx > 0)[0], real].all()


def test_top_k_pads_rows_with_fewer_items_than_k():
    table = np.arange(12, dtype=np.float32).reshape(6, 2)  # items 1..5, score grows with index
    users = np.ones((2, 2), np.float32)
    histories = np.array([[0, 0, 5, 4, 2], [0, 0, 0, 0, 0]])
    idx, val = top_k(users, table, 4, histories=histories, exclude_items=[1])
    assert idx.tolist() == [[3, 0, 0, 0], [5, 4, 3, 2]]
    assert val.tolist() == [[13.0, -np.inf, -np.inf, -np.inf], [21.0, 17.0, 13.0, 9.0]]
    idx, val = top_k(users, table, 3, candidates=[0, 2])
    assert idx.tolist() == [[2, 0, 0]] * 2
    idx, val = top_k(users, table, 3, exclude_items=[1, 2, 3, 4, 5])
    assert idx.tolist() == [[0, 0, 0]] * 2 and np.isneginf(val).all()
    idx, val = top_k(users, table, 0)
    assert idx.shape == (2, 0) and val.shape == (2, 0)
    idx, val = top_k(np.zeros((0, 2), np.float32), table, 3)
    assert idx.shape == (0, 3)


def _spy_paths(monkeypatch):
    """Record how TopK finishes: ("rescore", rows, width) per exact re-scoring of fast
    candidates, ("search", rows) per exact search."""
    calls = []
    stream, rescore = TopK._stream, TopK._exact_keys

    def spy_stream(self, users, keep, histories, slack, exact):
        if exact:
            calls.append(("search", users.shape[0]))
        return stream(self, users, keep, histories, slack, exact)

    def spy_rescore(self, users, items):
        if items.shape[0]:
            calls.append(("rescore",) + items.shape)
        return rescore(self, users, items)

    monkeypatch.setattr(TopK, "_stream", spy_stream)
    monkeypatch.setattr(TopK, "_exact_keys", spy_rescore)
    return calls


def test_top_k_near_ties_at_the_k_th_item_all_three_paths(monkeypatch):
    rng = np.random.default_rng(4)
    dim, k = 8, 10
    users = rng.standard_normal((3, dim), dtype=np.float32)
    base = rng.standard_normal((400, dim), dtype=np.float32) * 0.1
    best = users.sum(0)  # a direction all 3 users like: duplicates of it rank high
    assert (users @ best > 1).all()
    paths = {
        0: [("rescore", 3, k)],  # clear gap after the k-th: re-score the fast top k
        5: [("rescore", 3, k + 16)],  # 5 ties straddle the k-th: re-score the k + 16 kept
        40: [("search", 3)],  # more ties than kept: exact search
    }
    for num_dup, path in paths.items():
        table = np.vstack([np.zeros((1, dim), np.float32), base])
        table[1 : k - 3] = best * 2  # k - 4 clear winners
        table[200 : 200 + num_dup] = best  # then tied duplicates around the k-th place
        want = brute_top_k(all_scores(users, table), allowed_mask(3, 400), k)
        for chunk in (3, 64, 1000):
            calls = _spy_paths(monkeypatch)
            assert_same(top_k(users, table, k, chunk_size=chunk), want)
            assert calls == path
            monkeypatch.undo()


def test_top_k_many_users_ties_at_the_k_th_in_every_row_block(monkeypatch):
    # more users than one row block (topk._ROW_BLOCK), planted exact ties straddling the k-th
    # place for many users: duplicated item rows, integer embeddings (exact float32 dots)
    monkeypatch.setattr(topk, "_ROW_BLOCK", 64)
    rng = np.random.default_rng(11)
    users, table = int_data(rng, 150, 300, 4, lo=-3, hi=3)
    table[[7, 120, 121, 250, 299]] = 3.0  # five copies of the best possible row
    histories = rng.integers(0, 301, (150, 6))
    scores, ok = all_scores(users, table), allowed_mask(150, 300, histories)
    want = brute_top_k(scores, ok, 4)
    fifth = brute_top_k(scores, ok, 5)[1][:, 4]
    assert (want[1][:, 3] == fifth).sum() >= 30  # exact ties across the k-th place
    index = TopK(table, chunk_size=50)
    assert_same(index(users, 4, histories=histories), want)
    targets = rng.integers(1, 301, 150)
    np.testing.assert_array_equal(index.target_ranks(users, targets, histories=histories),
                                  brute_rank(scores, ok, targets))
    assert_same(TopK(table, chunk_size=301)(users[::-1], 4, histories=histories[::-1]),
                (want[0][::-1], want[1][::-1]))


def test_top_k_scores_rising_with_the_index():
    # every item beats all earlier ones, so every item is a candidate and each user's buffer
    # fills and is cut back again and again: the result must stay exact, also with near-ties
    # (exact search path)
    dim, num_items = 4, 3000
    users = np.ones((5, dim), np.float32) * np.array([[1], [2], [0.5], [3], [1]], np.float32)
    table = np.zeros((num_items + 1, dim), np.float32)
    table[1:, 0] = np.arange(1, num_items + 1, dtype=np.float32) / num_items
    table[2900:2990] = table[2990]  # 90 exact ties just below the best ten
    histories = np.array([[0, 3000, 2999], [0, 0, 0], [2995, 2990, 1], [0, 0, 7], [1, 2, 3]])
    scores = all_scores(users, table)
    for k in (5, 20, 60):
        want = brute_top_k(scores, allowed_mask(5, num_items, histories), k)
        for chunk in (256, 1000, 4096):
            assert_same(top_k(users, table, k, histories=histories, chunk_size=chunk), want)


def test_pilot_rank_follows_the_sample_size():
    # the first chunk is a random sample of m of the n items; r = the smallest rank whose
    # r-th best of the sample is at most the catalog's keep-th with probability >= 99%
    table = np.zeros((100_001, 2), np.float32)
    assert TopK(table[:54_543])._pilot_rank(26) == 5  # Beauty size, top 10 (+16)
    assert TopK(table)._pilot_rank(116) == 8  # 100k items, top 100 (+16)
    assert TopK(table[:2_000])._pilot_rank(26) == 0  # one chunk: no pilot
    assert TopK(table[:3_000])._pilot_rank(26) == 0  # r would reach keep: no pilot
    assert TopK(table, chunk_size=50_000)._pilot_rank(26) == 22  # x = 12.5: P(>= 22) < 1%


def test_top_k_rows_the_pilot_threshold_misses_are_searched_again(monkeypatch):
    # a loose miss rate makes r = 1: the sample's best item is often above a row's keep-th,
    # so many rows take the second search; results stay exact, with histories too
    monkeypatch.setattr(topk, "_PILOT_MISS", 0.9)
    rng = np.random.default_rng(5)
    users, table = float_data(rng, 40, 3000, 6)
    histories = rng.integers(0, 3001, (40, 30))
    index = TopK(table, chunk_size=256)
    assert index._pilot_rank(20) == 1
    searches = []
    stream = TopK._stream

    def spy(self, users, keep, histories, slack, exact, pilot=True):
        searches.append((users.shape[0], pilot))
        return stream(self, users, keep, histories, slack, exact, pilot)

    monkeypatch.setattr(TopK, "_stream", spy)
    scores = all_scores(users, table)
    want = brute_top_k(scores, allowed_mask(40, 3000, histories), 4)
    assert_same(index(users, 4, histories=histories), want)
    assert searches[0] == (40, True) and searches[1][1] is False and 0 < searches[1][0] < 40


def test_top_k_all_scores_tied():
    table = np.zeros((301, 4), np.float32)
    users = np.ones((2, 4), np.float32)
    histories = np.array([[0, 3, 1], [7, 7, 2]])
    idx, val = top_k(users, table, 5, histories=histories, chunk_size=32)
    assert idx.tolist() == [[2, 4, 5, 6, 7], [1, 3, 4, 5, 6]]
    assert (val == 0).all()


def test_top_k_class_reused_and_input_checks():
    rng = np.random.default_rng(5)
    users, table = float_data(rng, 4, 30, 5)
    index = TopK(table, exclude_items=[1, 2], chunk_size=4)
    index.warm_up()  # a tiny call (all items tied), no state: results are unchanged
    assert_same(index(users, 5), top_k(users, table, 5, exclude_items=[1, 2]))
    with pytest.raises(ValueError):
        index(users, -1)
    with pytest.raises(ValueError):
        index(users[:, :3], 2)
    with pytest.raises(ValueError):
        index(users, 2, histories=np.zeros((3, 2), int))
    bad = users.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError):
        index(bad, 2)
    with pytest.raises(ValueError):
        TopK(table, candidates=[31])
    with pytest.raises(ValueError):
        TopK(table, chunk_size=0)
    nan_table = table.copy()
    nan_table[3, 1] = np.inf
    with pytest.raises(ValueError):
        TopK(nan_table)


# -----------------------------------------------------------------------------
# per-query exclusions and candidates (one index, options per call)


def options_mask(ok, exclude, candidates):
    """ok (B, N+1) from allowed_mask, per-row exclude / candidates (None or items) -> the items
    each row may get with its own options on top."""
    ok = ok.copy()
    for b in range(ok.shape[0]):
        if exclude is not None and exclude[b] is not None:
            ok[b, np.asarray(exclude[b], int)] = False
        if candidates is not None and candidates[b] is not None:
            listed = np.zeros(ok.shape[1], bool)
            listed[np.asarray(candidates[b], int)] = True
            ok[b] &= listed
    return ok


def per_row_indexes(users, table, k, histories, exclude, candidates, base_exclude=None,
                    base_candidates=None, chunk=DEFAULT_CHUNK_SIZE):
    """The old way: one TopK built per row with that row's options folded in -> (B, k) x 2."""
    rows = []
    for b in range(users.shape[0]):
        ex = [np.asarray(e, int) for e in (base_exclude, exclude and exclude[b]) if e is not None]
        cand = [np.asarray(c, int) for c in (base_candidates, candidates and candidates[b])
                if c is not None]
        index = TopK(table, exclude_items=np.concatenate(ex) if ex else None,
                     candidates=reduce(np.intersect1d, cand) if cand else None, chunk_size=chunk)
        rows.append(index(users[b : b + 1], k,
                          histories=None if histories is None else histories[b : b + 1]))
    return np.vstack([r[0] for r in rows]), np.vstack([r[1] for r in rows])


def random_options(rng, num_users, num_items, size):
    """B per-row entries: None (about half), an empty list, or 1..size items in 0..N (repeats
    and item 0 included)."""
    out = []
    for _ in range(num_users):
        r = rng.random()
        out.append(None if r < 0.5 else [] if r < 0.6 else
                   rng.integers(0, num_items + 1, int(rng.integers(1, size + 1))))
    return out


@pytest.mark.parametrize("data", [int_data, float_data])
def test_per_query_options_match_brute_force_and_an_index_per_row(data):
    rng = np.random.default_rng(12)
    for trial in range(6):
        num_users, num_items = int(rng.integers(1, 9)), int(rng.integers(1, 60))
        users, table = data(rng, num_users, num_items, int(rng.integers(1, 6)))
        histories = rng.integers(0, num_items + 1, (num_users, 4)) if trial % 3 else None
        base_ex = rng.integers(0, num_items + 1, 3) if trial % 2 else None
        base_cand = rng.integers(0, num_items + 1, 30) if trial in (2, 5) else None
        exclude = random_options(rng, num_users, num_items, 10)
        candidates = random_options(rng, num_users, num_items, 20)
        ok = options_mask(allowed_mask(num_users, num_items, histories, base_ex, base_cand),
                          exclude, candidates)
        scores = all_scores(users, table)
        for k in {1, int(rng.integers(1, num_items + 3)), num_items + 2}:
            want = brute_top_k(scores, ok, k)
            for chunk in CHUNKS + (num_items + 5,):
                index = TopK(table, exclude_items=base_ex, candidates=base_cand, chunk_size=chunk)
                got = index(users, k, histories=histories, exclude=exclude, candidates=candidates)
                assert_same(got, want)
                assert_same(got, per_row_indexes(users, table, k, histories, exclude, candidates,
                                                 base_ex, base_cand, chunk))


def test_per_query_options_float_catalog_mixed_batch():
    # a catalog large enough for the pilot threshold and several chunks; each row excludes its
    # own plain top 5 (so exclusions change the answer), some rows are restricted to
    # candidates, some have no options at all
    rng = np.random.default_rng(13)
    users, table = float_data(rng, 24, 3000, 16)
    histories = rng.integers(0, 3001, (24, 30))
    index = TopK(table, chunk_size=256)
    plain, _ = index(users, 5, histories=histories)
    exclude = [plain[b] if b % 3 == 0 else None for b in range(24)]
    exclude[1] = rng.integers(1, 3001, 40)
    candidates = [rng.integers(1, 3001, 300) if b % 4 == 1 else None for b in range(24)]
    candidates[5] = np.concatenate([plain[5], rng.integers(1, 3001, 50)])  # history overlaps
    ok = options_mask(allowed_mask(24, 3000, histories), exclude, candidates)
    want = brute_top_k(all_scores(users, table), ok, 20)
    hist_before = histories.copy()
    got = index(users, 20, histories=histories, exclude=exclude, candidates=candidates)
    assert_same(got, want)
    np.testing.assert_array_equal(histories, hist_before)  # the caller's histories untouched
    assert not np.isin(got[0][0], plain[0]).any()
    assert_same(got, per_row_indexes(users, table, 20, histories, exclude, candidates,
                                     chunk=256))
    singles = [index(users[b : b + 1], 20, histories=histories[b : b + 1], exclude=[exclude[b]],
                     candidates=[candidates[b]]) for b in range(24)]
    assert_same((np.vstack([r[0] for r in singles]), np.vstack([r[1] for r in singles])), want)


def test_per_query_empty_lists_padding_and_ties():
    table = np.zeros((9, 2), np.float32)
    table[[2, 5, 7]] = [1.0, 1.0]  # tied best, then 1 and 4 tied, then the rest
    table[[1, 4]] = [0.5, 0.5]
    users = np.ones((4, 2), np.float32)
    index = TopK(table, exclude_items=[5], chunk_size=2)
    idx, val = index(users, 4, histories=np.array([[0, 2], [0, 0], [0, 0], [7, 1]]),
                     exclude=[[], [2, 2, 0], None, [4]],
                     candidates=[None, [], [0, 8, 5, 7, 7, 4], [1, 4, 7]])
    assert idx.tolist() == [[7, 1, 4, 3], [0, 0, 0, 0], [7, 4, 8, 0], [0, 0, 0, 0]]
    assert val[0].tolist() == [2.0, 1.0, 1.0, 0.0]
    assert np.isneginf(val[1]).all() and val[2].tolist() == [2.0, 1.0, 0.0, -np.inf]
    idx, _ = index(users, 2, exclude=[None] * 4, candidates=[None] * 4)  # all None: plain
    assert idx.tolist() == [[2, 7]] * 4
    idx, val = index(users, 0, exclude=[[1]] * 4, candidates=[[1]] * 4)
    assert idx.shape == val.shape == (4, 0)


def test_per_query_options_check_their_items():
    rng = np.random.default_rng(14)
    users, table = float_data(rng, 3, 30, 4)
    index = TopK(table, chunk_size=8)
    for bad in ([[31], None, None], [None, [-1], None], [[1], [2]], [[1]] * 4):
        for name in ("exclude", "candidates"):
            with pytest.raises(ValueError, match=name):
                index(users, 2, **{name: bad})
            with pytest.raises(ValueError, match=name):
                index(users, 0, **{name: bad})  # checked even when nothing is returned


def test_per_query_options_do_not_rebuild_the_index(monkeypatch):
    rng = np.random.default_rng(15)
    users, table = float_data(rng, 6, 3000, 8)
    histories = rng.integers(0, 3001, (6, 30))
    exclude = [rng.integers(1, 3001, 20)] * 3 + [None] * 3
    candidates = [rng.integers(1, 3001, 500) for _ in range(6)]
    index = TopK(table, chunk_size=256)
    assert index.is_exact() is True
    want = index(users, 10, histories=histories, exclude=exclude, candidates=candidates)
    vectors, items, positions = index.vectors, index.items, index._positions

    def rebuild(*args, **kwargs):
        raise AssertionError("a per-query option re-indexed the catalog")

    monkeypatch.setattr(np.random, "default_rng", rebuild)  # the index's permutation
    monkeypatch.setattr(TopK, "__init__", rebuild)
    streams = []
    stream = TopK._stream
    monkeypatch.setattr(TopK, "_stream", lambda self, *a, **kw: streams.append(1)
                        or stream(self, *a, **kw))
    assert_same(index(users, 10, histories=histories, exclude=exclude, candidates=candidates),
                want)
    assert streams == []  # rows with candidates never scan the catalog
    index(users, 10, histories=histories, exclude=exclude)
    assert len(streams) == 1  # rows without candidates: one streaming pass, as without options
    assert index.vectors is vectors and index.items is items and index._positions is positions


def test_per_query_exclusions_reach_the_exact_search(monkeypatch):
    # 40 tied duplicates around the k-th place force the exact search (see the three paths
    # test); a row's exclusions must hold there too
    rng = np.random.default_rng(4)
    users = rng.standard_normal((3, 8), dtype=np.float32)
    table = np.vstack([np.zeros((1, 8), np.float32),
                       rng.standard_normal((400, 8), dtype=np.float32) * 0.1])
    table[1:7] = users.sum(0) * 2
    table[200:240] = users.sum(0)
    exclude = [np.arange(200, 215), None, np.array([1, 2, 230])]
    want = brute_top_k(all_scores(users, table), options_mask(allowed_mask(3, 400), exclude, None),
                       10)
    for chunk in (3, 64, 1000):
        calls = _spy_paths(monkeypatch)
        assert_same(TopK(table, chunk_size=chunk)(users, 10, exclude=exclude), want)
        assert ("search", 3) in calls
        monkeypatch.undo()


@st.composite
def query_problems(draw):
    users, table, histories, exclude, candidates, k, chunk = draw(problems())
    num_users, num_items = users.shape[0], table.shape[0] - 1
    per_row = st.lists(st.none() | st.lists(st.integers(0, num_items), max_size=8),
                       min_size=num_users, max_size=num_users)
    return users, table, histories, exclude, candidates, draw(per_row), draw(per_row), k, chunk


@settings(max_examples=50, deadline=None)
@given(query_problems())
def test_per_query_options_property(problem):
    users, table, histories, base_ex, base_cand, exclude, candidates, k, chunk = problem
    num_users, num_items = users.shape[0], table.shape[0] - 1
    ok = options_mask(allowed_mask(num_users, num_items, histories, base_ex, base_cand),
                      exclude, candidates)
    index = TopK(table, exclude_items=base_ex, candidates=base_cand, chunk_size=chunk)
    got = index(users, k, histories=histories, exclude=exclude, candidates=candidates)
    assert_same(got, brute_top_k(all_scores(users, table), ok, k))
    assert_same(got, per_row_indexes(users, table, k, histories, exclude, candidates, base_ex,
                                     base_cand, chunk))


# -----------------------------------------------------------------------------
# target ranks


@pytest.mark.parametrize("data", [int_data, float_data])
def test_target_ranks_brute_force_and_consistent_with_top_k(data):
    rng = np.random.default_rng(6)
    for _trial in range(4):
        num_users, num_items = int(rng.integers(1, 12)), int(rng.integers(1, 80))
        users, table = data(rng, num_users, num_items, int(rng.integers(1, 6)))
        histories = rng.integers(0, num_items + 1, (num_users, 6))
        targets = rng.integers(1, num_items + 1, num_users)
        histories[0, -1] = targets[0]  # a target inside the history still counts as itself
        scores = all_scores(users, table)
        ok = allowed_mask(num_users, num_items, histories)
        want = brute_rank(scores, ok, targets)
        for chunk in CHUNKS + (num_items + 5,):
            ranks = target_ranks(users, table, targets, histories=histories, chunk_size=chunk)
            np.testing.assert_array_equal(ranks, want)
        np.testing.assert_array_equal(target_ranks(users, table, targets),
                                      brute_rank(scores, allowed_mask(num_users, num_items),
                                                 targets))
        # rank < k iff the target is in the top k, at position rank (history without target)
        hist_no_target = np.where(histories == targets[:, None], 0, histories)
        for k in (1, 3, num_items):
            idx, _ = top_k(users, table, k, histories=hist_no_target, chunk_size=7)
            for b in range(num_users):
                where = np.flatnonzero(idx[b] == targets[b])
                assert (ranks[b] < k) == (where.size == 1)
                if where.size:
                    assert where[0] == ranks[b]


def test_target_ranks_float_large_consistent_with_top_k():
    rng = np.random.default_rng(7)
    users, table = float_data(rng, 64, 3000, 16)
    histories = rng.integers(0, 3001, (64, 50))
    index = TopK(table, chunk_size=512)
    idx, _ = index(users, 100, histories=histories)
    targets = idx[:, 37].astype(np.int64)  # inside the top 100: rank must be exactly 37
    targets[::2] = rng.integers(1, 3001, 32)
    ranks = index.target_ranks(users, targets, histories=histories)
    assert (ranks[1::2] == 37).all()
    for b in range(0, 64, 2):
        if targets[b] in histories[b]:
            continue
        where = np.flatnonzero(idx[b] == targets[b])
        assert (ranks[b] < 100) == (where.size == 1)
        if where.size:
            assert ranks[b] == where[0]


def test_target_ranks_checks_targets():
    table = np.ones((5, 2), np.float32)
    with pytest.raises(ValueError):
        target_ranks(np.ones((1, 2), np.float32), table, [0])
    with pytest.raises(ValueError):
        target_ranks(np.ones((1, 2), np.float32), table, [5])
    with pytest.raises(ValueError):
        target_ranks(np.ones((2, 2), np.float32), table, [1])


def test_sampled_ranks():
    table = np.array([[9.0], [1.0], [3.0], [2.0], [3.0], [0.0]], np.float32)  # item 0: padding
    users = np.array([[1.0], [1.0]], np.float32)
    targets = np.array([3, 4])
    # user 0, target 3 (score 2): 2 (3) and 4 (3) beat it, 5 (0) does not, 0 and 3 are ignored
    # user 1, target 4 (score 3): 2 ties with a smaller index, twice; 1 (1) does not
    negatives = np.array([[2, 0, 5, 4, 3], [2, 2, 1, 0, 4]])
    assert sampled_ranks(users, table, targets, negatives).tolist() == [2, 2]


# -----------------------------------------------------------------------------
# dense score matrices


def test_dense_top_k_and_rank_from_scores_match_brute_force():
    rng = np.random.default_rng(8)
    scores = rng.integers(-3, 4, (7, 31)).astype(np.float64)
    scores[:, 0] = 99.0  # padding column is ignored
    histories = rng.integers(0, 31, (7, 5))
    targets = rng.integers(1, 31, 7)
    ok = allowed_mask(7, 30, histories)
    for k in (1, 5, 30, 33):
        want = brute_top_k(scores, ok, k)
        for chunk in CHUNKS + (35,):
            idx, val = top_k_from_scores(scores, k, histories=histories, chunk_size=chunk)
            np.testing.assert_array_equal(idx, want[0])
            np.testing.assert_array_equal(val, want[1])
            assert idx.dtype == np.int32 and val.dtype == np.float64
    with_nan = scores.copy()
    with_nan[:, 5] = np.nan  # never returned, like -inf
    ok_nan = ok.copy()
    ok_nan[:, 5] = False
    want = brute_top_k(np.nan_to_num(with_nan, nan=-np.inf), ok_nan, 40)
    np.testing.assert_array_equal(top_k_from_scores(with_nan, 40, histories=histories)[0],
                                  want[0])
    ranks = rank_from_scores(scores, targets, histories)
    np.testing.assert_array_equal(ranks, brute_rank(scores, ok, targets))
    idx, _ = top_k_from_scores(scores, 40, exclude_items=[1, 2], candidates=[1, 2, 3, 4])
    assert set(idx[0]) == {0, 3, 4}


def test_dense_and_streaming_agree():
    rng = np.random.default_rng(9)
    users, table = float_data(rng, 10, 200, 8)
    histories = rng.integers(0, 201, (10, 9))
    targets = rng.integers(1, 201, 10)
    dense = all_scores(users, table).astype(np.float32)
    assert_same(top_k(users, table, 20, histories=histories),
                top_k_from_scores(dense, 20, histories=histories))
    np.testing.assert_array_equal(target_ranks(users, table, targets, histories=histories),
                                  rank_from_scores(dense, targets, histories))


# -----------------------------------------------------------------------------
# property test


@st.composite
def problems(draw):
    num_users = draw(st.integers(1, 4))
    num_items = draw(st.integers(1, 25))
    dim = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if draw(st.booleans()):
        users, table = int_data(rng, num_users, num_items, dim, -1, 1)
    else:
        users, table = float_data(rng, num_users, num_items, dim)
    histories = rng.integers(0, num_items + 1, (num_users, draw(st.integers(0, 4))))
    exclude = rng.integers(0, num_items + 1, draw(st.integers(0, 3)))
    candidates = rng.integers(0, num_items + 1, draw(st.integers(1, 8))) if draw(
        st.booleans()) else None
    k = draw(st.integers(0, num_items + 3))
    chunk = draw(st.integers(1, num_items + 5))
    return users, table, histories, exclude, candidates, k, chunk


@settings(max_examples=50, deadline=None)
@given(problems())
def test_top_k_property_matches_brute_force(problem):
    users, table, histories, exclude, candidates, k, chunk = problem
    num_users, num_items = users.shape[0], table.shape[0] - 1
    ok = allowed_mask(num_users, num_items, histories, exclude, candidates)
    got = top_k(users, table, k, histories=histories, exclude_items=exclude,
                candidates=candidates, chunk_size=chunk)
    want = brute_top_k(all_scores(users, table), ok, k)
    assert_same(got, want)
    dense = top_k_from_scores(all_scores(users, table), k, histories=histories,
                              exclude_items=exclude, candidates=candidates, chunk_size=chunk)
    np.testing.assert_array_equal(dense[0], want[0])
    np.testing.assert_array_equal(dense[1], want[1])
    targets = np.arange(num_users) % num_items + 1
    np.testing.assert_array_equal(
        target_ranks(users, table, targets, histories=histories, chunk_size=chunk),
        brute_rank(all_scores(users, table), allowed_mask(num_users, num_items, histories),
                   targets))


def test_module_exports():
    for name in topk.__all__:
        assert hasattr(topk, name)


def test_ids_in_and_out_match_indices():
    rng = np.random.default_rng(7)
    users, table = float_data(rng, 4, 50, 8)
    ids = [f"item-{i}" for i in range(1, 51)]
    index = TopK(table, ids=ids)
    seen = [["item-3", "nope"], None, [], ["item-10", "item-11"]]
    exclude = [None, ["item-7"], ["unknown"], None]
    candidates = [None, None, ["item-1", "item-2", "item-3", "zzz"], None]
    got = index.query_ids(users, 5, seen=seen, exclude=exclude, candidates=candidates)
    to_items = [[int(r.split("-")[1]) for r in row if r and r.startswith("item-")]
                for row in [s or [] for s in seen]]
    histories = np.zeros((4, 2), np.int64)
    for b, row in enumerate(to_items):
        histories[b, 2 - len(row):] = row
    idx, scores = index(users, 5, histories=histories, exclude=[None, [7], [], None],
                        candidates=[None, None, [1, 2, 3], None])
    for b in range(4):
        assert got[b] == [(f"item-{i}", float(v)) for i, v in zip(idx[b], scores[b]) if i > 0]
    assert len(got[2]) == 3 and index.is_exact()
    with pytest.raises(ValueError, match="ids"):
        TopK(table).query_ids(users, 5)
    with pytest.raises(ValueError, match="must name the 50 items"):
        TopK(table, ids=ids[:-1])


# -----------------------------------------------------------------------------
# the few-users fast pass: one matmul over the whole catalog


@settings(max_examples=50, deadline=None)
@given(problems())
def test_whole_catalog_pass_property_matches_brute_force(problem):
    users, table, histories, exclude, candidates, k, chunk = problem
    ok = allowed_mask(users.shape[0], table.shape[0] - 1, histories, exclude, candidates)
    with whole_fast_pass():
        got = top_k(users, table, k, histories=histories, exclude_items=exclude,
                    candidates=candidates, chunk_size=chunk)
    assert_same(got, brute_top_k(all_scores(users, table), ok, k))


def test_whole_catalog_pass_where_rounding_differs_and_near_ties(monkeypatch):
    rng = np.random.default_rng(10)
    users = (rng.integers(-5, 6, (12, 20)) * 0.1).astype(np.float32)
    table = (rng.integers(-5, 6, (401, 20)) * 0.1).astype(np.float32)
    table[rng.integers(1, 401, 100)] = table[rng.integers(1, 401)]
    histories = rng.integers(0, 401, (12, 15))
    want = brute_top_k(all_scores(users, table), allowed_mask(12, 400, histories), 30)
    with whole_fast_pass():
        index = TopK(table)
        assert_same(index(users, 30, histories=histories), want)
        for b in range(12):  # one user at a time, as a request
            got = index(users[b : b + 1], 30, histories=histories[b : b + 1])
            np.testing.assert_array_equal(got[0][0], want[0][b])
        calls = _spy_paths(monkeypatch)  # more tied duplicates than kept: exact search
        dup = np.vstack([np.zeros((1, 4), np.float32), np.ones((60, 4), np.float32)])
        assert_same(TopK(dup)(np.ones((1, 4), np.float32), 10),
                    (np.arange(1, 11)[None], np.full((1, 10), 4.0)))
        assert ("search", 1) in calls


def test_the_few_users_pass_is_taken_only_for_small_batches(monkeypatch):
    taken = []
    whole = TopK._fast_keys_whole
    monkeypatch.setattr(TopK, "_fast_keys_whole",
                        lambda self, *a: taken.append(a[0].shape[0]) or whole(self, *a))
    table = np.random.default_rng(0).standard_normal((20_001, 8)).astype(np.float32)
    with whole_fast_pass():
        index = TopK(table)
        index(np.ones((3, 8), np.float32), 5)
        index(np.ones((WHOLE // 20_000 + 1, 8), np.float32), 5)  # a block of 210 users
    assert taken == [3]
