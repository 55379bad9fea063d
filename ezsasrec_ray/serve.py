"""Online recommendations with Ray Serve: the nightly job's model, answering over HTTP.

:class:`Recommender` (plain Python, no Ray) holds a model, the item vocabulary and, for
user-id requests, every user's history; it answers batches of queries with the same encoder
(:mod:`.encoder`) and retrieval index (:mod:`.topk`, per-request exclusions and candidates
without re-indexing) as nightly scoring, so the endpoint returns exactly what ``ezsasrec
score`` writes. :class:`RecommenderDeployment` is the Ray Serve deployment (FastAPI ingress,
requests batched by :class:`Batcher`). Routes: ``POST /recommend``, ``POST /score``, ``GET /healthz``,
``/readyz``, ``/version``, ``/docs``; with an API key (decided where the app is built, only its
hash reaches the replicas) every route but the probes needs it. Bodies over ``max_body_bytes``
get 413 before they are read; hostile inputs and answers: docs/security.md.
Memory per million users and deployment: docs/internals.md, "serve".
"""


import asyncio
import hashlib
import hmac
import logging
import os
import re
import sys
import threading
import time
from dataclasses import MISSING, asdict, dataclass, field, replace

import numpy as np

from .batching import left_pad
from .dataset import load_prepared
from .encoder import user_vectors, warm_up
from .errors import EzSASRecError
from .index import check_available, index_option, make_index
from .model_io import (
    NIGHT_FILE,
    check_vocab,
    item_vocab,
    load_model,
    model_version,
    resolve_night,
)
from .options import check_instance, option
from .runtime import init_ray, set_threads, storage_env
from .storage import is_remote
from .topk import TopK, exact_scores
from .vocab import IdIndex, strict_ids  # noqa: F401 - strict_ids: part of this API

API_KEY_ENV = "EZSASREC_API_KEY"
APP_NAME = "ezsasrec"
DEPLOYMENT_NAME = "Recommender"


@dataclass
class ServeConfig:
    """What a replica loads and the limits it enforces (validated before anything loads)."""

    model: str = option(MISSING, "model directory, or a pipeline night: its workdir or "
                                 "scores/latest pointer (that night's model and data)")
    data: str | None = option(None, "prepared dataset: user histories for user-id requests "
                                    "(default: none, history requests only)")
    max_k: int = option(100, "largest k a request may ask for", min=1)
    max_history: int = option(1000, "longest history a request may send", min=1)
    max_item_ids: int = option(1000, "most item ids in one request's item_ids, exclude_items or "
                                     "candidates", min=1)
    max_batch_size: int = option(32, "requests batched per call", min=1)
    batch_wait_timeout_s: float = option(0.0, "how long a batch that already has company waits "
                                              "for more requests, in seconds (0: never; requests "
                                              "that arrive while the model is busy form the "
                                              "next batch, and one that finds it idle is "
                                              "answered at once)"
                                                "seconds", min=0)
    api_key: str | None = option(None, "API key requests must send (default: $EZSASREC_API_KEY "
                                       "where the app is built; empty: none)")
    max_body_bytes: int = option(1 << 20, "largest request body in bytes (else 413, before "
                                          "the body is read)", min=1)
    docs_open: bool = option(False, "/docs and /openapi.json open without the API key")
    model_version: str | None = option(None, "version reported by /version and /readyz "
                                             "(default: model directory name + weights hash)")
    threads: int | None = option(None, "TensorFlow threads per replica (default: TF's)")
    index: str = index_option("index")
    ef_search: int = index_option("ef_search")
    nprobe: int = index_option("nprobe")
    precompute_user_vectors: bool = option(True, "encode every known user at start-up (4 x dim "
                                                 "bytes each)")
    follow_s: float | None = option(None, "with --model naming a pipeline night: look for a "
                                          "newer night every this many seconds and swap to it "
                                          "without failing a request (default: stay on the "
                                          "night found at start)", min=0.1)

    def __post_init__(self):
        check_instance(self, prefix="serve: ")
        check_available(self.index)
        # a directory, a night's scores/latest pointer, or a model directory's URI
        if not is_remote(self.model) and not os.path.exists(self.model):
            raise EzSASRecError(f"serve: model {self.model}: directory not found (a model "
                                "directory, a pipeline workdir or its scores/latest)")
        if self.data is not None and not os.path.isdir(self.data):
            raise EzSASRecError(f"serve: data {self.data}: directory not found")


# --------------------------------------------------------------------------------------------
# Unknown ids reported without echoing them in full (ids are looked up strictly: IdIndex)

MAX_REPORTED_IDS = 5  # unknown ids: the first few are echoed, the rest only counted
MAX_REPORTED_CHARS = 64  # each echoed id cut to this many characters


