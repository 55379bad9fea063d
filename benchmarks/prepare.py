"""Benchmark ``prepare`` against two in-memory baselines doing the same job.

For synthetic logs of each size (k = 5): wall time, events/s, driver peak RSS and total peak
RSS of ezsasrec_ray's Ray Data prepare; and, on the same input (up to --baseline-max events),
a vectorized pandas path and the original ezSASRec style (``groupby().filter(lambda ...)``
per group, dict encoding, per-user sequence loop), each doing k-core + encoding + sequences.

Each measurement runs in its own subprocess so peak memory is its own. Usage::

    .venv/bin/python benchmarks/prepare.py --sizes 1M,10M,100M --workdir bench_output
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time

K = 5


def parse_size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 10**3, "M": 10**6, "B": 10**9}.get(text[-1], 1)
    return int(float(text.rstrip("KMB")) * scale)


class PeakRSS:
    """Samples the RSS of this process, and of it plus all descendants, every 50 ms."""

    def __init__(self):
        import psutil

        self.proc = psutil.Process()
        self.driver = self.total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        import psutil

        while not self._stop.is_set():
            try:
                own = self.proc.memory_info().rss
                total = own
                for child in self.proc.children(recursive=True):
                    try:
                        total += child.memory_info().rss
                    except psutil.Error:
                        pass
                self.driver, self.total = max(self.driver, own), max(self.total, total)
            except psutil.Error:
                pass
            time.sleep(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------------------------------------
# The three implementations (each run in a child process)


def run_ray(src: str, out: str) -> dict:
    import ray

    from ezsasrec_ray.prepare import prepare

    ray.init(include_dashboard=False, log_to_driver=False)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    time.sleep(1.0)  # let the worker pool settle before measuring
    with PeakRSS() as peak:
        started = time.time()
        manifest = prepare(src, out, k_core=K, overwrite=True, verbose=False)
        wall = time.time() - started
    return {"wall_s": wall, "driver_peak_gb": peak.driver / 1e9, "total_peak_gb": peak.total / 1e9,
            "events_kept": manifest["counts"]["events_kept"],
            "users": manifest["counts"]["users_kept"], "items": manifest["counts"]["items_kept"],
            "rounds": len(manifest["kcore_rounds"]), "timings": manifest["timings"]}


def _read_log(src: str):
    import pandas as pd

    df = pd.read_parquet(src, columns=["user_id", "item_id", "timestamp"])
    return df.rename(columns={"user_id": "user", "item_id": "item", "timestamp": "ts"})


def run_pandas(src: str) -> dict:
    """Vectorized in-memory pandas: value_counts/map k-core, factorize, one sort."""
    import numpy as np
    import pandas as pd

    df = _read_log(src)
    with PeakRSS() as peak:
        started = time.time()
        rounds = 0
        while True:
            rounds += 1
            keep = (df["user"].map(df["user"].value_counts()) >= K) & (
                df["item"].map(df["item"].value_counts()) >= K)
            if keep.all():
                break
            df = df[keep]
        item_counts = df["item"].value_counts()
        item_vocab = item_counts.rename_axis("raw").reset_index(name="n").sort_values(
            ["n", "raw"], ascending=[False, True])
        user_counts = df["user"].value_counts()
        user_vocab = user_counts.rename_axis("raw").reset_index(name="n").sort_values(
            ["n", "raw"], ascending=[False, True])
        item_index = pd.Series(np.arange(1, len(item_vocab) + 1), index=item_vocab["raw"])
        user_index = pd.Series(np.arange(1, len(user_vocab) + 1), index=user_vocab["raw"])
        enc = pd.DataFrame({"u": df["user"].map(user_index).to_numpy(),
                            "i": df["item"].map(item_index).to_numpy(),
                            "ts": df["ts"].to_numpy()})
        enc = enc.sort_values(["u", "ts"], kind="stable")
        u = enc["u"].to_numpy()
        starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
        sequences = np.split(enc["i"].to_numpy().astype(np.int32), starts[1:])
        wall = time.time() - started
    return {"wall_s": wall, "driver_peak_gb": peak.driver / 1e9, "total_peak_gb": peak.total / 1e9,
            "events_kept": int(len(enc)), "users": len(sequences), "rounds": rounds}


def run_original(src: str) -> dict:
    """The original ezSASRec style: per-group filter lambdas, dict encoding, per-user loop."""
    df = _read_log(src)
    with PeakRSS() as peak:
        started = time.time()
        rounds = 0
        while True:
            rounds += 1
            before = len(df)
            df = df.groupby("user").filter(lambda x: len(x) >= K)
            df = df.groupby("item").filter(lambda x: len(x) >= K)
            if len(df) == before:
                break
        user_map = {u: n + 1 for n, u in enumerate(df["user"].unique())}
        item_map = {i: n + 1 for n, i in enumerate(df["item"].unique())}
        df = df.assign(user=df["user"].map(user_map), item=df["item"].map(item_map))
        df = df.sort_values(["user", "ts"])
        sequences = {}
        for user, group in df.groupby("user"):
            sequences[user] = group["item"].tolist()
        wall = time.time() - started
    return {"wall_s": wall, "driver_peak_gb": peak.driver / 1e9, "total_peak_gb": peak.total / 1e9,
            "events_kept": int(len(df)), "users": len(sequences), "rounds": rounds}


# ---------------------------------------------------------------------------------------------


def child(argv):
    kind, src, out = argv
    result = {"ray": lambda: run_ray(src, out), "pandas": lambda: run_pandas(src),
              "original": lambda: run_original(src)}[kind]()
    print("RESULT " + json.dumps(result), flush=True)


def run_child(kind: str, src: str, out: str, timeout: float) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", kind, src, out],
                          capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"exit {proc.returncode}: {' | '.join(tail)}"}


def make_log(events: int, workdir: str) -> str:
    src = os.path.join(workdir, f"synth_{events}_min2")
    if not os.path.exists(src):
        subprocess.run([sys.executable, "-m", "ezsasrec_ray.cli", "synth", "--users",
                        str(events // 50), "--items", str(events // 100), "--events", str(events),
                        "--seed", "0", "--min-length", "2", "--output", src],
                       check=True, capture_output=True)
    return src


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1M,10M,100M")
    parser.add_argument("--baseline-max", default="10M")
    parser.add_argument("--workdir", default="bench_output")
    parser.add_argument("--timeout", type=float, default=3600)
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    baseline_max = parse_size(args.baseline_max)
    import psutil

    print(f"machine: {platform.node()} {os.cpu_count()} CPUs, "
          f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}")
    print(f"{'events':>8} {'impl':>9} {'wall s':>8} {'events/s':>11} {'driver GB':>10} "
          f"{'total GB':>9} {'kept':>11} {'rounds':>6} {'x pandas':>8}")
    results = []
    for size in [parse_size(s) for s in args.sizes.split(",")]:
        src = make_log(size, args.workdir)
        kinds = ["ray"] + (["pandas", "original"] if size <= baseline_max else [])
        row = {}
        for kind in kinds:
            out = os.path.join(args.workdir, f"prepared_{size}")
            result = run_child(kind, src, out, args.timeout)
            row[kind] = result
            if "error" in result:
                print(f"{size:>8,} {kind:>9} failed: {result['error']}")
                continue
            ratio = ""
            if kind != "pandas" and "pandas" in row and "wall_s" in row["pandas"]:
                ratio = f"{result['wall_s'] / row['pandas']['wall_s']:.2f}"
            if kind == "original" and "ray" in row:
                ratio = f"{result['wall_s'] / row['pandas']['wall_s']:.2f}"
            print(f"{size:>8,} {kind:>9} {result['wall_s']:>8.2f} {size / result['wall_s']:>11,.0f} "
                  f"{result['driver_peak_gb']:>10.2f} {result['total_peak_gb']:>9.2f} "
                  f"{result['events_kept']:>11,} {result['rounds']:>6} {ratio:>8}", flush=True)
        if "ray" in row and "pandas" in row and "wall_s" in row["ray"] and "wall_s" in row[
                "pandas"]:
            print(f"{'':>8} ray / pandas wall time: {row['ray']['wall_s'] / row['pandas']['wall_s']:.2f}"
                  f"; ray timings: {row['ray'].get('timings')}")
        results.append({"events": size, **row})
    with open(os.path.join(args.workdir, "prepare_results.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
