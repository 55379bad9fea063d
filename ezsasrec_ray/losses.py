"""Training objectives for SASRec, as pure functions returning a scalar tf loss.

Shared arguments:

* `seq_emb` (B, L, d): `SASRec.sequence_embeddings(inputs, training=True)`;
* `item_table` (N+1, d): `SASRec.item_embeddings()`, row 0 = padding;
* `positives` (B, L) int: the next item at each position, 0 = no target (masked out).

Every loss is the mean over the positions that have a target (0 when there are none).

| name              | negatives                            | reference                       |
|-------------------|--------------------------------------|---------------------------------|
| `bce`             | (B, L): one per position             | Kang & McAuley 2018 (SASRec)    |
| `sampled_softmax` | (B, M) per sequence or (M,) shared   | Yi et al. 2019 (log-q)          |
| `softmax`         | none: the whole catalog              | full cross-entropy              |
| `gbce`            | (B, k) per sequence (or (B, L, k))   | Petrov & Macdonald 2023         |

In the sampled losses a negative equal to the positive of its position, or equal to 0 (padding),
is ignored. `sample_negatives` draws negatives in numpy (uniform or by popularity).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

# -----------------------------------------------------------------------------
# helpers


def _float32_table(item_table):
    """item_table as float32; a float32 variable (or Keras variable) stays a tf.Variable, so
    gathering rows reads only those rows (ResourceGather, gradient IndexedSlices) instead of
    the whole table, which TF copies on every read once a variable is accessed by rows."""
    table = getattr(item_table, "value", None)  # a Keras variable's tf.Variable
    table = table if isinstance(table, tf.Variable) else item_table
    if isinstance(table, tf.Variable) and table.dtype == tf.float32:
        return table
    return tf.cast(table, tf.float32)


def _prepare(seq_emb, item_table, positives):
    """-> seq_emb (B, L, d) float32, item_table (N+1, d) float32 (tensor or variable),
    positives (B, L) int32, valid (B, L) float32 (1 where there is a target), n_valid scalar
    float32 (>= 1)."""
    seq_emb = tf.cast(seq_emb, tf.float32)
    item_table = _float32_table(item_table)
    positives = tf.cast(positives, tf.int32)
    valid = tf.cast(positives > 0, tf.float32)
    return seq_emb, item_table, positives, valid, tf.maximum(tf.reduce_sum(valid), 1.0)


def _positive_logits(seq_emb, item_table, positives):
    """(B, L, d), (N+1, d), (B, L) -> (B, L): score of the target at each position."""
    return tf.reduce_sum(seq_emb * tf.gather(item_table, positives), axis=-1)


def _negative_logits(seq_emb, item_table, negatives):
    """Scores of negatives at every position.

    negatives: (M,) shared by the batch, (B, M) shared by the positions of a sequence, or
    (B, L, M) per position -> logits (B, L, M) and negatives broadcast to (B, L, M).
    """
    negatives = tf.cast(negatives, tf.int32)
    neg_emb = tf.gather(item_table, negatives)  # negatives.shape + (d,)
    rank = negatives.shape.rank
    if rank == 1:
        logits = tf.einsum("bld,md->blm", seq_emb, neg_emb)
        negatives = negatives[None, None, :]
    elif rank == 2:
        logits = tf.einsum("bld,bmd->blm", seq_emb, neg_emb)
        negatives = negatives[:, None, :]
    elif rank == 3:
        logits = tf.einsum("bld,blmd->blm", seq_emb, neg_emb)
    else:
        raise ValueError(f"negatives must have rank 1, 2 or 3, got shape {negatives.shape}")
    return logits, tf.broadcast_to(negatives, tf.shape(logits))


def _masked_mean(per_position, valid, n_valid):
    """(B, L), (B, L), scalar -> scalar mean over the valid positions."""
    return tf.reduce_sum(per_position * valid) / n_valid


# -----------------------------------------------------------------------------
# losses


def bce_loss(seq_emb, item_table, positives, negatives):
    """SASRec's binary cross-entropy: -log s(pos) - log(1 - s(neg)), one negative per position.

    seq_emb (B, L, d), item_table (N+1, d), positives (B, L), negatives (B, L) -> scalar.
    """
    seq_emb, item_table, positives, valid, n_valid = _prepare(seq_emb, item_table, positives)
    negatives = tf.cast(negatives, tf.int32)
    pos_logits = _positive_logits(seq_emb, item_table, positives)  # (B, L)
    neg_logits = _positive_logits(seq_emb, item_table, negatives)  # (B, L)
    neg_ok = tf.cast((negatives != positives) & (negatives > 0), tf.float32)  # (B, L)
    # -log sigmoid(x) = softplus(-x);  -log(1 - sigmoid(x)) = softplus(x)
    per_position = tf.nn.softplus(-pos_logits) + neg_ok * tf.nn.softplus(neg_logits)
    return _masked_mean(per_position, valid, n_valid)


def sampled_softmax_loss(seq_emb, item_table, positives, negatives, log_q=None):
    """Cross-entropy of the positive against M sampled negatives.

    seq_emb (B, L, d), item_table (N+1, d), positives (B, L),
    negatives (B, M) shared by the positions of each sequence, or (M,) shared by the batch,
    log_q: optional (N+1,) log sampling probability of each item; when given, log_q[item] is
    subtracted from the positive and negative logits (Yi et al. 2019, "logQ correction")
    -> scalar.
    """
    seq_emb, item_table, positives, valid, n_valid = _prepare(seq_emb, item_table, positives)
    pos_logits = _positive_logits(seq_emb, item_table, positives)  # (B, L)
    neg_logits, negatives = _negative_logits(seq_emb, item_table, negatives)  # (B, L, M) x2
    if log_q is not None:
        log_q = tf.cast(log_q, tf.float32)  # (N+1,)
        pos_logits -= tf.gather(log_q, positives)
        neg_logits -= tf.gather(log_q, negatives)
    accidental = (negatives == positives[:, :, None]) | (negatives == 0)  # (B, L, M)
    neg_logits = tf.where(accidental, tf.constant(-np.inf, tf.float32), neg_logits)
    logits = tf.concat([pos_logits[:, :, None], neg_logits], axis=-1)  # (B, L, 1+M)
    per_position = tf.reduce_logsumexp(logits, axis=-1) - pos_logits  # (B, L)
    return _masked_mean(per_position, valid, n_valid)


def softmax_loss(seq_emb, item_table, positives, negatives=None):
    """Full cross-entropy over the catalog 1..N (row 0 excluded, i.e. its logit is -inf).

    seq_emb (B, L, d), item_table (N+1, d), positives (B, L) -> scalar.
    Logits are computed only at the V positions that have a target: (V, N).
    """
    seq_emb, item_table, positives, valid, n_valid = _prepare(seq_emb, item_table, positives)
    mask = positives > 0  # (B, L)
    h = tf.boolean_mask(seq_emb, mask)  # (V, d)
    targets = tf.boolean_mask(positives, mask) - 1  # (V,) index into items 1..N
    logits = tf.matmul(h, item_table[1:], transpose_b=True)  # (V, N)
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets, logits=logits)  # (V,)
    return tf.reduce_sum(ce) / n_valid


def gbce_loss(seq_emb, item_table, positives, negatives, t=0.75):
    """gSASRec's generalised BCE (Petrov & Macdonald, RecSys 2023).

        loss = -log(sigmoid(s+) ** beta) - sum_j log(1 - sigmoid(s-_j))
        beta = alpha * (t * (1 - 1/alpha) + 1/alpha),   alpha = k / (N - 1)

    with k negatives per positive (the sampling rate alpha) and calibration t in [0, 1]:
    t = 0 is plain BCE (beta = 1), t = 1 gives beta = alpha. (The authors' code additionally
    divides by k + 1; the paper's sum is used here.)

    seq_emb (B, L, d), item_table (N+1, d), positives (B, L),
    negatives (B, k) per sequence (or (k,) or (B, L, k)) -> scalar.
    """
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"gbce t must be in [0, 1], got {t}")
    rows = item_table.shape[0]
    if rows is not None and rows - 1 < 2:
        raise ValueError(f"gbce needs at least 2 items, got {rows - 1}")
    seq_emb, item_table, positives, valid, n_valid = _prepare(seq_emb, item_table, positives)
    num_items = tf.cast(tf.shape(item_table)[0] - 1, tf.float32)
    pos_logits = _positive_logits(seq_emb, item_table, positives)  # (B, L)
    neg_logits, negatives = _negative_logits(seq_emb, item_table, negatives)  # (B, L, k) x2
    k = tf.cast(tf.shape(neg_logits)[-1], tf.float32)
    alpha = k / (num_items - 1)  # sampling rate
    beta = alpha * (t * (1.0 - 1.0 / alpha) + 1.0 / alpha)
    neg_ok = tf.cast((negatives != positives[:, :, None]) & (negatives > 0), tf.float32)
    # -log(sigmoid(s)^beta) = beta * softplus(-s);  -log(1 - sigmoid(s)) = softplus(s)
    per_position = (beta * tf.nn.softplus(-pos_logits)
                    + tf.reduce_sum(neg_ok * tf.nn.softplus(neg_logits), axis=-1))  # (B, L)
    return _masked_mean(per_position, valid, n_valid)


LOSSES = {
    "bce": bce_loss,
    "sampled_softmax": sampled_softmax_loss,
    "softmax": softmax_loss,
    "gbce": gbce_loss,
}


# Negatives each loss takes: one per position (bce), a shared set per user (sampled_softmax,
# gbce) or none (softmax scores the whole catalog).
NEGATIVES = {"bce": "per_position", "sampled_softmax": "per_user", "gbce": "per_user",
             "softmax": None}


def get_loss(name: str):
    """The loss function registered under name (one of LOSSES)."""
    try:
        return LOSSES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown loss {name!r}; valid names are {sorted(LOSSES)}") from None


def make_loss(name: str, *, log_q=None, gbce_t: float = 0.75):
    """The loss ``name`` as ``(seq_emb, item_table, positives, negatives) -> scalar``, its
    options bound, so a training step never branches on the name."""
    fn = get_loss(name)
    if name == "sampled_softmax":
        return lambda seq, table, pos, neg: fn(seq, table, pos, neg, log_q=log_q)
    if name == "gbce":
        return lambda seq, table, pos, neg: fn(seq, table, pos, neg, t=gbce_t)
    return fn


def negative_shape(name: str, positives_shape, num_negatives: int) -> tuple:
    """Shape of the negatives a batch needs for loss ``name`` ((1, 1) placeholder: none)."""
    kind = NEGATIVES[name]
    if kind == "per_position":
        return tuple(positives_shape)
    if kind == "per_user":
        return (positives_shape[0], num_negatives)
    return (1, 1)


# -----------------------------------------------------------------------------
# negative sampling


def sample_negatives(rng, shape, num_items: int, probs=None) -> np.ndarray:
    """Random item indices in 1..num_items, int32 array of the given shape.

    rng: np.random.Generator (or a seed / None); probs: None for uniform, else non-negative
    weights per item, length num_items (items 1..N) or num_items + 1 (indexed by item; entry 0
    is ignored), e.g. counts ** 0.75. Vectorized (inverse CDF), no rejection loop.
    """
    rng = np.random.default_rng(rng)
    if num_items < 1:
        raise ValueError(f"num_items must be >= 1, got {num_items}")
    if probs is None:
        return rng.integers(1, num_items + 1, size=shape, dtype=np.int32)
    p = np.asarray(probs, dtype=np.float64).ravel()
    if p.size == num_items + 1:
        p = p[1:]
    if p.size != num_items:
        raise ValueError(
            f"probs must have length num_items ({num_items}) or num_items + 1, got {p.size}")
    if not np.all(np.isfinite(p)) or np.any(p < 0) or p.sum() <= 0:
        raise ValueError("probs must be finite, non-negative and not all zero")
    cdf = np.cumsum(p)
    cdf /= cdf[-1]  # the last positive-weight item ends exactly at 1.0
    u = rng.random(size=shape)  # [0, 1)
    return (np.searchsorted(cdf, u, side="right") + 1).astype(np.int32)
