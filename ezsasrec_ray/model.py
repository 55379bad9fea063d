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

import numpy as np

from .model_io import CONFIG_FILE, WEIGHTS_FILE
from .runtime import quiet_native_logs

with quiet_native_logs():  # TensorFlow's C++ start-up lines go to the debug log
    import keras
    import tensorflow as tf

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

    def call(self, x, valid, training=False, last_only=False):
        """x: (B, W, dim) float, valid: (B, W) bool (False = padding) -> (B, W, dim).

        ``last_only``: only the last position queries (it attends to every valid key): the
        output is (B, 1, dim), equal to the last row of the full output, at a fraction of the
        cost (inference of user embeddings needs nothing else)."""
        B, W = tf.shape(x)[0], tf.shape(x)[1]
        Q = 1 if last_only else W  # query positions
        hd = self.dim // self.heads

        def split_heads(t, n):  # (B, n, dim) -> (B, heads, n, hd)
            return tf.transpose(tf.reshape(t, (B, n, self.heads, hd)), (0, 2, 1, 3))

        if last_only:  # q of the last position, k and v of all: the qkv kernel split
            kernel, bias = self.qkv.kernel, self.qkv.bias  # (dim, 3 dim), (3 dim,)
            q = tf.matmul(x[:, -1, :], kernel[:, :self.dim]) + bias[:self.dim]  # (B, dim)
            q = q[:, None, :]  # (B, 1, dim)
            k, v = tf.split(tf.matmul(x, kernel[:, self.dim:]) + bias[self.dim:], 2, axis=-1)
            mask = valid[:, None, None, :]  # (B, 1, 1, W): the last query sees every key
        else:
            q, k, v = tf.split(self.qkv(x), 3, axis=-1)  # 3 x (B, W, dim)
            causal = tf.linalg.band_part(tf.ones((W, W)), -1, 0) > 0  # (W, W) lower triangle
            mask = causal[None, None, :, :] & valid[:, None, None, :]  # (B, 1, W, W)
        q, k, v = split_heads(q, Q), split_heads(k, W), split_heads(v, W)
        att = tf.matmul(q, k, transpose_b=True) * (1.0 / math.sqrt(hd))  # (B, heads, Q, W)
        att = tf.where(mask, att, att.dtype.min)
        att = tf.nn.softmax(att, axis=-1)
        att = tf.where(mask, att, tf.zeros_like(att))  # rows of padding queries: all zero
        att = self.attn_dropout(att, training=training)
        y = tf.matmul(att, v)  # (B, heads, Q, hd)
        y = tf.reshape(tf.transpose(y, (0, 2, 1, 3)), (B, Q, self.dim))  # (B, Q, dim)
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

    def call(self, x, valid, training=False, last_only=False):
        """x: (B, W, dim), valid: (B, W) bool -> (B, W, dim); (B, 1, dim) with ``last_only``
        (the last position's output only: its attention still reads every position)."""
        y = self.attn(self.ln_1(x), valid, training=training, last_only=last_only)
        if last_only:
            x = x[:, -1:, :]  # (B, 1, dim)
        x = x + self.dropout_1(y, training=training)
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

    def sequence_embeddings(self, histories, training=False, last_only=False):
        """Representation at every position.

        histories: (B, W) int, W <= maxlen, left-padded with 0 -> (B, W, dim) float.
        Output t only depends on histories[:, :t+1] and not on padding (nor on the width W).
        ``last_only``: the last block and the final LayerNorm run for the last position only
        -> (B, 1, dim) (what ``user_embeddings`` needs; the earlier blocks run in full).
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
        for i, block in enumerate(self.blocks):
            last = last_only and i == len(self.blocks) - 1
            x = block(x, valid, training=training, last_only=last)
            x = x * (mask[:, -1:] if last else mask)
        return self.ln_f(x)  # (B, W, dim), or (B, 1, dim) with last_only

    def _item_vectors(self, histories):
        """``item_emb(histories)``: (B, W) int32 -> (B, W, dim), the same values, read with a
        row gather on the variable (ResourceGather), as the training losses do: once a variable
        is accessed by rows, TF copies all of it on every whole-table read (copy-on-read)."""
        table = self.item_emb.embeddings.value if self.item_emb.built else None
        if not isinstance(table, tf.Variable):  # not built yet, or a mixed-precision cast
            return self.item_emb(histories)
        return tf.cast(tf.gather(table, histories), self.item_emb.compute_dtype)

    def user_embeddings(self, histories, training=False, jit_compile=False):
        """THE user representation: the output at the last position.

        histories: (B, W) int numpy array or tensor, left-padded with 0 -> (B, dim) float tensor.
        Any W works: a width over maxlen keeps the last (most recent) maxlen columns.
        In inference mode this runs a compiled tf.function (one trace for all shapes);
        ``jit_compile=True`` runs it through XLA instead, which fuses the many small ops (about
        2x faster on CPU at dim 64) but compiles once per input shape: for callers with a few
        fixed shapes (:func:`.encoder.user_vectors`). Values differ from the plain graph's by
        float32 rounding only.
        """
        if isinstance(histories, tf.Tensor):
            h = tf.cast(histories, tf.int32)
        else:
            h = tf.convert_to_tensor(np.asarray(histories, dtype=np.int32))
        if h.shape.rank != 2:
            raise ValueError(f"histories must be 2-D (batch, width), got shape {h.shape}")
        if h.shape[1] == 0:
            raise ValueError("histories must have at least one column")
        if h.shape[1] is None or h.shape[1] > self.config.maxlen:
            h = h[:, -self.config.maxlen:]  # (B, min(W, maxlen)); an eager op, so only if needed
        if training:
            return self.sequence_embeddings(h, training=True, last_only=True)[:, -1, :]
        if jit_compile:
            return self._user_embeddings_xla(h)
        return self._user_embeddings_inference(h)

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32)], jit_compile=True)
    def _user_embeddings_xla(self, histories):
        return self.sequence_embeddings(histories, training=False, last_only=True)[:, -1, :]

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32)])
    def _user_embeddings_inference(self, histories):
        # (B, dim): the last block runs for the last position only
        return self.sequence_embeddings(histories, training=False, last_only=True)[:, -1, :]

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
    with quiet_native_logs():  # the first op may initialize the devices (cuInit without a GPU)
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
