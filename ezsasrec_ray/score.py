"""Nightly full-catalog scoring: the top-N items for every user, on Ray Data batch inference.

driver: open the prepared dataset and the model directory (no TensorFlow), refuse different
vocabularies, resolve --users / --exclude-items / --candidates to indices. Ray Data: the
sequence files -> :class:`BatchScorer` on an actor pool (the model loads once per actor) ->
written into a temporary sibling. driver: check every expected user was written exactly once,
then publish with manifest.json and ``_SUCCESS`` (:mod:`.outputs`).

Each output row is ``user_id, item_ids (list), scores (list)``, score descending, ties by the
smaller item index, the user's history excluded unless ``include_seen``; identical for any
number of actors, batch and chunk size (:mod:`.encoder`, :mod:`.topk`). Memory per actor is
O(threads x 512 x chunk + 2 x batch x k), never O(batch x catalog).
Threads, determinism, fault tolerance: docs/internals.md, "score".
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import itertools
import json
import math
import numbers
import os
import posixpath
import time
import warnings
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import outputs, storage
from .batching import left_pad
from .dataset import SEQUENCE_COLUMNS, PreparedDataset, holdout_examples, load_prepared, sha256_file
from .encoder import user_vectors, warm_up
from .errors import EzSASRecError, find_user_error
from .index import check_available, index_option, make_index, recall_counts
from .model_io import WEIGHTS_FILE, check_vocab, load_model, model_info
from .options import check_instance, option
from .runtime import SCORER_ENV, init_ray, keyed_stats_actor, set_threads, storage_env
from .storage import is_remote, local_dir
from .topk import DEFAULT_CHUNK_SIZE, TopK, exact_scores
from .vocab import lookup_ids, raw_ids_by_index, resolve_items, resolve_users

FORMAT_VERSION = 1
FAULT_ENV = "EZSASREC_FAULT_SCORE_CRASH_ONCE"
FORMATS = ("parquet", "jsonl", "csv")
HOLDOUTS = ("test", "valid")
DEFAULT_BATCH_SIZE = 4096  # users per Ray Data batch (fewer part-filled encoder calls than 1024)
RESULTS_DIR = "recommendations"
_SCORE_ROWS = 512  # users per TopK call: a task of the actor's thread pool
# Batches an actor scores at once. Two: while one batch's last TopK slices finish, the
# scorer's idle threads start on the next batch's encoder calls (one shared thread pool, first
# in, first out), instead of waiting at the end of every batch.
BATCHES_PER_ACTOR = 2
_READ_ROWS = 65536  # users per block read from the sequence files


# --------------------------------------------------------------------------------------------
# User vectors: the model's user_embeddings, with a fixed shape per call










# --------------------------------------------------------------------------------------------
# Raw ids <-> indices
















# --------------------------------------------------------------------------------------------
# Opening the inputs


def _open_data(data):
    if isinstance(data, PreparedDataset):
        return data
    return load_prepared(os.fspath(data))




@dataclass
class _ModelSource:
    """How actors get the model: a directory to load, or config + weights in the object store."""

    info: SimpleNamespace
    path: str | None = None
    weights_ref: object = None
    manifest: dict = field(default_factory=dict)


def _model_source(model, ray_put=None) -> _ModelSource:
    """A path: actors load the directory. A loaded model: its own weights travel through the
    object store (``ray_put``), whatever is on disk; its ``metadata`` is kept."""
    if isinstance(model, (str, os.PathLike)):
        info = model_info(os.fspath(model))
    else:
        directory = getattr(model, "model_dir", None)
        info = SimpleNamespace(config=model.config, metadata=getattr(model, "metadata", None),
                               model_dir=directory)
    metadata = info.metadata or {}
    manifest = {"path": info.model_dir, "format_version": metadata.get("format_version"),
                "trained_at": metadata.get("trained_at"),
                "vocab_fingerprint": metadata.get("vocab_fingerprint"),
                "best_epoch": metadata.get("best_epoch"), "config": info.config.to_dict()}
    if isinstance(model, (str, os.PathLike)):
        manifest["weights_sha256"] = sha256_file(os.path.join(info.model_dir, WEIGHTS_FILE))
        # on object storage, every actor copies it from there (to its own node)
        path = os.fspath(model) if is_remote(model) else info.model_dir
        manifest["path"] = path
        return _ModelSource(info=info, path=path, manifest=manifest)
    weights = [np.asarray(w) for w in model.get_weights()]
    digest = hashlib.sha256()
    for w in weights:
        digest.update(np.ascontiguousarray(w).tobytes())
    manifest["weights_sha256"] = digest.hexdigest()  # of the arrays, not of a file
    ref = ray_put(weights) if ray_put else None
    return _ModelSource(info=info, weights_ref=ref, manifest=manifest)


def _load_model_from_source(config: dict, path: str | None, weights_ref):
    if path is not None:
        return load_model(path)
    import ray

    from .model import SASRecConfig, build_model

    model = build_model(SASRecConfig.from_dict(config))
    model.set_weights(ray.get(weights_ref))
    return model




def _maybe_crash():
    """Fault injection (tests): the first caller creates the marker file and dies."""
    marker = os.environ.get(FAULT_ENV)
    if not marker:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, f"scorer pid {os.getpid()} crashed here\n".encode())
    os.close(fd)
    os._exit(1)


# --------------------------------------------------------------------------------------------
# The per-batch scorer (a Ray Data callable class; also usable locally)


class _CPUTimed:
    """An executor's ``map`` (or the builtin one, for ``pool=None``) that adds the CPU seconds
    of each task, in the thread that runs it, to ``spent`` (a list): what a phase of a batch
    costs, even while the actor's other batch shares the threads."""

    def __init__(self, pool, spent: list):
        self.pool, self.spent = pool, spent

    def map(self, fn, items):
        def timed(item):
            start = time.thread_time()
            try:
                return fn(item)
            finally:
                self.spent.append(time.thread_time() - start)

        return (self.pool.map if self.pool is not None else map)(timed, items)


