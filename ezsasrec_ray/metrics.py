"""Ranking metrics, catalog coverage and two non-neural baselines (pure numpy).

* :func:`ranking_metrics` turns 0-based target ranks (from :func:`.topk.target_ranks`,
  :func:`.topk.sampled_ranks` or :func:`rank_from_scores`) into HR@K, NDCG@K and MRR;
* :func:`coverage`: the share of the catalog that appears in anyone's top-k;
* :class:`PopularityBaseline` and :class:`MarkovBaseline` score a batch of users densely,
  ``scores(histories) -> (B, N+1)``, so they are ranked by :func:`rank_from_scores` and
  :func:`.topk.top_k_from_scores` with the same tie rule (score descending, then smaller item
  index) and the same exclusions (padding 0, the user's history but the target) as the model.

Training sequences are either a ``(values, offsets)`` pair of int arrays (sequence j is
``values[offsets[j]:offsets[j + 1]]``), a pyarrow ``ListArray`` / ``ChunkedArray`` of lists
of item indices, or a list of int sequences. Item 0 inside a sequence is padding and ignored.
"""

from __future__ import annotations

import numpy as np

from .topk import rank_from_scores, top_k_from_scores

__all__ = [
    "DEFAULT_KS",
    "MarkovBaseline",
    "PopularityBaseline",
    "coverage",
    "rank_from_scores",
    "ranking_metrics",
    "sequence_arrays",
    "top_k_from_scores",
]

DEFAULT_KS = (1, 5, 10, 20, 50)


# -----------------------------------------------------------------------------
# metrics


def ranking_metrics(ranks, ks=DEFAULT_KS):
    """Leave-one-out metrics from 0-based target ranks.

    ranks (B,) int >= 0 -> {"users": B, "HR@K", "NDCG@K" for K in ks, "MRR"} (floats, means
    over users): HR@K = [rank < K], NDCG@K = 1 / log2(rank + 2) if rank < K else 0 (one
    relevant item, so the ideal DCG is 1), MRR = 1 / (rank + 1) over all ranks (not cut at
    any K). With no users every metric is NaN.
    """
    ranks = np.asarray(ranks).reshape(-1)
    if ranks.size and ranks.min() < 0:
        raise ValueError("ranks must be >= 0")
    ranks = ranks.astype(np.float64)
    out = {"users": int(ranks.size)}
    gain = 1.0 / np.log2(ranks + 2.0)
    for k in ks:
        hit = ranks < k
        out[f"HR@{k}"] = _mean(hit)
        out[f"NDCG@{k}"] = _mean(np.where(hit, gain, 0.0))
    out["MRR"] = _mean(1.0 / (ranks + 1.0))
    return out


def _mean(x):
    return float(np.mean(x)) if np.size(x) else float("nan")


def coverage(top_indices, num_items):
    """Share of the catalog recommended to someone.

    top_indices (B, k) int (0 = padding, ignored), num_items N -> float in [0, 1]: the number
    of distinct items of 1..N in top_indices, over N.
    """
    if num_items <= 0:
        raise ValueError(f"num_items must be >= 1, got {num_items}")
    items = np.asarray(top_indices).reshape(-1)
    items = items[(items > 0) & (items <= num_items)]
    return float(np.unique(items).size / num_items)


# -----------------------------------------------------------------------------
# training sequences


def sequence_arrays(sequences):
    """Training sequences -> (values (T,) int64, offsets (S+1,) int64), offsets[0] = 0.

    Accepts (values, offsets), a pyarrow ListArray / LargeListArray / ChunkedArray (null lists
    are empty, null items are 0), or a list of int sequences.
    """
    if isinstance(sequences, tuple) and len(sequences) == 2:
        values = np.asarray(sequences[0]).astype(np.int64, copy=False).reshape(-1)
        offsets = np.asarray(sequences[1]).astype(np.int64, copy=False).reshape(-1)
        offsets = offsets - (offsets[0] if offsets.size else 0)
        if offsets.size == 0 or np.any(np.diff(offsets) < 0) or offsets[-1] > values.size:
            raise ValueError("offsets must be non-decreasing, within the values")
        return values[: offsets[-1]], offsets
    if hasattr(sequences, "combine_chunks"):  # pyarrow ChunkedArray
        sequences = sequences.combine_chunks()
    if hasattr(sequences, "value_lengths") and hasattr(sequences, "flatten"):  # pyarrow lists
        lengths = np.asarray(sequences.value_lengths().fill_null(0), np.int64)
        values = np.asarray(sequences.flatten().fill_null(0), np.int64)
    else:
        seqs = [np.asarray(s, np.int64).reshape(-1) for s in sequences]
        lengths = np.array([s.size for s in seqs], np.int64)
        values = np.concatenate(seqs) if seqs else np.zeros(0, np.int64)
    return values, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def _checked_items(values, num_items):
    if values.size and (values.min() < 0 or values.max() > num_items):
        raise ValueError(f"training items must be in 0..{num_items} (0 = padding)")
    return values