def shown_id(value):
    """An id as echoed in an answer or message: ints as they are, anything longer than
    :data:`MAX_REPORTED_CHARS` characters cut (ending in "...")."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 10 ** 18:
        return value
    text = value if isinstance(value, str) else str(value)
    if len(text) > MAX_REPORTED_CHARS:
        return text[:MAX_REPORTED_CHARS - 3] + "..."
    return text


def shown_ids(values) -> list:
    """The first :data:`MAX_REPORTED_IDS` ids, each :func:`shown_id`."""
    return [shown_id(v) for v in values[:MAX_REPORTED_IDS]]


class UserHistories:
    """Every user's whole sequence (item indices, time order), user_index 1..U, in memory.

    Stored as one int32 array of items and int64 offsets: ``items[offsets[u-1]:offsets[u]]``.
    """

    def __init__(self, data):
        import pyarrow.compute as pc

        table = data.sequences(["user_index", "item_indices"])  # sorted by user_index
        user_index = table["user_index"].to_numpy()
        lists = table["item_indices"].combine_chunks()
        lengths = pc.list_value_length(lists).fill_null(0).to_numpy().astype(np.int64)
        counts = np.zeros(data.num_users + 1, np.int64)  # a user without a row: empty history
        counts[user_index] = lengths
        self.offsets = np.cumsum(counts)  # (U+1,) offsets[0] = 0
        self.items = np.ascontiguousarray(lists.flatten().to_numpy(), np.int32)  # (events,)

    def get(self, user_index: int) -> np.ndarray:
        return self.items[self.offsets[user_index - 1]:self.offsets[user_index]]

    def memory_bytes(self) -> int:
        return int(self.items.nbytes + self.offsets.nbytes)


# --------------------------------------------------------------------------------------------
# Queries and answers (plain data; the HTTP layer validates and converts)


@dataclass
class Query:
    """One request: a known user's history, or a history of raw item ids."""

    user_id: object = None
    history: list | None = None
    k: int = 10
    exclude_seen: bool = True
    exclude_items: list | None = None
    candidates: list | None = None
    item_ids: list | None = None  # /score only


@dataclass
class _Resolved:
    """A query in indices: the history to encode (None: fallback) and the options."""

    history: np.ndarray | None  # (H,) int32 item indices, time order
    unknown_items: list = field(default_factory=list)  # all of them (answers show a few)
    exclude: np.ndarray | None = None
    candidates: np.ndarray | None = None
    ignored: dict = field(default_factory=dict)
    unknown_user: bool = False
    user: int = 0  # user index of a user-id query (0: a history query)


class Batcher:
    """Requests answered together, without a timer: a request that finds the model idle is
    answered at once; those arriving while it is busy are answered in the next call, up to
    ``max_batch_size`` at a time. So an idle replica adds no wait, and a busy one batches as
    much as its load brings (``@serve.batch`` waits its timeout even when idle).

    ``run(queries) -> answers`` runs on a worker thread, one call at a time; ``wait_s`` > 0:
    a batch of more than one request waits that long for more first."""

    def __init__(self, run, max_batch_size: int, wait_s: float = 0.0):
        self.run, self.max_batch_size, self.wait_s = run, int(max_batch_size), float(wait_s)
        self.queue: list = []  # (query, future)
        self.busy = False

    async def __call__(self, query):
        future = asyncio.get_running_loop().create_future()
        self.queue.append((query, future))
        if not self.busy:
            self.busy = True
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self):
        try:
            while self.queue:
                if self.wait_s and 1 < len(self.queue) < self.max_batch_size:
                    await asyncio.sleep(self.wait_s)
                batch = self.queue[: self.max_batch_size]
                del self.queue[: len(batch)]
                batch = [(q, f) for q, f in batch if not f.done()]  # a caller gone: skip it
                if batch:
                    await self._answer(batch)
        except BaseException:  # cancelled (the replica stopping): no caller waits forever
            for _, future in self.queue:
                if not future.done():
                    future.set_exception(RuntimeError("the replica is shutting down"))
            self.queue.clear()
            raise
        finally:
            self.busy = False

    async def _answer(self, batch):
        try:
            answers = await asyncio.to_thread(self.run, [query for query, _ in batch])
        except BaseException as exc:  # every caller of the batch gets the error (cancelled
            for _, future in batch:  # at shutdown too: no caller waits forever)
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception)
                                         else RuntimeError("the replica is shutting down"))
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future), answer in zip(batch, answers):
            if not future.done():
                future.set_result(answer)


