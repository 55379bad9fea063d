"""SASRec (Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018) in Keras 3.

One file, nanoGPT style. Conventions used everywhere in the package:

* items are indexed 1..N, 0 is padding;
* a history is a row of an int array (B, W), W <= maxlen, LEFT-padded with 0, most recent item
  in the last column;
* positions are counted from the RIGHT end: the last column always uses positional row
  maxlen - 1, so a history trimmed on the left (to drop all-padding columns) gives exactly the
  same outputs as the full-width one.

`SASRec.user_embeddings` is the one function that represents a user (training, evaluation, batch
scoring and online serving all call it); a score is the dot product of a user embedding with a row
of `SASRec.item_embeddings()` (the input item table, shared with the output).

Files: `save_model_files(model, dir)` writes `config.json` + `model.weights.h5` (no pickle);
`load_model_files(dir)` reads them back.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import asdict, dataclass, fields

import keras
import numpy as np
import tensorflow as tf

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.weights.h5"


# -----------------------------------------------------------------------------
# config


@dataclass
class SASRecConfig:
    num_items: int  # N: items are 1..N, row 0 of the item table is padding
    maxlen: int = 50  # longest history the model looks at
    dim: int = 64  # embedding / hidden size
    blocks: int = 2  # number of transformer blocks
    heads: int = 1  # attention heads (dim % heads == 0)
    dropout: float = 0.2
    l2: float = 0.0  # L2 penalty on the embedding tables, see SASRec.regularization_loss

    def __post_init__(self):
        for name in ("num_items", "maxlen", "dim", "blocks", "heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"SASRecConfig.{name} must be an integer, got {value!r}")
            setattr(self, name, int(value))
        for name in ("dropout", "l2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"SASRecConfig.{name} must be a number, got {value!r}")
            setattr(self, name, float(value))
        if self.num_items < 1:
            raise ValueError(f"SASRecConfig.num_items must be >= 1, got {self.num_items}")
        if self.maxlen < 2:
            raise ValueError(f"SASRecConfig.maxlen must be >= 2, got {self.maxlen}")
        if self.dim < 1:
            raise ValueError(f"SASRecConfig.dim must be >= 1, got {self.dim}")
        if self.blocks < 1:
            raise ValueError(f"SASRecConfig.blocks must be >= 1, got {self.blocks}")
        if self.heads < 1:
            raise ValueError(f"SASRecConfig.heads must be >= 1, got {self.heads}")
        if self.dim % self.heads:
            raise ValueError(
                f"SASRecConfig.dim ({self.dim}) must be divisible by heads, got {self.heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"SASRecConfig.dropout must be in [0, 1), got {self.dropout}")
        if not self.l2 >= 0.0:  # also rejects nan
            raise ValueError(f"SASRecConfig.l2 must be >= 0, got {self.l2}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SASRecConfig:
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ValueError(f"unknown SASRecConfig keys {unknown}; valid keys are {valid}")
        if "num_items" not in d:
            raise ValueError("SASRecConfig.num_items is required")
        return cls(**d)


# -----------------------------------------------------------------------------
# layers


class CausalSelfAttention(keras.layers.Layer):
    """Multi-head causal self-attention that also never attends to padding keys."""

    def __init__(self, dim: int, heads: int, dropout: float, **kwargs):
        super().__init__(**kwargs)
        self.dim, self.heads = dim, heads
        self.qkv = keras.layers.Dense(3 * dim, name="qkv")  # q, k, v projections in one matmul
        self.proj = keras.layers.Dense(dim, name="proj")
        self.attn_dropout = keras.layers.Dropout(dropout)

    def call(self, x, valid, training=False):
        """x: (B, W, dim) float, valid: (B, W) bool (False = padding) -> (B, W, dim)."""
        B, W = tf.shape(x)[0], tf.shape(x)[1]
        hd = self.dim // self.heads

        def split_heads(t):  # (B, W, dim) -> (B, heads, W, hd)
            return tf.transpose(tf.reshape(t, (B, W, self.heads, hd)), (0, 2, 1, 3))

        q, k, v = tf.split(self.qkv(x), 3, axis=-1)  # 3 x (B, W, dim)
        q, k, v = split_heads(q), split_heads(k), split_heads(v)
        att = tf.matmul(q, k, transpose_b=True) * (1.0 / math.sqrt(hd))  # (B, heads, W, W)
        causal = tf.linalg.band_part(tf.ones((W, W)), -1, 0) > 0  # (W, W) lower triangle
        mask = causal[None, None, :, :] & valid[:, None, None, :]  # (B, 1, W, W)
        att = tf.where(mask, att, att.dtype.min)
        att = tf.nn.softmax(att, axis=-1)
        att = tf.where(mask, att, tf.zeros_like(att))  # rows of padding queries: all zero
        att = self.attn_dropout(att, training=training)
        y = tf.matmul(att, v)  # (B, heads, W, hd)
        y = tf.reshape(tf.transpose(y, (0, 2, 1, 3)), (B, W, self.dim))  # (B, W, dim)
        return self.proj(y)


class Block(keras.layers.Layer):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + ffn(ln(x))."""

    def __init__(self, dim: int, heads: int, dropout: float, **kwargs):
        super().__init__(**kwargs)
        self.ln_1 = keras.layers.LayerNormalization(epsilon=1e-6, name="ln_1")
        self.attn = CausalSelfAttention(dim, heads, dropout, name="attn")
        self.ln_2 = keras.layers.LayerNormalization(epsilon=1e-6, name="ln_2")
        self.fc = keras.layers.Dense(dim, activation="relu", name="fc")
        self.fc_proj = keras.layers.Dense(dim, name="fc_proj")
        self.dropout_1 = keras.layers.Dropout(dropout)
        self.dropout_2 = keras.layers.Dropout(dropout)
        self.dropout_3 = keras.layers.Dropout(dropout)

    def call(self, x, valid, training=False):
        """x: (B, W, dim), valid: (B, W) bool -> (B, W, dim)."""
        x = x + self.dropout_1(self.attn(self.ln_1(x), valid, training=training),
                               training=training)
        h = self.dropout_2(self.fc(self.ln_2(x)), training=training)
        return x + self.dropout_3(self.fc_proj(h), training=training)


