"""The one user encoder: a user's vector, bitwise the same in every batch, stage and process.

:func:`user_vectors` runs the model's ``user_embeddings`` (the last block for the last position
only) in calls of a fixed shape compiled by XLA. A float32 matmul rounds differently for
different batch shapes (oneDNN/BLAS pick other kernels), so each user goes to a width bucket
fixed by its own history length (8, 16, 32, ... up to maxlen; the model gives the same outputs
for a history trimmed on the left) and each bucket is encoded in calls of a fixed number of
rows, the last one padded with empty histories. A user's vector then never depends on the
other users of its batch. Evaluation (training's validation included), batch scoring, Serve
and the easy API all encode users here.
"""

from __future__ import annotations

import math

import numpy as np

from .batching import left_pad

_MIN_WIDTH = 8  # narrowest history bucket


_CALL_TOKENS = 2048  # rows x width of one encoder call (rows a power of two in 32..512)


_MIN_CALL_ROWS = 32  # rows of one encoder call: a power of two in 32..512


_MAX_CALL_ROWS = 512


def bucket_widths(maxlen: int) -> np.ndarray:
    """History widths the encoder is called with: 8, 16, 32, ... below maxlen, then maxlen."""
    widths, width = [], _MIN_WIDTH
    while width < maxlen:
        widths.append(width)
        width *= 2
    widths.append(maxlen)
    return np.array(widths, np.int64)


def rows_per_call(width: int) -> int:
    """Rows of one encoder call for histories of this width (fixed: a power of two)."""
    rows = 2 ** int(math.log2(max(1, _CALL_TOKENS // max(1, width))))
    return int(min(_MAX_CALL_ROWS, max(_MIN_CALL_ROWS, rows)))


def user_vectors(model, histories, *, executor=None) -> np.ndarray:
    """User representations ``model.user_embeddings(left_pad(history, maxlen))`` -> (B, dim).

    histories: anything :func:`.batching.left_pad` accepts (a pyarrow ListArray, a list of
    arrays, ...). Each user is encoded in the narrowest width bucket that holds its last
    ``maxlen`` items, in calls of a fixed shape, so the result is bitwise independent of
    which other users are in ``histories`` (see the module docstring). ``executor`` (a
    ``concurrent.futures`` executor, optional) runs the encoder calls concurrently.
    """
    maxlen, dim = model.config.maxlen, model.config.dim
    padded = left_pad(histories, maxlen)  # (B, maxlen) int32
    out = np.empty((padded.shape[0], dim), np.float32)
    if padded.shape[0] == 0:
        return out
    widths = bucket_widths(maxlen)
    lengths = np.count_nonzero(padded, axis=1)  # items are never 0
    bucket = np.searchsorted(widths, np.maximum(lengths, 1))
    calls = []  # (rows, width): one encoder call each, widest (slowest) first
    for b in range(len(widths) - 1, -1, -1):
        rows = np.flatnonzero(bucket == b)
        step = rows_per_call(int(widths[b]))
        calls += [(rows[a:a + step], int(widths[b])) for a in range(0, rows.size, step)]

    def encode(call):
        part, width = call
        x = np.zeros((rows_per_call(width), width), np.int32)
        x[: part.size] = padded[part, maxlen - width:]
        out[part] = model.user_embeddings(x, jit_compile=True).numpy()[: part.size]

    for _ in (executor.map if executor is not None else map)(encode, calls):
        pass
    return out


def warm_up(model):
    """Compile every call shape :func:`user_vectors` uses (one XLA compile each, about 0.6 s
    on CPU at dim 64), so that no batch or request pays for it."""
    user_vectors(model, [np.ones(int(width), np.int32)
                         for width in bucket_widths(model.config.maxlen)])