class Recommender:
    """A loaded model (+ user histories) answering batches of queries. No Ray, no HTTP."""

    def __init__(self, config: ServeConfig):

        self.config = config
        set_threads(config.threads)
        started = time.perf_counter()
        self.model = load_model(config.model)
        self.metadata = self.model.metadata
        self.item_table = np.asarray(self.model.item_embeddings().numpy(), np.float32)
        self.topk = make_index(self.item_table, index=config.index, ef_search=config.ef_search,
                               nprobe=config.nprobe, threads=config.threads)
        self.users = self.histories = data = None
        if config.data is not None:
            data = load_prepared(config.data)
            check_vocab(self.model, data)
            self.users = IdIndex(data.users())
            self.histories = UserHistories(data)
        self.user_vecs = None
        items = item_vocab(config.model, data)
        self.items = IdIndex(items)
        counts = items.sort_by("index")["count"].to_numpy()
        # The fallback ranks by training count through the same retrieval index: a one-column
        # item table of counts scored by the user vector [1] (exact below 2**24 events an item)
        self.popular = TopK(np.concatenate([[0.0], counts])[:, None].astype(np.float32))
        self.model_version = config.model_version or model_version(config.model)
        self.night = night_of(config.model)
        self._warm_up()
        if self.histories is not None and config.precompute_user_vectors:
            self.user_vecs = self._encode_all_users()
        self.load_seconds = time.perf_counter() - started

    def _encode_all_users(self) -> np.ndarray:
        """(U + 1, d) float32: every known user's vector, row 0 unused. The same
        :func:`.encoder.user_vectors` on the same histories as the nightly job, done once."""
        import pyarrow as pa

        lists = pa.ListArray.from_arrays(pa.array(self.histories.offsets),
                                         pa.array(self.histories.items))
        out = np.zeros((len(lists) + 1, self.model.config.dim), np.float32)
        step = 65536
        for start in range(0, len(lists), step):
            part = lists.slice(start, step)
            out[1 + start:1 + start + len(part)] = user_vectors(self.model, part)
        return out

    def vectors(self, resolved: list) -> np.ndarray:
        """(B, d) user vectors of resolved queries that have a history."""
        out = np.empty((len(resolved), self.model.config.dim), np.float32)
        use_cache = self.user_vecs is not None
        cached = [j for j, r in enumerate(resolved) if use_cache and r.user]
        if cached:
            out[cached] = self.user_vecs[[resolved[j].user for j in cached]]
        fresh = [j for j, r in enumerate(resolved) if not (use_cache and r.user)]
        if fresh:
            out[fresh] = user_vectors(self.model, [resolved[j].history for j in fresh])
        return out

    def _warm_up(self):
        """Compile the encoder for every call shape and load the top-k loops, so first
        requests are not slow."""
        warm_up(self.model)
        self.topk.warm_up()

    # -- resolving raw ids ----------------------------------------------------------------------

    def _items_or_none(self, values, name: str, ignored: dict):
        if values is None:
            return None
        index = self.items.lookup(values)
        if (index == 0).any():
            ignored[name] = [v for v, i in zip(values, index) if i == 0]
        return np.unique(index[index > 0])

    def resolve(self, query: Query) -> _Resolved:
        ignored: dict = {}
        exclude = self._items_or_none(query.exclude_items, "exclude_items", ignored)
        candidates = self._items_or_none(query.candidates, "candidates", ignored)
        if query.history is not None:
            index = self.items.lookup(query.history)
            unknown = [v for v, i in zip(query.history, index) if i == 0]
            history = index[index > 0].astype(np.int32)
            return _Resolved(history if history.size else None, unknown, exclude, candidates,
                             ignored)
        if self.users is None:
            raise EzSASRecError("user_id: this server has no user data (started without "
                                "--data); send a history instead")
        user = int(self.users.lookup([query.user_id])[0])
        if user == 0:
            return _Resolved(None, [], exclude, candidates, ignored, unknown_user=True)
        history = self.histories.get(user)
        return _Resolved(history if history.size else None, [], exclude, candidates, ignored,
                         user=user)

    # -- answering ------------------------------------------------------------------------------

    def recommend_many(self, queries: list[Query]) -> list[dict]:
        """Top-k for each query -> ``{"items", "scores", "model_version", "fallback", ...}``."""
        resolved = [self.resolve(q) for q in queries]
        answers: list = [None] * len(queries)
        model_rows = [i for i, r in enumerate(resolved) if r.history is not None]
        if model_rows:  # one TopK call; exclusions and candidates per query, no re-indexing
            k = max(queries[i].k for i in model_rows)
            seen = [resolved[i].history if queries[i].exclude_seen else np.zeros(0, np.int32)
                    for i in model_rows]
            idx, sc = self.topk(self.vectors([resolved[i] for i in model_rows]), k,
                                histories=left_pad(seen, max(1, max(s.size for s in seen))),
                                exclude=[resolved[i].exclude for i in model_rows],
                                candidates=[resolved[i].candidates for i in model_rows])
            for row, i in enumerate(model_rows):
                answers[i] = self._answer(idx[row, :queries[i].k], sc[row, :queries[i].k],
                                          resolved[i], fallback=False)
        for i, r in enumerate(resolved):
            if answers[i] is None:
                answers[i] = self._popular(queries[i], r)
        return answers

    def _popular(self, query: Query, r: _Resolved) -> dict:
        """The fallback: most popular items (training counts as scores), with the query's
        exclusions and candidates, through the same tie rule as the model's top-k."""
        idx, scores = self.popular(np.ones((1, 1), np.float32), query.k, exclude=[r.exclude],
                                   candidates=[r.candidates])
        return self._answer(idx[0], scores[0], r, fallback=True)

    def _answer(self, idx, scores, r: _Resolved, *, fallback: bool) -> dict:
        keep = np.asarray(idx) > 0  # padding (fewer allowed items than k) is never returned
        answer = {"items": self.items.raw_ids(np.asarray(idx)[keep]),
                  "scores": [float(s) for s in np.asarray(scores)[keep]],
                  "model_version": self.model_version, "fallback": fallback,
                  "unknown_items": shown_ids(r.unknown_items),
                  "unknown_count": len(r.unknown_items)}
        if r.unknown_user:
            answer["unknown_user"] = True
        if r.ignored:
            answer["ignored_ids"] = {k: shown_ids(v) for k, v in r.ignored.items()}
            answer["ignored_counts"] = {k: len(v) for k, v in r.ignored.items()}
        return answer

    def score_many(self, queries: list[Query]) -> list[dict]:
        """Scores of each query's ``item_ids`` -> ``{"item_ids", "scores", ...}``."""
        answers: list = []
        resolved = [self.resolve(q) for q in queries]
        rows = [i for i, r in enumerate(resolved) if r.history is not None]
        vecs = self.vectors([resolved[i] for i in rows]) if rows else None
        position = {i: j for j, i in enumerate(rows)}
        for i, (q, r) in enumerate(zip(queries, resolved)):
            index = self.items.lookup(q.item_ids or [])
            known = index > 0
            unknown = r.unknown_items + [v for v, ok in zip(q.item_ids or [], known) if not ok]
            answer = {"item_ids": [v for v, ok in zip(q.item_ids or [], known) if ok],
                      "model_version": self.model_version, "unknown_items": shown_ids(unknown),
                      "unknown_count": len(unknown)}
            if r.history is None:
                what = "user_id" if q.history is None else "history"
                reason = "is not a known user" if r.unknown_user else "has no known items"
                who = repr(shown_id(q.user_id)) if q.history is None else "history"
                answer["error"] = f"{what}: {who} {reason}; no scores without a history"
                answer["scores"] = []
            else:
                j = position[i]
                scores = exact_scores(vecs[j:j + 1], self.item_table, index[known][None, :])
                answer["scores"] = [float(s) for s in scores[0]]
            answers.append(answer)
        return answers

    def memory_bytes(self) -> dict:
        """Bytes held for ids and histories (the model and TF runtime not counted)."""
        out = {"item_ids": self.items.memory_bytes(), "item_table": int(self.item_table.nbytes)}
        if self.users is not None:
            out["user_ids"] = self.users.memory_bytes()
            out["histories"] = self.histories.memory_bytes()
        if self.user_vecs is not None:
            out["user_vectors"] = int(self.user_vecs.nbytes)
        if hasattr(self.topk, "index_bytes"):
            out["faiss_index"] = self.topk.index_bytes
        return out

    def version(self) -> dict:
        """What /version shows: no filesystem paths (the model directory's name only)."""
        meta = self.metadata or {}
        return {"model_version": self.model_version,
                "model_name": os.path.basename(os.path.normpath(self.model.model_dir)),
                "format_version": meta.get("format_version"),
                "trained_at": meta.get("trained_at"), "best_epoch": meta.get("best_epoch"),
                "valid": meta.get("valid"), "test": meta.get("test"),
                "night": self.night,  # the pipeline night it came from, if any
                "index": self.config.index,
                "user_data": self.users is not None, "num_items": len(self.items),
                "num_users": len(self.users) if self.users is not None else None}