class BatchScorer:
    """Sequences batch (pyarrow) -> one row per user: ``user_id, item_ids, scores``.

    Built once per actor: loads the model, builds one :class:`.topk.TopK` over the item table
    (with the exclusions and candidates), and reads the item vocabulary. With ``threads`` > 1,
    a batch's encoder calls, then its TopK row slices, run on a pool of that many threads, one
    call per thread (TF runs each op on one thread; set BLAS to one thread per process, as
    :func:`recommend` does for its actors). The slices are small (_SCORE_ROWS users) and taken
    from a queue, so a thread that the OS leaves waiting holds up the others little. Calls
    may overlap (:data:`BATCHES_PER_ACTOR`): they share the thread pool, and only read the
    model and the TopK index.
    """

    def __init__(self, *, model_config: dict | None = None, model_path: str | None = None,
                 weights_ref=None, model=None, data_path: str, top_n: int, holdout: str | None = None,
                 split_kind: str = "loo", include_seen: bool = False, users_ref=None,
                 exclude_items=None, candidates=None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 threads: int | None = None, list_encoding: str | None = None,
                 stats=None, index_options: dict | None = None, recall_share: float = 0.0):
        import ray


        set_threads(threads, concurrent_calls=True)
        self.pool = ThreadPoolExecutor(int(threads)) if threads and int(threads) > 1 else None
        self.model = model if model is not None else _load_model_from_source(
            model_config, model_path, weights_ref)
        warm_up(self.model)
        table = np.asarray(self.model.item_embeddings().numpy(), np.float32)

        def get(x):
            return ray.get(x) if isinstance(x, ray.ObjectRef) else x

        exclude_items, candidates = get(exclude_items), get(candidates)
        self.users = get(users_ref)  # sorted user indices or None
        self.topk = make_index(table, **(index_options or {}), exclude_items=exclude_items,
                               candidates=candidates, chunk_size=chunk_size,
                               threads=1 if self.pool else threads)
        # recall against exact: a share of each batch's users scored exactly too
        self.recall_share = recall_share if not self.topk.is_exact() else 0.0
        self.exact = TopK(table, exclude_items=exclude_items, candidates=candidates,
                          chunk_size=chunk_size) if self.recall_share else None
        self.topk.warm_up()
        self.item_ids = raw_ids_by_index(load_prepared(data_path).items())
        self.top_n, self.holdout, self.split_kind = int(top_n), holdout, split_kind
        self.include_seen = include_seen
        self.list_encoding = list_encoding
        self.stats = stats
        self.actor = f"{os.uname().nodename}:{os.getpid()}"  # whose batch windows (busy time)

    def histories(self, batch: pa.Table) -> tuple[pa.Table, pa.ListArray]:
        """The users kept and the history each is scored on (time order)."""
        if batch.num_rows and self.users is not None:
            index = batch["user_index"].to_numpy()
            pos = np.minimum(np.searchsorted(self.users, index), max(self.users.size - 1, 0))
            keep = (self.users[pos] == index) if self.users.size else np.zeros(len(index), bool)
            batch = batch.filter(pa.array(keep))
        if self.holdout is None or batch.num_rows == 0:
            return batch, batch["item_indices"].combine_chunks()
        user_index, histories, _ = holdout_examples(batch, self.holdout, self.split_kind)
        index = batch["user_index"].to_numpy()
        order = np.argsort(index, kind="stable")
        rows = order[np.searchsorted(index[order], user_index)]
        return batch.take(pa.array(rows)), histories

    def __call__(self, batch: pa.Table) -> pa.Table:
        _maybe_crash()
        started, wall_started = time.perf_counter(), time.time()
        first = int(pc.min(batch["user_index"]).as_py()) if batch.num_rows else -1
        users, histories = self.histories(batch)
        phases: dict = {}
        result = self.score(users["user_id"].combine_chunks(), histories, timings=phases,
                            sample_seed=first)
        if self.stats is not None and first >= 0:
            # Not waited for: on a busy machine the stats actor can take a tenth of a batch to
            # answer, time the scorer's threads would sit idle. recommend() waits for every
            # batch's record before it checks the counts.
            lengths = pc.list_value_length(result["item_ids"]).to_numpy()
            self.stats.record.remote(first, {
                "rows": int(result.num_rows), "short": int((lengths < self.top_n).sum()),
                "seconds": time.perf_counter() - started, **phases,
                "window": (wall_started, time.time()), "actor": self.actor,
                "index_build_s": getattr(self.topk, "build_seconds", 0.0),
                "index_bytes": getattr(self.topk, "index_bytes", 0)})
        if self.list_encoding == "json":
            result = pa.table({
                "user_id": result["user_id"],
                "item_ids": pa.array([json.dumps(v) for v in result["item_ids"].to_pylist()]),
                "scores": pa.array([json.dumps(v) for v in result["scores"].to_pylist()]),
            })
        return result

    def score(self, user_ids: pa.Array, histories: pa.ListArray, *,
              timings: dict | None = None, sample_seed: int = 0) -> pa.Table:
        """user ids (B,), histories (B lists of item indices) -> the output table.
        ``timings`` (a dict), if given, gets the CPU seconds the scorer's threads spent in the
        encoder and in the catalog (``encoder_cpu_s``, ``catalog_cpu_s``; host CPU only), and
        the recall check's counts (``recall_found``, ``recall_total``)."""
        n = len(histories)
        idx = np.zeros((n, self.top_n), np.int32)
        sc = np.zeros((n, self.top_n), np.float32)
        lengths = pc.list_value_length(histories).fill_null(0).to_numpy()
        encoder_cpu, catalog_cpu = [], []
        vecs = user_vectors(self.model, histories, executor=_CPUTimed(self.pool, encoder_cpu))

        def top(start):
            stop = min(n, start + _SCORE_ROWS)
            seen = self._seen(histories.slice(start, stop - start), lengths[start:stop])
            idx[start:stop], sc[start:stop] = self.topk(vecs[start:stop], self.top_n,
                                                        histories=seen)

        for _ in _CPUTimed(self.pool, catalog_cpu).map(top, range(0, n, _SCORE_ROWS)):
            pass
        if timings is not None:
            timings.update(encoder_cpu_s=sum(encoder_cpu), catalog_cpu_s=sum(catalog_cpu))
            if self.exact is not None:
                timings.update(self._recall(vecs, histories, lengths, idx, sample_seed))
        valid = idx > 0  # padding (fewer allowed items than top_n) is never returned
        offsets = pa.array(np.concatenate([[0], np.cumsum(valid.sum(axis=1))]).astype(np.int32))
        items = self.item_ids.take(pa.array(idx[valid].astype(np.int64) - 1))
        return pa.table({
            "user_id": user_ids,
            "item_ids": pa.ListArray.from_arrays(offsets, items),
            "scores": pa.ListArray.from_arrays(offsets, pa.array(sc[valid], pa.float32())),
        })


    def _seen(self, histories: pa.ListArray, lengths: np.ndarray):
        """The items these rows may not get, left-padded (None with include_seen)."""
        if self.include_seen:
            return None
        return left_pad(histories, max(1, int(lengths.max(initial=1))))

    def _recall(self, vecs, histories, lengths, idx, seed: int) -> dict:
        """A random share of the batch's rows scored exactly too: how many of their exact
        top-n items the approximate lists hold."""
        rows = np.flatnonzero(np.random.default_rng(seed).random(len(idx)) < self.recall_share)
        found = total = 0
        for start in range(0, rows.size, _SCORE_ROWS):
            part = rows[start:start + _SCORE_ROWS]
            seen = self._seen(histories.take(pa.array(part)), lengths[part])
            exact, _ = self.exact(vecs[part], self.top_n, histories=seen)
            hits, count = recall_counts(idx[part], exact)
            found, total = found + hits, total + count
        return {"recall_found": found, "recall_total": total}


