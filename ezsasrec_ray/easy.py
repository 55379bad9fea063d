"""The easy API: the ezSASRec quickstart runs with only its imports changed.

    from ezsasrec_ray.easy import filter_k_core, SASRecDataSet, load_model, SASREC, WarpSampler

Same names, arguments, meanings and return shapes as ezSASRec, backed by this package's core:
the model (:mod:`.model`), the training step (:mod:`.fit`, in one process, no Ray), the user
encoder (:mod:`.encoder`), full-catalog ranks (:mod:`.ranking`) and the retrieval index
(:mod:`.topk`); ``save`` / ``load_model`` write and read a model directory (no pickle) that
``ezsasrec_ray.load_model`` also opens. Where ezSASRec went wrong this module does the right
thing (``docs/easy_api.md`` lists each case). Data conventions are ezSASRec's:
``user<TAB>item[<TAB>time]`` lines, 1-based integer ids, leave-one-out split.
"""

from __future__ import annotations

import itertools
import math
import numbers
import os
import warnings
from collections.abc import Mapping

import numpy as np
import pandas as pd

from .batching import epoch_batches, left_pad, make_inputs, take_rows
from .encoder import user_vectors
from .errors import EzSASRecError
from .metrics import ranking_metrics
from .model_io import read_model_dir, write_model_dir
from .ranking import model_ranks
from .topk import TopK, exact_scores

__all__ = ["SASREC", "SASRecDataSet", "UserSequences", "WarpSampler", "filter_k_core",
           "load_model", "to_sasrec_data"]

LOSSES = ("bce", "softmax", "sampled_softmax", "gbce")
HISTORY_COLUMNS = ["epoch", "NDCG@10", "HR@10", "loss", "steps", "users"]
_SCORE_USERS = 1024  # users scored at once by recommend_item (bounds the exclusion matrix)


# --------------------------------------------------------------------------------------------
# small helpers