# --------------------------------------------------------------------------------------------
# The API key: decided once, where the app is built, and handed to every replica

_KEY_CHARS = re.compile(r"[\x21-\x7e]+")  # what a client can send in a header as it is
_REPLICA_ENV_KEY = (f"serve: {API_KEY_ENV} is set on the replicas but not where the app was "
                    f"built, so it would not take effect; set it where you run ezsasrec serve "
                    f"(or api_key in the app args)")


def decide_api_key(api_key: str | None) -> tuple[str, str]:
    """``api_key`` (``""``: none) or else ``$EZSASREC_API_KEY`` of this process -> (key or
    ``""``, where it came from). A key a client could not send is refused with one line."""
    key, source = (api_key, "api_key") if api_key is not None else \
        (os.environ.get(API_KEY_ENV, ""), API_KEY_ENV)
    if key and not _KEY_CHARS.fullmatch(key):
        raise EzSASRecError(f"serve: {source}: an API key must be printable ASCII without "
                            f"spaces (clients send it in a header)")
    return key, source


def _auth_args(api_key: str | None) -> dict:
    """What a replica gets to check keys: the key's SHA-256, never the key itself."""
    key, source = decide_api_key(api_key)
    return {"key_sha256": hashlib.sha256(key.encode()).hexdigest() if key else None,
            "source": source, "explicitly_off": api_key == ""}


