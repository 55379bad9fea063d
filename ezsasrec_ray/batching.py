"""Vectorized construction of training batches and inference histories (numpy, no row loops).

A batch of variable-length item sequences is handled as flat `values` plus per-row `starts`
and `lengths` (Arrow list layout); every output cell is then one fancy-indexing gather.

Accepted inputs ("sequences"): a `pyarrow.ListArray` / `LargeListArray` / `ChunkedArray` of
them, a `(values, offsets)` pair of numpy arrays, a `tf.RaggedTensor`, or anything
`pyarrow.array` turns into a list array (a python list of numpy arrays or of lists, a pandas
Series of arrays). A null row counts as an empty sequence.

Outputs are int32, right-aligned (left-padded with 0): the most recent item is in the last column.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def _ragged(sequences):
    """sequences -> (values (T,) int64, starts (B,) int64, lengths (B,) int64)."""
    if isinstance(sequences, tuple) and len(sequences) == 2:
        values, offsets = (np.asarray(a) for a in sequences)
        offsets = offsets.astype(np.int64)
        return values.astype(np.int64, copy=False), offsets[:-1], np.diff(offsets)
    if hasattr(sequences, "row_splits") and hasattr(sequences, "flat_values"):  # tf.RaggedTensor
        offsets = np.asarray(sequences.row_splits).astype(np.int64)
        values = np.asarray(sequences.flat_values).astype(np.int64)
        return values, offsets[:-1], np.diff(offsets)
    if isinstance(sequences, pa.ChunkedArray):
        sequences = (sequences.combine_chunks() if sequences.num_chunks
                     else pa.array([], type=sequences.type))
    if not isinstance(sequences, pa.Array):
        if len(sequences) == 0:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty, empty
        sequences = pa.array(sequences)
    if not (pa.types.is_list(sequences.type) or pa.types.is_large_list(sequences.type)):
        raise TypeError(f"expected a list of item sequences, got arrow type {sequences.type}")
    # .offsets and .values both ignore a slice's offset, so they stay consistent with each other
    offsets = sequences.offsets.to_numpy().astype(np.int64)
    values = sequences.values.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    starts, lengths = offsets[:-1], np.diff(offsets)
    if sequences.null_count:
        lengths = np.where(sequences.is_null().to_numpy(zero_copy_only=False), 0, lengths)
    return values, starts, lengths


def _gather_right_aligned(values, first, counts, width):
    """Row b gets values[first[b] : first[b] + counts[b]] in its last counts[b] columns.

    values (T,), first (B,), counts (B,) with counts <= width -> (B, width) int32, 0 elsewhere.
    """
    j = counts[:, None] - width + np.arange(width)[None, :]  # (B, width) index in the row
    ok = j >= 0
    if values.size == 0:
        return np.zeros(ok.shape, dtype=np.int32)
    idx = np.where(ok, first[:, None] + j, 0)
    return np.where(ok, values[idx], 0).astype(np.int32)


def take_rows(values: np.ndarray, offsets: np.ndarray, rows: np.ndarray, lengths=None):
    """The selected rows of a ragged ``(values, offsets)`` array, as a new ``(values, offsets)``;
    with ``lengths``, only the first ``lengths[b]`` items of row ``rows[b]``."""
    rows = np.asarray(rows, np.int64)
    lengths = offsets[rows + 1] - offsets[rows] if lengths is None else \
        np.asarray(lengths, np.int64)
    new_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    take = np.repeat(offsets[rows] - new_offsets[:-1], lengths) + np.arange(new_offsets[-1])
    return values[take], new_offsets


def make_inputs(sequences, maxlen: int, rng=None):
    """Next-item training pairs for a batch of sequences.

    For each sequence s (time order): inputs = s[:-1], positives = s[1:], right-aligned.
    A sequence longer than maxlen + 1 is cut to a contiguous window of maxlen + 1 items: a random
    one drawn with rng (np.random.Generator or seed) when rng is given, else the most recent.

    -> inputs (B, W) int32, positives (B, W) int32, with W = min(maxlen, longest len - 1 in the
    batch), at least 1 (a batch without any pair gives all-zero rows).
    """
    if maxlen < 1:
        raise ValueError(f"maxlen must be >= 1, got {maxlen}")
    values, starts, lengths = _ragged(sequences)
    window = np.minimum(lengths, maxlen + 1)  # (B,) items used per row
    if rng is None:
        offset = lengths - window  # the most recent window
    else:
        offset = np.random.default_rng(rng).integers(0, lengths - window + 1)  # (B,)
    first = starts + offset  # (B,) first item of the window
    pairs = np.maximum(window - 1, 0)  # (B,) number of (input, positive) pairs
    width = max(int(pairs.max(initial=0)), 1)
    inputs = _gather_right_aligned(values, first, pairs, width)
    positives = _gather_right_aligned(values, first + 1, pairs, width)
    return inputs, positives


def left_pad(sequences, width: int) -> np.ndarray:
    """The most recent `width` items of each sequence, left-padded with 0 -> (B, width) int32.

    Builds model histories for inference (evaluation, scoring, serving).
    """
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    values, starts, lengths = _ragged(sequences)
    counts = np.minimum(lengths, width)
    return _gather_right_aligned(values, starts + lengths - counts, counts, width)


def epoch_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator,
                  bucket_batches: int = 32) -> list[np.ndarray]:
    """Row indices of each batch of an epoch: shuffled, then sorted by length within buckets of
    ``bucket_batches`` batches, so each batch holds histories of similar length."""
    order = rng.permutation(len(lengths))
    bucket = batch_size * bucket_batches
    batches = []
    for start in range(0, len(order), bucket):
        rows = order[start:start + bucket]
        rows = rows[np.argsort(lengths[rows], kind="stable")]
        batches.extend(rows[i:i + batch_size] for i in range(0, len(rows), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def history_windows(values: np.ndarray, offsets: np.ndarray, maxlen: int):
    """Cut each history into windows of at most ``maxlen + 1`` items that together predict
    every position once: windows end at n, n - maxlen, n - 2 maxlen, ... (and start at 0 or
    ``maxlen + 1`` before their end). Short histories are kept whole.

    (values, offsets) -> (values, offsets) of the windows, in order of their history.
    """
    offsets = np.asarray(offsets, np.int64)
    lengths = np.diff(offsets)
    # windows per history: targets 1..n-1, maxlen of them a window (at least one window)
    counts = np.maximum(1, -(-(lengths - 1) // maxlen))
    history = np.repeat(np.arange(lengths.size), counts)
    k = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)  # 0 = last
    ends = lengths[history] - k * maxlen
    starts = np.maximum(0, ends - maxlen - 1)
    new_offsets = np.concatenate([[0], np.cumsum(ends - starts)]).astype(np.int64)
    take = np.repeat(offsets[history] + starts - new_offsets[:-1], ends - starts) \
        + np.arange(new_offsets[-1])
    return np.asarray(values)[take], new_offsets