def _int_arg(name: str, value, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise EzSASRecError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise EzSASRecError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def _sample_unseen(rng, seen, shape, num_items: int) -> np.ndarray:
    """Uniform draws from ``1..num_items`` minus each row's seen items, without rejection.

    seen: ragged ``(values, offsets)`` with one row per output row; shape: ``(B, M)``
    -> int32 ``(B, M)``. The r-th unseen item of a row is ``r + 1 + #{seen s: s - rank(s)
    - 1 <= r}`` (one ``searchsorted`` for the whole batch). A row that has seen every item
    gets 0 (padding: the losses and ranks ignore it) instead of looping forever.
    """
    values, offsets = (np.asarray(a, np.int64) for a in seen)
    rows = len(offsets) - 1
    stride = num_items + 1
    row_of = np.repeat(np.arange(rows), np.diff(offsets))
    ok = (values >= 1) & (values <= num_items)
    keys = np.unique(row_of[ok] * stride + values[ok])  # sorted, unique per row
    key_row, item = np.divmod(keys, stride)
    counts = np.bincount(key_row, minlength=rows)  # distinct seen items per row
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    below = item - (np.arange(keys.size) - first[key_row]) - 1  # unseen items below each
    gaps = key_row * stride + below  # non-decreasing: one sorted array for all rows
    free = num_items - counts  # (B,) items each row may draw
    r = rng.integers(0, np.maximum(free, 1)[:, None], size=shape)  # (B, M)
    query = np.arange(rows)[:, None] * stride + r
    out = r + 1 + np.searchsorted(gaps, query, side="right") - first[:, None]
    out[free == 0] = 0
    return out.astype(np.int32)


def _describe(ids, limit: int = 5) -> str:
    return ", ".join(repr(i) for i in list(ids)[:limit])


# --------------------------------------------------------------------------------------------
# filter_k_core


def filter_k_core(data, core_num=0, col_user="userID", col_item="itemID"):
    """Keep the rows whose user and item both have at least ``core_num`` rows (the k-core).

    pandas in, pandas out, as ezSASRec: prints ``Original: U users and I items`` and
    ``Final: ...``, returns the kept rows (original index and columns) sorted by user. The
    sort is stable, so the rows of a user keep their order (time order, if the log was);
    the counting is vectorized (``np.bincount``) instead of a ``groupby.filter`` per round.
    """
    if not isinstance(data, pd.DataFrame):
        raise EzSASRecError(f"filter_k_core: data must be a pandas DataFrame, got "
                            f"{type(data).__name__}")
    missing = [c for c in (col_user, col_item) if c not in data.columns]
    if missing:
        raise EzSASRecError(f"filter_k_core: column(s) {missing} not in the DataFrame "
                            f"(columns: {list(data.columns)}); pass col_user= / col_item=")
    core_num = _int_arg("filter_k_core: core_num", core_num, 0)
    print(f"Original: {data[col_user].nunique()} users and {data[col_item].nunique()} items")
    keep = np.ones(len(data), bool)
    if core_num > 0:
        users, _ = pd.factorize(data[col_user])  # -1 for a missing id
        items, _ = pd.factorize(data[col_item])
        keep &= (users >= 0) & (items >= 0)
        while True:
            item_counts = np.bincount(items[keep], minlength=items.max(initial=0) + 1)
            keep &= item_counts[items] >= core_num
            user_counts = np.bincount(users[keep], minlength=users.max(initial=0) + 1)
            keep &= user_counts[users] >= core_num
            item_counts = np.bincount(items[keep], minlength=items.max(initial=0) + 1)
            if not ((item_counts > 0) & (item_counts < core_num)).any():
                break
    out = data[keep].sort_values(by=[col_user], kind="stable")
    print(f"Final: {out[col_user].nunique()} users and {out[col_item].nunique()} items")
    return out


def to_sasrec_data(df, filename, col_user="userID", col_item="itemID", col_time=None):
    """Encode users and items to 1..U / 1..I and write ``filename`` (``user<TAB>item`` lines).

    An addition to ezSASRec's quickstart (which builds the maps with python loops): raw ids
    are numbered in sorted order; rows are kept in their order within each user, or sorted
    by ``col_time`` when given. Returns ``(user_map, item_map)``: ``{raw id: encoded id}``.
    """
    for col in (col_user, col_item) + ((col_time,) if col_time else ()):
        if col not in df.columns:
            raise EzSASRecError(f"to_sasrec_data: column {col!r} not in the DataFrame "
                                f"(columns: {list(df.columns)})")
    by = [col_user] + ([col_time] if col_time else [])
    df = df.sort_values(by=by, kind="stable")
    user_codes, user_ids = pd.factorize(df[col_user], sort=True)
    item_codes, item_ids = pd.factorize(df[col_item], sort=True)
    if (user_codes < 0).any() or (item_codes < 0).any():
        raise EzSASRecError("to_sasrec_data: missing user or item ids; drop those rows first")
    pd.DataFrame({"u": user_codes + 1, "i": item_codes + 1}).to_csv(
        filename, sep="\t", header=False, index=False)
    user_map = dict(zip(user_ids.tolist(), range(1, len(user_ids) + 1)))
    item_map = dict(zip(item_ids.tolist(), range(1, len(item_ids) + 1)))
    return user_map, item_map


# --------------------------------------------------------------------------------------------
# data


class UserSequences(Mapping):
    """Read-only ``{user id: [items]}`` over ragged arrays (what ezSASRec kept as dicts).

    Behaves like the original dict-of-lists for reading (``d[u]``, ``len``, ``items()``...);
    ``arrays`` gives ``(users, values, offsets)`` for vectorized code: row ``j`` is user
    ``users[j]`` with items ``values[offsets[j]:offsets[j + 1]]``.
    """

    def __init__(self, users: np.ndarray, values: np.ndarray, offsets: np.ndarray):
        self._users, self._values, self._offsets = users, values, offsets

    @property
    def arrays(self):
        return self._users, self._values, self._offsets

    def _row(self, user) -> int:
        if isinstance(user, bool) or not isinstance(user, numbers.Integral):
            raise KeyError(user)
        j = int(np.searchsorted(self._users, user))
        if j == len(self._users) or self._users[j] != user:
            raise KeyError(user)
        return j

    def __getitem__(self, user):
        j = self._row(user)
        return self._values[self._offsets[j]:self._offsets[j + 1]].tolist()

    def __contains__(self, user):
        try:
            self._row(user)
        except KeyError:
            return False
        return True

    def __iter__(self):
        return iter(self._users.tolist())

    def __len__(self):
        return len(self._users)

    def __repr__(self):
        head = ", ".join(f"{u}: {self[u]}" for u in self._users[:3].tolist())
        return f"UserSequences({len(self)} users; {{{head}{', ...' if len(self) > 3 else ''}}})"


class SASRecDataSet:
    """ezSASRec's dataset: ``SASRecDataSet(filename, col_sep='\\t')``, then ``split()``.

    After ``split()``: ``usernum`` / ``itemnum`` (the largest ids), ``User`` (every user's
    items), ``user_train``, ``user_valid``, ``user_test`` (read-only dicts of lists, see
    :class:`UserSequences`) and ``Items``. A third column is a timestamp: items are then
    sorted by it within each user (stable). A file that is not ``col_sep``-separated but
    whitespace-separated is read too. Ids must be integers >= 1 (0 is padding).
    """

    def __init__(self, filename=None, col_sep="\t"):
        self.filename = filename
        self.col_sep = col_sep
        self.usernum = 0
        self.itemnum = 0
        self.with_time = False
        self._split = None

    # -- reading ---------------------------------------------------------------------------

    def _read(self, filename):
        """-> users (E,) int64, items (E,) int64, times (E,) float64 or None, file order."""
        if not os.path.isfile(filename):
            raise EzSASRecError(f"{filename}: file not found")
        with open(filename) as f:
            first = f.readline().rstrip("\r\n")
        if not first.strip():
            raise EzSASRecError(f"{filename}: empty first line (expected user{self.col_sep!r}"
                                "item lines)")
        sep, ncols = self.col_sep, len(first.split(self.col_sep))
        if ncols not in (2, 3) and len(first.split()) in (2, 3):
            sep, ncols = r"\s+", len(first.split())  # e.g. space-separated
        if ncols not in (2, 3):
            raise EzSASRecError(f"{filename}:1: expected 2 or 3 columns separated by "
                                f"{self.col_sep!r} (user, item[, time]), got {first!r}")
        names = ["user", "item", "time"][:ncols]
        options = {"sep": sep, "header": None, "names": names}
        try:
            df = pd.read_csv(filename, dtype={"user": np.int64, "item": np.int64}, **options)
        except pd.errors.ParserError as exc:
            raise EzSASRecError(f"{filename}: {exc}") from None
        except (ValueError, OverflowError):  # locate the bad value for the message
            df = pd.read_csv(filename, dtype=str, keep_default_na=False, **options)
            for col in ("user", "item"):
                text = df[col].str.strip()
                ok = text.str.fullmatch(r"[+-]?\d+").fillna(False).to_numpy(bool)
                if not ok.all():
                    line = int(np.flatnonzero(~ok)[0])
                    raise EzSASRecError(f"{filename}:{line + 1}: {col} {df[col].iloc[line]!r} is "
                                        "not an integer id") from None
            raise EzSASRecError(f"{filename}: ids do not fit in int64") from None
        for col in ("user", "item"):
            bad = np.flatnonzero(df[col].to_numpy() < 1)
            if bad.size:
                raise EzSASRecError(f"{filename}:{bad[0] + 1}: {col} id "
                                    f"{int(df[col].iloc[bad[0]])} < 1 (ids start at 1; 0 is "
                                    "padding)")
        time = None
        if ncols == 3:
            time = pd.to_numeric(df["time"], errors="coerce").to_numpy(np.float64)
            bad = np.flatnonzero(np.isnan(time))
            if bad.size:
                raise EzSASRecError(f"{filename}:{bad[0] + 1}: time {df['time'].iloc[bad[0]]!r}"
                                    " is not a number")
        return df["user"].to_numpy(np.int64), df["item"].to_numpy(np.int64), time

    def split(self, filename=None, **kwargs):
        """Read the file and split each user's items: train (all but the last 2), valid (the
        second last), test (the last); users with fewer than 3 items only train."""
        filename = filename or kwargs.get("filename") or self.filename
        if not filename:
            raise EzSASRecError("SASRecDataSet.split: a filename is required")
        self.filename = filename
        users, items, time = self._read(filename)
        self.with_time = time is not None
        order = (np.lexsort((time, users)) if time is not None
                 else np.argsort(users, kind="stable"))
        users, items = users[order], items[order]
        ids, starts, lengths = np.unique(users, return_index=True, return_counts=True)
        offsets = np.concatenate([starts, [len(users)]]).astype(np.int64)
        held = lengths >= 3
        n_train = np.where(held, lengths - 2, lengths)
        rows = np.arange(len(ids))
        train_values, train_offsets = take_rows(items, offsets, rows, n_train)
        valid_items = np.where(held, items[np.maximum(offsets[:-1] + lengths - 2, 0)], 0)
        test_items = np.where(held, items[offsets[:-1] + lengths - 1], 0)
        one = held.astype(np.int64)
        one_offsets = np.concatenate([[0], np.cumsum(one)]).astype(np.int64)
        self._split = {
            "users": ids, "values": items, "offsets": offsets, "lengths": lengths,
            "train": UserSequences(ids, train_values, train_offsets),
            "valid": UserSequences(ids, valid_items[held], one_offsets),
            "test": UserSequences(ids, test_items[held], one_offsets),
            "all": UserSequences(ids, items, offsets),
        }
        self.usernum = int(ids.max())
        self.itemnum = int(items.max())
        return self

    # -- the original attributes -----------------------------------------------------------

    def _need_split(self):
        if self._split is None:
            raise EzSASRecError("SASRecDataSet: call data.split() first")
        return self._split

    @property
    def User(self) -> UserSequences:
        return self._need_split()["all"]

    @property
    def user_train(self) -> UserSequences:
        return self._need_split()["train"]

    @property
    def user_valid(self) -> UserSequences:
        return self._need_split()["valid"]

    @property
    def user_test(self) -> UserSequences:
        return self._need_split()["test"]

    @property
    def Items(self) -> set:
        return set(np.unique(self._need_split()["values"]).tolist())

    # -- vectorized access for the model -----------------------------------------------------

    def user_rows(self, encoded_users) -> np.ndarray:
        """Encoded user ids -> row numbers in the arrays (an error names unknown ids)."""
        split = self._need_split()
        encoded = np.asarray(encoded_users, dtype=np.int64).reshape(-1)
        rows = np.searchsorted(split["users"], encoded)
        rows = np.minimum(rows, len(split["users"]) - 1)
        bad = split["users"][rows] != encoded
        if bad.any():
            raise EzSASRecError(f"{bad.sum()} encoded user id(s) not in {self.filename} "
                                f"(first: {_describe(encoded[bad])})")
        return rows

    def histories(self, rows, drop_last: int = 0):
        """Each row's items without its last ``drop_last`` -> ragged ``(values, offsets)``."""
        split = self._need_split()
        lengths = np.maximum(split["lengths"][rows] - drop_last, 0)
        return take_rows(split["values"], split["offsets"], rows, lengths)

    def holdout(self, is_val: bool):
        """Users with a held-out target -> ``(rows, histories, targets)``: the validation
        target after the training items, or the test target after all the others."""
        split = self._need_split()
        lengths = split["lengths"]
        rows = np.flatnonzero(lengths >= 3)
        drop = 2 if is_val else 1
        histories = self.histories(rows, drop)
        targets = split["values"][split["offsets"][rows] + lengths[rows] - drop]
        return rows, histories, targets.astype(np.int32)

    def __repr__(self):
        if self._split is None:
            return f"SASRecDataSet({self.filename!r}, not split)"
        return (f"SASRecDataSet({self.filename!r}: {len(self._split['users'])} users, "
                f"usernum {self.usernum}, itemnum {self.itemnum}, "
                f"{len(self._split['values'])} events)")


# --------------------------------------------------------------------------------------------
# sampler


def _as_ragged(user_dict):
    """A {user: items} mapping -> (users sorted, values, offsets)."""
    if isinstance(user_dict, UserSequences):
        return user_dict.arrays
    if not isinstance(user_dict, Mapping):
        raise EzSASRecError(f"WarpSampler: User must be a dict of user -> item list (e.g. "
                            f"data.user_train), got {type(user_dict).__name__}")
    users = sorted(user_dict)
    bad = [u for u in users if isinstance(u, bool) or not isinstance(u, numbers.Integral)]
    if bad:
        raise EzSASRecError(f"WarpSampler: user ids must be integers (first: {_describe(bad)})")
    lists = [user_dict[u] for u in users]
    lengths = np.fromiter((len(x) for x in lists), np.int64, len(lists))
    values = np.fromiter(itertools.chain.from_iterable(lists), np.int64, int(lengths.sum()))
    return (np.asarray(users, np.int64), values,
            np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))


