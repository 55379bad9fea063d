"""The prepared dataset: the contract between prepare and every later stage.

A prepared dataset is a directory::

    manifest.json   format version, source, column mapping, options, per-round k-core
                    counts, dropped-row counts, vocabulary sizes, created-at, content hashes
    users/part-0.parquet   raw_id, index, count       (index 1..U; 0 is padding)
    items/part-0.parquet   raw_id, index, count       (index 1..N; 0 is padding)
    sequences/*.parquet    one row per user:
        user_index    int32
        user_id       the raw id (int64 or string, as in the log)
        item_indices  list<int32>, time order (ties keep input order)
        timestamps    list<int64> unix milliseconds (only when the log has time)
        n_events      int32
        n_train       int32  events the model may train on: leave-one-out -> n_events - 2
                             (the 2nd last is the validation target, the last the test
                             target); time split -> events at or before the cutoff
        train_only    bool   no held-out target (loo: fewer than 3 events; time: nothing
                             after the cutoff)

The holdout roles (:func:`fit_lengths`, :func:`holdout_examples`) say, in one place, what a
model or a baseline is fitted on and what is held out.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import EzSASRecError
from .outputs import MARKER
from .runtime import storage_env
from .storage import is_remote, local_dir

FORMAT_VERSION = 1


SEQUENCE_COLUMNS = ("user_index", "user_id", "item_indices", "n_events", "n_train", "train_only")


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def hash_tree(root: str) -> dict:
    hashes = {}
    for directory, _, names in os.walk(root):
        for name in sorted(names):
            path = os.path.join(directory, name)
            hashes[os.path.relpath(path, root)] = sha256_file(path)
    return dict(sorted(hashes.items()))


def list_prefixes(lists: pa.Array, lengths: np.ndarray) -> pa.ListArray:
    """The first ``lengths[b]`` items of each row of a list array (vectorized take)."""
    if isinstance(lists, pa.ChunkedArray):
        lists = lists.combine_chunks()
    offsets = lists.offsets.to_numpy().astype(np.int64)
    lengths = np.minimum(np.asarray(lengths, np.int64), np.diff(offsets))
    new_offsets = np.concatenate([[0], np.cumsum(lengths)])
    take = np.repeat(offsets[:-1] - new_offsets[:-1], lengths) + np.arange(new_offsets[-1])
    values = lists.values.take(pa.array(take)) if len(take) else lists.values.slice(0, 0)
    return pa.ListArray.from_arrays(pa.array(new_offsets.astype(np.int32)), values)


HOLDOUTS = ("valid", "test", "none")


def check_holdout(holdout: str) -> str:
    """``holdout`` if it is one of HOLDOUTS, else a one-line error."""
    if holdout not in HOLDOUTS:
        raise EzSASRecError(f"--holdout: unknown value {holdout!r}; use one of {HOLDOUTS}")
    return holdout


def validation_users(user_index: np.ndarray, valid_share: float = 1.0) -> np.ndarray:
    """Which users are in the validation sample: a fixed hash of ``user_index`` below
    ``valid_share``, so every stage and worker picks the same users without a list."""
    if valid_share >= 1.0:
        return np.ones(len(user_index), bool)
    hashed = (np.asarray(user_index).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> \
        np.uint64(11)
    return hashed.astype(np.float64) / float(1 << 53) < valid_share


def fit_lengths(table: pa.Table, holdout: str = "valid", kind: str = "loo",
                valid_share: float = 1.0) -> np.ndarray:
    """How many of each user's first items a model (or baseline) may be fitted on.

    ``holdout="valid"`` (the default): ``n_train``, both held-out targets kept out, so the
    validation metrics are honest; with ``valid_share`` < 1 (leave-one-out only), the users
    outside the validation sample (:func:`validation_users`) also train on their validation
    targets, the most recent transitions of the log. ``"test"``: every item before the test target (leave-one-out
    adds the validation target; a time split has one target, so it equals ``"valid"``): the
    final model for a test-split evaluation, fitted on what the baselines of that evaluation
    see. ``"none"``: every event (the production model; no held-out metrics are valid).
    """
    check_holdout(holdout)
    n_train = table["n_train"].to_numpy().astype(np.int64)
    if holdout == "none":
        return table["n_events"].to_numpy().astype(np.int64)
    if kind != "loo" or holdout == "valid" and valid_share >= 1.0:
        return n_train  # time split: the one target is the test one too
    train_only = table["train_only"].to_numpy(zero_copy_only=False)
    add = ~train_only  # n_train = n_events - 2 unless train_only
    if holdout == "valid":
        add &= ~validation_users(table["user_index"].to_numpy(), valid_share)
    return np.where(add, n_train + 1, n_train)


def training_sequences(table: pa.Table, holdout: str = "valid", kind: str = "loo",
                       valid_share: float = 1.0) -> pa.ListArray:
    """What the model trains on: each user's first :func:`fit_lengths` items."""
    return list_prefixes(table["item_indices"], fit_lengths(table, holdout, kind, valid_share))