# --------------------------------------------------------------------------------------------
# The stage


def _read_sequence_files(batch: dict):
    """Ray Data read step: rows [start, stop) of a Parquet file of sequences -> blocks of up to
    _READ_ROWS users (only the row groups that overlap the range are read). A dataset on
    object storage (``root``) is read from this node's copy of it."""
    for path, root, start, stop in zip(batch["path"], batch["root"], batch["start"],
                                       batch["stop"]):
        if root:
            path = os.path.join(local_dir(str(root)), "sequences", os.path.basename(str(path)))
        parquet = pq.ParquetFile(str(path))
        offset = 0
        for group in range(parquet.num_row_groups):
            rows = parquet.metadata.row_group(group).num_rows
            lo, hi = max(int(start) - offset, 0), min(int(stop) - offset, rows)
            offset += rows
            if lo >= hi:
                continue
            table = parquet.read_row_group(group, columns=list(SEQUENCE_COLUMNS)).slice(lo, hi - lo)
            for at in range(0, table.num_rows, _READ_ROWS):
                yield table.slice(at, _READ_ROWS)


def _sequences_dataset(data, blocks: int = 1, min_rows: int = 1):
    """The prepared sequences as a streaming Ray Dataset of about ``blocks`` blocks (row ranges
    of the files, a multiple of ``min_rows`` users each but for a file's last range, of equal
    sizes within a file to one batch).

    A block goes to one scoring actor, so an actor pool needs several blocks to run in parallel
    even when the users sit in one file (Ray Data would merge a file's output into one block).
    Not ``read_parquet``: its file-listing task needs a whole CPU, which a fixed actor pool
    holding every CPU (2 actors on 2 cores) never frees, so the job would wait forever. These
    read tasks take no CPU slot (reading is light next to scoring).
    """
    import ray.data

    files = sorted(os.path.join(data.sequences_path, name)
                   for name in os.listdir(data.sequences_path) if name.endswith(".parquet"))
    if not files:
        raise EzSASRecError(f"{data.path}: no sequence files in sequences/")
    counts = [pq.ParquetFile(path).metadata.num_rows for path in files]  # the footers only
    tasks = [{"path": files[f], "root": data.uri or "", "start": start, "stop": stop}
             for f, start, stop in _row_ranges(counts, blocks, min_rows)]
    remote_args = {"runtime_env": {"env_vars": storage_env()}} if data.uri else {}  # readers
    return ray.data.from_items(tasks, override_num_blocks=len(tasks)).map_batches(
        _read_sequence_files, batch_size=1, batch_format="numpy", num_cpus=0, **remote_args)


