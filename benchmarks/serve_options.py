"""Cost of ``exclude_items`` / ``candidates`` in the in-process ``Recommender`` (no Ray, no HTTP).

A random SASRec model (``--items`` items, dim 64, maxlen 50) is written to a model directory
with an ``items/`` vocabulary and loaded by ``Recommender(ServeConfig(model=dir, threads=1))``.
Each repeat draws one random 30-item history (raw ids) shared by four interleaved cases:

(a) ``recommend_many([Query(history=h, k=10)])``: a plain request;
(b) the same with ``exclude_items`` of 20 random raw ids;
(c) the same with ``candidates`` of 500 random raw ids;
(d) a batch of 8 queries, half with options (2 exclude, 2 candidates), half plain: ms per request.

The first 10 rounds are not timed. Prints the median and p90 ms of each case and the ratios
(b)/(a), (c)/(a) as a markdown table. Target: at 100k items, (b) and (c) cost at most 1.5x (a).
Usage::

    OMP_NUM_THREADS=1 TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python benchmarks/serve_options.py
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

K, HISTORY, EXCLUDE, CANDIDATES, BATCH, WARMUP = 10, 30, 20, 500, 8, 10
TARGET = 1.5


def raw_ids(num_items: int) -> np.ndarray:
    """Raw item ids of indices 1..N (distinct from the indices, so lookups are exercised)."""
    return np.arange(1, num_items + 1, dtype=np.int64) * 7 + 1000


def write_random_model(path: str, num_items: int, dim: int, maxlen: int) -> str:
    """A random SASRec model directory with an ``items/`` vocabulary (what serve loads)."""
    import keras
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ezsasrec_ray.model import SASRecConfig, build_model
    from ezsasrec_ray.model_io import write_model_dir

    def vocabulary(tmp: str):
        os.makedirs(os.path.join(tmp, "items"))
        table = pa.table({"raw_id": pa.array(raw_ids(num_items), pa.int64()),
                          "index": pa.array(np.arange(1, num_items + 1), pa.int32()),
                          "count": pa.array(np.full(num_items, 5), pa.int64())})
        pq.write_table(table, os.path.join(tmp, "items", "part-0.parquet"))

    keras.utils.set_random_seed(0)
    model = build_model(SASRecConfig(num_items=num_items, maxlen=maxlen, dim=dim))
    write_model_dir(path, model, {"note": "random weights (benchmarks/serve_options.py)"},
                    overwrite=True, extra=vocabulary)
    return path


def cases(rng, ids: np.ndarray) -> tuple[dict, set]:
    """-> ({case: queries}, candidate set) for one repeat, all with the same random history."""
    from ezsasrec_ray.serve import Query

    h = rng.choice(ids, HISTORY, replace=False).tolist()
    excl = rng.choice(ids, EXCLUDE, replace=False).tolist()
    cand = rng.choice(ids, CANDIDATES, replace=False).tolist()
    plain, with_excl = Query(history=h, k=K), Query(history=h, k=K, exclude_items=excl)
    with_cand = Query(history=h, k=K, candidates=cand)
    batch = [with_excl, with_cand] * (BATCH // 4) + [plain] * (BATCH // 2)
    return {"a": [plain], "b": [with_excl], "c": [with_cand], "d": batch}, set(cand)


def run(rec, ids: np.ndarray, repeats: int, seed: int = 0) -> dict:
    """-> {case: array of ms per request}, cases interleaved in each repeat."""
    rng = np.random.default_rng(seed)
    times: dict = {c: [] for c in "abcd"}
    for r in range(WARMUP + repeats):
        queries, cand = cases(rng, ids)
        for name, qs in queries.items():
            start = time.perf_counter()
            answers = rec.recommend_many(qs)
            ms = (time.perf_counter() - start) * 1e3 / len(qs)
            if name == "c":  # sanity: a candidates answer stays within the candidates
                assert set(answers[0]["items"]) <= cand, answers[0]["items"]
            if r >= WARMUP:
                times[name].append(ms)
    return {c: np.asarray(v) for c, v in times.items()}


def table(times: dict, args, build_s: float) -> str:
    """The markdown table of median / p90 ms and the ratios to (a)."""
    labels = {"a": "(a) plain", "b": f"(b) exclude_items={EXCLUDE}",
              "c": f"(c) candidates={CANDIDATES}",
              "d": f"(d) batch of {BATCH}, half with options (per request)"}
    med = {c: float(np.median(v)) for c, v in times.items()}
    lines = [f"items={args.items:,} dim={args.dim} maxlen={args.maxlen} repeats={args.repeats}"
             f" (+{WARMUP} untimed), Recommender build {build_s:.1f} s",
             "", "| case | median ms | p90 ms | median / (a) |", "|---|---:|---:|---:|"]
    for c, label in labels.items():
        ratio = f"{med[c] / med['a']:.2f}x" if c != "d" else "-"
        lines.append(f"| {label} | {med[c]:.2f} | {np.percentile(times[c], 90):.2f} | {ratio} |")
    worst = max(med["b"], med["c"]) / med["a"]
    verdict = "met" if worst <= TARGET else "NOT met"
    lines += ["", f"target (b)/(a), (c)/(a) <= {TARGET}x: {verdict} (worst {worst:.2f}x)"]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--maxlen", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--workdir", default=None, help="default: a new temporary directory")
    args = parser.parse_args(argv)

    from ezsasrec_ray.serve import Recommender, ServeConfig

    workdir = args.workdir or tempfile.mkdtemp(prefix="serve_options_")
    model_dir = write_random_model(os.path.join(workdir, f"model_{args.items}"), args.items,
                                   args.dim, args.maxlen)
    start = time.perf_counter()
    rec = Recommender(ServeConfig(model=model_dir, threads=1))
    build_s = time.perf_counter() - start
    times = run(rec, raw_ids(args.items), args.repeats)
    print(table(times, args, build_s))
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f} (other processes share it); OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    env = " ".join(f"{v}={os.environ[v]}" for v in ("OMP_NUM_THREADS", "TF_CPP_MIN_LOG_LEVEL")
                   if v in os.environ)
    print(f"command: {env} {sys.executable} {' '.join(sys.argv)}".strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
