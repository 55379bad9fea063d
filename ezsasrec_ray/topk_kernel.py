"""The inner loop of :class:`ezsasrec_ray.topk.TopK`, compiled with numba.

After BLAS has written a block of fast scores (items x users), one pass over it keeps each
user's best ``keep`` keys. Doing that pass in numpy costs a comparison, a ``flatnonzero``, a
gather and a merge per block: about half as long as the matmul itself. Here it is one loop that
reads the block once (vectorised comparisons against each user's threshold) and touches only
the few candidates, with each user's threshold raised as soon as better items arrive.

Per user, the running top ``keep`` lives in a buffer of ``2 * keep`` keys: a candidate whose
key beats the current keep-th is appended; when the buffer is full, a selection moves the best
``keep`` to its front and raises the threshold to the new keep-th. Keys are the int64 keys of
:mod:`ezsasrec_ray.topk` (score and item in one number, larger = better, unique per item).

The functions release the GIL (``nogil``), so a scorer's threads run them side by side, and are
compiled once per machine (``cache=True``: the compiled code is stored next to this file or,
where that is read-only, in numba's user cache).
"""

from __future__ import annotations

import numba
import numpy as np

EMPTY_KEY = np.iinfo(np.int64).min  # "no item" (see topk.EMPTY_KEY)
_MAX_INDEX = 0x7FFFFFFF
_FLT_MAX = float(np.finfo(np.float32).max)
_ROWS = 8  # item rows compared together before looking for candidates
_NUMBA = {"nogil": True, "cache": True, "boundscheck": False}


@numba.njit(**_NUMBA)
def exact_dots(users, table, items, out):
    """out[b, j] = the float32 rounding of sum_t users[b, t] * table[items[b, j], t], the float32
    products summed in float64 in index order t (the same as topk.exact_scores' numpy loop).

    users (B, d) float32, table (N+1, d) float32, items (B, K) int64 in 0..N, out (B, K) float32.
    """
    num_rows, width = items.shape
    dim = users.shape[1]
    totals = np.empty(width, np.float64)
    for b in range(num_rows):
        totals[:] = 0.0
        for t in range(dim):  # index order; the K sums are independent, so they pipeline
            u = np.float64(users[b, t])
            for j in range(width):
                totals[j] += u * np.float64(table[items[b, j], t])
        for j in range(width):
            out[b, j] = np.float32(totals[j])
    return out


@numba.njit(**_NUMBA)
def _key(bits, item):
    """float32 bits (as int32) and item -> int64 key (the same as topk.encode_keys)."""
    if bits == np.int32(-2147483648):  # -0.0 counts as +0.0
        bits = np.int32(0)
    ordered = bits ^ ((bits >> 31) & np.int32(_MAX_INDEX))  # int order = float order
    return np.int64(ordered) * 4294967296 + (_MAX_INDEX - item)


@numba.njit(**_NUMBA)
def _select(row, count, keep):
    """Move the `keep` largest of row[:count] to row[:keep] (unordered), in place; return the
    smallest of them (the keep-th largest). Quickselect; keys are unique."""
    lo, hi = 0, count - 1
    target = keep - 1  # descending order: index keep-1 holds the keep-th largest
    while lo < hi:
        mid = (lo + hi) >> 1
        # median of three as the pivot, moved to hi
        a, b, c = row[lo], row[mid], row[hi]
        if (a >= b) == (b >= c):
            p = mid
        elif (b >= a) == (a >= c):
            p = lo
        else:
            p = hi
        pivot = row[p]
        row[p], row[hi] = row[hi], row[p]
        store = lo
        for i in range(lo, hi):  # branch-free: whether row[i] > pivot is unpredictable
            v = row[i]
            row[i] = row[store]
            row[store] = v
            store += v > pivot
        row[store], row[hi] = row[hi], row[store]
        if store == target:
            break
        if store < target:
            lo = store + 1
        else:
            hi = store - 1
    return row[target]


@numba.njit(**_NUMBA)
def _score_of(key, scratch_bits, scratch_float):
    """int64 key -> its float32 score as float64 (-inf for EMPTY_KEY)."""
    if key == EMPTY_KEY:
        return -np.inf
    ordered = np.int32(key >> 32)
    scratch_bits[0] = ordered ^ ((ordered >> 31) & np.int32(_MAX_INDEX))
    return np.float64(scratch_float[0])


