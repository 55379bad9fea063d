"""Approximate retrieval at catalog scale: exact TopK against FAISS HNSW and IVF (ezsasrec_ray.index).

A random SASRec model (dim 64, maxlen 50, 2 blocks) over ``--items`` items (default 1M) and
``--queries`` histories of 10 to 50 random items (default 10,000), encoded once with the
model. For the exact index and each FAISS setting: build time and size, batch retrieval rate
(top 10 of the whole catalog for every history, its items excluded, in blocks of 512 as a
scoring actor does, on this process's threads), single-query latency (p50/p99 of one history
at a time, as an idle Serve replica answers), and recall@10 against exact.

    RAY_worker_niceness=0 .venv/bin/python benchmarks/ann.py --workdir /tmp/bench_ann

``--model M --data D`` takes a trained model and its prepared dataset instead (the histories:
``--queries`` random users' sequences): random embeddings have no structure at all, the
hardest case for an approximate index; trained ones cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
K = 10


def histories(rng, count: int, num_items: int) -> list[np.ndarray]:
    return [rng.integers(1, num_items + 1, int(n)).astype(np.int32)
            for n in rng.integers(10, 51, count)]


def user_vectors_of(args, num_items: int, hist: list) -> np.ndarray:
    """A random model over num_items items -> (table, user vectors of hist)."""
    import keras

    from ezsasrec_ray.encoder import user_vectors
    from ezsasrec_ray.model import SASRecConfig, build_model

    keras.utils.set_random_seed(args.seed)
    model = build_model(SASRecConfig(num_items=num_items, maxlen=50, dim=64, blocks=2, heads=1,
                                     dropout=0.0))
    table = np.asarray(model.item_embeddings().numpy(), np.float32)
    return table, user_vectors(model, hist)


def trained_vectors(args, rng) -> tuple[np.ndarray, np.ndarray, list]:
    """A trained model's table, and the vectors and histories of random users of its data."""
    from ezsasrec_ray.dataset import load_prepared
    from ezsasrec_ray.encoder import user_vectors
    from ezsasrec_ray.model_io import load_model

    model = load_model(args.model)
    sequences = load_prepared(args.data).sequences(["item_indices"])["item_indices"]
    picks = rng.choice(len(sequences), min(args.queries, len(sequences)), replace=False)
    hist = [np.asarray(sequences[int(i)].as_py(), np.int32) for i in picks]
    table = np.asarray(model.item_embeddings().numpy(), np.float32)
    return table, user_vectors(model, hist), hist


def padded(hist: list) -> np.ndarray:
    from ezsasrec_ray.batching import left_pad

    return left_pad(hist, 50)


def measure(index, vecs, seen, singles: int) -> dict:
    """Batch rate over every query, and single-query latencies over the first ``singles``."""
    out = np.zeros((len(vecs), K), np.int32)
    started = time.perf_counter()
    for a in range(0, len(vecs), 512):
        out[a:a + 512] = index(vecs[a:a + 512], K, histories=seen[a:a + 512])[0]
    batch_s = time.perf_counter() - started
    latencies = []
    for b in range(singles):
        t = time.perf_counter()
        index(vecs[b:b + 1], K, histories=seen[b:b + 1])
        latencies.append(time.perf_counter() - t)
    lat = np.array(latencies) * 1000
    return {"users_per_s": round(len(vecs) / batch_s, 1), "batch_s": round(batch_s, 2),
            "single_p50_ms": round(float(np.percentile(lat, 50)), 2),
            "single_p99_ms": round(float(np.percentile(lat, 99)), 2)}, out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="bench_output/ann")
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--singles", type=int, default=300, help="single-query latency samples")
    parser.add_argument("--ef-search", default="128,256,512,1024")
    parser.add_argument("--nprobe", default="64,256,1024")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", help="a trained model directory (with --data)")
    parser.add_argument("--data", help="its prepared dataset")
    args = parser.parse_args(argv)
    from ezsasrec_ray.index import FaissTopK, recall_at_k
    from ezsasrec_ray.topk import TopK

    os.makedirs(args.workdir, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    if args.model:
        table, vecs, hist = trained_vectors(args, rng)
    else:
        hist = histories(rng, args.queries, args.items)
        table, vecs = user_vectors_of(args, args.items, hist)
    seen = padded(hist)
    rows = []

    def add(name, build, index, **params):
        figures, top = measure(index, vecs, seen, args.singles)
        row = {"index": name, **params, "build_s": round(build, 1),
               "bytes": getattr(index, "index_bytes", int(index.vectors.nbytes)), **figures,
               f"recall@{K}": round(recall_at_k(top, exact_top), 4)}
        rows.append(row)
        print(json.dumps(row), flush=True)

    started = time.perf_counter()
    exact = TopK(table)
    exact.warm_up()
    build = time.perf_counter() - started
    exact_top = np.concatenate([exact(vecs[a:a + 512], K, histories=seen[a:a + 512])[0]
                                for a in range(0, len(vecs), 512)])
    add("exact", build, exact)
    for kind, name, values in (("faiss-hnsw", "ef_search", args.ef_search),
                               ("faiss-ivf", "nprobe", args.nprobe)):
        index = FaissTopK(table, kind=kind)
        for value in (int(v) for v in values.split(",")):
            index.ef_search = index.nprobe = value
            add(kind, index.build_seconds, index, **{name: value})
    base = rows[0]
    for row in rows[1:]:
        row["speedup_users_per_s"] = round(row["users_per_s"] / base["users_per_s"], 2)
        row["single_p99_ratio"] = round(row["single_p99_ms"] / base["single_p99_ms"], 3)
    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
              "items": int(table.shape[0] - 1), "queries": len(hist),
              "model": args.model or "random", "rows": rows}
    with open(os.path.join(args.workdir, "ann_results.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"\n{report['items']:,} items, {len(hist):,} histories, model {report['model']}, top "
          f"{K}; {report['machine']}")
    print(f"{'index':<11}{'param':>10}{'build s':>9}{'MiB':>7}{'users/s':>10}{'x exact':>8}"
          f"{'p50 ms':>8}{'p99 ms':>8}{'recall':>8}")
    for row in rows:
        param = row.get("ef_search", row.get("nprobe", ""))
        print(f"{row['index']:<11}{param!s:>10}{row['build_s']:>9}{row['bytes'] / 2**20:>7.0f}"
              f"{row['users_per_s']:>10}{row.get('speedup_users_per_s', 1.0):>8}"
              f"{row['single_p50_ms']:>8}{row['single_p99_ms']:>8}{row[f'recall@{K}']:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
