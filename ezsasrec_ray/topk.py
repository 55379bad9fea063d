"""Exact top-k retrieval over the full catalog: the one retrieval interface.

:class:`TopK` indexes an item table once; each call takes user vectors and, per query row,
the history to exclude, extra exclusions and candidate lists (no re-indexing);
:meth:`TopK.target_ranks` gives held-out ranks with the same rule; :meth:`TopK.is_exact` is
True (an approximate backend would say False). Pure numpy and numba (no TF, no Ray).

Conventions: items are 1..N, row 0 of ``item_table`` (N+1, d) is padding and never returned;
``user_vecs`` (B, d) float32; ``histories`` (B, H) int, left-padded with 0. Order: score
descending, ties by the smaller item index, identical for every chunk size and batch split
(exact float64-summed scores decide; BLAS scores only prune). Dense score matrices (baselines)
go through :func:`top_k_from_scores` and :func:`rank_from_scores` with the same rule.
Why it is exact and fast: docs/internals.md, "topk".
"""

from __future__ import annotations

import math

import numpy as np

from ezsasrec_ray import topk_kernel

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "EMPTY_KEY",
    "TopK",
    "decode_keys",
    "encode_keys",
    "exact_scores",
    "rank_from_scores",
    "sampled_ranks",
    "target_ranks",
    "top_k",
    "top_k_from_scores",
]

EMPTY_KEY = topk_kernel.EMPTY_KEY  # "no item" (the int64 minimum): index 0, score -inf
DEFAULT_CHUNK_SIZE = 2048  # items per (chunk x 512 users) score block: 4 MiB, in cache

_MAX_INDEX = topk_kernel._MAX_INDEX  # 2**31 - 1: largest item index a key can hold
_LOW_32 = 0xFFFFFFFF
_FLT_MAX = topk_kernel._FLT_MAX
_EXTRA = 16  # the fast pass keeps k + _EXTRA items per row, so near-ties at the k-th survive
_MIN_FIRST_CHUNK = 128  # top_k_from_scores starts with chunks of max(k, this)
_PILOT_MISS = 0.01  # rows whose pilot threshold may be too high, searched again
_ROW_BLOCK = 512  # users scored together: a (512, chunk) score block stays in cache
# users x items up to which the fast pass is one matmul over the whole catalog (16 MiB of
# scores): a request's few users then cost one BLAS call and an argpartition, not a loop
# over chunks
_SMALL_BATCH_SCORES = 1 << 22


# -----------------------------------------------------------------------------
# keys: (score, item) -> one int64, larger = better


def encode_keys(scores, items):
    """scores float32 (...), items int (...) in 0..2**31-1 -> int64 keys (...).

    ``key = ordered(score) * 2**32 + (2**31 - 1 - item)``: comparing keys compares scores
    (-0.0 equal to +0.0), then prefers the smaller item. Unique per item.
    """
    scores = np.asarray(scores, np.float32) + np.float32(0.0)  # copy; -0.0 -> +0.0
    bits = scores.view(np.int32)
    ordered = bits ^ ((bits >> 31) & np.int32(_MAX_INDEX))  # flip negatives: int order = float order
    return ordered.astype(np.int64) * (1 << 32) + (_MAX_INDEX - np.asarray(items, np.int64))


def decode_keys(keys):
    """int64 keys (...) -> items int32 (...), scores float32 (...); EMPTY_KEY -> (0, -inf)."""
    keys = np.asarray(keys, np.int64)
    ordered = (keys >> 32).astype(np.int32)
    scores = (ordered ^ ((ordered >> 31) & np.int32(_MAX_INDEX))).view(np.float32)
    items = (_MAX_INDEX - (keys & _LOW_32)).astype(np.int32)
    empty = keys == EMPTY_KEY
    items[empty] = 0
    scores[empty] = -np.inf
    return items, scores


def _key_scores(keys):
    """int64 keys (...) -> their scores as float64 (...), -inf for EMPTY_KEY."""
    return decode_keys(keys)[1].astype(np.float64)


# -----------------------------------------------------------------------------
# exact scores and the bound on fast (BLAS) scores