@numba.njit(**_NUMBA)
def _threshold(kth_key, slack, scratch_bits, scratch_float):
    """The float32 fast-score threshold for a row whose keep-th key is kth_key: the largest
    float32 <= score - slack (slack >= |fast - exact| when the keys hold exact scores)."""
    t = _score_of(kth_key, scratch_bits, scratch_float) - slack
    y = np.float32(t)
    if np.float64(y) > t:
        y = np.nextafter(y, np.float32(-np.inf))
    return max(y, np.float32(-_FLT_MAX))


def new_state(num_rows, keep):
    """The running top `keep` of `num_rows` users, empty, as :func:`scan_block` takes it:
    buf (B, 2 keep) int64, fill (B,) int64, kth (B,) int64, lo (B,) float32."""
    return (np.empty((num_rows, 2 * keep), np.int64), np.zeros(num_rows, np.int64),
            np.full(num_rows, EMPTY_KEY, np.int64), np.full(num_rows, -_FLT_MAX, np.float32))


@numba.njit(inline="always", **_NUMBA)
def _flag_rows(block, first, last, lo, flags):
    """Vectorised: flags[b] = 1 if any of item rows first..last reaches user b's threshold."""
    num_rows = block.shape[1]
    for b in range(num_rows):
        flags[b] = block[first, b] >= lo[b]
    for c in range(first + 1, last):
        scores = block[c]
        for b in range(num_rows):
            flags[b] |= scores[b] >= lo[b]


@numba.njit(**_NUMBA)
def scan_block(block, start, items, users, table, exact, slack, buf, fill, kth, lo):
    """Feed one block of fast scores into the running top `keep` of every user, in place.

    block (C, B) float32: fast scores of the items at positions start..start+C of `items`
    (items (n,) int64) for B users, -inf for items a user must never get (its history: set
    by the caller, so this loop need not look them up); users (B, d) and table (N+1, d)
    float32 for exact scores; exact: keys hold exact scores (else the fast ones) and slack
    (B,) float64 widens the thresholds. State: buf (B, 2 keep) int64 keys, fill (B,) int64
    keys in buf, kth (B,) int64 the keep-th key (EMPTY_KEY until buf has held keep),
    lo (B,) float32 the fast-score threshold (> -inf, so -inf scores never pass).
    """
    num_items, num_rows = block.shape
    keep = buf.shape[1] // 2
    dim = users.shape[1]
    bits = block.view(np.int32)
    scratch_float = np.empty(1, np.float32)
    scratch_bits = scratch_float.view(np.int32)
    num_words = (num_rows + 7) // 8
    words = np.zeros(num_words, np.uint64)
    flags = words.view(np.uint8)  # (8 * num_words,): one flag per user, read 8 at a time
    for first in range(0, num_items, _ROWS):
        last = min(num_items, first + _ROWS)
        _flag_rows(block, first, last, lo, flags)
        for w in range(num_words):
            if words[w] == 0:
                continue
            for b in range(8 * w, min(num_rows, 8 * w + 8)):
                if flags[b] == 0:
                    continue
                for c in range(first, last):
                    if not block[c, b] >= lo[b]:
                        continue
                    item = items[start + c]
                    if exact:
                        total = 0.0  # the float32 products summed in float64 in index order
                        for j in range(dim):
                            total += np.float64(users[b, j]) * np.float64(table[item, j])
                        scratch_float[0] = np.float32(total)
                        key = _key(scratch_bits[0], item)
                    else:
                        key = _key(bits[c, b], item)
                    if key <= kth[b]:
                        continue
                    n = fill[b]
                    buf[b, n] = key
                    n += 1
                    if n == 2 * keep:
                        kth[b] = _select(buf[b], n, keep)
                        lo[b] = _threshold(kth[b], slack[b], scratch_bits, scratch_float)
                        n = keep
                    elif n == keep and kth[b] == EMPTY_KEY:
                        kth[b] = buf[b, :keep].min()
                        lo[b] = _threshold(kth[b], slack[b], scratch_bits, scratch_float)
                    fill[b] = n
    return 0


@numba.njit(**_NUMBA)
def finish(buf, fill):
    """-> (B, keep) int64: each row's best `keep` keys (unordered), EMPTY_KEY where fewer."""
    num_rows = buf.shape[0]
    keep = buf.shape[1] // 2
    out = np.full((num_rows, keep), EMPTY_KEY, np.int64)
    for b in range(num_rows):
        n = fill[b]
        if n > keep:
            _select(buf[b], n, keep)
            n = keep
        out[b, :n] = buf[b, :n]
    return out