# -----------------------------------------------------------------------------
# model


class SASRec(keras.Model):
    """SASRec: item embeddings + positions -> causal transformer -> one vector per position."""

    def __init__(self, config: SASRecConfig, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        init = keras.initializers.TruncatedNormal(stddev=0.02)
        self.item_emb = keras.layers.Embedding(
            config.num_items + 1, config.dim, embeddings_initializer=init, name="item_emb")
        self.pos_emb = keras.layers.Embedding(
            config.maxlen, config.dim, embeddings_initializer=init, name="pos_emb")
        self.emb_dropout = keras.layers.Dropout(config.dropout)
        self.blocks = [Block(config.dim, config.heads, config.dropout, name=f"block_{i}")
                       for i in range(config.blocks)]
        self.ln_f = keras.layers.LayerNormalization(epsilon=1e-6, name="ln_f")

    def get_config(self):
        return {"config": self.config.to_dict(), "name": self.name}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        return cls(SASRecConfig.from_dict(config.pop("config")), **config)

    def call(self, histories, training=False):
        return self.sequence_embeddings(histories, training=training)

    def sequence_embeddings(self, histories, training=False):
        """Representation at every position.

        histories: (B, W) int, W <= maxlen, left-padded with 0 -> (B, W, dim) float.
        Output t only depends on histories[:, :t+1] and not on padding (nor on the width W).
        """
        h = tf.cast(tf.convert_to_tensor(histories), tf.int32)  # (B, W)
        if h.shape.rank != 2:
            raise ValueError(f"histories must be 2-D (batch, width), got shape {h.shape}")
        if h.shape[1] is not None and h.shape[1] > self.config.maxlen:
            raise ValueError(
                f"histories width {h.shape[1]} > maxlen {self.config.maxlen}; "
                "use user_embeddings (keeps the last maxlen columns) or trim the input")
        maxlen, W = self.config.maxlen, tf.shape(h)[1]
        valid = h > 0  # (B, W)
        x = self._item_vectors(h) * math.sqrt(self.config.dim)  # (B, W, dim)
        mask = tf.cast(valid, x.dtype)[:, :, None]  # (B, W, 1)
        x = x + self.pos_emb(tf.range(maxlen - W, maxlen))[None]  # positions from the right
        x = self.emb_dropout(x, training=training) * mask  # padding (and item row 0) -> 0
        for block in self.blocks:
            x = block(x, valid, training=training) * mask
        return self.ln_f(x)  # (B, W, dim)

    def _item_vectors(self, histories):
        """``item_emb(histories)``: (B, W) int32 -> (B, W, dim), the same values, read with a
        row gather on the variable (ResourceGather), as the training losses do: once a variable
        is accessed by rows, TF copies all of it on every whole-table read (copy-on-read)."""
        table = self.item_emb.embeddings.value if self.item_emb.built else None
        if not isinstance(table, tf.Variable):  # not built yet, or a mixed-precision cast
            return self.item_emb(histories)
        return tf.cast(tf.gather(table, histories), self.item_emb.compute_dtype)

    def user_embeddings(self, histories, training=False):
        """THE user representation: the output at the last position.

        histories: (B, W) int numpy array or tensor, left-padded with 0 -> (B, dim) float tensor.
        Any W works: a width over maxlen keeps the last (most recent) maxlen columns.
        In inference mode this runs a compiled tf.function (one trace for all shapes).
        """
        if isinstance(histories, tf.Tensor):
            h = tf.cast(histories, tf.int32)
        else:
            h = tf.convert_to_tensor(np.asarray(histories, dtype=np.int32))
        if h.shape.rank != 2:
            raise ValueError(f"histories must be 2-D (batch, width), got shape {h.shape}")
        if h.shape[1] == 0:
            raise ValueError("histories must have at least one column")
        h = h[:, -self.config.maxlen:]  # (B, min(W, maxlen))
        if training:
            return self.sequence_embeddings(h, training=True)[:, -1, :]
        return self._user_embeddings_inference(h)

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32)])
    def _user_embeddings_inference(self, histories):
        return self.sequence_embeddings(histories, training=False)[:, -1, :]  # (B, dim)

    def item_embeddings(self):
        """The item table (num_items + 1, dim), row 0 = padding (never a valid item)."""
        return self.item_emb.embeddings

    def regularization_loss(self):
        """Scalar l2 * (||item table||^2 + ||positional table||^2); 0 when config.l2 == 0."""
        if self.config.l2 == 0.0:
            return tf.constant(0.0)
        return self.config.l2 * (tf.reduce_sum(tf.square(self.item_emb.embeddings))
                                 + tf.reduce_sum(tf.square(self.pos_emb.embeddings)))


def build_model(config: SASRecConfig) -> SASRec:
    """A SASRec with its weights created (called once on a dummy batch)."""
    model = SASRec(config)
    model(np.zeros((1, config.maxlen), dtype=np.int32), training=False)
    return model


# -----------------------------------------------------------------------------
# files


def save_model_files(model: SASRec, directory) -> str:
    """Write `config.json` and `model.weights.h5` into directory (created); returns it."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(model.config.to_dict(), f, indent=2, sort_keys=True)
    model.save_weights(os.path.join(directory, WEIGHTS_FILE))
    return directory


def load_model_files(directory) -> SASRec:
    """Inverse of save_model_files."""
    directory = os.fspath(directory)
    with open(os.path.join(directory, CONFIG_FILE)) as f:
        config = SASRecConfig.from_dict(json.load(f))
    model = build_model(config)
    model.load_weights(os.path.join(directory, WEIGHTS_FILE))
    return model