def auth_line(auth: dict) -> str:
    """The one start-up line saying whether requests need a key (never the key)."""
    if auth["key_sha256"]:
        return (f"API key on (from {auth['source']}): /recommend, /score, /version, /docs and "
                f"/openapi.json need X-API-Key or Authorization: Bearer")
    return f"API key off: every route is open (set {API_KEY_ENV} or api_key to require one)"


# --------------------------------------------------------------------------------------------
# HTTP: request models, the FastAPI app and the Serve deployment

try:  # the HTTP layer needs fastapi (installed with ray[serve]); the Recommender does not
    from fastapi import Depends, FastAPI, HTTPException, Request
    from fastapi.exception_handlers import http_exception_handler
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr
    from pydantic_core import ValidationError
    from ray import serve
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError:  # pragma: no cover - documented requirement
    serve = None

if serve is not None:
    RawId = StrictInt | StrictStr

    class _Body(BaseModel):
        model_config = ConfigDict(extra="forbid")

        user_id: RawId | None = Field(None, description="a known user's raw id")
        history: list[RawId] | None = Field(
            None, description="raw item ids, oldest first (instead of user_id)")

        def check(self, limits: ServeConfig):
            if (self.user_id is None) == (self.history is None):
                raise _BadRequest("user_id/history: give exactly one of them")
            if self.history is not None and len(self.history) > limits.max_history:
                raise _BadRequest(f"history: {len(self.history)} items, more than the "
                                  f"maximum {limits.max_history}")

    class RecommendRequest(_Body):
        k: StrictInt = Field(10, ge=1, description="number of items to return")
        exclude_seen: StrictBool = Field(True, description="never recommend history items")
        exclude_items: list[RawId] | None = Field(None, description="never recommend these")
        candidates: list[RawId] | None = Field(None, description="recommend only among these")

        def check(self, limits: ServeConfig):
            super().check(limits)
            if self.k > limits.max_k:
                raise _BadRequest(f"k: {shown_id(self.k)} is more than the maximum "
                                  f"{limits.max_k}")
            for name in ("exclude_items", "candidates"):
                values = getattr(self, name)
                if values is not None and len(values) > limits.max_item_ids:
                    raise _BadRequest(f"{name}: {len(values)} ids, more than the maximum "
                                      f"{limits.max_item_ids}")

    class ScoreRequest(_Body):
        item_ids: list[RawId] = Field(..., min_length=1, description="raw item ids to score")

        def check(self, limits: ServeConfig):
            super().check(limits)
            if len(self.item_ids) > limits.max_item_ids:
                raise _BadRequest(f"item_ids: {len(self.item_ids)} ids, more than the maximum "
                                  f"{limits.max_item_ids}")

    class RecommendResponse(BaseModel):
        items: list[RawId]
        scores: list[float]
        model_version: str
        fallback: bool
        unknown_items: list[RawId] = Field([], description="the first 5 unknown history ids, "
                                                          "each cut to 64 characters")
        unknown_count: int = Field(0, description="how many history ids are unknown")
        unknown_user: bool | None = None
        ignored_ids: dict[str, list[RawId]] | None = Field(
            None, description="unknown exclude_items/candidates: the first 5 of each")
        ignored_counts: dict[str, int] | None = None

    class ScoreResponse(BaseModel):
        item_ids: list[RawId]
        scores: list[float]
        model_version: str
        unknown_items: list[RawId] = []
        unknown_count: int = 0

    class _BadRequest(Exception):
        def __init__(self, message: str, status: int = 422):
            super().__init__(message)
            self.message, self.status = message, status

    # The documented failures of a request (422/404 over HTTP), for callers without HTTP
    REQUEST_ERRORS = (ValidationError, _BadRequest, EzSASRecError)

    app = FastAPI(title="ezsasrec_ray", description="SASRec top-N recommendations, online.",
                  version="1")
    app.state.key_sha256 = None  # set by each replica from its deployment arguments
    app.state.max_body_bytes = ServeConfig.__dataclass_fields__["max_body_bytes"].default
    app.state.docs_open = False
    _DOC_PATHS = frozenset(p for p in (app.docs_url, app.openapi_url, app.redoc_url,
                                       app.swagger_ui_oauth2_redirect_url) if p)
    _UNAUTHORIZED = "missing or wrong API key (X-API-Key header or Authorization: Bearer)"

    def key_ok(headers: dict, state) -> bool:
        """``headers``: lower-case bytes names -> bytes values; ``state``: the served app's
        (a replica's app is a copy of this module's). True without a key."""
        digest = state.key_sha256
        if not digest:
            return True
        given = headers.get(b"x-api-key")
        bearer = headers.get(b"authorization", b"")
        if given is None and bearer[:7].lower() == b"bearer ":
            given = bearer[7:].strip()
        return given is not None and hmac.compare_digest(
            hashlib.sha256(given).hexdigest().encode(), digest.encode())

    def precheck(path: str, headers: dict, state) -> tuple[int, str] | None:
        """What the middleware answers before the body is read: 413 for a declared body over
        ``max_body_bytes``, then 401 for /docs and /openapi.json without the key."""
        limit = state.max_body_bytes
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return 400, "content-length: not a number"
            if int(length) > limit:
                return 413, f"body: more than the limit of {limit} bytes"
        if path in _DOC_PATHS and not state.docs_open and not key_ok(headers, state):
            return 401, _UNAUTHORIZED
        return None

    class _Guard:
        """ASGI middleware: body-size limit (Content-Length, then counted while reading a
        chunked body; nothing over the limit is kept) and the key on the docs."""

        def __init__(self, app_):
            self.app = app_

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.app(scope, receive, send)
            headers = {}
            for name, value in scope.get("headers", ()):
                headers.setdefault(name.lower(), value)
            path, root = scope.get("path", "/"), scope.get("root_path", "")
            if root and path.startswith(root):
                path = path[len(root):] or "/"
            state = scope["app"].state  # set by Starlette before its middleware runs
            refused = precheck(path, headers, state)
            if refused:
                extra = {"WWW-Authenticate": "Bearer"} if refused[0] == 401 else None
                return await JSONResponse({"detail": refused[1]}, refused[0],
                                          headers=extra)(scope, receive, send)
            limit, size, messages = state.max_body_bytes, 0, []
            while True:  # buffer the body (at most the limit) before the app sees it
                message = await receive()
                messages.append(message)
                if message["type"] != "http.request":
                    break
                size += len(message.get("body", b""))
                if size > limit:
                    messages.clear()
                    return await JSONResponse(
                        {"detail": f"body: more than the limit of {limit} bytes"},
                        413)(scope, receive, send)
                if not message.get("more_body", False):
                    break
            replay = iter(messages)

            async def replayed():
                for message in replay:
                    return message
                return await receive()

            return await self.app(scope, replayed, send)

    app.add_middleware(_Guard)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        """422 with one line naming the field: ``{"detail": "k: Input should be ..."}``
        (the first 5 problems; field names cut to 64 characters)."""
        parts = []
        errors = exc.errors()
        for err in errors[:MAX_REPORTED_IDS]:
            if err.get("type") == "json_invalid":
                parts.append(f"body: invalid JSON ({err.get('ctx', {}).get('error', '')})")
                continue
            loc = [str(shown_id(x)) for x in err.get("loc", ()) if x != "body"][:8]
            parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg')}")
        if len(errors) > MAX_REPORTED_IDS:
            parts.append(f"and {len(errors) - MAX_REPORTED_IDS} more")
        return JSONResponse(status_code=422, content={"detail": "; ".join(parts)})

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        """FastAPI's 400 for a JSON body it cannot decode (bad UTF-8, nesting deeper than the
        parser's recursion limit) becomes the documented 422."""
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            return JSONResponse(status_code=422, content={
                "detail": "body: invalid JSON (not UTF-8, or nested too deeply)"})
        return await http_exception_handler(request, exc)

    @app.exception_handler(_BadRequest)
    async def _bad_request(request: Request, exc: _BadRequest):
        return JSONResponse(status_code=exc.status, content={"detail": exc.message})

    def _check_key(request: Request):
        headers = {k.encode("latin-1"): v.encode("latin-1") for k, v in request.headers.items()}
        if not key_ok(headers, request.app.state):
            raise HTTPException(status_code=401, detail=_UNAUTHORIZED,
                                headers={"WWW-Authenticate": "Bearer"})

    def _query(body, **extra) -> Query:
        return Query(user_id=body.user_id, history=body.history, **extra)

    @serve.deployment(name=DEPLOYMENT_NAME, max_ongoing_requests=64,
                      health_check_period_s=10, graceful_shutdown_timeout_s=10)
    @serve.ingress(app)
    class RecommenderDeployment:
        """One replica: a :class:`Recommender` behind FastAPI routes, requests batched.

        ``auth``: from :func:`build_app` (the key's hash, decided where the app was built);
        without it (bound directly) the replica decides from ``api_key`` or its environment.
        """

        def __init__(self, config: dict, auth: dict | None = None):
            self.config = ServeConfig(**config)
            if auth is None:
                auth = _auth_args(self.config.api_key)
            elif not auth["key_sha256"] and not auth["explicitly_off"] and \
                    os.environ.get(API_KEY_ENV):
                raise EzSASRecError(_REPLICA_ENV_KEY)
            app.state.key_sha256 = auth["key_sha256"]
            app.state.max_body_bytes = self.config.max_body_bytes
            app.state.docs_open = self.config.docs_open
            logging.getLogger("ray.serve").info("ezsasrec: %s", auth_line(auth))
            self.recommender = Recommender(self._night_config())
            if self.config.follow_s is not None:
                threading.Thread(target=self._follow, daemon=True).start()
            self._lock = threading.Lock()  # one batch at a time through the model
            batching = (self.config.max_batch_size, self.config.batch_wait_timeout_s)
            self._batch_recommend = Batcher(self._recommend_many, *batching)
            self._batch_score = Batcher(self._score_many, *batching)
            self.batches = {"calls": 0, "requests": 0, "seconds": 0.0}  # for /readyz

        def _night_config(self) -> ServeConfig:
            """The config with the night's model and data in place (as it stands now)."""
            model, data = resolve_night(self.config.model, self.config.data)
            return replace(self.config, model=model, data=data)

        def _follow(self):
            """Swap to a newer night when the pointer moves: the new night loads beside the
            old one, then one assignment switches; batches already running finish on the old
            one, so no request fails."""
            log = logging.getLogger("ray.serve")
            while True:
                time.sleep(self.config.follow_s)
                try:
                    config = self._night_config()
                    if config.model != self.recommender.config.model:
                        fresh = Recommender(config)
                        with self._lock:
                            self.recommender = fresh
                        log.info("ezsasrec: now serving night %s", fresh.night)
                except Exception as exc:  # noqa: BLE001 - keep serving the night we have
                    log.warning("ezsasrec: staying on night %s: %s", self.recommender.night,
                                exc)

        def _run(self, method, queries):
            with self._lock:
                started = time.perf_counter()
                answers = method(queries)
                self.batches["calls"] += 1
                self.batches["requests"] += len(queries)
                self.batches["seconds"] += time.perf_counter() - started
                return answers

        def _recommend_many(self, queries: list[Query]) -> list[dict]:
            return self._run(lambda qs: self.recommender.recommend_many(qs), queries)

        def _score_many(self, queries: list[Query]) -> list[dict]:
            return self._run(lambda qs: self.recommender.score_many(qs), queries)

        @app.post("/recommend", response_model=RecommendResponse,
                  response_model_exclude_none=True, dependencies=[Depends(_check_key)])
        async def recommend(self, body: RecommendRequest) -> dict:
            """Top-k items for a known user (``user_id``) or for a ``history`` of raw item ids."""
            body.check(self.config)
            if body.user_id is not None and self.recommender.users is None:
                raise _BadRequest("user_id: this server has no user data; send a history")
            return await self._batch_recommend(_query(
                body, k=body.k, exclude_seen=body.exclude_seen,
                exclude_items=body.exclude_items, candidates=body.candidates))

        @app.post("/score", response_model=ScoreResponse, dependencies=[Depends(_check_key)])
        async def score(self, body: ScoreRequest) -> dict:
            """Scores of ``item_ids`` for a known user or a history."""
            body.check(self.config)
            if body.user_id is not None and self.recommender.users is None:
                raise _BadRequest("user_id: this server has no user data; send a history")
            answer = await self._batch_score(_query(body, item_ids=body.item_ids))
            if "error" in answer:
                raise _BadRequest(answer["error"], status=404)
            return answer

        @app.get("/healthz")
        def healthz(self) -> dict:
            """Alive."""
            return {"status": "ok"}

        @app.get("/readyz")
        def readyz(self) -> dict:
            """Model loaded (a replica only takes traffic after loading it)."""
            calls = max(1, self.batches["calls"])
            return {"ready": True, "model_version": self.recommender.model_version,
                    "load_seconds": round(self.recommender.load_seconds, 3),
                    "batches": self.batches["calls"],
                    "mean_batch_size": round(self.batches["requests"] / calls, 2),
                    "mean_batch_ms": round(1000 * self.batches["seconds"] / calls, 2)}

        @app.get("/version", dependencies=[Depends(_check_key)])
        def version(self) -> dict:
            """Model directory name, version, trained-at and metrics (no filesystem paths)."""
            return self.recommender.version()


