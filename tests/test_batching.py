"""Batch construction: hand-written cases, a naive reference, random windows, input formats."""

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ezsasrec_ray.batching import history_windows, left_pad, make_inputs


def naive_make_inputs(sequences, maxlen):
    """Row-by-row reference of make_inputs without rng (most recent window)."""
    rows = [list(s)[-(maxlen + 1):] for s in sequences]
    width = max([len(r) - 1 for r in rows] + [1])
    inputs = np.zeros((len(rows), width), dtype=np.int32)
    positives = np.zeros((len(rows), width), dtype=np.int32)
    for i, r in enumerate(rows):
        if len(r) > 1:
            inputs[i, width - len(r) + 1:] = r[:-1]
            positives[i, width - len(r) + 1:] = r[1:]
    return inputs, positives


def naive_left_pad(sequences, width):
    out = np.zeros((len(sequences), width), dtype=np.int32)
    for i, s in enumerate(sequences):
        s = list(s)[-width:]
        if s:
            out[i, width - len(s):] = s
    return out


def random_sequences(rng, n, max_len, num_items=50):
    return [rng.integers(1, num_items + 1, size=rng.integers(0, max_len + 1)) for _ in range(n)]


# -----------------------------------------------------------------------------
# make_inputs


def test_make_inputs_hand_written():
    seqs = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [], [10, 11, 12, 13, 14, 15, 16]]  # maxlen 4
    inputs, positives = make_inputs(seqs, maxlen=4)
    np.testing.assert_array_equal(inputs, [
        [0, 0, 1, 2],  # short: left-padded
        [4, 5, 6, 7],  # exactly maxlen + 1 items
        [0, 0, 0, 0],  # one item: no pair
        [0, 0, 0, 0],  # empty
        [12, 13, 14, 15],  # long: the most recent window
    ])
    np.testing.assert_array_equal(positives, [
        [0, 0, 2, 3],
        [5, 6, 7, 8],
        [0, 0, 0, 0],
        [0, 0, 0, 0],
        [13, 14, 15, 16],
    ])
    assert inputs.dtype == np.int32 and positives.dtype == np.int32


def test_make_inputs_trims_to_longest_in_batch():
    inputs, positives = make_inputs([[1, 2, 3], [4, 5]], maxlen=50)
    np.testing.assert_array_equal(inputs, [[1, 2], [0, 4]])
    np.testing.assert_array_equal(positives, [[2, 3], [0, 5]])
    inputs, positives = make_inputs([[1], [2]], maxlen=50)  # no pair at all: width 1
    assert inputs.shape == positives.shape == (2, 1) and not inputs.any()
    inputs, positives = make_inputs([], maxlen=5)
    assert inputs.shape == (0, 1)


@pytest.mark.parametrize("maxlen", [1, 3, 8])
def test_make_inputs_matches_naive_reference(maxlen):
    rng = np.random.default_rng(maxlen)
    seqs = random_sequences(rng, 40, 15)
    got = make_inputs(seqs, maxlen)
    want = naive_make_inputs(seqs, maxlen)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_random_windows_are_contiguous_slices():
    maxlen = 4
    seqs = [np.arange(100 * i + 1, 100 * i + 1 + n) for i, n in enumerate([2, 5, 6, 9, 30] * 4)]
    starts_seen = set()
    for seed in range(10):
        inputs, positives = make_inputs(seqs, maxlen, rng=np.random.default_rng(seed))
        for s, x, y in zip(seqs, inputs, positives):
            real = x > 0
            np.testing.assert_array_equal(x[real][1:], y[real][:-1])  # shifted by one
            window = np.concatenate([x[real], y[real][-1:]])  # the maxlen + 1 window
            assert len(window) == min(len(s), maxlen + 1)
            start = int(np.searchsorted(s, window[0]))  # items of s are increasing
            np.testing.assert_array_equal(s[start:start + len(window)], window)
            if len(s) == 30:
                starts_seen.add(start)
            if len(s) <= maxlen + 1:
                assert start == 0
    assert len(starts_seen) > 5  # the window moves
    same = [make_inputs(seqs, maxlen, rng=np.random.default_rng(7)) for _ in range(2)]
    np.testing.assert_array_equal(same[0][0], same[1][0])


# -----------------------------------------------------------------------------
# input formats and left_pad


def formats(seqs):
    """The same sequences in every accepted input format."""
    arrow = pa.array(seqs, type=pa.list_(pa.int32()))
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in seqs])])
    values = np.concatenate([np.asarray(s, dtype=np.int64) for s in seqs])
    padded = pa.array([[99]] + seqs + [[98, 97]], type=pa.list_(pa.int64()))
    return {
        "list of lists": seqs,
        "list of arrays": [np.asarray(s, dtype=np.int32) for s in seqs],
        "ListArray": arrow,
        "LargeListArray": pa.array(seqs, type=pa.large_list(pa.int64())),
        "ChunkedArray": pa.chunked_array([arrow.slice(0, 2), arrow.slice(2)]),
        "sliced ListArray": padded.slice(1, len(seqs)),
        "values+offsets": (values, offsets),
    }


SEQS = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [], [10], [11, 12]]


@pytest.mark.parametrize("kind", list(formats(SEQS)))
def test_input_formats(kind):
    seqs = formats(SEQS)[kind]
    want = naive_make_inputs(SEQS, 3)
    got = make_inputs(seqs, 3)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(left_pad(seqs, 4), naive_left_pad(SEQS, 4))


def test_ragged_tensor():
    tf = pytest.importorskip("tensorflow")
    ragged = tf.ragged.constant(SEQS, dtype=tf.int64)
    np.testing.assert_array_equal(make_inputs(ragged, 3)[1], naive_make_inputs(SEQS, 3)[1])
    np.testing.assert_array_equal(left_pad(ragged, 4), naive_left_pad(SEQS, 4))


def test_null_rows_are_empty():
    arr = pa.array([[1, 2], None, [3, 4, 5]], type=pa.list_(pa.int32()))
    np.testing.assert_array_equal(left_pad(arr, 3), [[0, 1, 2], [0, 0, 0], [3, 4, 5]])


def test_left_pad():
    np.testing.assert_array_equal(left_pad([[1, 2, 3], [4], [], [5, 6, 7, 8, 9]], 3),
                                  [[1, 2, 3], [0, 0, 4], [0, 0, 0], [7, 8, 9]])
    rng = np.random.default_rng(1)
    seqs = random_sequences(rng, 30, 12)
    for width in (1, 5, 12, 20):
        got = left_pad(seqs, width)
        assert got.dtype == np.int32 and got.shape == (30, width)
        np.testing.assert_array_equal(got, naive_left_pad(seqs, width))
    with pytest.raises(ValueError, match="width"):
        left_pad(seqs, 0)


@given(st.lists(st.integers(0, 40), min_size=1, max_size=20), st.integers(1, 9))
@settings(max_examples=60, deadline=None)
def test_history_windows_predict_every_position_once(lengths, maxlen):
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    values = np.arange(1, offsets[-1] + 1)  # item = its global position + 1: unique
    out_values, out_offsets = history_windows(values, offsets, maxlen)
    windows = [out_values[a:b] for a, b in zip(out_offsets[:-1], out_offsets[1:])]
    assert all(len(w) <= maxlen + 1 for w in windows)
    # each window is a contiguous run of one history; its targets are all but its first item
    targets = sorted(int(t) for w in windows for t in w[1:])
    expected = sorted(int(values[offsets[i] + j]) for i, n in enumerate(lengths)
                      for j in range(1, n))
    assert targets == expected
    for w in windows:
        assert np.all(np.diff(w) == 1)
