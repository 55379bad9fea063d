"""The id vocabulary: raw user and item ids <-> indices (1..n; 0 is padding and "unknown").

A vocabulary is a table ``raw_id, index, count`` (``users/`` and ``items/`` of a prepared
dataset, copied into each model directory). Batch scoring, Serve, evaluation and the easy API
map ids through here.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import EzSASRecError


def raw_ids_by_index(vocab: pa.Table) -> pa.Array:
    """A vocabulary table (raw_id, index 1..n) -> raw ids, position i = index i + 1."""
    table = vocab.sort_by("index")
    index = table["index"].to_numpy()
    if not np.array_equal(index, np.arange(1, len(index) + 1)):
        raise EzSASRecError("vocabulary indices are not 1..n; re-run prepare")
    return table["raw_id"].combine_chunks()


def _parse_ints(values: pa.Array) -> pa.Array:
    """Strings -> int64, null where a value is not an integer."""
    try:
        return pc.cast(pc.utf8_trim_whitespace(values), pa.int64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        out = []
        for value in values.to_pylist():
            try:
                out.append(int(value))
            except (TypeError, ValueError):
                out.append(None)
        return pa.array(out, pa.int64())


def lookup_ids(ids, vocab: pa.Table) -> tuple[np.ndarray, list]:
    """Raw ids (any iterable or pyarrow array) -> (indices int64 with 0 = unknown, raw ids as
    python values in the vocabulary's type, None where they cannot be)."""
    raw = vocab["raw_id"].combine_chunks()
    values = ids if isinstance(ids, (pa.Array, pa.ChunkedArray)) else pa.array(
        [v.item() if isinstance(v, np.generic) else v for v in ids])
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if pa.types.is_integer(raw.type):
        if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
            values = _parse_ints(values)
        elif pa.types.is_floating(values.type):
            as_int = pc.cast(values, pa.int64(), safe=False)
            values = pc.if_else(pc.equal(pc.cast(as_int, values.type), values), as_int, None)
        values = values.cast(raw.type) if not pa.types.is_null(values.type) else \
            pa.nulls(len(values), raw.type)
    else:
        values = values.cast(raw.type)
    position = pc.index_in(values, value_set=raw)
    index = vocab["index"].combine_chunks().take(position)
    return (index.fill_null(0).to_numpy().astype(np.int64, copy=False),
            values.to_pylist())


def read_id_file(path: str, what: str) -> pa.Array:
    """A file of raw ids: text with one id a line (blank lines skipped), or the first column
    of a Parquet file -> string or typed pyarrow array."""
    if not os.path.isfile(path):
        raise EzSASRecError(f"--{what} {path}: file not found")
    if path.endswith(".parquet"):
        try:
            return pq.read_table(path).column(0).combine_chunks()
        except Exception as exc:  # noqa: BLE001 - one line for any unreadable file
            raise EzSASRecError(f"--{what} {path}: unreadable Parquet file ({exc})") from None
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    return pa.array([line for line in lines if line], pa.string())


def _id_values(ids, what: str) -> tuple[list, pa.Array | list, str]:
    """An option given as a file path or as raw ids -> (given ids as python values, the ids
    to look up, source for the manifest)."""
    if isinstance(ids, (str, os.PathLike)):
        path = os.fspath(ids)
        values = read_id_file(path, what)
        return values.to_pylist(), values, os.path.abspath(path)
    if isinstance(ids, (pa.Array, pa.ChunkedArray)):
        return ids.to_pylist(), ids, "list"
    ids = list(ids)
    return ids, ids, "list"


def resolve_items(ids, data, what: str) -> tuple[np.ndarray, dict]:
    """Item ids -> (known indices, report). Unknown ids are ignored and reported."""
    given, values, source = _id_values(ids, what)
    index, _ = lookup_ids(values, data.items())
    unknown = [str(g) for g, i in zip(given, index) if i == 0]
    known = np.unique(index[index > 0])
    report = {"source": source, "given": int(len(index)), "known": int(known.size),
              "unknown": len(unknown), "unknown_examples": unknown[:10]}
    return known, report


def resolve_users(ids, data) -> tuple[np.ndarray, dict]:
    """User ids -> (sorted unique user indices, report). An unknown user is an error."""
    given, values, source = _id_values(ids, "users")
    index, _ = lookup_ids(values, data.users())
    if (index == 0).any():
        bad = [repr(g) for g, i in zip(given, index) if i == 0]
        raise EzSASRecError(
            f"--users {source}: {len(bad)} unknown user id(s) not in {data.path} "
            f"(first: {', '.join(bad[:5])})")
    users = np.unique(index)
    return users, {"source": source, "given": int(len(index)), "unique": int(users.size)}


_FEW_IDS = 8  # up to this many ids are looked up one by one (IdIndex.lookup)


class IdIndex:
    """Raw ids of a vocabulary (index order 1..n) -> indices, 0 for unknown.

    Integer vocabularies accept ints and integer strings; string vocabularies accept strings
    and ints (as their decimal text), like the batch job's id files.
    """

    def __init__(self, vocab):
        import pandas as pd
        import pyarrow as pa

        raw = raw_ids_by_index(vocab)
        self.is_int = pa.types.is_integer(raw.type)
        self.raw = raw.to_numpy(zero_copy_only=False)  # (n,) position i = index i + 1
        self.index = pd.Index(self.raw)

    def __len__(self) -> int:
        return len(self.raw)

    def _normal(self, value):
        if self.is_int:
            return strict_int_id(value)
        return value if isinstance(value, str) else str(value)

    def lookup(self, values) -> np.ndarray:
        """Raw ids (list) -> indices (n,) int64, 0 where unknown."""
        if len(values) == 0:
            return np.zeros(0, np.int64)
        normal = [self._normal(v) for v in values]
        found = np.zeros(len(normal), np.int64)
        ok = [i for i, v in enumerate(normal) if v is not None]
        if len(ok) <= _FEW_IDS:  # a request's few ids: hash lookups, without get_indexer's setup
            for i in ok:
                try:
                    found[i] = self.index.get_loc(normal[i]) + 1
                except KeyError:
                    pass
        else:
            pos = self.index.get_indexer([normal[i] for i in ok])
            found[ok] = pos + 1  # -1 (unknown) -> 0
        return found

    def raw_ids(self, indices) -> list:
        """Indices (1..n) -> raw ids as JSON-ready python values."""
        return [v.item() if isinstance(v, np.generic) else v
                for v in self.raw[np.asarray(indices, np.int64) - 1]]

    def memory_bytes(self) -> int:
        return int(self.index.memory_usage(deep=True) + getattr(self.raw, "nbytes", 0))


_INT_ID = re.compile(r"0|-?[1-9][0-9]{0,18}")  # ASCII digits, optional minus, no padding
_INT64 = (-(1 << 63), (1 << 63) - 1)


def strict_int_id(value) -> int | None:
    """An id an integer vocabulary may take, or None: an int (not a bool) within int64, or a
    string of exactly ASCII digits with an optional leading minus (no spaces, plus sign,
    leading zeros, ``_`` or non-ASCII digits)."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, np.integer)):
        number = int(value)
    elif isinstance(value, str) and _INT_ID.fullmatch(value):
        number = int(value)
    else:
        return None
    return number if _INT64[0] <= number <= _INT64[1] else None


def strict_ids(values, is_int: bool) -> list:
    """Request ids -> what :class:`IdIndex` looks up (None: unknown) for an integer
    (``is_int``) or a string vocabulary."""
    return [strict_int_id(v) for v in values] if is_int else list(values)
