"""Prepare: raw interaction logs -> k-core-filtered, encoded per-user sequences, on Ray Data.

The output is a prepared dataset (layout: :mod:`.dataset`); vocabularies are ordered by count
descending, then raw id, so the same input and options give byte-identical files. Steps: read
(one task per file), distinct ids (partial counts merged on the driver), encode (a broadcast
sorted id array), k-core rounds (vectorized counts, no shuffle), sequences (one two-stage Ray
shuffle by user, one Parquet file per partition). The driver holds only id vocabularies,
never the rows. How each step scales: docs/internals.md, "prepare".
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import MISSING, asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import outputs, storage
from .dataset import FORMAT_VERSION, hash_tree
from .errors import EzSASRecError, PrepareError, find_user_error
from .options import check_instance, option
from .readers import FORMATS, LogSpec, list_input_files, read_file, unix_to_millis
from .runtime import cluster_cpus, init_ray, keyed_stats_actor
from .storage import is_remote

SEQUENCE_ROW_GROUP = 65536  # users per Parquet row group of the sequence files


@dataclass
class PrepareConfig:
    """Options of ``prepare``; validated on construction."""

    input: str = option(MISSING, "file, directory, glob or URI (s3://, gs://, file://) of the "
                                 "raw log")
    output: str = option(MISSING, "prepared-dataset directory to write", yaml=False)
    format: str | None = option(None, "input format (default: from the file extension)",
                                choices=FORMATS)
    user_col: str | None = option(None, "user column name or 0-based position (default: "
                                        "detected)")
    item_col: str | None = option(None, "item column name or 0-based position (default: "
                                        "detected)")
    time_col: str | None = option(None, "time column name or position; 'none' for file order "
                                        "(default: detected)")
    delimiter: str | None = option(None, "text delimiter (default: detected)")
    header: bool | None = option(None, "text has a header line: true/false (default: detected)")
    k_core: int | None = option(None, "sets both --min-user and --min-item (default: unset)",
                                min=1)
    min_user: int = option(5, "drop users with fewer events (repeated to a fixed point)", min=1)
    min_item: int = option(5, "drop items with fewer events", min=1)
    max_history: int | None = option(None, "keep each user's most recent N events (default: "
                                           "all)", min=1)
    dedupe: bool = option(False, "drop exact duplicate (user, item, time) events")
    split: str = option("loo", "loo: last event = test, second last = validation; time: events "
                               "after --cutoff are held out", choices=("loo", "time"))
    cutoff: Any = option(None, "time split cutoff: unix seconds/ms or ISO-8601 (default: "
                               "none; needed by --split time)")
    on_bad_lines: str = option("error", "error, or skip bad lines (counted in the manifest)",
                               choices=("error", "skip"))
    null_values: str = option("", "comma-separated user/item values read as missing (dropped "
                                  "and counted), e.g. 'NA,NULL'; an empty field always is")
    overwrite: bool = option(False, "replace an existing output", yaml=False)
    num_partitions: int | None = option(None, "shuffle partitions (default: sized to the cluster "
                                              "and the data)", min=1)
    max_rounds: int = option(100, "k-core rounds before giving up", min=1)
    verbose: bool = option(True, "print progress and the summary table")

    def __post_init__(self):
        try:
            check_instance(self)
        except EzSASRecError as exc:  # prepare's errors are PrepareErrors
            raise PrepareError(exc.message) from None
        if self.k_core is not None:
            self.min_user = self.min_item = int(self.k_core)
        if self.split == "time":
            if self.cutoff is None:
                raise PrepareError("--split time needs --cutoff T (unix time or ISO-8601)")
            self.cutoff_ms = parse_time_value(self.cutoff, "--cutoff")
        elif self.cutoff is not None:
            raise PrepareError("--cutoff is only used with --split time")
        self.log_spec = LogSpec(format=self.format, user_col=self.user_col,
                                item_col=self.item_col, time_col=self.time_col,
                                delimiter=self.delimiter, header=self.header,
                                on_bad_lines=self.on_bad_lines,
                                null_values=_null_values(self.null_values))

    def options(self) -> dict:
        """The options that define the output (for the manifest and re-run checks)."""
        data = asdict(self)
        for key in ("input", "output", "overwrite", "num_partitions", "max_rounds", "verbose"):
            data.pop(key)
        return data


def _null_values(text: str) -> tuple[str, ...]:
    """``--null-values 'NA,NULL'`` -> ("NA", "NULL") (blank entries dropped)."""
    return tuple(dict.fromkeys(v.strip() for v in str(text or "").split(",") if v.strip()))


def parse_time_value(value, name: str) -> int:
    """Unix s/ms/us/ns (by magnitude, as in the log) or an ISO-8601 string -> unix ms."""
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        pass
    else:
        if math.isfinite(number):
            return int(round(unix_to_millis([number])[0][0]))
    try:
        parsed = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise PrepareError(f"{name}: unparseable time {value!r}; use unix time or ISO-8601") \
            from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=_dt.timezone.utc)
    return int(round(parsed.timestamp() * 1000))








def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _from_ipc(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()




# --------------------------------------------------------------------------------------------
# Block functions (run in Ray Data tasks). Each takes and returns whole blocks.


def _read_files(batch: pa.Table, spec: LogSpec, stats_actor):
    import ray

    for uri, index in zip(batch["uri"].to_pylist(), batch["file_index"].to_pylist()):
        stats: dict = {}
        yield from read_file(uri, index, spec, stats)
        ray.get(stats_actor.record.remote(uri, stats))


def _partial_id_counts(block: pa.Table) -> dict:
    """Block -> one row: rows, rows dropped for a null id, and IPC-encoded (id, n) tables."""
    null_user = pc.sum(block["user"].is_null()).as_py() or 0
    null_item = pc.sum(block["item"].is_null()).as_py() or 0
    valid = block.filter(pc.and_(block["user"].is_valid(), block["item"].is_valid()))
    users = valid.group_by("user").aggregate([([], "count_all")])
    items = valid.group_by("item").aggregate([([], "count_all")])
    has_time = pc.sum(valid["ts"].is_valid()).as_py() or 0
    return {
        "rows": np.array([block.num_rows]),
        "null_user": np.array([null_user]),
        "null_item": np.array([null_item]),
        "dropped_null": np.array([block.num_rows - valid.num_rows]),
        "timed_rows": np.array([has_time]),
        "users": np.array([_ipc(users.rename_columns(["id", "n"]))], dtype=object),
        "items": np.array([_ipc(items.rename_columns(["id", "n"]))], dtype=object),
    }


class _IdMerger:
    """Merges partial (id, n) tables; memory bounded by distinct ids times a small factor."""

    def __init__(self):
        self.parts: list[pa.Table] = []
        self.rows = 0
        self.merged_rows = 0

    def add(self, table: pa.Table):
        self.parts.append(table)
        self.rows += table.num_rows
        if self.rows > 2 * max(self.merged_rows, 1_000_000):
            self._merge()

    def _merge(self):
        if any(pa.types.is_string(t.schema.field("id").type) for t in self.parts):
            self.parts = [t.set_column(0, "id", t["id"].cast(pa.string())) for t in self.parts]
        table = pa.concat_tables(self.parts)
        table = table.group_by("id").aggregate([("n", "sum")]).rename_columns(["id", "n"])
        self.parts = [table]
        self.rows = self.merged_rows = table.num_rows

    def result(self) -> pa.Table:
        """All distinct ids sorted by raw id, with their counts."""
        if not self.parts:
            return pa.table({"id": pa.array([], pa.int64()), "n": pa.array([], pa.int64())})
        self._merge()
        table = self.parts[0]
        return table.take(pc.sort_indices(table["id"]))


def _encode_ids(values: pa.Array, sorted_ids: pa.Array) -> np.ndarray:
    """Raw ids -> positions in ``sorted_ids`` (every id is known to be present)."""
    if pa.types.is_integer(sorted_ids.type):
        return np.searchsorted(sorted_ids.to_numpy(), values.to_numpy()).astype(np.int32)
    if not pa.types.is_string(values.type):
        values = values.cast(pa.string())
    return pc.index_in(values, value_set=sorted_ids).to_numpy().astype(np.int32)


def _encode_block(block: pa.Table, users_ref, items_ref) -> pa.Table:
    import ray

    users, items = ray.get(users_ref), ray.get(items_ref)
    if block["user"].null_count or block["item"].null_count:
        block = block.filter(pc.and_(block["user"].is_valid(), block["item"].is_valid()))
    return pa.table({
        "u": _encode_ids(block["user"].combine_chunks(), users),
        "i": _encode_ids(block["item"].combine_chunks(), items),
        "ts": block["ts"].fill_null(0),
        "ord": block["ord"],
    })


def _core_counts(batch: dict, alive_ref, num_users: int, num_items: int) -> dict:
    """Counts of the events whose user and item are both alive: one k-core pass over a block."""
    import ray

    alive_users, alive_items = ray.get(alive_ref)
    u, i = batch["u"], batch["i"]
    keep = alive_users[u] & alive_items[i]
    return {
        "users": np.array([np.bincount(u[keep], minlength=num_users).tobytes()], dtype=object),
        "items": np.array([np.bincount(i[keep], minlength=num_items).tobytes()], dtype=object),
    }


def _split_for_shuffle(block: pa.Table, user_map: np.ndarray, item_map: np.ndarray,
                       partitions: int) -> list[dict]:
    """Map side of the shuffle: keep surviving events, recode them to final 1-based indices
    and cut the block into ``partitions`` pieces by ``user_index % partitions``."""
    u = user_map[block["u"].to_numpy()]
    i = item_map[block["i"].to_numpy()]
    keep = (u > 0) & (i > 0)
    u, i = u[keep], i[keep]
    ts, order = block["ts"].to_numpy()[keep], block["ord"].to_numpy()[keep]
    part = u % partitions
    perm = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[perm], np.arange(partitions + 1))
    pieces = []
    for p in range(partitions):
        rows = perm[bounds[p]:bounds[p + 1]]
        pieces.append({"user_index": u[rows], "item_index": i[rows], "ts": ts[rows],
                       "ord": order[rows]})
    return pieces if partitions > 1 else pieces[0]


def _write_partition(path: str, raw_users: pa.Array, options: dict, *pieces: dict) -> dict:
    """Reduce side of the shuffle: one whole partition -> one Parquet file of sequences."""
    group = {key: np.concatenate([piece[key] for piece in pieces]) for key in pieces[0]}
    table, stats = _build_sequences(group, raw_users, **options)
    if table.num_rows:  # row groups of 64k users: scoring reads row ranges of a file
        pq.write_table(table, path, compression="zstd", row_group_size=SEQUENCE_ROW_GROUP)
    stats.update(users=table.num_rows, events=int(pc.sum(table["n_events"]).as_py() or 0),
                 train_only=int(pc.sum(table["train_only"].cast(pa.int64())).as_py() or 0))
    return stats


def _dedupe_sorted(u, i, ts, order):
    """Mask of first occurrences of (user, item, ts), given rows sorted by (u, ts, i, ord)."""
    same = (u[1:] == u[:-1]) & (i[1:] == i[:-1]) & (ts[1:] == ts[:-1])
    return np.concatenate([[True], ~same]) if len(u) else np.zeros(0, bool)


def _build_sequences(group: dict, raw_users: pa.Array, has_time: bool, split: str,
                     cutoff_ms: int | None, max_history: int | None,
                     dedupe: bool) -> tuple[pa.Table, dict]:
    """Events of whole users -> one row per user. Sorts and slices with numpy only."""

    u, i, ts, order = group["user_index"], group["item_index"], group["ts"], group["ord"]
    stats = {"duplicates": 0, "truncated": 0}
    if dedupe:
        perm = np.lexsort((order, i, ts, u))
        u, i, ts, order = u[perm], i[perm], ts[perm], order[perm]
        first = _dedupe_sorted(u, i, ts, order)
        stats["duplicates"] = int((~first).sum())
        u, i, ts, order = u[first], i[first], ts[first], order[first]
    perm = np.lexsort((order, ts, u)) if has_time else np.lexsort((order, u))
    u, i, ts = u[perm], i[perm], ts[perm]
    n = len(u)
    starts = np.flatnonzero(np.concatenate([[True], u[1:] != u[:-1]])) if n else np.zeros(0, int)
    ends = np.append(starts[1:], n)
    if max_history is not None and n:
        position_from_end = np.repeat(ends, ends - starts) - np.arange(n)  # 1 = most recent
        keep = position_from_end <= max_history
        stats["truncated"] = int((~keep).sum())
        u, i, ts = u[keep], i[keep], ts[keep]
        lengths = np.minimum(ends - starts, max_history)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        ends = starts + lengths
        n = len(u)
    lengths = (ends - starts).astype(np.int32)
    offsets = pa.array(np.append(starts, n).astype(np.int32))
    user_index = u[starts].astype(np.int32)
    if split == "time":
        before = np.concatenate([[0], np.cumsum(ts <= cutoff_ms)]).astype(np.int64)
        n_train = (before[ends] - before[starts]).astype(np.int32)
        train_only = n_train == lengths
    else:
        train_only = lengths < 3
        n_train = np.where(train_only, lengths, lengths - 2).astype(np.int32)
    columns = {
        "user_index": pa.array(user_index),
        "user_id": raw_users.take(pa.array(user_index - 1)),
        "item_indices": pa.ListArray.from_arrays(offsets, pa.array(i.astype(np.int32))),
    }
    if has_time:
        columns["timestamps"] = pa.ListArray.from_arrays(offsets, pa.array(ts.astype(np.int64)))
    columns.update(n_events=pa.array(lengths), n_train=pa.array(n_train),
                   train_only=pa.array(train_only))
    return pa.table(columns), stats


# --------------------------------------------------------------------------------------------
# Output helpers




def _write_vocab(directory: str, raw_ids: pa.Array, counts: np.ndarray):
    os.makedirs(directory)
    table = pa.table({"raw_id": raw_ids,
                      "index": pa.array(np.arange(1, len(raw_ids) + 1, dtype=np.int32)),
                      "count": pa.array(counts.astype(np.int64))})
    pq.write_table(table, os.path.join(directory, "part-0.parquet"), compression="zstd")


def _vocab_order(counts: np.ndarray, alive: np.ndarray) -> np.ndarray:
    """Codes of alive ids ordered by count descending, then raw id (= code, as codes are sorted)."""
    codes = np.flatnonzero(alive)
    return codes[np.lexsort((codes, -counts[codes]))]


# --------------------------------------------------------------------------------------------
# The stage


def prepare(input: str, output: str, *, address: str | None = None, verbose: bool = True,
            **options) -> dict:
    """Read a raw log, k-core filter it, encode ids and write a prepared dataset.

    Args mirror ``ezsasrec prepare`` (see :class:`PrepareConfig`). Returns the manifest.
    Raises :class:`PrepareError` with a one-line message on bad input.
    """
    config = PrepareConfig(input=input, output=output, verbose=verbose, **options)
    skipped: list[str] = []  # Spark/Hadoop _temporary/, _SUCCESS, .staging/, .crc
    files = list_input_files(config.input, skipped=skipped)  # bad paths fail before Ray starts
    try:
        tmp = _start_output(config)
    except EzSASRecError as exc:  # prepare's errors are PrepareErrors
        raise PrepareError(exc.message) from None
    init_ray(address)
    try:
        return _prepare(config, files, tmp, verbose, skipped)
    except Exception as exc:
        user_error = find_user_error(exc)
        if user_error is not None and user_error is not exc:
            raise type(user_error)(user_error.message) from None
        raise
    finally:
        if is_remote(config.output):
            shutil.rmtree(tmp, ignore_errors=True)  # a staging directory of ours
        else:
            outputs.discard(tmp)  # gone already once published


def _start_output(config: PrepareConfig) -> str:
    """The directory to write into: a temporary sibling of a local output, or, for one on
    object storage, a local staging directory uploaded at the end (_SUCCESS last)."""
    if not is_remote(config.output):
        return outputs.start(config.output, overwrite=config.overwrite)
    storage.check_output(config.output, config.overwrite)
    return tempfile.mkdtemp(prefix="ezsasrec-prepare-")


def _publish(tmp: str, config: PrepareConfig):
    if is_remote(config.output):
        storage.publish(tmp, config.output, kind="prepared", overwrite=config.overwrite)
    else:
        outputs.publish(tmp, config.output, kind="prepared", overwrite=config.overwrite)


def _prepare(config: PrepareConfig, files: list[str], tmp: str, verbose: bool,
             skipped: list[str] = ()) -> dict:
    """The stage's steps, each timed; writes into ``tmp`` and publishes it."""
    started = time.time()
    timings: dict[str, float] = {}

    def log(message):
        if verbose:
            print(message, flush=True)

    def timed(name, step, *args):
        t = time.time()
        out = step(*args)
        timings[name] = time.time() - t
        return out

    raw, file_stats = timed("read_s", _read_step, config, files)
    log(f"read {len(files)} file(s) in {timings['read_s']:.1f}s"
        + (f"; skipped {len(skipped)} hidden file(s) with _ or . names under the input, "
           f"e.g. {skipped[0]}" if skipped else ""))
    users, items, totals = timed("distinct_s", _distinct_step, config, raw)
    encoded = timed("encode_s", _encode_step, raw, users, items)
    del raw
    kcore = timed("kcore_s", _kcore_step, config, encoded, users.num_rows, items.num_rows, log)
    vocab, seq_stats, partitions = timed("sequences_s", _sequences_step, config, encoded,
                                         users, items, kcore, totals["has_time"], tmp)
    del encoded
    timings["total_s"] = time.time() - started
    manifest = _manifest(config, files, file_stats, totals, kcore, vocab, seq_stats,
                         partitions, timings, tmp, skipped)
    with open(os.path.join(tmp, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=False, default=str)
    _publish(tmp, config)
    log(format_summary(manifest))
    return manifest


def _read_step(config: PrepareConfig, files: list[str]):
    """One Ray Data task per file -> (materialized raw blocks, per-file stats)."""
    import ray
    import ray.data

    stats_actor = keyed_stats_actor()
    file_rows = [{"uri": uri, "file_index": index} for index, uri in enumerate(files)]
    raw = (ray.data.from_items(file_rows, override_num_blocks=len(file_rows))
           .map_batches(_read_files, batch_size=1, batch_format="pyarrow",
                        fn_kwargs={"spec": config.log_spec, "stats_actor": stats_actor})
           .materialize())
    return raw, ray.get(stats_actor.get.remote())


def _distinct_step(config: PrepareConfig, raw):
    """Distinct user and item ids with counts (merged on the driver) and row totals."""
    user_merger, item_merger = _IdMerger(), _IdMerger()
    totals = {"rows": 0, "null_user": 0, "null_item": 0, "dropped_null": 0, "timed_rows": 0}
    for batch in raw.map_batches(_partial_id_counts, batch_size=None,
                                 batch_format="pyarrow").iter_batches(batch_size=None,
                                                                      batch_format="numpy"):
        for key in totals:
            totals[key] += int(batch[key].sum())
        for row in range(len(batch["rows"])):
            user_merger.add(_from_ipc(batch["users"][row]))
            item_merger.add(_from_ipc(batch["items"][row]))
    if totals["rows"] == totals["dropped_null"]:
        raise PrepareError(f"{config.input}: no usable rows (read {totals['rows']}, all with a "
                           "null user or item)")
    totals["has_time"] = totals["timed_rows"] > 0
    if config.split == "time" and not totals["has_time"]:
        raise PrepareError(f"{config.input}: --split time needs a time column; none was found")
    return user_merger.result(), item_merger.result(), totals


def _encode_step(raw, users: pa.Table, items: pa.Table):
    """Raw ids -> int32 codes (the sorted id arrays broadcast once), materialized."""
    import ray

    users_ref, items_ref = ray.put(users["id"].combine_chunks()), ray.put(
        items["id"].combine_chunks())
    return raw.map_batches(_encode_block, batch_size=None, batch_format="pyarrow",
                           fn_kwargs={"users_ref": users_ref, "items_ref": items_ref}
                           ).materialize()


def _kcore_step(config: PrepareConfig, encoded, num_users: int, num_items: int, log) -> dict:
    """k-core rounds until nothing changes -> alive masks, final counts and the rounds."""
    import ray

    alive_users, alive_items = np.ones(num_users, bool), np.ones(num_items, bool)
    rounds = []
    for round_number in range(1, config.max_rounds + 1):
        user_counts, item_counts = _count_alive(encoded, alive_users, alive_items, ray)
        record = {"round": round_number, "events": int(user_counts.sum()),
                  "users": int(alive_users.sum()), "items": int(alive_items.sum())}
        new_users = alive_users & (user_counts >= config.min_user)
        new_items = alive_items & (item_counts >= config.min_item)
        record.update(users_after=int(new_users.sum()), items_after=int(new_items.sum()))
        rounds.append(record)
        log(f"k-core round {round_number}: {record['events']:,} events, "
            f"{record['users']:,} -> {record['users_after']:,} users, "
            f"{record['items']:,} -> {record['items_after']:,} items")
        if (new_users == alive_users).all() and (new_items == alive_items).all():
            break
        alive_users, alive_items = new_users, new_items
    else:
        raise PrepareError(f"k-core did not converge in {config.max_rounds} rounds")
    if not alive_users.any() or not alive_items.any():
        raise PrepareError(
            f"{config.input}: nothing survives the k-core filter (min_user={config.min_user}, "
            f"min_item={config.min_item}); lower --k-core")
    return {"alive_users": alive_users, "alive_items": alive_items, "rounds": rounds,
            "user_counts": user_counts, "item_counts": item_counts}


def _count_alive(encoded, alive_users, alive_items, ray) -> tuple[np.ndarray, np.ndarray]:
    """One pass: each block counts its events whose user and item are both alive."""
    num_users, num_items = alive_users.size, alive_items.size
    alive_ref = ray.put((alive_users, alive_items))
    user_counts = np.zeros(num_users, np.int64)
    item_counts = np.zeros(num_items, np.int64)
    passes = encoded.map_batches(
        _core_counts, batch_size=None, batch_format="numpy",
        fn_kwargs={"alive_ref": alive_ref, "num_users": num_users, "num_items": num_items})
    for batch in passes.iter_batches(batch_size=None, batch_format="numpy"):
        for row in range(len(batch["users"])):
            user_counts += np.frombuffer(batch["users"][row], np.int64)
            item_counts += np.frombuffer(batch["items"][row], np.int64)
    return user_counts, item_counts


def _sequences_step(config: PrepareConfig, encoded, users: pa.Table, items: pa.Table,
                    kcore: dict, has_time: bool, tmp: str):
    """Vocabularies in count order, then one two-stage shuffle by user into sequence files."""
    user_order = _vocab_order(kcore["user_counts"], kcore["alive_users"])
    item_order = _vocab_order(kcore["item_counts"], kcore["alive_items"])
    vocab = {"raw_user_ids": _final_ids(users["id"], user_order),
             "raw_item_ids": _final_ids(items["id"], item_order),
             "events_after_kcore": int(kcore["user_counts"].sum())}
    _write_vocab(os.path.join(tmp, "users"), vocab["raw_user_ids"],
                 kcore["user_counts"][user_order])
    _write_vocab(os.path.join(tmp, "items"), vocab["raw_item_ids"],
                 kcore["item_counts"][item_order])
    partitions = config.num_partitions or max(
        cluster_cpus(), math.ceil(vocab["events_after_kcore"] / 2_000_000))
    options = {"has_time": has_time, "split": config.split,
               "cutoff_ms": getattr(config, "cutoff_ms", None),
               "max_history": config.max_history, "dedupe": config.dedupe}
    seq_stats = _shuffle_to_sequences(encoded, _index_map(user_order, users.num_rows),
                                      _index_map(item_order, items.num_rows),
                                      vocab["raw_user_ids"], options, partitions,
                                      os.path.join(tmp, "sequences"),
                                      pin=is_remote(config.output))
    return vocab, seq_stats, partitions


def _index_map(order: np.ndarray, size: int) -> np.ndarray:
    """code -> final index (1..n in ``order``), 0 for codes filtered out."""
    out = np.zeros(size, np.int32)
    out[order] = np.arange(1, len(order) + 1, dtype=np.int32)
    return out


def _shuffle_to_sequences(encoded, user_map, item_map, raw_user_ids, options: dict,
                          partitions: int, seq_dir: str, pin: bool = False) -> dict:
    """Map tasks cut each block by ``user % partitions``; each reduce task writes one file
    (``pin``: on this node, whose local staging directory is uploaded to object storage)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    os.makedirs(seq_dir)
    split_block = ray.remote(num_returns=partitions)(_split_for_shuffle)
    maps = [ray.put(user_map), ray.put(item_map)]
    pieces = [split_block.remote(block, *maps, partitions) for block in encoded.to_arrow_refs()]
    if partitions == 1:
        pieces = [[piece] for piece in pieces]
    raw_users_ref = ray.put(raw_user_ids)
    write = ray.remote(_write_partition)
    if pin:
        write = write.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=False))
    seq_stats = {"duplicates": 0, "truncated": 0, "events": 0, "users": 0, "train_only": 0}
    for stats in ray.get([
        write.remote(os.path.join(seq_dir, f"part-{p:05d}.parquet"), raw_users_ref, options,
                     *[block_pieces[p] for block_pieces in pieces])
        for p in range(partitions)
    ]):
        for key in seq_stats:
            seq_stats[key] += stats[key]
    return seq_stats


SKIPPED_LISTED = 20  # hidden files named in the manifest (all are counted)


def _manifest(config: PrepareConfig, files, file_stats, totals, kcore, vocab, seq_stats,
              partitions, timings, tmp, skipped=()) -> dict:
    """manifest.json: where the data came from, what was dropped and why, content hashes."""
    alive_users, alive_items = kcore["alive_users"], kcore["alive_items"]
    counts = {
        "files_read": len(files),
        "files_skipped_hidden": len(skipped),
        "rows_read": totals["rows"],
        "bad_lines_skipped": sum(s.get("bad_lines", 0) for s in file_stats.values()),
        "dropped_null_user": totals["null_user"],
        "dropped_null_item": totals["null_item"],
        "dropped_null_rows": totals["dropped_null"],
        "events_after_nulls": totals["rows"] - totals["dropped_null"],
        "events_after_kcore": vocab["events_after_kcore"],
        "duplicates_dropped": seq_stats["duplicates"],
        "truncated_by_max_history": seq_stats["truncated"],
        "events_kept": seq_stats["events"],
        "users_kept": int(alive_users.sum()),
        "items_kept": int(alive_items.sum()),
        "users_before": alive_users.size,
        "items_before": alive_items.size,
        "users_train_only": seq_stats["train_only"],
    }
    raw_user_ids, raw_item_ids = vocab["raw_user_ids"], vocab["raw_item_ids"]
    return {
        "format_version": FORMAT_VERSION,
        "kind": "ezsasrec_ray.prepared",
        "source": {"input": config.input, "files": files,
                   "files_skipped_hidden": list(skipped[:SKIPPED_LISTED]),
                   "file_stats": {k: {kk: vv for kk, vv in v.items() if kk != "columns"}
                                  for k, v in file_stats.items()}},
        "columns": next(iter(file_stats.values()), {}).get("columns", {}),
        "has_time": totals["has_time"],
        "time_unit": "ms" if totals["has_time"] else None,
        # the unit(s) each file's times were read in (s, ms, us, ns by magnitude; iso;
        # timestamp), all normalised to ms
        "time_units_read": {uri: file_stats[uri]["time_unit"] for uri in files
                            if file_stats.get(uri, {}).get("time_unit")},
        "options": config.options(),
        "split": config.split,
        "cutoff_ms": getattr(config, "cutoff_ms", None),
        "kcore_rounds": kcore["rounds"],
        "counts": counts,
        "vocab": {"num_users": len(raw_user_ids), "num_items": len(raw_item_ids),
                  "user_id_type": str(raw_user_ids.type), "item_id_type": str(raw_item_ids.type)},
        "partitions": partitions,
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "content_hashes": hash_tree(tmp),
    }


def _final_ids(sorted_ids: pa.ChunkedArray, order: np.ndarray) -> pa.Array:
    return sorted_ids.combine_chunks().take(pa.array(order))




def format_summary(manifest: dict) -> str:
    """A plain-text summary table of a prepare run."""
    c = manifest["counts"]
    lines = [
        f"{'files read':<34}{c.get('files_read', len(manifest['source']['files'])):>14,}",
        f"{'files skipped (hidden: _ or . names)':<34}{c.get('files_skipped_hidden', 0):>14,}",
        f"{'rows read':<34}{c['rows_read']:>14,}",
        f"{'bad lines skipped':<34}{c['bad_lines_skipped']:>14,}",
        f"{'dropped: null user':<34}{c['dropped_null_user']:>14,}",
        f"{'dropped: null item':<34}{c['dropped_null_item']:>14,}",
    ]
    for r in manifest["kcore_rounds"]:
        lines.append(f"{'k-core round ' + str(r['round']):<34}{r['events']:>14,} events "
                     f"{r['users']:>9,} -> {r['users_after']:,} users "
                     f"{r['items']:>9,} -> {r['items_after']:,} items")
    lines += [
        f"{'events after k-core':<34}{c['events_after_kcore']:>14,}",
        f"{'dropped: duplicates (--dedupe)':<34}{c['duplicates_dropped']:>14,}",
        f"{'dropped: over --max-history':<34}{c['truncated_by_max_history']:>14,}",
        f"{'events kept':<34}{c['events_kept']:>14,}",
        f"{'users kept':<34}{c['users_kept']:>14,}",
        f"{'items kept':<34}{c['items_kept']:>14,}",
        f"{'users train-only (no target)':<34}{c['users_train_only']:>14,}",
        f"time {manifest['timings']['total_s']:.1f}s",
    ]
    width = max(len(line) for line in lines)
    units = manifest.get("time_units_read") or {}
    if len(set(units.values())) > 1 or any("+" in u for u in units.values()):
        shown = "; ".join(f"{os.path.basename(uri)}: {unit}"
                          for uri, unit in list(units.items())[:10])
        more = f"; ... ({len(units)} files)" if len(units) > 10 else ""
        lines.append(f"note: time units differ across files (each value read by its "
                     f"magnitude, all stored as ms): {shown}{more}")
    return "\n".join(["prepare summary", "-" * width, *lines])
