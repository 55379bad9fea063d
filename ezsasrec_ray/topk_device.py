"""The catalog scan of :class:`.topk.TopK` on a TensorFlow device: a GPU in a scoring actor.

The device computes each user's scores over the catalog chunk by chunk (one matmul), sets the
user's history items to -inf and keeps a running best ``keep`` per user with
``tf.math.top_k``; only those come back to the host, which re-scores them exactly and applies
the tie rule (:meth:`.topk.TopK._exact_top`). The output is then the CPU path's, item for item
and score for score, because the device's float32 dot products obey the error bound the host
uses to decide when to look further (:func:`.topk._score_bound`, any summation order).
TensorFloat-32 is turned off for that reason: its 10-bit products would not obey it.

Tested on CPU with the same code (the device being the CPU): tests/test_topk.py.
"""

from __future__ import annotations

import numpy as np

from .topk import EMPTY_KEY, TopK, _sorted_desc, encode_keys

# scores held on the device per chunk: users x items <= this many floats (128 MiB)
MAX_BLOCK = 1 << 25


class DeviceTopK(TopK):
    """:class:`.topk.TopK` whose fast pass runs on ``device`` (default: the first GPU, else
    the CPU). Same arguments and results; the item vectors are copied to the device once."""

    def __init__(self, item_table, *, device: str | None = None, max_block: int = MAX_BLOCK,
                 **kwargs):
        import tensorflow as tf

        super().__init__(item_table, **kwargs)
        tf.config.experimental.enable_tensor_float_32_execution(False)
        if device is None:
            device = "/GPU:0" if tf.config.list_logical_devices("GPU") else "/CPU:0"
        self.device, self.max_block = device, int(max_block)
        with tf.device(device):
            self._device_vectors = tf.constant(self.vectors)  # (n, d), rows as self.items
        self._merge = tf.function(_merge_chunk, reduce_retracing=True)

    def _fast_keys(self, users, keep, histories):
        import tensorflow as tf

        num_rows, n = users.shape[0], self.items.size
        width = max(keep, self.max_block // max(1, num_rows))  # items per chunk
        pos, rows = _sorted_pairs(self, histories)
        with tf.device(self.device):
            queries = tf.constant(users)
            best = tf.zeros((num_rows, 0), tf.float32)
            where = tf.zeros((num_rows, 0), tf.int32)
            for start in range(0, n, width):
                stop = min(n, start + width)
                a, b = np.searchsorted(pos, [start, stop])
                mask = np.stack([rows[a:b], pos[a:b] - start], axis=1).astype(np.int32)
                best, where = self._merge(queries, self._device_vectors[start:stop],
                                          tf.constant(start), tf.constant(mask), best, where,
                                          tf.constant(keep))
        scores, positions = best.numpy(), where.numpy()
        keys = encode_keys(scores, self.items[positions])
        keys[np.isneginf(scores)] = EMPTY_KEY  # history items (and padding when fewer)
        return _sorted_desc(keys)


def _sorted_pairs(topk: TopK, histories):
    """(positions in topk.items, rows) of the history items, sorted by position."""
    if histories is None:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    pos, rows = topk._history_positions(histories)
    order = np.argsort(pos, kind="stable")
    return pos[order], rows[order]


def _merge_chunk(users, vectors, start, mask, best, where, keep):
    """One chunk into the running best: users (B, d), vectors (C, d) from position ``start``,
    mask (M, 2) int32 (row, column) pairs set to -inf, best / where (B, k) the scores and
    positions so far -> the best min(keep, k + C) of both, (B, .) each."""
    import tensorflow as tf

    scores = tf.matmul(users, vectors, transpose_b=True)  # (B, C)
    scores = tf.tensor_scatter_nd_update(scores, mask,
                                         tf.fill([tf.shape(mask)[0]], float("-inf")))
    top, at = tf.math.top_k(scores, tf.minimum(keep, tf.shape(scores)[1]))  # (B, <= keep)
    scores = tf.concat([best, top], axis=1)
    positions = tf.concat([where, at + start], axis=1)
    top, at = tf.math.top_k(scores, tf.minimum(keep, tf.shape(scores)[1]))
    return top, tf.gather(positions, at, batch_dims=1)