def holdout_examples(table: pa.Table, split: str, kind: str, valid_share: float = 1.0
                     ) -> tuple:
    """Held-out next-item examples: ``(user_index (B,), histories ListArray, targets (B,))``.

    Leave-one-out: ``split="valid"`` predicts the second last item from the ones before it,
    ``"test"`` the last item from all before it. Time split (``kind="time"``): both predict
    the first event after the cutoff from the events up to it. Users without a held-out
    target (``train_only``) are left out, and with ``valid_share`` < 1 the validation split
    keeps only the validation sample (leave-one-out; see :func:`fit_lengths`).
    """
    if split not in ("valid", "test"):
        raise EzSASRecError(f"--split: unknown evaluation split {split!r}; use valid or test")
    keep = pc.invert(table["train_only"])
    if split == "valid" and kind == "loo" and valid_share < 1.0:
        keep = pc.and_(keep, pa.array(validation_users(table["user_index"].to_numpy(),
                                                       valid_share)))
    table = table.filter(keep)
    n_events = table["n_events"].to_numpy().astype(np.int64)
    if kind == "time":
        history_len = table["n_train"].to_numpy().astype(np.int64)
        keep = history_len >= 1
        table, n_events, history_len = table.filter(pa.array(keep)), n_events[keep], \
            history_len[keep]
    else:
        history_len = n_events - (2 if split == "valid" else 1)
    items = table["item_indices"].combine_chunks()
    offsets = items.offsets.to_numpy().astype(np.int64)
    targets = items.values.to_numpy()[offsets[:-1] + history_len]
    return (table["user_index"].to_numpy(), list_prefixes(items, history_len),
            targets.astype(np.int32))


@dataclass
class PreparedDataset:
    """An opened prepared-dataset directory (see the module docstring for its layout)."""

    path: str
    manifest: dict
    uri: str | None = None  # where it was published, when on object storage (path: a copy)
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def num_users(self) -> int:
        return self.manifest["vocab"]["num_users"]

    @property
    def num_items(self) -> int:
        return self.manifest["vocab"]["num_items"]

    @property
    def has_time(self) -> bool:
        return bool(self.manifest["has_time"])

    def users(self) -> pa.Table:
        """User vocabulary: raw_id, index, count (index order)."""
        return self._vocab("users")

    def items(self) -> pa.Table:
        """Item vocabulary: raw_id, index, count (index order)."""
        return self._vocab("items")

    def _vocab(self, name: str) -> pa.Table:
        if name not in self._cache:
            self._cache[name] = pq.read_table(os.path.join(self.path, name))
        return self._cache[name]

    @property
    def sequences_path(self) -> str:
        return os.path.join(self.path, "sequences")

    def sequences(self, columns=None) -> pa.Table:
        """All sequence rows in one pyarrow table, sorted by user_index (small data)."""
        table = pq.read_table(self.sequences_path, columns=columns)
        if "user_index" in table.column_names:
            table = table.sort_by("user_index")
        return table

    def sequences_dataset(self, columns=None):
        """The sequences as a Ray Dataset (parallel Parquet reads)."""
        import ray.data

        if self.uri:  # read where it was published: the read tasks may run on any node
            dataset = ray.data.read_parquet(posixpath.join(self.uri, "sequences"),
                                            runtime_env={"env_vars": storage_env()})
        else:
            dataset = ray.data.read_parquet(self.sequences_path)
        return dataset.select_columns(columns) if columns else dataset

    @property
    def split_kind(self) -> str:
        return self.manifest["split"]

    def valid_share(self, valid_users: int = 0) -> float:
        """The share of users in a validation sample of ``valid_users`` users (0: all)."""
        eligible = self.num_users - self.manifest.get("counts", {}).get("users_train_only", 0)
        return 1.0 if valid_users <= 0 else min(1.0, valid_users / max(eligible, 1))

    def training_sequences(self, holdout: str = "valid", valid_share: float = 1.0
                           ) -> pa.ListArray:
        """Every user's training items (see :func:`fit_lengths`), in user_index order."""
        return training_sequences(self.sequences(
            ["user_index", "item_indices", "n_events", "n_train", "train_only"]), holdout,
            self.split_kind, valid_share)

    def holdout_examples(self, split: str = "test", valid_share: float = 1.0) -> tuple:
        """``(user_index, histories, targets)`` for evaluation; see :func:`holdout_examples`."""
        return holdout_examples(self.sequences(), split, self.split_kind, valid_share)

    def vocab_fingerprint(self) -> str:
        """Hash of both vocabularies: models trained on this data record it."""
        hashes = self.manifest["content_hashes"]
        joined = "".join(hashes[k] for k in sorted(hashes) if k.startswith(("users/", "items/")))
        return hashlib.sha256(joined.encode()).hexdigest()

    def verify(self):
        """Recompute the content hashes; raise if any file differs from the manifest."""
        actual = hash_tree(self.path)
        actual.pop("manifest.json", None)
        actual.pop(MARKER, None)  # written after the hashes
        if actual != self.manifest["content_hashes"]:
            raise EzSASRecError(f"{self.path}: files differ from manifest.json content hashes")


def load_prepared(path: str) -> PreparedDataset:
    """Open a prepared dataset, checking that it is complete and of a known format version;
    one on object storage is read from a local copy (:func:`.storage.local_dir`)."""
    if is_remote(path):
        data = load_prepared(local_dir(path))
        data.uri = path.rstrip("/")
        return data
    manifest_path = os.path.join(path, "manifest.json")
    if not os.path.isdir(path):
        raise EzSASRecError(f"{path}: prepared dataset not found")
    if not os.path.exists(manifest_path):
        raise EzSASRecError(f"{path}: not a prepared dataset (no manifest.json)")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except ValueError as exc:
        raise EzSASRecError(f"{manifest_path}: unreadable manifest ({exc})") from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION or manifest.get("kind") != "ezsasrec_ray.prepared":
        raise EzSASRecError(f"{manifest_path}: format_version {version!r} is not supported "
                            f"(expected {FORMAT_VERSION}); re-run prepare")
    for name in ("users", "items", "sequences"):
        if not os.path.isdir(os.path.join(path, name)):
            raise EzSASRecError(f"{path}: incomplete prepared dataset ({name}/ missing)")
    if manifest["vocab"]["num_items"] < 1:
        raise EzSASRecError(f"{path}: empty prepared dataset (no items)")
    return PreparedDataset(path=path, manifest=manifest)