class WarpSampler:
    """ezSASRec's training sampler, without worker processes or rejection loops.

    ``WarpSampler(User, usernum, itemnum, batch_size=64, maxlen=10, n_workers=1)``: ``User``
    is the training dict (``data.user_train``). ``n_workers`` is accepted and unused (batches
    are built with numpy in the training loop). :meth:`next_batch` returns ``(u, seq, pos,
    neg)`` like the original (users drawn at random; arrays ``(batch_size,)`` and
    ``(batch_size, maxlen)``); ``SASREC.train`` instead goes through every user once per epoch.
    Negatives are uniform over the items the user has not trained on, drawn exactly (see
    :func:`_sample_unseen`): a user who rated every item gets none (0) instead of hanging.
    """

    def __init__(self, User, usernum, itemnum, batch_size=64, maxlen=10,
                 n_workers=1, seed=None):
        self.User = User
        self.usernum = _int_arg("WarpSampler: usernum", usernum, 1)
        self.itemnum = _int_arg("WarpSampler: itemnum", itemnum, 1)
        self.batch_size = _int_arg("WarpSampler: batch_size", batch_size, 1)
        self.maxlen = _int_arg("WarpSampler: maxlen", maxlen, 1)
        self.n_workers = _int_arg("WarpSampler: n_workers", n_workers, 1)
        self.users, self.values, self.offsets = _as_ragged(User)
        if self.values.size and (self.values.min() < 1 or self.values.max() > self.itemnum):
            raise EzSASRecError(f"WarpSampler: item ids must be in 1..itemnum ({self.itemnum}), "
                                f"found {int(self.values.min())}..{int(self.values.max())}")
        self.lengths = np.diff(self.offsets)
        self.trainable = np.flatnonzero(self.lengths >= 2)  # rows with a (input, next) pair
        if self.trainable.size == 0:
            raise EzSASRecError("WarpSampler: no user has 2 or more training items, so there "
                                "is nothing to train on")
        self.rng = np.random.default_rng(seed)
        self.closed = False

    def negatives(self, rows, shape, rng=None) -> np.ndarray:
        """``shape`` = (len(rows), M) negatives for these sampler rows, none in the row's
        training items (0 where the user has trained on every item)."""
        rng = self.rng if rng is None else rng
        seen = take_rows(self.values, self.offsets, rows, self.lengths[rows])
        return _sample_unseen(rng, seen, shape, self.itemnum)

    def next_batch(self):
        """``(u, seq, pos, neg)`` for ``batch_size`` random users, as ezSASRec's sampler: the
        most recent ``maxlen + 1`` training items, left-padded with 0."""
        if self.closed:
            raise EzSASRecError("WarpSampler: next_batch() after close()")
        rows = self.rng.choice(self.trainable, size=self.batch_size)
        seqs = take_rows(self.values, self.offsets, rows, self.lengths[rows])
        seq, pos = make_inputs(seqs, self.maxlen)
        pad = ((0, 0), (self.maxlen - seq.shape[1], 0))
        seq, pos = np.pad(seq, pad), np.pad(pos, pad)
        neg = np.where(pos > 0, self.negatives(rows, pos.shape), 0).astype(np.int32)
        return self.users[rows], seq, pos, neg

    def close(self):
        """Nothing to stop (no worker processes); kept for compatibility."""
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --------------------------------------------------------------------------------------------
# the model