def _row_ranges(counts: list[int], blocks: int, min_rows: int) -> list[tuple[int, int, int]]:
    """Files of ``counts`` rows -> about ``blocks`` row ranges ``(file, start, stop)``: whole
    batches of ``min_rows`` (but a file's last range), each file's batches shared evenly among
    its ranges (3, 3, 2, 2 batches rather than 3, 3, 3, 1), so the actors' last blocks end
    together."""
    min_rows = max(1, int(min_rows))
    batches = [-(-count // min_rows) for count in counts]
    per_range = max(1, -(-sum(batches) // max(1, int(blocks))))  # at most, in batches
    ranges = []
    for f, (count, file_batches) in enumerate(zip(counts, batches)):
        parts = -(-file_batches // per_range)
        sizes = [file_batches // parts + (i < file_batches % parts) for i in range(parts)]
        edges = [min(count, min_rows * n) for n in itertools.accumulate(sizes, initial=0)]
        ranges += [(f, a, b) for a, b in zip(edges, edges[1:])]
    return ranges


def _recall_share(config: ScoreConfig, data, request) -> float:
    """The share of users the recall check scores exactly too."""
    if not config.check_recall or config.index == "exact":
        return 0.0
    expected, _ = _expected_users(data, request.users, config.holdout)
    return min(1.0, config.check_recall / max(expected, 1))


def _expected_users(data, users: np.ndarray | None, holdout: str | None) -> tuple[int, int]:
    """-> (users that will be scored, users skipped for having no held-out target)."""
    requested = data.num_users if users is None else int(users.size)
    if holdout is None:
        return requested, 0
    table = pq.read_table(data.sequences_path, columns=["user_index", "train_only", "n_train"])
    keep = ~table["train_only"].to_numpy(zero_copy_only=False)
    if data.split_kind == "time":  # as in data.holdout_examples
        keep &= table["n_train"].to_numpy() >= 1
    if users is not None:
        keep &= np.isin(table["user_index"].to_numpy(), users)
    return int(keep.sum()), requested - int(keep.sum())


def _batch_records(stats, expected: int, timeout_s: float = 30.0) -> dict:
    """The scorers' per-batch records, once they cover ``expected`` users (the scorers send
    them without waiting, so the last ones may still be on their way when the output is
    written), or whatever has arrived after ``timeout_s``."""
    import ray

    deadline = time.time() + timeout_s
    while True:
        batches = ray.get(stats.get.remote())
        if sum(b["rows"] for b in batches.values()) >= expected or time.time() > deadline:
            return batches
        time.sleep(0.05)


def _busy_seconds(records) -> float:
    """Seconds each actor had at least one batch in progress (its batches may overlap),
    summed over actors: the union of each actor's batch windows."""
    by_actor: dict = {}
    for record in records:
        by_actor.setdefault(record.get("actor"), []).append(record["window"])
    total = 0.0
    for windows in by_actor.values():
        end = -math.inf
        for start, stop in sorted(windows):
            total += max(0.0, stop - max(start, end))
            end = max(end, stop)
    return total


def _count_rows(directory: str, fmt: str) -> int:
    """Rows written under ``directory`` (a local path or a URI): Parquet footers, text lines."""
    total = 0
    for _, open_file in storage.files_under(directory):
        with open_file() as f:
            if fmt == "parquet":
                total += pq.ParquetFile(f).metadata.num_rows
                continue
            lines = sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 20), b""))
        total += lines - (1 if fmt == "csv" and lines else 0)
    return total


def _cluster_threads(actors: int, cpus_per_actor: float) -> int:
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    node_cpus = max([int(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes()
                     if n.get("Alive")] or [cpus])
    return max(1, int(cpus_per_actor), min(node_cpus, cpus // max(1, actors)))


@dataclass
class ScoreConfig:
    """Options of :func:`recommend` (and ``ezsasrec score``); validated on construction."""

    top_n: int = option(10, "items per user", min=1)
    include_seen: bool = option(False, "also recommend items in the user's history")
    holdout: str | None = option(None, "test: score as of before the test target (offline "
                                       "checks; default: the whole history)", choices=HOLDOUTS)
    users: Any = option(None, "file of raw user ids (one a line, or Parquet): score only these "
                              "(default: every user)")
    exclude_items: Any = option(None, "file of raw item ids never recommended (default: none)")
    candidates: Any = option(None, "file of raw item ids: recommend only these (default: every "
                                   "item)")
    batch_size: int = option(DEFAULT_BATCH_SIZE, "users per batch", min=1)
    chunk_size: int = option(DEFAULT_CHUNK_SIZE, "items per catalog chunk of the exact top-k "
                                                 "scan", min=1)
    actors: int = option(1, "scoring actors (a Ray Data actor pool)", min=1)
    gpus_per_actor: float = option(0, "GPUs per scoring actor", min=0)
    scan: str = option("auto", "where the catalog is scanned: numpy (host CPU), tensorflow "
                               "(TensorFlow's device: the actor's GPU, else its CPU; then "
                               "re-scored exactly on the host, same output), auto (tensorflow "
                               "when --gpus-per-actor > 0)", choices=("auto", "numpy", "tensorflow"))
    index: str = index_option("index")
    ef_search: int = index_option("ef_search")
    nprobe: int = index_option("nprobe")
    check_recall: int = option(0, "with an approximate --index: about this many users are also "
                                  "scored exactly, recall@top-n against exact in the manifest",
                               min=0)
    cpus_per_actor: float = option(1, "CPUs per scoring actor", min=0)
    threads_per_actor: int | None = option(None, "scorer threads per actor (default: the "
                                                 "cluster's CPUs / actors)", min=1)
    format: str = option("parquet", "output format (csv: the lists as JSON strings)",
                         choices=FORMATS)
    verbose: bool = option(True, "print the summary")

    def device_scan(self) -> bool:
        """Whether actors scan the catalog with TensorFlow (:class:`.topk_device.DeviceTopK`)."""
        return self.scan == "tensorflow" or (self.scan == "auto" and self.gpus_per_actor > 0)

    def index_options(self) -> dict:
        """The keyword arguments of :func:`.index.make_index`."""
        return {"index": self.index, "ef_search": self.ef_search, "nprobe": self.nprobe,
                "device_scan": self.device_scan()}

    def __post_init__(self):
        check_instance(self)
        for name in ("users", "exclude_items", "candidates"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, (bytes, dict, numbers.Number))
                                      or not isinstance(value, (str, os.PathLike, Iterable))):
                raise EzSASRecError(f"--{name.replace('_', '-')} must be a file path or a list "
                                    f"of ids, got {value!r}")


def recommend(model, data, top_n: int = 10, output: str | None = None, *,
              include_seen: bool = False, holdout: str | None = None, users=None,
              exclude_items=None, candidates=None, batch_size: int = DEFAULT_BATCH_SIZE,
              chunk_size: int = DEFAULT_CHUNK_SIZE, actors: int = 1,
              gpus_per_actor: float = 0, cpus_per_actor: float = 1,
              threads_per_actor: int | None = None, format: str = "parquet",
              overwrite: bool = False, address: str | None = None, verbose: bool = True,
              scan: str = "auto", index: str = "exact", ef_search: int = 128, nprobe: int = 32,
              check_recall: int = 0):
    """Top-``top_n`` items for every user (or ``users``) of a prepared dataset.

    Args:
        model: a model directory path or a loaded :class:`.model.SASRec`.
        data: a prepared-dataset path or a :class:`.dataset.PreparedDataset`.
        output: directory to write; None returns the (lazy) Ray Dataset instead.
        the rest: see :class:`ScoreConfig`. ``users``, ``exclude_items``, ``candidates`` are a
            file path (one raw id a line, or a Parquet file's first column) or an iterable of
            raw ids. Unknown users are an error; unknown items are reported and ignored.

    Returns the Ray Dataset of ``user_id, item_ids, scores`` rows when ``output`` is None,
    else the manifest dict (also written to ``output/manifest.json``).
    """
    started = time.time()
    config = ScoreConfig(top_n=top_n, include_seen=include_seen, holdout=holdout, users=users,
                         exclude_items=exclude_items, candidates=candidates,
                         batch_size=batch_size, chunk_size=chunk_size, actors=actors,
                         gpus_per_actor=gpus_per_actor, cpus_per_actor=cpus_per_actor,
                         threads_per_actor=threads_per_actor, format=format, verbose=verbose,
                         scan=scan, index=index, ef_search=ef_search, nprobe=nprobe,
                         check_recall=check_recall)
    check_available(config.index)
    if output is not None:
        output = os.fspath(output).removeprefix("file://")
        storage.check_output(output, overwrite)  # before any work
    data = _open_data(data)
    request = _resolve_request(model, data, config)
    init_ray(address)
    run = _scoring_run(model, data, config, request, with_stats=output is not None)
    if output is None:
        return run.dataset
    manifest = _write_scores(run, output, overwrite, data, config, request, started)
    if verbose:
        print(format_summary(manifest), flush=True)
    return manifest


@dataclass
class _Request:
    """What to score, in indices: the model source and the resolved id options."""

    source: _ModelSource
    users: np.ndarray | None = None
    exclude: np.ndarray | None = None
    candidates: np.ndarray | None = None
    reports: dict = field(default_factory=dict)  # users_file / exclude_items / candidates


def _resolve_request(model, data, config: ScoreConfig) -> _Request:
    """Check the model against the data and resolve raw ids, on the driver (no TensorFlow)."""
    source = _model_source(model)
    check_vocab(source.info, data)
    if source.info.config.num_items != data.num_items:
        raise EzSASRecError(f"model has {source.info.config.num_items} items but {data.path} "
                            f"has {data.num_items}: different vocabularies")
    request = _Request(source=source)
    if config.users is not None:
        request.users, request.reports["users_file"] = resolve_users(config.users, data)
    if config.exclude_items is not None:
        request.exclude, request.reports["exclude_items"] = resolve_items(
            config.exclude_items, data, "exclude-items")
    if config.candidates is not None:
        request.candidates, report = resolve_items(config.candidates, data, "candidates")
        request.reports["candidates"] = report
        if request.candidates.size == 0:
            raise EzSASRecError(f"--candidates {report['source']}: none of the "
                                f"{report['given']} ids is in the item vocabulary")
    return request


def _scoring_run(model, data, config: ScoreConfig, request: _Request, *, with_stats: bool):
    """The lazy Ray Dataset of scores: sequence files -> BatchScorer on an actor pool."""
    import ray
    import ray.data

    if request.source.path is None:  # a loaded model: ship its weights
        request.source = _model_source(model, ray_put=ray.put)
    threads = int(config.threads_per_actor or _cluster_threads(config.actors,
                                                               config.cpus_per_actor))
    env = {**SCORER_ENV, **storage_env()}
    if os.environ.get(FAULT_ENV):
        env[FAULT_ENV] = os.environ[FAULT_ENV]
    stats = keyed_stats_actor(max_restarts=-1, max_task_retries=-1) if with_stats else None
    source = request.source
    scorer_kwargs = {
        "model_config": source.info.config.to_dict(), "model_path": source.path,
        "weights_ref": source.weights_ref, "data_path": data.uri or os.path.abspath(data.path),
        "top_n": config.top_n, "holdout": config.holdout, "split_kind": data.split_kind,
        "include_seen": config.include_seen,
        "users_ref": None if request.users is None else ray.put(request.users),
        "exclude_items": request.exclude, "candidates": request.candidates,
        "chunk_size": config.chunk_size, "threads": threads,
        "index_options": config.index_options(), "recall_share": _recall_share(config, data, request),
        "list_encoding": "json" if config.format == "csv" else None, "stats": stats,
    }
    with warnings.catch_warnings():
        # max_restarts / max_task_retries only go through ray_remote_args, which Ray 2.60
        # flags as deprecated; they are also Ray Data's defaults for actor pools.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        # a few blocks per actor (each of at least one batch), so every actor gets work
        dataset = _sequences_dataset(data, blocks=4 * config.actors,
                                     min_rows=config.batch_size).map_batches(
            BatchScorer, fn_constructor_kwargs=scorer_kwargs, batch_size=config.batch_size,
            batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(
                size=config.actors, max_concurrent_calls_per_actor=BATCHES_PER_ACTOR
                if threads > 1 else 1, enable_true_multi_threading=True),
            num_cpus=config.cpus_per_actor, num_gpus=config.gpus_per_actor or None,
            runtime_env={"env_vars": env}, max_restarts=-1, max_task_retries=-1)
    return SimpleNamespace(dataset=dataset, stats=stats, threads=threads)


def _write_scores(run, output: str, overwrite: bool, data, config: ScoreConfig,
                  request: _Request, started: float) -> dict:
    """Run the dataset into a temporary sibling, check every user was written exactly once,
    then publish it with its manifest (nothing is published on any failure)."""
    import ray

    expected, skipped = _expected_users(data, request.users, config.holdout)
    tmp, results = _start_scores(output, overwrite)
    try:
        t = time.time()
        _write_dataset(run.dataset, results, config.format)
        score_s = time.time() - t
        batches = _batch_records(run.stats, expected)
        written = _count_rows(results, config.format)
        scored = sum(b["rows"] for b in batches.values())
        if written != expected or scored != expected:
            raise EzSASRecError(f"scoring wrote {written:,} rows ({scored:,} counted by the "
                                f"batches) but {expected:,} users were expected; output not "
                                "published")
        counts = {
            "users_scored": written,
            "users_requested": data.num_users if request.users is None
            else int(request.users.size),
            "users_skipped_no_target": skipped,
            "users_with_fewer_than_top_n": sum(b["short"] for b in batches.values()),
            "batches": len(batches),
            "items_in_catalog": data.num_items,
            "items_allowed": int(_allowed_count(data.num_items, request.exclude,
                                                request.candidates)),
            **request.reports,
        }
        manifest = _scores_manifest(output, data, config, request, run.threads, counts,
                                    _timings(batches, written, score_s, started))
        manifest["index"] = _index_report(batches, config)
        _publish_scores(tmp, output, manifest, overwrite)
    finally:
        if tmp:
            outputs.discard(tmp)
        if run.stats is not None:
            ray.kill(run.stats)
    return manifest


def _start_scores(output: str, overwrite: bool) -> tuple[str | None, str]:
    """``(tmp, results)``: a local output is written into a temporary sibling and renamed;
    one on object storage straight under its URI (the write tasks may run on any node),
    after its previous version, if any, is unpublished."""
    if is_remote(output):
        storage.make_room(output, overwrite=overwrite)
        return None, posixpath.join(output.rstrip("/"), RESULTS_DIR)
    tmp = outputs.start(output, overwrite=overwrite)
    os.makedirs(os.path.join(tmp, RESULTS_DIR))
    return tmp, os.path.join(tmp, RESULTS_DIR)


def _publish_scores(tmp: str | None, output: str, manifest: dict, overwrite: bool):
    """The manifest, then ``_SUCCESS`` (object storage) or the rename (local)."""
    body = json.dumps(manifest, indent=2, default=str)
    if tmp is None:
        storage.finish(output, {"manifest.json": body.encode()}, kind="scores")
        return
    with open(os.path.join(tmp, "manifest.json"), "w") as f:
        f.write(body)
    outputs.publish(tmp, output, kind="scores", overwrite=overwrite)


def _write_dataset(dataset, results: str, format: str):
    """Execute the scoring dataset into ``results`` (one-line errors for bad input)."""
    try:
        # Write tasks take no CPU slot either (the actors may hold them all); they reach
        # object storage as the driver does.
        write_args = {"ray_remote_args": {"num_cpus": 0, "runtime_env": {
            "env_vars": storage_env()}}}
        if format == "parquet":
            dataset.write_parquet(results, **write_args)
        elif format == "jsonl":  # 15 decimals: float32 scores round-trip
            dataset.write_json(results, double_precision=15, **write_args)
        else:
            dataset.write_csv(results, **write_args)
    except Exception as exc:
        user_error = find_user_error(exc)
        if user_error is not None and user_error is not exc:
            raise type(user_error)(user_error.message) from None
        raise


def _timings(batches: dict, written: int, score_s: float, started: float) -> dict:
    """The manifest's timings from the batch records (see format_summary for the two rates)."""
    busy_s = _busy_seconds(batches.values())
    phase_s = {k: sum(b.get(k, 0.0) for b in batches.values())
               for k in ("encoder_cpu_s", "catalog_cpu_s")}
    windows = [b["window"] for b in batches.values()] or [(0.0, 0.0)]
    return {"score_s": round(score_s, 3), "total_s": round(time.time() - started, 3),
            "users_per_s": round(written / max(score_s, 1e-9), 1),
            # time each actor had a batch in progress, summed over actors (no start-up)
            "batches_s": round(busy_s, 3),
            # CPU seconds of the scorers' threads in the encoder and the catalog top-k
            # (summed over threads and actors)
            **{k: round(v, 3) for k, v in phase_s.items()},
            "users_per_actor_s": round(written / max(busy_s, 1e-9), 1),
            # from the start of the first batch to the end of the last one
            "batches_window_s": round(max(w[1] for w in windows) - min(w[0] for w in windows),
                                      3)}


def _index_report(batches: dict, config: ScoreConfig) -> dict:
    """The retrieval index: its kind, the slowest actor's build and the largest index (FAISS),
    and the recall check's result."""
    records = list(batches.values())
    report = {"kind": config.index,
              "build_s": round(max((b.get("index_build_s", 0.0) for b in records), default=0), 3),
              "bytes": max((b.get("index_bytes", 0) for b in records), default=0)}
    total = sum(b.get("recall_total", 0) for b in records)
    if total:
        found = sum(b.get("recall_found", 0) for b in records)
        report[f"recall@{config.top_n}"] = round(found / total, 4)
        report["recall_items_checked"] = total
    return report


def _scores_manifest(output: str, data, config: ScoreConfig, request: _Request, threads: int,
                     counts: dict, timings: dict) -> dict:
    reports = request.reports
    options = {"top_n": config.top_n, "include_seen": config.include_seen,
               "holdout": config.holdout,
               "users": reports.get("users_file", {}).get("source"),
               "exclude_items": reports.get("exclude_items", {}).get("source"),
               "candidates": reports.get("candidates", {}).get("source"),
               "batch_size": config.batch_size, "chunk_size": config.chunk_size,
               "actors": config.actors, "gpus_per_actor": config.gpus_per_actor,
               "scan": "tensorflow" if config.device_scan() else "numpy",
               "index": config.index, "ef_search": config.ef_search, "nprobe": config.nprobe,
               "check_recall": config.check_recall,
               "cpus_per_actor": config.cpus_per_actor, "threads_per_actor": threads,
               "format": config.format}
    return {
        "format_version": FORMAT_VERSION,
        "kind": "ezsasrec_ray.scores",
        "output": output if is_remote(output) else os.path.abspath(output),
        "results": RESULTS_DIR,
        "columns": ["user_id", "item_ids", "scores"],
        "order": "score descending, ties by smaller item index",
        "data": {"path": data.uri or os.path.abspath(data.path),
                 "vocab_fingerprint": data.vocab_fingerprint(),
                 "num_users": data.num_users, "num_items": data.num_items},
        "model": request.source.manifest,
        "options": options,
        "counts": counts,
        "timings": timings,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _allowed_count(num_items: int, exclude, candidates) -> int:
    allowed = np.zeros(num_items + 1, bool)
    if candidates is None:
        allowed[1:] = True
    else:
        allowed[candidates] = True
    if exclude is not None:
        allowed[exclude] = False
    return int(allowed[1:].sum())


def format_summary(manifest: dict) -> str:
    """The closing summary of a scoring run."""
    c, t = manifest["counts"], manifest["timings"]
    lines = [f"{'users scored':<30}{c['users_scored']:>14,}",
             # whole job (actor start-up, model load and compiles included) vs the steady rate
             f"{'users/s, whole job':<30}{t['users_per_s']:>14,.0f}",
             f"{'users/s per actor, scoring':<30}{t['users_per_actor_s']:>14,.0f}  "
             "(while a batch was in progress; excludes start-up)",
             f"{'top-N':<30}{manifest['options']['top_n']:>14,}",
             f"{'items allowed':<30}{c['items_allowed']:>14,}"]
    if c.get("users_skipped_no_target"):
        lines.append(f"{'users skipped (no target)':<30}{c['users_skipped_no_target']:>14,}")
    if c.get("users_with_fewer_than_top_n"):
        lines.append(f"{'users with < N items':<30}{c['users_with_fewer_than_top_n']:>14,}")
    for key, label in (("exclude_items", "--exclude-items"), ("candidates", "--candidates")):
        if key in c and c[key]["unknown"]:
            lines.append(f"{label + ' unknown ids ignored':<30}{c[key]['unknown']:>14,} "
                         f"(e.g. {', '.join(c[key]['unknown_examples'][:3])})")
    index = manifest.get("index", {})
    if index.get("kind", "exact") != "exact":
        recall = index.get(f"recall@{manifest['options']['top_n']}")
        lines.append(f"{'index':<30}{index['kind']:>14}  (built in {index['build_s']:.1f}s, "
                     f"{index['bytes'] / 2**20:,.0f} MiB" + ("" if recall is None else
                                                           f", recall {recall:.3f}") + ")")
    lines += [f"time {t['total_s']:.1f}s (scoring {t['score_s']:.1f}s)",
              f"output {manifest['output']} ({manifest['options']['format']} in "
              f"{manifest['results']}/, manifest.json, _SUCCESS)"]
    width = max(len(line) for line in lines)
    return "\n".join(["score summary", "-" * width, *lines])


# --------------------------------------------------------------------------------------------
# Scores of given (user, item) pairs


def score_pairs(model, data, user_ids, item_ids, *, holdout: str | None = None):
    """Scores of every (user, item) pair -> pandas DataFrame, users as rows, items as columns.

    Raw ids in (any iterable), raw ids out (index ``user_id``, columns ``item_id``). The scores
    are the exact scores :func:`recommend` returns (same user vectors, see :mod:`.topk`).
    Unknown users or items are an error. Runs on the driver (no Ray).
    """
    import pandas as pd


    data = _open_data(data)
    if isinstance(model, (str, os.PathLike)):
        model = load_model(os.fspath(model))
    check_vocab(model, data)
    if holdout is not None and holdout not in HOLDOUTS:
        raise EzSASRecError(f"holdout: unknown split {holdout!r}; use test")
    user_ids, item_ids = list(user_ids), list(item_ids)
    uidx, user_raw = lookup_ids(user_ids, data.users())
    iidx, item_raw = lookup_ids(item_ids, data.items())
    for name, idx, given in (("user", uidx, user_ids), ("item", iidx, item_ids)):
        if (idx == 0).any():
            bad = [repr(g) for g, i in zip(given, idx) if i == 0]
            raise EzSASRecError(f"score_pairs: {len(bad)} unknown {name} id(s) not in "
                                f"{data.path} (first: {', '.join(bad[:5])})")
    wanted = np.unique(uidx)
    table = pq.read_table(data.sequences_path, columns=list(SEQUENCE_COLUMNS),
                          filters=[("user_index", "in", wanted.tolist())]) if wanted.size \
        else pq.read_table(data.sequences_path, columns=list(SEQUENCE_COLUMNS)).slice(0, 0)
    if holdout is None:
        index, histories = table["user_index"].to_numpy(), table["item_indices"].combine_chunks()
    else:
        index, histories, _ = holdout_examples(table, holdout, data.split_kind)
        missing = np.setdiff1d(wanted, index)
        if missing.size:
            raise EzSASRecError(f"score_pairs: {missing.size} user(s) have no {holdout} target")
    order = np.argsort(index)
    rows = order[np.searchsorted(index[order], uidx)]
    vecs = user_vectors(model, histories.take(pa.array(rows)) if len(rows) else histories)
    item_table = np.asarray(model.item_embeddings().numpy(), np.float32)
    scores = exact_scores(vecs, item_table, np.broadcast_to(iidx, (len(uidx), len(iidx)))) \
        if len(uidx) and len(iidx) else np.zeros((len(uidx), len(iidx)), np.float32)
    return pd.DataFrame(scores, index=pd.Index(user_raw, name="user_id"),
                        columns=pd.Index(item_raw, name="item_id"))


__all__ = ["BatchScorer", "FAULT_ENV", "format_summary", "recommend", "score_pairs"]