def _last_items(histories):
    """(B, H) left-padded histories or (B,) last items -> (B,) int64 last items (0 = none)."""
    h = np.asarray(histories).astype(np.int64, copy=False)
    if h.ndim == 2:
        return h[:, -1] if h.shape[1] else np.zeros(h.shape[0], np.int64)
    if h.ndim == 1:
        return h
    raise ValueError(f"histories must be (B, H) or (B,), got shape {h.shape}")


# -----------------------------------------------------------------------------
# baselines


class PopularityBaseline:
    """Scores every item by its number of occurrences in the training sequences.

    ``scores(histories)`` (B, N+1) float64: the same row for every user; column 0 is -inf.
    Ties (equal counts) go to the smaller item index, by the ranking functions' rule.
    """

    def __init__(self, num_items):
        self.num_items = int(num_items)
        self.counts = None  # (N+1,) int64 after fit

    def fit(self, train_sequences):
        """train_sequences (see module docstring) -> self."""
        values, _ = sequence_arrays(train_sequences)
        values = _checked_items(values, self.num_items)
        self.counts = np.bincount(values, minlength=self.num_items + 1).astype(np.int64)
        self.counts[0] = 0
        return self

    def scores(self, histories):
        """histories (B, H) or (B,) (only B is used) -> (B, N+1) float64."""
        if self.counts is None:
            raise RuntimeError("fit() first")
        row = self.counts.astype(np.float64)
        row[0] = -np.inf
        return np.repeat(row[None, :], len(np.asarray(histories)), axis=0)


class MarkovBaseline:
    """First-order Markov chain: scores item j by how often it followed the user's last item.

    ``fit`` counts the consecutive pairs (a, b) of every training sequence (pairs with a 0 are
    skipped) into a CSR matrix (``indptr`` (N+2,), ``next_items``, ``pair_counts``), built with
    numpy from the pairs, no Python loop over sequences.

    ``scores(histories)`` (B, N+1) float64, for the last (most recent, rightmost) item a of
    each left-padded history: count(a -> j), plus, if ``popularity_tiebreak``,
    popularity(j) / (max popularity + 1), a term < 1 that only orders items with equal counts
    (so users with an unseen or empty last item get the popularity ranking). Remaining ties go
    to the smaller index. Column 0 is -inf.
    """

    def __init__(self, num_items, popularity_tiebreak=True):
        self.num_items = int(num_items)
        self.popularity_tiebreak = bool(popularity_tiebreak)
        self.indptr = None
        self.next_items = None
        self.pair_counts = None
        self.popularity = None

    def fit(self, train_sequences):
        """train_sequences (see module docstring) -> self."""
        values, offsets = sequence_arrays(train_sequences)
        values = _checked_items(values, self.num_items)
        n1 = self.num_items + 1
        self.popularity = PopularityBaseline(self.num_items).fit((values, offsets)).counts
        same_seq = np.ones(max(values.size - 1, 0), bool)  # pair (i, i+1) within one sequence
        ends = offsets[1:-1] - 1  # last position of every sequence but the final one
        same_seq[ends[(ends >= 0) & (ends < same_seq.size)]] = False
        prev, nxt = values[:-1][same_seq], values[1:][same_seq]
        keep = (prev > 0) & (nxt > 0)
        pairs, counts = np.unique(prev[keep] * n1 + nxt[keep], return_counts=True)
        prev_items = pairs // n1
        self.next_items = pairs % n1
        self.pair_counts = counts.astype(np.int64)
        self.indptr = np.concatenate([[0], np.cumsum(np.bincount(prev_items, minlength=n1))])
        return self

    def transitions(self, item):
        """item int -> (next items (m,) ascending, counts (m,)) seen after it in training."""
        a, b = self.indptr[item], self.indptr[item + 1]
        return self.next_items[a:b], self.pair_counts[a:b]

    def scores(self, histories):
        """histories (B, H) left-padded or (B,) last items -> (B, N+1) float64."""
        if self.indptr is None:
            raise RuntimeError("fit() first")
        last = _last_items(histories)
        if last.size and (last.min() < 0 or last.max() > self.num_items):
            raise ValueError(f"history items must be in 0..{self.num_items}")
        row = np.zeros(self.num_items + 1)
        if self.popularity_tiebreak:
            row = self.popularity / (self.popularity.max() + 1.0)
        out = np.repeat(row[None, :], last.size, axis=0)
        start, stop = self.indptr[last], self.indptr[last + 1]
        lengths = stop - start
        rows = np.repeat(np.arange(last.size), lengths)
        pos = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        pos += np.repeat(start, lengths)
        out[rows, self.next_items[pos]] += self.pair_counts[pos]
        out[:, 0] = -np.inf
        return out
