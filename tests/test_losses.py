"""Training losses against numpy references, masking rules, a few optimisation steps."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from ezsasrec_ray.losses import (
    LOSSES,
    bce_loss,
    gbce_loss,
    get_loss,
    sample_negatives,
    sampled_softmax_loss,
    softmax_loss,
)
from ezsasrec_ray.model import SASRecConfig, build_model

N, D = 9, 4


def softplus(x):
    return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0)


def logsumexp(x):
    m = x.max()
    return m + np.log(np.exp(x - m).sum())


@pytest.fixture
def toy():
    rng = np.random.default_rng(0)
    seq = rng.normal(size=(2, 3, D)).astype(np.float32)
    table = rng.normal(size=(N + 1, D)).astype(np.float32)
    positives = np.array([[0, 4, 2], [7, 0, 9]], dtype=np.int32)  # 4 targets
    return seq, table, positives


def valid_positions(positives):
    return [(b, t) for b in range(positives.shape[0]) for t in range(positives.shape[1])
            if positives[b, t] > 0]


def test_bce_matches_reference(toy):
    seq, table, pos = toy
    neg = np.array([[3, 5, 1], [2, 8, 6]], dtype=np.int32)
    expected = np.mean([softplus(-seq[b, t] @ table[pos[b, t]])
                        + softplus(seq[b, t] @ table[neg[b, t]])
                        for b, t in valid_positions(pos)])
    np.testing.assert_allclose(float(bce_loss(seq, table, pos, neg)), expected, rtol=1e-5)


def test_softmax_matches_reference_and_excludes_padding(toy):
    seq, table, pos = toy
    expected = np.mean([logsumexp(table[1:] @ seq[b, t]) - table[pos[b, t]] @ seq[b, t]
                        for b, t in valid_positions(pos)])
    loss = float(softmax_loss(seq, table, pos))
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    huge_padding_row = table.copy()
    huge_padding_row[0] = 100.0 * seq.mean(axis=(0, 1))  # would dominate if it were a logit
    np.testing.assert_allclose(float(softmax_loss(seq, huge_padding_row, pos)), loss, rtol=1e-6)


def test_sampled_softmax_matches_reference_with_log_q(toy):
    seq, table, pos = toy
    neg = np.array([[3, 5, 1], [2, 8, 6]], dtype=np.int32)  # (B, M) per sequence
    log_q = np.log(np.linspace(0.5, 1.5, N + 1) / 10).astype(np.float32)

    def reference(shared):
        out = []
        for b, t in valid_positions(pos):
            items = np.concatenate([[pos[b, t]], neg if shared else neg[b]])
            logits = table[items] @ seq[b, t] - log_q[items]
            out.append(logsumexp(logits) - logits[0])
        return np.mean(out)

    got = float(sampled_softmax_loss(seq, table, pos, neg, log_q=log_q))
    np.testing.assert_allclose(got, reference(shared=False), rtol=1e-5)
    neg = neg[0]  # (M,) shared by the batch
    got = float(sampled_softmax_loss(seq, table, pos, neg, log_q=log_q))
    np.testing.assert_allclose(got, reference(shared=True), rtol=1e-5)


def test_sampled_softmax_masks_accidental_positives(toy):
    seq, table, _ = toy
    pos = np.array([[0, 4, 0], [0, 0, 9]], dtype=np.int32)  # one target per sequence
    clean = np.array([[3, 5], [1, 8]], dtype=np.int32)
    # each row also samples its own positive (twice in row 1) and the padding index
    dirty = np.array([[3, 4, 5, 0], [9, 1, 8, 9]], dtype=np.int32)
    np.testing.assert_allclose(float(sampled_softmax_loss(seq, table, pos, dirty)),
                               float(sampled_softmax_loss(seq, table, pos, clean)), rtol=1e-6)


@pytest.mark.parametrize("t", [0.0, 0.5, 0.75, 1.0])
def test_gbce_matches_paper_formula(toy, t):
    seq, table, pos = toy
    neg = np.array([[3, 5, 1], [2, 8, 6]], dtype=np.int32)  # (B, k), k = 3
    alpha = 3 / (N - 1)
    beta = alpha * (t * (1 - 1 / alpha) + 1 / alpha)
    sigmoid = 1 / (1 + np.exp(-np.float64(seq) @ np.float64(table).T))  # (B, L, N+1)
    expected = np.mean([-np.log(sigmoid[b, t_, pos[b, t_]] ** beta)
                        - np.sum(np.log(1 - sigmoid[b, t_, neg[b]]))
                        for b, t_ in valid_positions(pos)])
    got = float(gbce_loss(seq, table, pos, neg, t=t))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    if t == 0.0:  # beta = 1: plain BCE with k negatives
        assert beta == pytest.approx(1.0)
    if t == 1.0:
        assert beta == pytest.approx(alpha)


def test_no_targets_gives_zero(toy):
    seq, table, _ = toy
    pos = np.zeros((2, 3), dtype=np.int32)
    neg = np.ones((2, 3), dtype=np.int32)
    assert float(bce_loss(seq, table, pos, neg)) == 0.0
    assert float(softmax_loss(seq, table, pos)) == 0.0
    assert float(sampled_softmax_loss(seq, table, pos, neg)) == 0.0
    assert float(gbce_loss(seq, table, pos, neg)) == 0.0


def test_registry():
    assert set(LOSSES) == {"bce", "sampled_softmax", "softmax", "gbce"}
    assert get_loss("gbce") is gbce_loss
    with pytest.raises(ValueError, match="unknown loss 'ce'.*bce.*gbce.*sampled_softmax.*softmax"):
        get_loss("ce")


def loss_args(name, rng, inputs, positives, num_items):
    """Extra arguments (the negatives) each loss needs."""
    B, L = positives.shape
    if name == "bce":
        return (sample_negatives(rng, (B, L), num_items),)
    if name == "softmax":
        return ()
    return (sample_negatives(rng, (B, 5), num_items),)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_decreases_with_adam(name):
    keras.utils.set_random_seed(0)
    model = build_model(SASRecConfig(num_items=20, maxlen=6, dim=16, dropout=0.0))
    inputs = np.array([[0, 1, 2, 3, 4, 5], [0, 0, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    positives = np.array([[0, 2, 3, 4, 5, 6], [0, 0, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17]])
    args = loss_args(name, np.random.default_rng(0), inputs, positives, 20)
    loss_fn = get_loss(name)
    opt = keras.optimizers.Adam(learning_rate=0.01)
    losses = []
    for _ in range(6):
        with tf.GradientTape() as tape:
            seq = model.sequence_embeddings(inputs, training=True)
            loss = loss_fn(seq, model.item_embeddings(), positives, *args)
        grads = tape.gradient(loss, model.trainable_variables)
        assert all(np.all(np.isfinite(tf.convert_to_tensor(g))) for g in grads if g is not None)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        losses.append(float(loss))
    assert np.all(np.isfinite(losses)) and losses[0] > 0
    assert losses[-1] < losses[0]


def test_sample_negatives():
    rng = np.random.default_rng(0)
    s = sample_negatives(rng, (50, 7), 5)
    assert s.shape == (50, 7) and s.dtype == np.int32
    assert s.min() == 1 and s.max() == 5
    np.testing.assert_array_equal(sample_negatives(1, 20, 5), sample_negatives(1, 20, 5))
    probs = np.array([0.0, 3.0, 0.0, 1.0, 0.0])  # items 1..5
    s = sample_negatives(rng, 20000, 5, probs)
    assert set(np.unique(s)) == {2, 4}
    assert abs(np.mean(s == 2) - 0.75) < 0.02
    with_padding_entry = np.concatenate([[123.0], probs])  # length N + 1, entry 0 ignored
    assert set(np.unique(sample_negatives(rng, 1000, 5, with_padding_entry))) == {2, 4}
    assert set(np.unique(sample_negatives(rng, 100, 5, [0, 0, 0, 0, 1]))) == {5}
    for bad in ([1, 2], [0, 0, 0, 0, 0], [1, -1, 1, 1, 1], [1, np.nan, 1, 1, 1]):
        with pytest.raises(ValueError, match="probs"):
            sample_negatives(rng, 3, 5, bad)