def night_of(model_dir: str) -> str | None:
    """The date of the pipeline night a model directory belongs to (nights/<date>/model)."""
    night = os.path.dirname(os.path.abspath(model_dir))
    return os.path.basename(night) if os.path.isfile(os.path.join(night, NIGHT_FILE)) else None


def deployment_options(*, replicas: int | None = None, autoscale: str | None = None,
                       num_cpus: float = 1, num_gpus: float = 0,
                       max_ongoing_requests: int = 64, target_ongoing_requests: float = 16
                       ) -> dict:
    """Serve deployment options from ``--replicas N`` or ``--autoscale MIN:MAX``."""
    options = {"ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus},
               "max_ongoing_requests": int(max_ongoing_requests)}
    if replicas is not None and autoscale is not None:
        raise EzSASRecError("serve: give --replicas or --autoscale, not both")
    if autoscale is not None:
        try:
            low, high = (int(x) for x in str(autoscale).split(":"))
        except ValueError:
            raise EzSASRecError(f"--autoscale {autoscale!r}: expected MIN:MAX, e.g. 1:4") from None
        if not 0 <= low <= high or high < 1:
            raise EzSASRecError(f"--autoscale {autoscale!r}: need 0 <= MIN <= MAX and MAX >= 1")
        options["autoscaling_config"] = {"min_replicas": low, "max_replicas": high,
                                         "target_ongoing_requests": target_ongoing_requests}
    else:
        replicas = 1 if replicas is None else int(replicas)
        if replicas < 1:
            raise EzSASRecError(f"--replicas {replicas}: must be >= 1")
        options["num_replicas"] = replicas
    return options