_CONFIG_NAMES = {"num_items": "item_num", "maxlen": "seq_max_len", "dim": "embedding_dim",
                 "blocks": "num_blocks", "heads": "attention_num_heads",
                 "dropout": "dropout_rate", "l2": "l2_reg"}


class SASREC:
    """ezSASRec's ``SASREC(item_num=..., seq_max_len=..., ...)`` on :class:`.model.SASRec`.

    Arguments map to :class:`.model.SASRecConfig`: ``item_num -> num_items``,
    ``seq_max_len -> maxlen``, ``embedding_dim -> dim``, ``num_blocks -> blocks``,
    ``attention_num_heads -> heads``, ``dropout_rate -> dropout``, ``l2_reg -> l2``.
    ``attention_dim`` and both ``conv_dims`` must equal ``embedding_dim`` (the model has one
    width; left out, they default to it). ``l2_reg`` is applied (ezSASRec's was not: it added
    ``tf.compat.v1.losses.get_regularization_loss()``, which is 0 under TF2).

    Attributes as ezSASRec: ``epoch``, ``best_score`` (best validation HR@10),
    ``val_users``, ``history`` (a DataFrame, one row per epoch). ``sasrec`` is the Keras model.
    """

    def __init__(self, *, item_num, seq_max_len=100, num_blocks=2, embedding_dim=100,
                 attention_dim=None, attention_num_heads=1, conv_dims=None, dropout_rate=0.5,
                 l2_reg=0.0, history=None):
        from .model import SASRecConfig, build_model

        if attention_dim is None:
            attention_dim = embedding_dim
        if conv_dims is None:
            conv_dims = [embedding_dim, embedding_dim]
        if attention_dim != embedding_dim:
            raise EzSASRecError(f"SASREC: attention_dim ({attention_dim!r}) must equal "
                                f"embedding_dim ({embedding_dim!r}); this SASRec has one width")
        if (not isinstance(conv_dims, (list, tuple)) or len(conv_dims) != 2
                or any(d != embedding_dim for d in conv_dims)):
            raise EzSASRecError(f"SASREC: conv_dims ({conv_dims!r}) must be [embedding_dim, "
                                f"embedding_dim] = [{embedding_dim!r}, {embedding_dim!r}]")
        try:
            self.config = SASRecConfig(num_items=item_num, maxlen=seq_max_len, dim=embedding_dim,
                                       blocks=num_blocks, heads=attention_num_heads,
                                       dropout=dropout_rate, l2=l2_reg)
        except ValueError as exc:
            message = str(exc)
            for ours, theirs in _CONFIG_NAMES.items():
                message = message.replace(f"SASRecConfig.{ours}", theirs)
            message = message.replace("divisible by heads", "divisible by attention_num_heads")
            raise EzSASRecError(f"SASREC: {message}") from None
        c = self.config
        self.item_num, self.seq_max_len, self.num_blocks = c.num_items, c.maxlen, c.blocks
        self.embedding_dim = self.attention_dim = c.dim
        self.attention_num_heads, self.conv_dims = c.heads, [c.dim, c.dim]
        self.dropout_rate, self.l2_reg = c.dropout, c.l2
        self.sasrec = build_model(c)
        self.epoch = 0
        self.best_score = 0.0
        self.val_users = []
        self._last_eval_users = 0
        self.history = (pd.DataFrame(history) if history is not None
                        else pd.DataFrame(columns=HISTORY_COLUMNS))

    def __repr__(self):
        return (f"SASREC(item_num={self.item_num}, seq_max_len={self.seq_max_len}, "
                f"num_blocks={self.num_blocks}, embedding_dim={self.embedding_dim}, "
                f"attention_num_heads={self.attention_num_heads}, "
                f"dropout_rate={self.dropout_rate}, l2_reg={self.l2_reg})")

    def args(self) -> dict:
        """The constructor arguments (what ``save`` records)."""
        return {"item_num": self.item_num, "seq_max_len": self.seq_max_len,
                "num_blocks": self.num_blocks, "embedding_dim": self.embedding_dim,
                "attention_dim": self.attention_dim,
                "attention_num_heads": self.attention_num_heads, "conv_dims": self.conv_dims,
                "dropout_rate": self.dropout_rate, "l2_reg": self.l2_reg}

    def _item_table(self) -> np.ndarray:
        return np.asarray(self.sasrec.item_embeddings().numpy(), np.float32)

    def _check_data(self, dataset, what: str):
        if not isinstance(dataset, SASRecDataSet):
            raise EzSASRecError(f"SASREC.{what}: dataset must be a SASRecDataSet, got "
                                f"{type(dataset).__name__}")
        dataset._need_split()
        if dataset.itemnum > self.item_num:
            raise EzSASRecError(f"SASREC.{what}: the dataset has item ids up to "
                                f"{dataset.itemnum} but the model has item_num={self.item_num}")

    # -- training ---------------------------------------------------------------------------

    def train(self, dataset, sampler, num_epochs=10, batch_size=128, lr=0.001, val_epoch=5,
              val_target_user_n=1000, target_item_n=-1, auto_save=False, path="./",
              exp_name="SASRec_exp", *, loss="bce", num_negatives=256, seed=None,
              verbose=True):
        """Train, validating every ``val_epoch`` epochs and after the last one.

        Each epoch goes through every user of ``sampler`` with 2+ training items once, in
        ``ceil(users / batch_size)`` shuffled, length-bucketed batches (at least one step).
        Validation ranks each user's validation target among all items (``target_item_n=-1``;
        an int / float samples that many / that share of negatives) for *every* user:
        ``val_target_user_n`` is not used. With ``auto_save``, the model with the best
        validation HR@10 is written to ``path/exp_name`` (the first validated one is always
        written). ``loss``: ``bce`` (ezSASRec's, one sampler negative per position),
        ``softmax`` (full catalog), ``sampled_softmax`` / ``gbce`` (``num_negatives`` sampler
        negatives per user). Returns ``history``.
        """
        self._check_train_args(dataset, sampler, lr, loss, target_item_n, auto_save, exp_name,
                               val_target_user_n)
        num_epochs = _int_arg("SASREC.train: num_epochs", num_epochs, 1)
        batch_size = _int_arg("SASREC.train: batch_size", batch_size, 1)
        val_epoch = _int_arg("SASREC.train: val_epoch", val_epoch, 1)
        num_negatives = _int_arg("SASREC.train: num_negatives", num_negatives, 1)
        step = self._train_step(float(lr), loss)
        rng = np.random.default_rng(seed)
        saved = False
        for epoch in range(1, num_epochs + 1):
            if verbose:
                print(f"epoch {epoch} / {num_epochs} -----------------------------")
            self.epoch = epoch
            record = self._train_epoch(step, sampler, batch_size, loss, num_negatives, rng)
            record["epoch"] = epoch
            validate = epoch % val_epoch == 0 or epoch == num_epochs
            if validate:
                if verbose:
                    print("Evaluating...")
                ndcg, hr = self.evaluate(dataset, target_item_n=target_item_n, is_val=True,
                                         seed=None if seed is None else seed + epoch)
                record.update({"NDCG@10": ndcg, "HR@10": hr, "users": self._last_eval_users})
            frames = [f for f in (self.history, pd.DataFrame([record])) if len(f)]
            self.history = pd.concat(frames, ignore_index=True)
            if verbose:
                print(_epoch_line(record, validate))
            improved = validate and not math.isnan(record["HR@10"]) and \
                record["HR@10"] > self.best_score
            if improved:
                self.best_score = record["HR@10"]
            if auto_save and validate and (improved or not saved):
                self.save(path, exp_name, _dataset=dataset)
                saved = True
                if verbose:
                    print("best score model updated and saved")
        if auto_save and saved:
            self.history.to_csv(os.path.join(path, exp_name, "history.csv"), index=False)
        return self.history

    def _check_train_args(self, dataset, sampler, lr, loss, target_item_n, auto_save,
                          exp_name, val_target_user_n):
        self._check_data(dataset, "train")
        if not isinstance(sampler, WarpSampler):
            raise EzSASRecError(f"SASREC.train: sampler must be a WarpSampler, got "
                                f"{type(sampler).__name__}")
        if sampler.itemnum > self.item_num:
            raise EzSASRecError(f"SASREC.train: the sampler has itemnum={sampler.itemnum} but "
                                f"the model has item_num={self.item_num}")
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not lr > 0:
            raise EzSASRecError(f"SASREC.train: lr must be a number > 0, got {lr!r}")
        if loss not in LOSSES:
            raise EzSASRecError(f"SASREC.train: unknown loss {loss!r}; use one of {LOSSES}")
        _negative_count(target_item_n, self.item_num, "SASREC.train")
        if auto_save and not exp_name:
            raise EzSASRecError("SASREC.train: auto_save needs an exp_name")
        eligible = int((dataset._need_split()["lengths"] >= 3).sum())
        if val_target_user_n is not None and val_target_user_n != -1 \
                and val_target_user_n < eligible:
            warnings.warn(f"val_target_user_n={val_target_user_n} is not used: the easy API "
                          f"validates on all {eligible} users", stacklevel=3)

    def _train_step(self, lr: float, loss: str):
        """The step Ray Train workers run, under the default (single-device) strategy."""
        import tensorflow as tf

        from .fit import Adam, make_train_step, model_loss
        from .losses import make_loss

        optimizer = Adam(self.sasrec.trainable_variables, lr)
        return make_train_step(optimizer, tf.distribute.get_strategy(),
                               model_loss(self.sasrec, make_loss(loss)))

    def _train_epoch(self, step, sampler, batch_size: int, loss: str, num_negatives: int,
                     rng) -> dict:
        """Every trainable user once, in length-bucketed batches -> the history record."""
        from .losses import NEGATIVES, negative_shape

        rows_all = sampler.trainable
        total, steps = 0.0, 0
        for batch in epoch_batches(sampler.lengths[rows_all], batch_size, rng):
            rows = rows_all[batch]
            seqs = take_rows(sampler.values, sampler.offsets, rows, sampler.lengths[rows])
            inputs, positives = make_inputs(seqs, self.seq_max_len, rng)
            # ezSASRec's sampler: negatives the user has not seen
            shape = negative_shape(loss, positives.shape, num_negatives)
            negatives = (sampler.negatives(rows, shape, rng) if NEGATIVES[loss]
                         else np.zeros(shape, np.int32))
            total += float(step(inputs, positives.astype(np.int32), negatives.astype(np.int32)))
            steps += 1
        return {"epoch": 0, "NDCG@10": float("nan"), "HR@10": float("nan"),
                "loss": total / max(steps, 1), "steps": steps, "users": 0}

    # -- evaluation -------------------------------------------------------------------------

    def sample_val_users(self, dataset, target_user_n, seed=None):
        """Pick ``target_user_n`` existing users at random into ``val_users`` (all users when
        there are fewer), as ezSASRec; :meth:`evaluate` with ``target_user_n`` uses them."""
        self._check_data(dataset, "sample_val_users")
        target_user_n = _int_arg("sample_val_users: target_user_n", target_user_n, 1)
        users = dataset._need_split()["users"]
        if len(users) > target_user_n:
            users = np.sort(np.random.default_rng(seed).choice(users, target_user_n,
                                                               replace=False))
        self.val_users = users.tolist()
        return self.val_users

    def evaluate(self, dataset, target_user_n=None, target_item_n=-1, rank_threshold=10,
                 is_val=False, seed=None):
        """``(NDCG@k, HR@k)`` with ``k = rank_threshold``, leave-one-out.

        ``is_val=True``: the validation target after the training items; else the test target
        after all the others. Every user with a target is evaluated (``target_user_n=None``);
        an int evaluates a random sample of that many (``val_users``). ``target_item_n=-1``
        ranks the target among all items not in the input history; an int / float samples
        that many / that share of ``itemnum`` negatives outside the user's items.
        """

        self._check_data(dataset, "evaluate")
        k = _int_arg("evaluate: rank_threshold", rank_threshold, 1)
        count = _negative_count(target_item_n, dataset.itemnum, "evaluate")
        rows, histories, targets = dataset.holdout(is_val)
        if target_user_n is not None:  # an explicit sample of the users with a target
            target_user_n = _int_arg("evaluate: target_user_n", target_user_n, 1)
            if target_user_n < len(rows):
                chosen = np.sort(np.random.default_rng(seed).choice(
                    len(rows), target_user_n, replace=False))
                rows, targets = rows[chosen], targets[chosen]
                histories = dataset.histories(rows, 2 if is_val else 1)
            self.val_users = dataset._need_split()["users"][rows].tolist()
        self._last_eval_users = int(len(rows))
        if len(rows) == 0:
            return float("nan"), float("nan")
        if count is None:
            ranks = model_ranks(self.sasrec, histories, targets, exclude_seen=True)
        else:
            rng = np.random.default_rng(seed)
            negatives = _sample_unseen(rng, dataset.histories(rows), (len(rows), count),
                                       dataset.itemnum)
            ranks = model_ranks(self.sasrec, histories, targets, protocol="sampled",
                                negatives=negatives)
        metrics = ranking_metrics(ranks, (k,))
        return float(metrics[f"NDCG@{k}"]), float(metrics[f"HR@{k}"])

    # -- prediction ---------------------------------------------------------------------------

    def _encode_users(self, dataset, user_map_dict, user_id_list, what):
        user_id_list = list(user_id_list)
        missing = [u for u in user_id_list if u not in user_map_dict]
        if missing:
            raise EzSASRecError(f"{what}: {len(missing)} user id(s) not in user_map "
                                f"(first: {_describe(missing)})")
        encoded = np.array([user_map_dict[u] for u in user_id_list], np.int64)
        return user_id_list, dataset.user_rows(encoded)

    def _user_vectors(self, dataset, rows, is_test):
        histories = dataset.histories(rows, 1 if is_test else 0)
        return user_vectors(self.sasrec, histories), histories

    def recommend_item(self, dataset, user_map_dict, user_id_list, target_item_n=-1, top_n=10,
                       exclude_purchased=True, is_test=False, *, item_map_dict=None,
                       seed=None):
        """Top-``top_n`` items per user -> ``{raw user id: [(item, score), ...]}``, best first.

        Items are encoded ids as in ezSASRec (raw ids when ``item_map_dict`` is given).
        The user's history is the input: all its items, or all but the last with
        ``is_test=True`` (recommend as of before the test item). ``exclude_purchased``
        excludes the items of that input history. ``target_item_n=-1`` ranks all items; an
        int / float ranks that many / that share of random items instead.
        """
        self._check_data(dataset, "recommend_item")
        top_n = _int_arg("recommend_item: top_n", top_n, 1)
        count = _negative_count(target_item_n, dataset.itemnum, "recommend_item")
        raw_users, rows = self._encode_users(dataset, user_map_dict, user_id_list,
                                             "recommend_item")
        inverse = _inverse_map(item_map_dict, self.item_num) if item_map_dict else None
        table = self._item_table()
        index = TopK(table)
        rng = np.random.default_rng(seed)
        out = {}
        for start in range(0, len(rows), _SCORE_USERS):
            part = rows[start:start + _SCORE_USERS]
            vecs, histories = self._user_vectors(dataset, part, is_test)
            if count is None:
                seen = None
                if exclude_purchased:
                    seen = left_pad(histories, max(1, int(np.diff(histories[1]).max(initial=1))))
                items, scores = index(vecs, top_n, histories=seen)
            else:
                empty = (np.zeros(0, np.int64), np.zeros(len(part) + 1, np.int64))
                cand = _sample_unseen(rng, histories if exclude_purchased else empty,
                                      (len(part), count), dataset.itemnum)
                items, scores = index(vecs, top_n, candidates=list(cand))
            for j, raw in enumerate(raw_users[start:start + _SCORE_USERS]):
                keep = items[j] > 0
                ids = items[j][keep].tolist()
                if inverse is not None:
                    ids = inverse[items[j][keep]].tolist()
                out[raw] = list(zip(ids, scores[j][keep].tolist()))
        return out

    def get_user_item_score(self, dataset, user_id_list, item_list, user_map_dict,
                            item_map_dict, batch_size=128, *, is_test=False):
        """Scores of every (user, item) pair -> DataFrame: a ``user_id`` column, then one
        column per item of ``item_list`` (raw ids), one row per user sorted by ``user_id``.

        The user's whole history is the input (as ezSASRec), all but its last item with
        ``is_test=True``. ``batch_size`` is the number of users encoded at once (any size).
        """
        self._check_data(dataset, "get_user_item_score")
        batch_size = _int_arg("get_user_item_score: batch_size", batch_size, 1)
        item_list = list(item_list)
        missing = [i for i in item_list if i not in item_map_dict]
        if missing:
            raise EzSASRecError(f"get_user_item_score: {len(missing)} item id(s) not in "
                                f"item_map (first: {_describe(missing)})")
        if len(set(item_list)) != len(item_list):
            raise EzSASRecError("get_user_item_score: item_list has duplicate items")
        cand = np.array([item_map_dict[i] for i in item_list], np.int64)
        if cand.size and (cand.min() < 1 or cand.max() > self.item_num):
            raise EzSASRecError(f"get_user_item_score: item_map gives ids outside 1..item_num "
                                f"({self.item_num})")
        raw_users = list(dict.fromkeys(user_id_list))  # one row per user
        raw_users, rows = self._encode_users(dataset, user_map_dict, raw_users,
                                             "get_user_item_score")
        table = self._item_table()
        scores = np.zeros((len(rows), len(cand)), np.float32)
        for start in range(0, len(rows), batch_size):
            part = rows[start:start + batch_size]
            vecs, _ = self._user_vectors(dataset, part, is_test)
            if cand.size:
                scores[start:start + len(part)] = exact_scores(
                    vecs, table, np.broadcast_to(cand, (len(part), len(cand))))
        frame = pd.DataFrame(scores, columns=pd.Index(item_list))
        frame.insert(0, "user_id", raw_users)
        return frame.sort_values(by="user_id", kind="stable").reset_index(drop=True)

    # -- files ----------------------------------------------------------------------------------

    def save(self, path, exp_name="sas_experiment", *, _dataset=None):
        """Write the model directory ``path/exp_name`` (atomically replaced): ``config.json``,
        ``model.weights.h5``, ``item_embeddings.npy``, ``metrics.json`` (the arguments,
        epoch, best score; readable by ``ezsasrec_ray.load_model`` too), ``history.csv``."""
        if not exp_name or os.sep in str(exp_name):
            raise EzSASRecError(f"SASREC.save: exp_name must be a plain name, got {exp_name!r}")
        directory = os.path.join(os.fspath(path), exp_name)
        best = self.history.dropna(subset=["HR@10"]) if "HR@10" in self.history else None
        metadata = {
            "api": "ezsasrec_ray.easy",
            "data": getattr(_dataset, "filename", None),
            "vocab_fingerprint": None,  # encoded by the user, not by ezsasrec prepare
            "model": self.config.to_dict(),
            "easy": {"args": self.args(), "epoch": self.epoch, "best_score": self.best_score},
            "valid": ({"NDCG@10": float(best["NDCG@10"].iloc[-1]),
                       "HR@10": float(best["HR@10"].iloc[-1])}
                      if best is not None and len(best) else {}),
        }
        write_model_dir(directory, self.sasrec, metadata, overwrite=True,
                        extra=lambda tmp: self.history.to_csv(os.path.join(tmp, "history.csv"),
                                                              index=False))
        return directory