def exact_scores(user_vecs, item_table, items):
    """Reproducible dot products: (B, d), (N+1, d), items (B, K) or (B,) -> (B, K) or (B,).

    Each float32 product is exact in float64; the d products are summed in float64 in index
    order and the sum is rounded once to float32 (:func:`topk_kernel.exact_dots`: no BLAS, no
    pairwise sums), so the result does not depend on shapes, batch or machine.
    """
    users = _as_matrix(user_vecs, "user_vecs")
    table = _as_matrix(item_table, "item_table")
    items = np.asarray(items, np.int64)
    if items.ndim == 1:
        return exact_scores(users, table, items[:, None])[:, 0]
    if items.ndim != 2 or items.shape[0] != users.shape[0]:
        raise ValueError(f"items must be (B,) or (B, K) with B={users.shape[0]}, got {items.shape}")
    if users.shape[1] != table.shape[1]:
        raise ValueError(f"user_vecs has d={users.shape[1]}, item_table d={table.shape[1]}")
    if items.size and (items.min() < 0 or items.max() >= table.shape[0]):
        raise ValueError(f"items must be row indices of item_table, 0..{table.shape[0] - 1}")
    out = np.empty(items.shape, np.float32)
    return topk_kernel.exact_dots(users, table, np.ascontiguousarray(items), out)


def _score_bound(users, max_item_norm):
    """(B, d) float32, item norm(s) -> (B,) float64: bound on |fast score - exact score| for
    items whose norm is at most max_item_norm.

    |BLAS - true| <= d * 2**-24 * |u|.|v| for any summation order (with or without FMA), and
    |exact - true| <= 2**-24 * |true| + tiny; (d + 2) * 2**-23 is twice their sum. 2**-100
    covers subnormal underflow.
    """
    norms = np.sqrt(np.einsum("bd,bd->b", users.astype(np.float64), users.astype(np.float64)))
    return (users.shape[1] + 2) * 2.0**-23 * norms * max_item_norm + 2.0**-100


def _round_down32(x):
    """float64 (...) -> the largest float32 <= x (...)."""
    x = np.asarray(x, np.float64)
    y = x.astype(np.float32)
    over = y > x
    y[over] = np.nextafter(y[over], np.float32(-np.inf))
    return y


def _round_up32(x):
    """float64 (...) -> the smallest float32 >= x (...)."""
    x = np.asarray(x, np.float64)
    y = x.astype(np.float32)
    under = y < x
    y[under] = np.nextafter(y[under], np.float32(np.inf))
    return y


# -----------------------------------------------------------------------------
# input checks