def build_app(args: dict):
    """Serve application builder (``import_path: ezsasrec_ray.serve:build_app``).

    ``args``: the :class:`ServeConfig` fields (``model``, ``data``, ``max_k``, ...) plus
    optional ``replicas``/``autoscale``/``num_cpus``/``num_gpus`` (deployment options in
    ``serve/config.yaml``'s ``deployments:`` section override them).
    """
    if serve is None:  # pragma: no cover
        raise EzSASRecError("serve: fastapi and ray[serve] are required")
    args = dict(args)
    option_keys = ("replicas", "autoscale", "num_cpus", "num_gpus", "max_ongoing_requests",
                   "target_ongoing_requests")
    options = deployment_options(**{k: args.pop(k) for k in option_keys if k in args})
    known = set(ServeConfig.__dataclass_fields__)
    unknown = sorted(set(args) - known)
    if unknown:
        raise EzSASRecError(f"serve: unknown argument {unknown[0]!r} (known: "
                            f"{', '.join(sorted(known | set(option_keys)))})")
    config = ServeConfig(**args)  # validated here, before any replica starts
    # a pipeline night (workdir, scores/latest): pinned now, so every replica, restarted or
    # added later, reads that night's model and data together; or followed (follow_s)
    model, data = resolve_night(config.model, config.data)
    if config.follow_s is None:
        config = replace(config, model=model, data=data)
    elif model == config.model:
        raise EzSASRecError(f"serve: follow_s: model {config.model} is a model directory; "
                            "follow a pipeline night (its workdir or scores/latest)")
    # The key is decided here (api_key, else $EZSASREC_API_KEY of this process) and only its
    # hash travels, in the deployment's arguments: every replica gets it, however started
    auth = _auth_args(config.api_key)
    if is_remote(config.model) and storage_env():  # replicas read the model where we do
        options["ray_actor_options"].setdefault("runtime_env", {})["env_vars"] = storage_env()
    return RecommenderDeployment.options(**options).bind(asdict(replace(config, api_key=None)),
                                                         auth)