def load_model(path, exp_name="sas_experiment"):
    """Load ``path/exp_name`` written by ``SASREC.save`` (or ``auto_save``) -> :class:`SASREC`.

    JSON and HDF5 weights only (no pickle). A model directory written by ``ezsasrec train``
    loads too: its shape is read from ``config.json``.
    """
    directory = os.path.join(os.fspath(path), exp_name)
    config, metadata = read_model_dir(directory)
    easy = metadata.get("easy") or {}
    args = easy.get("args") or {
        "item_num": config["num_items"], "seq_max_len": config["maxlen"],
        "num_blocks": config["blocks"], "embedding_dim": config["dim"],
        "attention_num_heads": config["heads"], "dropout_rate": config["dropout"],
        "l2_reg": config["l2"]}
    history_path = os.path.join(directory, "history.csv")
    history = pd.read_csv(history_path) if os.path.exists(history_path) else None
    model = SASREC(**args, history=history)
    model.sasrec.load_weights(os.path.join(directory, "model.weights.h5"))
    model.epoch = int(easy.get("epoch", metadata.get("best_epoch", 0)))
    model.best_score = float(easy.get("best_score", metadata.get("valid", {}).get("HR@10", 0.0)))
    model.model_dir = os.path.abspath(directory)
    model.metadata = metadata
    return model