def _as_matrix(x, name):
    """-> C-contiguous float32 (rows, d)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows, d), got shape {x.shape}")
    return x


def _check_finite(x, name):
    if not np.isfinite(x).all():
        raise ValueError(f"{name} has NaN or infinite values")


def _as_items(x, num_items, name, lo=1):
    """-> int64 1-D array, every value in lo..num_items."""
    x = np.asarray(x).astype(np.int64, copy=False).reshape(-1)
    if x.size and (x.min() < lo or x.max() > num_items):
        raise ValueError(f"{name} must be item indices in {lo}..{num_items}")
    return x


def _as_histories(histories, num_rows):
    """-> (B, H) int64 or None."""
    if histories is None:
        return None
    h = np.asarray(histories).astype(np.int64, copy=False)
    if h.ndim != 2 or h.shape[0] != num_rows:
        raise ValueError(f"histories must be (B, H) with B={num_rows}, got shape {h.shape}")
    return h


def _left_pad_rows(rows) -> np.ndarray:
    """1-D int arrays -> (B, H) left-padded with 0 (at least one column)."""
    width = max([1] + [r.size for r in rows])
    out = np.zeros((len(rows), width), np.int64)
    for b, r in enumerate(rows):
        out[b, width - r.size:] = r
    return out


def _per_row(options, num_rows, num_items, name):
    """None or B entries (None or item indices) -> None or a list of B (None or int64 (M,)
    arrays in 0..num_items): per-query exclude or candidates."""
    if options is None:
        return None
    if len(options) != num_rows:
        raise ValueError(f"{name} must have one entry per row ({num_rows}), got {len(options)}")
    return [None if o is None else _as_items(o, num_items, name, lo=0) for o in options]


def _merge_exclusions(histories, exclude, num_rows):
    """histories (B, H) int64 or None, exclude from :func:`_per_row` -> (B, H + E) int64 or None.

    Each row's exclusions are appended to its history (rows padded with 0, which is never an
    item), so every path that drops history items drops them too, at a cost of O(B x E), not
    O(catalog) as re-indexing would be.
    """
    width = 0 if exclude is None else max((e.size for e in exclude if e is not None), default=0)
    if width == 0:
        return histories
    extra = np.zeros((num_rows, width), np.int64)
    for b, e in enumerate(exclude):
        if e is not None:
            extra[b, : e.size] = e
    return extra if histories is None else np.hstack([histories, extra])


def _chunk_bounds(n, chunk_size, first):
    """-> [(start, stop)] covering 0..n with chunks of first, first, 2 first, 4 first, ...
    up to chunk_size.

    The warm-up matters for top-k: while the running threshold is still low almost every item
    of a chunk is a candidate; with chunks as large as the items seen so far, about k per row.
    """
    bounds, start, size = [], 0, max(1, min(first, chunk_size))
    while start < n:
        bounds.append((start, min(n, start + size)))
        start += size
        size = min(chunk_size, max(size, start))
    return bounds


def _row_counts(mask):
    """bool (B, C) C-contiguous -> (B,) int32 number of True per row.

    When C % 8 == 0, sums 8 bools at a time as bytes of uint64 words (<= 255 words per
    partial sum, so no byte carries over), then the bytes.
    """
    rows, width = mask.shape
    if width % 8 or width < 64:
        return mask.view(np.uint8).sum(axis=1, dtype=np.int32)
    words = mask.view(np.uint64)  # (B, C / 8), every byte 0 or 1
    partial = np.add.reduceat(words, np.arange(0, words.shape[1], 255), axis=1)
    return partial.view(np.uint8).sum(axis=1, dtype=np.int32)


# -----------------------------------------------------------------------------
# the running top-k


def _sorted_desc(keys):
    """int64 (B, K) -> (B, K) sorted descending along rows."""
    return np.sort(keys, axis=1)[:, ::-1]


class TopK:
    """Exact top-k index over a fixed item table, with exclusions.

    This is the one retrieval interface (in the spirit of TensorFlow Recommenders'
    ``factorized_top_k.TopK``): index the table once, then query it with per-query histories,
    exclusions and candidate lists (:meth:`__call__`); :meth:`is_exact` says whether results
    are exact (True here; an approximate backend would answer False).

    Args:
        item_table: (N+1, d) float32 item embeddings, row 0 = padding.
        exclude_items: int array of items never returned (for every user and every query).
        candidates: int array; if given, only these items are scored and returned (their rows
            are gathered once, so restricting the catalog also makes scoring cheaper).
        chunk_size: items scored per matmul; memory is O(min(B, 512) x chunk_size + B x k).
        ids: optional raw ids of items 1..N (a sequence of N), for :meth:`query_ids` (ids in
            and out).

    Item 0 is never a candidate. Build one TopK and call it for every batch and request:
    construction copies the allowed rows (in a fixed random order, see :meth:`_stream`) and
    checks the table once; per-query options never copy or re-order it.
    """

    def __init__(self, item_table, *, exclude_items=None, candidates=None,
                 chunk_size=DEFAULT_CHUNK_SIZE, ids=None):
        self.table = _as_matrix(item_table, "item_table")
        self.num_items = self.table.shape[0] - 1
        self.ids = None if ids is None else list(ids)  # position i: the raw id of item i + 1
        if self.ids is not None and len(self.ids) != self.num_items:
            raise ValueError(f"ids must name the {self.num_items} items, got {len(self.ids)}")
        self._index_of = None  # raw id -> item, built on the first query_ids
        if self.num_items < 0 or self.num_items > _MAX_INDEX:
            raise ValueError(f"item_table must have 1..2**31 rows, got {self.table.shape[0]}")
        self.chunk_size = int(chunk_size)
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        allowed = np.ones(self.num_items + 1, bool)
        allowed[0] = False
        if candidates is not None:
            allowed[:] = False
            allowed[_as_items(candidates, self.num_items, "candidates", lo=0)] = True
            allowed[0] = False
        if exclude_items is not None:
            allowed[_as_items(exclude_items, self.num_items, "exclude_items", lo=0)] = False
        # The items that can be returned, (n,) int64, in a fixed random order: the first chunk
        # is then a uniform sample of the catalog, from which each user's pruning threshold
        # starts (see _pilot_rank). The order changes no result (keys are unique).
        self.items = np.random.default_rng(0).permutation(np.flatnonzero(allowed))
        self._positions = np.full(self.num_items + 1, -1, np.int64)  # item -> position, or -1
        self._positions[self.items] = np.arange(self.items.size)
        self.vectors = self.table[self.items]  # (n, d): row p holds item self.items[p]
        _check_finite(self.vectors, "item_table")
        vecs = self.vectors.astype(np.float64)
        self._norms = np.sqrt(np.einsum("nd,nd->n", vecs, vecs))  # (n,) item norms
        self._max_norm = float(self._norms.max()) if self._norms.size else 0.0

    # -- public --------------------------------------------------------------

    def __call__(self, user_vecs, k, *, histories=None, exclude=None, candidates=None):
        """Top-k items per user, with per-query exclusions and candidates.

        user_vecs (B, d) float32, k int >= 0, histories (B, H) int or None; exclude and
        candidates: None or B entries, one per row, each None or a 1-D int array of items in
        0..N (0 is ignored, other values raise a ValueError). A row never gets its history
        items, its ``exclude`` items or the items excluded at construction; a row whose
        ``candidates`` entry is not None only gets items from it (an empty one: nothing).
        -> indices (B, k) int32, scores (B, k) float32 (exact scores), sorted by score
        descending, ties by smaller index: per row, the same as a TopK built with that row's
        options. A row with fewer than k returnable items is padded with index 0 and score -inf.
        """
        users = self._users(user_vecs)
        num_rows, k = users.shape[0], int(k)
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        histories = _as_histories(histories, num_rows)
        exclude = _per_row(exclude, num_rows, self.num_items, "exclude")
        candidates = _per_row(candidates, num_rows, self.num_items, "candidates")
        keys = np.full((num_rows, k), EMPTY_KEY, np.int64)
        if k == 0 or num_rows == 0 or self.items.size == 0:
            return decode_keys(keys)
        histories = _merge_exclusions(histories, exclude, num_rows)
        streamed = np.arange(num_rows)
        if candidates is not None:  # rows with candidates: exact scores of just those items
            listed = np.array([c is not None for c in candidates])
            for b in np.flatnonzero(listed):
                seen = np.zeros(0, np.int64) if histories is None else histories[b]
                top = self._candidate_top(users[b : b + 1], k, candidates[b], seen)
                keys[b, : top.size] = top
            streamed = streamed[~listed]
        for a in range(0, streamed.size, _ROW_BLOCK):  # rows are independent: cache-sized blocks
            rows = streamed[a : a + _ROW_BLOCK]
            top = self._top_rows(users[rows], k, None if histories is None else histories[rows])
            keys[rows, : top.shape[1]] = top
        return decode_keys(keys)

    def query_ids(self, user_vecs, k, *, seen=None, exclude=None, candidates=None):
        """Ids in and out: :meth:`__call__` with raw ids (``ids`` given at construction).

        seen, exclude, candidates: None or B entries, each None or a list of raw ids (unknown
        ids are ignored; an empty candidate list gives nothing) -> B lists of
        ``(raw id, score)``, best first.
        """
        if self.ids is None:
            raise ValueError("query_ids needs the items' raw ids: TopK(..., ids=...)")
        if self._index_of is None:
            self._index_of = {raw: i + 1 for i, raw in enumerate(self.ids)}
        num_rows = _as_matrix(user_vecs, "user_vecs").shape[0]
        as_items = self._items_of
        histories = None if seen is None else _left_pad_rows([as_items(r) for r in seen])
        idx, scores = self(user_vecs, k, histories=histories,
                           exclude=None if exclude is None else [as_items(r) for r in exclude],
                           candidates=None if candidates is None
                           else [None if r is None else as_items(r) for r in candidates])
        return [[(self.ids[i - 1], float(v)) for i, v in zip(idx[b], scores[b]) if i > 0]
                for b in range(num_rows)]

    def _items_of(self, raw_ids) -> np.ndarray:
        """Raw ids -> known item indices (unknown ids dropped)."""
        found = (self._index_of.get(raw, 0) for raw in (raw_ids if raw_ids is not None else ()))
        items = np.fromiter(found, np.int64)
        return items[items > 0]

    def is_exact(self):
        """True: results are the exact top k under the tie rule (an approximate index would
        return False)."""
        return True

    def target_ranks(self, user_vecs, targets, *, histories=None):
        """0-based rank of each user's target among the returnable items.

        user_vecs (B, d), targets (B,) int in 1..N, histories (B, H) or None -> ranks (B,) int64:
        the number of returnable items, not in the user's history, whose exact score is larger
        than the target's, or equal with a smaller index. The target itself is never excluded.
        So rank < k iff the target is in ``self(user_vecs, k, histories=histories)``, at
        position rank.
        """
        users = self._users(user_vecs)
        num_rows = users.shape[0]
        targets = _as_items(targets, self.num_items, "targets")
        if targets.size != num_rows:
            raise ValueError(f"targets must have shape ({num_rows},), got {np.shape(targets)}")
        histories = _as_histories(histories, num_rows)
        _check_finite(self.table[targets], "item_table")
        ranks = np.zeros(num_rows, np.int64)
        for a in range(0, num_rows, _ROW_BLOCK):
            rows = slice(a, a + _ROW_BLOCK)
            ranks[rows] = self._target_ranks_rows(
                users[rows], targets[rows], None if histories is None else histories[rows])
        return ranks

    def warm_up(self):
        """One tiny call, so that the compiled loops (:mod:`topk_kernel`, cached on disk by
        numba) are loaded now rather than inside the first batch or request. With a zero user
        vector every item ties, so the exact search path runs too."""
        self(np.zeros((1, self.table.shape[1]), np.float32), 1,
             histories=np.zeros((1, 1), np.int64))

    # -- internals -----------------------------------------------------------

    def _target_ranks_rows(self, users, targets, histories):
        """(B, d), (B,) in 1..N, (B, H) or None -> (B,) int64 ranks, see target_ranks."""
        num_rows = users.shape[0]
        target_scores = exact_scores(users, self.table, targets).astype(np.float64)
        target_keys = encode_keys(target_scores, targets)
        unit_bound = _score_bound(users, 1.0)
        ranks = np.zeros(num_rows, np.int64)
        for start, block in self._blocks(users, histories, targets):
            # |fast - exact| <= bound for this chunk's items: fast > hi is surely above the
            # target, fast < lo surely below; the few in between are re-scored exactly.
            bound = unit_bound * self._norms[start : start + block.shape[0]].max()
            hi = _round_up32(target_scores + bound)
            lo = np.maximum(_round_down32(target_scores - bound), -_FLT_MAX)
            above = block > hi
            ranks += np.count_nonzero(above, axis=0)
            flat = np.flatnonzero((block >= lo) ^ above)
            if flat.size == 0:
                continue
            cols, rows = np.divmod(flat, num_rows)
            items = self._items_at(start + cols)
            keys = encode_keys(exact_scores(users[rows], self.table, items), items)
            ranks += np.bincount(rows[keys > target_keys[rows]], minlength=num_rows)
        return ranks

    def _top_rows(self, users, k, histories):
        """(B, d), k >= 1, (B, H) or None -> (B, min(k, n)) keys of the exact top k, sorted."""
        bound = _score_bound(users, self._max_norm)
        keep = min(k + _EXTRA, self.items.size)
        return self._exact_top(users, self._fast_keys(users, keep, histories), k, bound,
                               histories)

    def _fast_keys(self, users, keep, histories):
        """(B, d), keep, (B, H) or None -> (B, keep) keys of the best `keep` fast scores per row
        (EMPTY_KEY where fewer), sorted descending: any float32 dot products whose error
        :func:`_score_bound` bounds will do (a device backend overrides this)."""
        if users.shape[0] * self.items.size <= _SMALL_BATCH_SCORES:
            return self._fast_keys_whole(users, keep, histories)
        return _sorted_desc(self._stream(users, keep, histories, 0.0, False))

    def _fast_keys_whole(self, users, keep, histories):
        """:meth:`_fast_keys` for a few users: one matmul over the catalog, an argpartition."""
        scores = users @ self.vectors.T  # (B, n)
        if histories is not None:
            pos, rows = self._history_positions(histories)
            scores[rows, pos] = -np.inf
        n = scores.shape[1]
        best = np.argpartition(scores, n - keep, axis=1)[:, n - keep:]  # (B, keep), unordered
        values = np.take_along_axis(scores, best, axis=1)
        keys = encode_keys(values, self.items[best])
        keys[np.isneginf(values)] = EMPTY_KEY  # history items, when fewer than keep are left
        return _sorted_desc(keys)

    def _exact_top(self, users, fast, k, bound, histories):
        """Exact top k from the fast pass.

        fast (B, keep) keys by fast score, sorted descending; bound (B,) -> (B, min(k, keep))
        keys by exact score, sorted descending. Per row, the cheapest sufficient case:

        1. the fast k-th and (k+1)-th scores are more than 2 * bound apart (almost every row):
           the exact top k are the fast top k, only those are re-scored;
        2. else, the fast keep-th score is more than 2 * bound below the k-th (or ``fast`` holds
           every returnable item): the exact top k are among the keep, all are re-scored;
        3. else (more than keep - k near-ties): an exact search of that row.
        """
        num_rows, keep = fast.shape
        kk = min(k, keep)
        items, scores = decode_keys(fast)
        scores = scores.astype(np.float64)
        valid = items > 0
        floor = scores[:, kk - 1] - 2 * bound  # -inf where a row has fewer than kk items
        if keep > kk:
            case1 = ~valid[:, kk] | (scores[:, kk] < floor)
        else:
            case1 = np.ones(num_rows, bool)
        out = np.empty((num_rows, kk), np.int64)
        rows = np.flatnonzero(case1)
        out[rows] = _sorted_desc(self._exact_keys(users[rows], items[rows, :kk]))
        rest = np.flatnonzero(~case1)
        if rest.size == 0:
            return out
        if keep >= self.items.size:
            case2 = np.ones(rest.size, bool)
        else:
            case2 = ~valid[rest, -1] | (scores[rest, -1] < floor[rest])
        rows = rest[case2]
        out[rows] = _sorted_desc(self._exact_keys(users[rows], items[rows]))[:, :kk]
        rows = rest[~case2]  # here keep = k + _EXTRA < number of returnable items, kk = k
        if rows.size:
            sub_hist = None if histories is None else histories[rows]
            out[rows] = _sorted_desc(self._stream(users[rows], k, sub_hist, bound[rows], True))
        return out

    def _candidate_top(self, user, k, candidates, seen):
        """One row restricted to its own candidates: (1, d), k >= 1, candidates int64 (M,),
        seen (S,) items it may not get (history and exclusions; 0 and out-of-range values
        match nothing) -> (min(k, m),) keys by exact score, sorted descending.

        Exact scores of just these m items, O(M + S): no pass over the catalog, and the same
        keys as a TopK built with these candidates would return.
        """
        items = np.unique(candidates)  # a candidate listed twice is still one item
        items = items[(self._positions[items] >= 0) & ~np.isin(items, seen)]
        keys = encode_keys(exact_scores(user, self.table, items[None]), items[None])[0]
        return np.sort(keys)[::-1][:k]

    def _items_at(self, positions):
        """Positions in self.items (int64 array) -> the items there."""
        return self.items[positions]

    def _exact_keys(self, users, items):
        """(B, d), items (B, K) with 0 = none -> (B, K) keys of exact scores, EMPTY_KEY for 0."""
        keys = encode_keys(exact_scores(users, self.table, items), items)
        keys[items == 0] = EMPTY_KEY
        return keys

    def _users(self, user_vecs):
        users = _as_matrix(user_vecs, "user_vecs")
        if users.shape[1] != self.table.shape[1]:
            raise ValueError(f"user_vecs has d={users.shape[1]}, item_table d={self.table.shape[1]}")
        _check_finite(users, "user_vecs")
        return users

    def _history_positions(self, histories, targets=None):
        """histories (B, H) int, targets (B,) or None -> (positions in self.items, rows) int64.

        One pair per history entry that is a returnable item (a user's target is kept).
        """
        rows = np.repeat(np.arange(histories.shape[0]), histories.shape[1])
        items = histories.reshape(-1)
        keep = items > 0
        if targets is not None:
            keep &= items != np.repeat(targets, histories.shape[1])
        rows, items = rows[keep], items[keep]
        pos = self._positions[np.minimum(items, self.num_items)]
        found = (items <= self.num_items) & (pos >= 0)
        return pos[found], rows[found]

    def _blocks(self, users, histories=None, targets=None):
        """Fast scores chunk by chunk: yields (start, block) with block (C, B) float32 =
        self.vectors[start:start + C] @ users.T (items x users: the faster BLAS shape for
        d << B, C), C = chunk_size but for the last, history items (but targets) set to -inf.

        The block buffer is reused: use a block before asking for the next one.
        """
        bounds = _chunk_bounds(self.items.size, self.chunk_size, self.chunk_size)
        if not bounds:
            return
        num_rows = users.shape[0]
        if histories is not None:  # group the history pairs by chunk (radix sort on chunk ids)
            pos, rows = self._history_positions(histories, targets)
            starts = np.array([a for a, _ in bounds])
            chunk = np.searchsorted(starts, pos, side="right") - 1
            chunk = chunk.astype(np.uint16 if len(bounds) <= 1 << 16 else np.int64)
            order = np.argsort(chunk, kind="stable")
            pos, rows = pos[order], rows[order]
            split = np.searchsorted(chunk[order], np.arange(len(bounds) + 1))
        buf = np.empty(num_rows * max(b - a for a, b in bounds), np.float32)
        for i, (start, stop) in enumerate(bounds):
            width = stop - start
            block = buf[: num_rows * width].reshape(width, num_rows)
            np.matmul(self.vectors[start:stop], users.T, out=block)
            if histories is not None:
                a, b = split[i], split[i + 1]
                block.reshape(-1)[(pos[a:b] - start) * num_rows + rows[a:b]] = -np.inf
            yield start, block

    def _stream(self, users, keep, histories, slack, exact, pilot=True):
        """One pass over the allowed items -> (B, keep) int64 keys (unordered) of the best items.

        exact=False: keys from fast scores, slack must be 0. exact=True: keys from exact scores;
        slack (B,) >= |fast - exact| widens the pruning thresholds so no candidate is lost.
        BLAS writes each chunk's scores; :func:`topk_kernel.scan_block` keeps the best.

        Pilot (fast keys only): each row's threshold starts at the score of its r-th best item
        of the first chunk (a random sample of the catalog, r from :meth:`_pilot_rank`), instead
        of rising from -inf over the first thousands of items. Rows with fewer than `keep`
        items at or above it (about 1%) are searched again without the pilot.
        """
        num_rows = users.shape[0]
        buf, fill, kth, lo = topk_kernel.new_state(num_rows, keep)
        slack = np.ascontiguousarray(np.broadcast_to(np.asarray(slack, np.float64), (num_rows,)))
        rank = self._pilot_rank(keep) if pilot and not exact else 0
        for start, block in self._blocks(users, histories):  # history scores are -inf
            if start == 0 and rank:
                pilot_keys = self._scan(block, 0, users, slack, rank)
                lo = np.maximum(decode_keys(pilot_keys.min(axis=1))[1], np.float32(-_FLT_MAX))
            topk_kernel.scan_block(block, start, self.items, users, self.table, exact, slack,
                                   buf, fill, kth, lo)
        keys = topk_kernel.finish(buf, fill)
        short = np.flatnonzero(fill < keep) if rank else []
        if len(short):
            keys[short] = self._stream(users[short], keep, None if histories is None else
                                       histories[short], slack[short], exact, pilot=False)
        return keys

    def _scan(self, block, start, users, slack, keep):
        """The best `keep` fast-score keys per row (B, keep) of one block alone (EMPTY_KEY
        where fewer)."""
        buf, fill, kth, lo = topk_kernel.new_state(users.shape[0], keep)
        topk_kernel.scan_block(block, start, self.items, users, self.table, False, slack,
                               buf, fill, kth, lo)
        return topk_kernel.finish(buf, fill)

    def _pilot_rank(self, keep):
        """r such that a row's r-th best of the first chunk is at most its keep-th best of the
        catalog with probability >= 99%, or 0 for no pilot (one chunk, or r >= keep).

        The first chunk holds m of the n items at random, so the number of it among a row's
        best keep - 1 items is about Poisson(x), x = (keep - 1) m / n; the r-th best of the
        chunk is too high only when that number reaches r.
        """
        n = self.items.size
        m = min(self.chunk_size, n)
        if m >= n:
            return 0
        x = (keep - 1) * m / n
        term = tail = math.exp(-x)  # P(0), then the running sum P(< r)
        r = 1
        while 1.0 - tail > _PILOT_MISS and r < keep:
            term *= x / r
            tail += term
            r += 1
        return r if r < keep else 0


# -----------------------------------------------------------------------------
# functional API


def top_k(user_vecs, item_table, k, *, histories=None, exclude_items=None, candidates=None,
          chunk_size=DEFAULT_CHUNK_SIZE):
    """Top-k items for each user over the whole catalog (see :class:`TopK`).

    user_vecs (B, d), item_table (N+1, d), histories (B, H) or None, exclude_items (E,) or None,
    candidates (M,) or None -> indices (B, k) int32, scores (B, k) float32; sorted by score
    descending, ties by smaller index; rows with fewer than k allowed items are padded with
    index 0 and score -inf. For many batches or requests, build one :class:`TopK` instead
    and give it each query's exclusions and candidates (it is never rebuilt).
    """
    index = TopK(item_table, exclude_items=exclude_items, candidates=candidates,
                 chunk_size=chunk_size)
    return index(user_vecs, k, histories=histories)


def target_ranks(user_vecs, item_table, targets, *, histories=None,
                 chunk_size=DEFAULT_CHUNK_SIZE):
    """0-based rank of each target among items 1..N (see :meth:`TopK.target_ranks`).

    user_vecs (B, d), item_table (N+1, d), targets (B,), histories (B, H) or None -> (B,) int64.
    Same scores and tie rule as :func:`top_k`: rank < k iff the target is in the top k.
    """
    return TopK(item_table, chunk_size=chunk_size).target_ranks(
        user_vecs, targets, histories=histories)


def sampled_ranks(user_vecs, item_table, targets, negatives):
    """0-based rank of each target among itself and its sampled negatives.

    user_vecs (B, d), item_table (N+1, d), targets (B,), negatives (B, M) int -> (B,) int64:
    the number of negatives scoring above the target, or equal with a smaller index (exact
    scores). Negatives equal to 0 or to the target are ignored; repeated ones count each time.
    """
    users = _as_matrix(user_vecs, "user_vecs")
    table = _as_matrix(item_table, "item_table")
    num_items = table.shape[0] - 1
    targets = _as_items(targets, num_items, "targets")
    negatives = np.asarray(negatives).astype(np.int64, copy=False)
    if negatives.ndim != 2 or negatives.shape[0] != targets.size:
        raise ValueError(f"negatives must be (B, M) with B={targets.size}, got {negatives.shape}")
    _as_items(negatives, num_items, "negatives", lo=0)
    t = exact_scores(users, table, targets)[:, None]
    s = exact_scores(users, table, negatives)
    tg = targets[:, None]
    beats = (s > t) | ((s == t) & (negatives < tg))
    return (beats & (negatives > 0) & (negatives != tg)).sum(axis=1)


# -----------------------------------------------------------------------------
# dense score matrices (baselines): same tie rule and exclusions


def _history_pairs(histories, num_cols, targets=None):
    """(B, H) -> (rows, items) of the history entries in 1..num_cols-1 (not the targets)."""
    rows = np.repeat(np.arange(histories.shape[0]), histories.shape[1])
    items = histories.reshape(-1)
    keep = (items > 0) & (items < num_cols)
    if targets is not None:
        keep &= items != np.repeat(targets, histories.shape[1])
    return rows[keep], items[keep]


def top_k_from_scores(scores, k, *, histories=None, exclude_items=None, candidates=None,
                      chunk_size=DEFAULT_CHUNK_SIZE):
    """Top-k of a dense score matrix with the same rule and exclusions as :func:`top_k`.

    scores (B, N+1) float (column 0 ignored, NaN and -inf = never returned), k int, histories
    (B, H), exclude_items, candidates -> indices (B, k) int32, scores (B, k) float (float64
    unless the scores are float32 or narrower); score descending, ties by smaller index,
    padded with index 0 and score -inf.

    Streams over column chunks like :class:`TopK`: in index order, a column can only enter
    the running top k with a score strictly above the current k-th, so few are merged.
    """
    s = np.asarray(scores)
    if s.ndim != 2:
        raise ValueError(f"scores must be (B, N+1), got shape {s.shape}")
    num_rows, num_cols = s.shape
    k, chunk_size = int(k), int(chunk_size)
    if k < 0 or chunk_size < 1:
        raise ValueError(f"need k >= 0 and chunk_size >= 1, got {k} and {chunk_size}")
    dtype = np.result_type(s.dtype, np.float32)
    best = np.full((num_rows, k), -np.inf, dtype)  # running top k, sorted
    best_idx = np.zeros((num_rows, k), np.int64)
    if k == 0 or num_rows == 0 or num_cols == 0:
        return best_idx.astype(np.int32), best
    allowed = np.ones(num_cols, bool)
    if candidates is not None:
        allowed[:] = False
        allowed[_as_items(candidates, num_cols - 1, "candidates", lo=0)] = True
    if exclude_items is not None:
        allowed[_as_items(exclude_items, num_cols - 1, "exclude_items", lo=0)] = False
    allowed[0] = False
    if histories is not None:
        hist_rows, hist_items = _history_pairs(_as_histories(histories, num_rows), num_cols)
    for start, stop in _chunk_bounds(num_cols, chunk_size, max(_MIN_FIRST_CHUNK, k)):
        block = np.array(s[:, start:stop], dtype)
        block[:, np.flatnonzero(~allowed[start:stop])] = -np.inf
        if histories is not None:
            sel = (hist_items >= start) & (hist_items < stop)
            block[hist_rows[sel], hist_items[sel] - start] = -np.inf
        flat = np.flatnonzero(block > best[:, -1:])  # NaN and -inf never pass
        if flat.size == 0:
            continue
        rows, cols = np.divmod(flat, stop - start)
        rows = np.concatenate([np.repeat(np.arange(num_rows), k), rows])
        vals = np.concatenate([best.reshape(-1), block.reshape(-1)[flat]])
        idx = np.concatenate([best_idx.reshape(-1), cols + start])
        order = np.lexsort((idx, -vals, rows))  # by row, score descending, index ascending
        counts = np.bincount(rows, minlength=num_rows)
        first = ((np.cumsum(counts) - counts)[:, None] + np.arange(k)).reshape(-1)
        best = vals[order[first]].reshape(num_rows, k)
        best_idx = idx[order[first]].reshape(num_rows, k)
    return best_idx.astype(np.int32), best


def rank_from_scores(scores, targets, histories=None):
    """0-based rank of each target in a dense score matrix, same rule as :func:`target_ranks`.

    scores (B, N+1) float (column 0 ignored), targets (B,) in 1..N, histories (B, H) or None
    -> (B,) int64: items (not in the history, the target excepted) scoring above the target,
    or equal with a smaller index.
    """
    s = np.asarray(scores)
    if s.ndim != 2:
        raise ValueError(f"scores must be (B, N+1), got shape {s.shape}")
    num_rows, num_cols = s.shape
    targets = _as_items(targets, num_cols - 1, "targets")
    if targets.size != num_rows:
        raise ValueError(f"targets must have shape ({num_rows},), got {targets.shape}")
    t = s[np.arange(num_rows), targets][:, None]
    beats = (s > t) | ((s == t) & (np.arange(num_cols) < targets[:, None]))
    beats[:, 0] = False
    if histories is not None:
        beats[_history_pairs(_as_histories(histories, num_rows), num_cols, targets)] = False
    return _row_counts(beats).astype(np.int64)