def deployment_message(app_name: str) -> str:
    """Serve's status message of the app's deployment (a failed replica's error is there)."""
    app_status = serve.status().applications.get(app_name)
    deployment = app_status.deployments.get(DEPLOYMENT_NAME) if app_status else None
    return (deployment.message or "") if deployment else ""


def run_server(model: str, data: str | None, *, host: str = "127.0.0.1", port: int = 8000,
               replicas: int | None = None, autoscale: str | None = None,
               address: str | None = None, blocking: bool = True, **config) -> str:
    """``ezsasrec serve``: deploy locally and (``blocking``) serve until Ctrl-C. -> the URL."""
    app_ = build_app({"model": model, "data": data, "replicas": replicas,
                      "autoscale": autoscale, **config})
    print(f"ezsasrec serve: {auth_line(_auth_args(config.get('api_key')))}", file=sys.stderr,
          flush=True)
    init_ray(address)
    serve.start(http_options={"host": host, "port": int(port)})
    try:
        serve.run(app_, name=APP_NAME, route_prefix="/")
    except RuntimeError:  # a replica refused to start: its one line, if it is ours
        if _REPLICA_ENV_KEY in deployment_message(APP_NAME):
            serve.delete(APP_NAME)
            raise EzSASRecError(_REPLICA_ENV_KEY) from None
        raise
    url = f"http://{host}:{port}"
    if not blocking:
        return url
    print(f"serving {model} at {url}  (docs: {url}/docs; Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        serve.shutdown()
    return url


__all__ = ["Query", "Recommender", "RecommenderDeployment", "ServeConfig", "build_app",
           "deployment_options", "run_server"]