# --------------------------------------------------------------------------------------------
# helpers of the model


def _epoch_line(record: dict, validate: bool) -> str:
    line = f"epoch: {record['epoch']}, loss {record['loss']:.4f} ({record['steps']} steps)"
    if validate:
        line += (f", valid (NDCG@10: {record['NDCG@10']:.4f}, HR@10: {record['HR@10']:.4f}, "
                 f"{record['users']} users)")
    return line


def _negative_count(target_item_n, itemnum: int, what: str) -> int | None:
    """ezSASRec's ``target_item_n``: -1 -> None (all items), int n >= 1 -> n, float f in
    (0, 1] -> round(f * itemnum) (at least 1)."""
    if isinstance(target_item_n, bool):
        raise EzSASRecError(f"{what}: target_item_n must be -1, an int >= 1 or a float in "
                            f"(0, 1], got {target_item_n!r}")
    if isinstance(target_item_n, numbers.Integral):
        if target_item_n == -1:
            return None
        if target_item_n >= 1:
            return int(target_item_n)
    elif isinstance(target_item_n, numbers.Real) and 0 < target_item_n <= 1:
        return max(1, round(itemnum * float(target_item_n)))
    raise EzSASRecError(f"{what}: target_item_n must be -1, an int >= 1 or a float in (0, 1], "
                        f"got {target_item_n!r}")


def _inverse_map(item_map_dict, item_num: int) -> np.ndarray:
    """{raw: encoded} -> object array, position = encoded id."""
    inverse = np.empty(item_num + 1, object)
    encoded = np.fromiter(item_map_dict.values(), np.int64, len(item_map_dict))
    if encoded.size and (encoded.min() < 1 or encoded.max() > item_num):
        raise EzSASRecError(f"item_map gives ids outside 1..item_num ({item_num})")
    inverse[encoded] = list(item_map_dict.keys())
    return inverse
