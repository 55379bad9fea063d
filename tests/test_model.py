"""SASRec model: config validation, shapes, causality, padding/trimming invariance, files."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from ezsasrec_ray.model import (
    SASRec,
    SASRecConfig,
    build_model,
    load_model_files,
    save_model_files,
)

CONFIG = SASRecConfig(num_items=30, maxlen=8, dim=16, blocks=2, heads=2, dropout=0.2)


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(1234)
    return build_model(CONFIG)


def histories():
    """(3, 8) left-padded histories: 4 items, 8 items, 1 item."""
    return np.array([
        [0, 0, 0, 0, 3, 7, 1, 30],
        [5, 6, 7, 8, 9, 10, 11, 12],
        [0, 0, 0, 0, 0, 0, 0, 4],
    ], dtype=np.int32)


# -----------------------------------------------------------------------------
# config


@pytest.mark.parametrize("field,value", [
    ("num_items", 0), ("maxlen", 1), ("dim", 0), ("heads", 0), ("heads", 3), ("blocks", 0),
    ("dropout", -0.1), ("dropout", 1.0), ("l2", -1.0), ("dim", 2.5), ("maxlen", True),
])
def test_config_rejects_bad_values(field, value):
    kwargs = {"num_items": 10, "dim": 16, field: value}
    with pytest.raises(ValueError, match=field):
        SASRecConfig(**kwargs)


def test_config_dict_round_trip():
    c = SASRecConfig(num_items=7, maxlen=5, dim=8, heads=4, l2=1e-4)
    assert SASRecConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown SASRecConfig keys.*'hidden'"):
        SASRecConfig.from_dict({**c.to_dict(), "hidden": 3})
    with pytest.raises(ValueError, match="num_items"):
        SASRecConfig.from_dict({"maxlen": 5})


# -----------------------------------------------------------------------------
# outputs


def test_shapes_and_user_embedding_is_last_position(model):
    h = histories()
    assert model.config == CONFIG
    assert tuple(model.item_embeddings().shape) == (CONFIG.num_items + 1, CONFIG.dim)
    seq = model.sequence_embeddings(h).numpy()
    assert seq.shape == (3, 8, CONFIG.dim)
    assert model(h[:, 3:]).shape == (3, 5, CONFIG.dim)
    user = model.user_embeddings(h).numpy()
    assert user.shape == (3, CONFIG.dim)
    np.testing.assert_allclose(user, seq[:, -1], atol=1e-5)
    # numpy int64 and tensors give the same result
    np.testing.assert_allclose(model.user_embeddings(h.astype(np.int64)).numpy(), user, atol=1e-6)
    np.testing.assert_allclose(model.user_embeddings(tf.constant(h)).numpy(), user, atol=1e-6)
    assert model.user_embeddings(h, training=True).shape == (3, CONFIG.dim)


def test_trimming_invariance(model):
    h = histories()[:1]  # 4 real items in width 8
    full = model.user_embeddings(h).numpy()
    for width in (5, 4):
        np.testing.assert_allclose(model.user_embeddings(h[:, -width:]).numpy(), full, atol=1e-5)
    seq_full = model.sequence_embeddings(h).numpy()
    seq_trim = model.sequence_embeddings(h[:, -5:]).numpy()
    np.testing.assert_allclose(seq_trim[:, 1:], seq_full[:, 4:], atol=1e-5)  # real positions


def test_wider_than_maxlen_keeps_most_recent_columns(model):
    h = histories()
    wide = np.concatenate([np.full((3, 4), 9, dtype=np.int32), h], axis=1)  # (3, 12)
    np.testing.assert_allclose(model.user_embeddings(wide).numpy(),
                               model.user_embeddings(h).numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="maxlen"):
        model.sequence_embeddings(wide)


def test_causality(model):
    h = histories()
    changed = h.copy()
    changed[:, 5] = [2, 2, 0]  # change column 5 of the first two rows (the third stays padding)
    a = model.sequence_embeddings(h).numpy()
    b = model.sequence_embeddings(changed).numpy()
    np.testing.assert_allclose(a[:, :5], b[:, :5], atol=1e-6)  # earlier positions unchanged
    assert np.abs(a[:2, 5:] - b[:2, 5:]).max() > 1e-4  # later positions see the change
    np.testing.assert_allclose(a[2], b[2], atol=1e-6)


def test_padding_invariance(model):
    h = histories()
    before_user = model.user_embeddings(h).numpy()
    before_seq = model.sequence_embeddings(h).numpy()
    table = model.item_emb.embeddings
    saved = table.numpy()
    try:  # the padding row must not influence anything
        table.assign(np.concatenate([np.full((1, CONFIG.dim), 5.0, np.float32), saved[1:]]))
        np.testing.assert_allclose(model.user_embeddings(h).numpy(), before_user, atol=1e-6)
        after_seq = model.sequence_embeddings(h).numpy()
        real = h > 0
        np.testing.assert_allclose(after_seq[real], before_seq[real], atol=1e-6)
    finally:
        table.assign(saved)
    # the user embedding of a history does not depend on the batch it is in
    np.testing.assert_allclose(model.user_embeddings(h[2:]).numpy(), before_user[2:], atol=1e-5)


def test_eval_deterministic_training_stochastic(model):
    h = histories()
    np.testing.assert_array_equal(model.user_embeddings(h).numpy(),
                                  model.user_embeddings(h).numpy())
    a = model.sequence_embeddings(h, training=True).numpy()
    b = model.sequence_embeddings(h, training=True).numpy()
    assert np.abs(a - b).max() > 1e-6


def test_gradients_reach_every_weight(model):
    h = histories()
    with tf.GradientTape() as tape:
        seq = model.sequence_embeddings(h, training=True)
        loss = tf.reduce_sum(tf.matmul(seq[:, -1], model.item_embeddings(), transpose_b=True))
    grads = tape.gradient(loss, model.trainable_variables)
    assert all(g is not None for g in grads)
    assert all(np.all(np.isfinite(tf.convert_to_tensor(g).numpy())) for g in grads)


def test_regularization_loss():
    c = SASRecConfig(num_items=5, maxlen=4, dim=8, l2=0.1)
    m = build_model(c)
    expected = 0.1 * (np.sum(m.item_emb.embeddings.numpy() ** 2)
                      + np.sum(m.pos_emb.embeddings.numpy() ** 2))
    np.testing.assert_allclose(float(m.regularization_loss()), expected, rtol=1e-5)
    assert float(build_model(SASRecConfig(num_items=5, maxlen=4, dim=8)).regularization_loss()) == 0


# Keras' h5 writer triggers a numpy 2 DeprecationWarning internally
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_save_load_round_trip(model, tmp_path):
    directory = save_model_files(model, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json",
                                                                  "model.weights.h5"]
    loaded = load_model_files(directory)
    assert isinstance(loaded, SASRec)
    assert loaded.config == model.config
    h = histories()
    np.testing.assert_array_equal(loaded.user_embeddings(h).numpy(),
                                  model.user_embeddings(h).numpy())


def test_last_only_equals_last_row_of_the_full_pass():
    """user_embeddings runs the last block for the last position only: same values as the
    last row of the full pass, for several heads, widths, and an empty history."""
    config = SASRecConfig(num_items=50, maxlen=12, dim=16, blocks=3, heads=4, dropout=0.3)
    model = build_model(config)
    rng = np.random.default_rng(3)
    for width in (1, 5, 12):
        h = rng.integers(1, 51, (6, width)).astype(np.int32)
        h[0] = 0  # empty history
        h[1, : width - 1] = 0  # one item
        full = model.sequence_embeddings(h).numpy()[:, -1]
        last = model.sequence_embeddings(h, last_only=True).numpy()
        assert last.shape == (6, 1, 16)
        np.testing.assert_allclose(last[:, 0], full, atol=1e-5)
        np.testing.assert_allclose(model.user_embeddings(h).numpy(), full, atol=1e-5)
