"""Benchmark nightly full-catalog scoring (``ezsasrec_ray.score.recommend``) on this machine.

Cases (random weights: speed does not depend on them; synthetic prepared datasets written
directly with numpy, history lengths Beauty-like: at least 5, mean about 8.8, up to 200):

(a) Beauty-size: 40,226 users x 54,542 items, top-10 (the size of Amazon Beauty 5-core).
(b) 1M users x 100k items, top-100: a measured share of the users (``--big-sample``) is scored
    and the time for 1M users is extrapolated from the measured rate (printed as such).

Model: dim 64, maxlen 50, 2 blocks, 1 head. For each case: end-to-end users/s (with actor
start-up), steady users/s (from the start of the first batch to the end of the last one),
peak RSS of each scoring actor (and of the driver); the dense float32 matmul peak of this
machine measured with numpy and TensorFlow in the same run (the higher is used); the FLOPs
each user costs (history encoder at the width actually used + catalog scoring) and the
achieved rate: the roofline ratio; the encoder / catalog split inside the actor's batches (CPU
ms per 1k users and GFLOP/s per core of each, from the CPU time of the scorer's threads); the
CPU time other processes took on this shared machine meanwhile. Each case is scored
``--repeats`` times (default 3) with the same data and model, and the run with the median
steady rate is reported, with every run's rate and ratio (runs on this shared 2-core machine
vary by about 10%). The baseline is a per-user loop in the style of the original ezSASRec
(one user at a time through the model, the full catalog scored, a full argsort) on a subset of
(a), timed in the same run, so the speedup is a measured ratio; the original's own rate (11
users/s on Beauty, measured while planning) is quoted too. The benchmark's Ray workers run at
normal priority (``RAY_worker_niceness=0``; Ray's default is nice 15), like the baseline in
the driver.

Usage::

    .venv/bin/python benchmarks/score.py --workdir /tmp/bench_score
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import sys
import threading
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Ray starts its workers at nice 15; on a shared machine every normal-priority process then
# takes the scoring actor's CPU first, while the per-user baseline runs in this driver at
# nice 0. Workers at nice 0 make the comparison fair (this run's own Ray only).
os.environ.setdefault("RAY_worker_niceness", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DIM, MAXLEN, BLOCKS, HEADS = 64, 50, 2, 1
ORIGINAL_USERS_PER_S = 11  # the original ezSASRec's recommend_item on Beauty (issue 4)


# ---------------------------------------------------------------------------------------------
# Inputs


def history_lengths(rng, users: int) -> np.ndarray:
    """Beauty-like: 5 + geometric (mean 8.8 in all), capped at 200."""
    return np.minimum(5 + rng.geometric(1 / 4.8, users) - 1, 200).astype(np.int64)


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def write_prepared(path: str, users: int, items: int, seed: int = 0) -> np.ndarray:
    """A prepared-dataset directory (the layout ``load_prepared`` reads) with random sequences.
    Returns the history lengths."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    shutil.rmtree(path, ignore_errors=True)
    for name in ("users", "items", "sequences"):
        os.makedirs(os.path.join(path, name))
    lengths = history_lengths(rng, users)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    values = rng.integers(1, items + 1, int(offsets[-1]), dtype=np.int32)
    ids = np.arange(1, users + 1)
    pq.write_table(pa.table({"raw_id": ids.astype(np.int64), "index": ids.astype(np.int32),
                             "count": lengths}), os.path.join(path, "users", "part-0.parquet"))
    counts = np.bincount(values, minlength=items + 1)[1:]
    item_ids = np.arange(1, items + 1)
    pq.write_table(pa.table({"raw_id": item_ids.astype(np.int64),
                             "index": item_ids.astype(np.int32), "count": counts}),
                   os.path.join(path, "items", "part-0.parquet"))
    step = 250_000
    for part, start in enumerate(range(0, users, step)):
        stop = min(users, start + step)
        local = offsets[start:stop + 1] - offsets[start]
        lists = pa.ListArray.from_arrays(pa.array(local.astype(np.int32)),
                                         pa.array(values[offsets[start]:offsets[stop]]))
        n = lengths[start:stop].astype(np.int32)
        pq.write_table(pa.table({
            "user_index": ids[start:stop].astype(np.int32), "user_id": ids[start:stop],
            "item_indices": lists, "n_events": n, "n_train": np.maximum(n - 2, 0),
            "train_only": n < 3}), os.path.join(path, "sequences", f"part-{part:05d}.parquet"))
    hashes = {}
    for name in ("users", "items", "sequences"):
        for file in sorted(os.listdir(os.path.join(path, name))):
            hashes[f"{name}/{file}"] = _sha256(os.path.join(path, name, file))
    manifest = {"format_version": 1, "kind": "ezsasrec_ray.prepared",
                "source": {"input": "benchmarks/score.py (random sequences)"},
                "has_time": False, "split": "loo",
                "vocab": {"num_users": users, "num_items": items, "user_id_type": "int64",
                          "item_id_type": "int64"},
                "counts": {"events_kept": int(offsets[-1])}, "content_hashes": hashes}
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return lengths


def write_model(path: str, data, seed: int = 0) -> str:
    """A random SASRec model directory (what ``load_model`` reads)."""
    import keras

    from ezsasrec_ray.model import SASRecConfig, build_model, save_model_files
    from ezsasrec_ray.model_io import MODEL_FORMAT_VERSION

    keras.utils.set_random_seed(seed)
    shutil.rmtree(path, ignore_errors=True)
    model = build_model(SASRecConfig(num_items=data.num_items, maxlen=MAXLEN, dim=DIM,
                                     blocks=BLOCKS, heads=HEADS, dropout=0.0))
    save_model_files(model, path)
    with open(os.path.join(path, "metrics.json"), "w") as f:
        json.dump({"format_version": MODEL_FORMAT_VERSION, "kind": "ezsasrec_ray.model",
                   "trained_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                   "vocab_fingerprint": data.vocab_fingerprint(), "note": "random weights"}, f)
    return path


# ---------------------------------------------------------------------------------------------
# Measurements


def _best_gflops(run, flops: float, seconds: float) -> float:
    """Best GFLOP/s of ``run()`` (one matmul of ``flops``) over ``seconds`` of repeats."""
    run()
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        run()
        best = max(best, flops / (time.perf_counter() - t) / 1e9)
    return round(best, 1)


def matmul_peak(seconds: float = 2.0) -> dict:
    """Dense float32 matmul GFLOP/s (best of repeated runs, all cores) with both frameworks the
    scorer uses: numpy (the catalog's matmuls) for a large square shape and TopK's catalog
    block (2048 items x 64 dims x 512 users), and TensorFlow (the encoder) for the square one.
    The roofline uses the highest."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    out = {}
    for name, (m, k, n) in {"numpy_square_2048": (2048, 2048, 2048),
                            "numpy_scoring_2048x64x512": (2048, 64, 512)}.items():
        a = rng.standard_normal((m, k)).astype(np.float32)
        b = rng.standard_normal((k, n)).astype(np.float32)
        c = np.empty((m, n), np.float32)
        out[name] = _best_gflops(lambda a=a, b=b, c=c: np.matmul(a, b, out=c), 2 * m * k * n,
                                 seconds)
    a = tf.constant(rng.standard_normal((2048, 2048)).astype(np.float32))
    product = tf.function(tf.matmul)
    out["tensorflow_square_2048"] = _best_gflops(lambda: product(a, a).numpy(), 2 * 2048**3,
                                                 seconds)
    return out


def encoder_flops(width: int, dim: int = DIM, blocks: int = BLOCKS) -> float:
    """FLOPs of one history of ``width`` positions through the transformer as
    ``user_embeddings`` computes it: each block but the last, the q/k/v, output and two
    feed-forward projections (12 W d^2) and the attention scores and weighted sum over all
    W x W pairs (4 W^2 d); the last block only for the last position (``last_only``): k and v
    of every position (4 W d^2), q, output and feed-forward of one (8 d^2), one query's
    scores and sum (4 W d)."""
    full_block = 12 * width * dim * dim + 4 * width * width * dim
    last_block = 4 * width * dim * dim + 8 * dim * dim + 4 * width * dim
    return (blocks - 1) * full_block + last_block


def flops_per_user(lengths: np.ndarray, items_allowed: int) -> dict:
    from ezsasrec_ray.encoder import bucket_widths

    widths = bucket_widths(MAXLEN)
    used = widths[np.searchsorted(widths, np.clip(lengths, 1, MAXLEN))]
    encoder = float(np.mean([encoder_flops(int(w)) for w in used]))
    catalog = 2.0 * DIM * items_allowed
    return {"encoder": encoder, "encoder_at_maxlen": float(encoder_flops(MAXLEN)),
            "catalog": catalog, "total": encoder + catalog}


def _busy_cpu_seconds() -> float:
    """CPU seconds all processes of this machine have used since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait


class ProcessMonitor:
    """While a case runs: peak RSS of every scoring actor (by its Ray process title), and the
    CPU used by this benchmark's processes (the driver and everything it started: Ray, the
    actors, the tasks) versus by the rest of the machine (other users of the shared VM).

    The process tree is scanned once a second; the actors' RSS is sampled at 5 Hz."""

    def __init__(self):
        self.peaks: dict[int, int] = {}
        self.cpu: dict[int, float] = {}  # pid -> last CPU seconds seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _scan(self) -> dict:
        import psutil

        actors = {}
        me = psutil.Process()
        for proc in [me, *me.children(recursive=True)]:
            try:
                times = proc.cpu_times()
                self.cpu[proc.pid] = times.user + times.system
                if "BatchScorer" in " ".join(proc.cmdline()):
                    actors[proc.pid] = proc
            except psutil.Error:
                pass
        return actors

    def _run(self):
        import psutil

        actors, tick = {}, 0
        while not self._stop.is_set():
            if tick % 5 == 0:
                actors = self._scan()
            for pid, proc in actors.items():
                try:
                    self.peaks[pid] = max(self.peaks.get(pid, 0), proc.memory_info().rss)
                except psutil.Error:
                    pass
            tick += 1
            time.sleep(0.2)

    def __enter__(self):
        self._scan()
        self._cpu0, self._busy0, self._t0 = dict(self.cpu), _busy_cpu_seconds(), time.time()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._scan()
        ours = sum(v - self._cpu0.get(pid, 0.0) for pid, v in self.cpu.items())
        busy = _busy_cpu_seconds() - self._busy0
        seconds = time.time() - self._t0
        self.cpu_share = {"seconds": round(seconds, 1), "ours_cpu_s": round(ours, 1),
                          "others_cpu_s": round(max(0.0, busy - ours), 1),
                          "others_share_of_machine": round(max(0.0, busy - ours)
                                                           / (seconds * os.cpu_count()), 2)}


def per_user_baseline(model, data, users: int, top_n: int) -> dict:
    """The original ezSASRec's way: each user alone through the model, the whole catalog
    scored, a full argsort, seen items dropped."""
    from ezsasrec_ray.batching import left_pad

    table = model.item_embeddings().numpy()
    histories = data.sequences().slice(0, users)["item_indices"].to_pylist()
    model.user_embeddings(left_pad([histories[0]], MAXLEN))
    t = time.perf_counter()
    for history in histories:
        user = model.user_embeddings(left_pad([history], MAXLEN)).numpy()[0]
        scores = table @ user
        scores[0] = -np.inf
        scores[history] = -np.inf
        _ = np.argsort(-scores, kind="stable")[:top_n]
    seconds = time.perf_counter() - t
    return {"users": users, "seconds": round(seconds, 2), "users_per_s": users / seconds}


def _run_figures(manifest: dict, lengths: np.ndarray, users: int, actors: int,
                 peak: float) -> dict:
    """One scoring run's rates, phases and roofline ratio, from its manifest."""
    timings = manifest["timings"]
    flops = flops_per_user(lengths, manifest["counts"]["items_allowed"])
    # steady: wall time from the first batch's start to the last one's end (all actors);
    # busy: as if every actor were busy all along (batches_s sums over the actors)
    steady = users / max(timings["batches_window_s"], 1e-9)
    busy = users / max(timings["batches_s"] / actors, 1e-9)
    achieved = steady * flops["total"] / 1e9
    phases = {}  # CPU ms per 1k users and GFLOP/s per core of each phase (scorer threads)
    for phase, key in (("encoder", "encoder_cpu_s"), ("catalog", "catalog_cpu_s")):
        seconds = timings[key]
        phases[phase] = {"cpu_ms_per_1k": round(1e6 * seconds / users, 1),
                         "gflops_per_core": round(users * flops[phase] / max(seconds, 1e-9) / 1e9,
                                                  1)}
    return {
        "end_to_end_s": timings["score_s"], "end_to_end_users_per_s": timings["users_per_s"],
        "steady_users_per_s": round(steady, 1), "busy_users_per_s": round(busy, 1),
        "phases": phases, "flops_per_user_M": {k: round(v / 1e6, 2) for k, v in flops.items()},
        "achieved_gflops": round(achieved, 1), "roofline_ratio": round(achieved / peak, 3),
    }


def scorer_alone(model_dir: str, data_dir: str, top_n: int, threads: int, users: int,
                 batch_size: int, repeats: int) -> list[float]:
    """users/s of the same scorer (``score.BatchScorer``: model, data, top-n, threads) in a
    plain Ray actor that calls it on batches of the first ``users`` users held in memory: no
    Ray Data pipeline (no read or write tasks, no block hand-offs, no stats actor). One figure
    per repeat."""
    import ray

    from ezsasrec_ray.runtime import SCORER_ENV

    @ray.remote(num_cpus=threads, runtime_env={"env_vars": SCORER_ENV})
    class Alone:
        def __init__(self):
            from ezsasrec_ray.dataset import load_prepared
            from ezsasrec_ray.score import BatchScorer

            self.scorer = BatchScorer(model_path=model_dir, data_path=data_dir, top_n=top_n,
                                      threads=threads)
            self.batch = load_prepared(data_dir).sequences().slice(0, users)
            self.scorer(self.batch.slice(0, 512))  # first calls: compiled code loaded

        def run(self) -> float:
            started = time.perf_counter()
            for at in range(0, self.batch.num_rows, batch_size):
                self.scorer(self.batch.slice(at, batch_size))
            return self.batch.num_rows / (time.perf_counter() - started)

    actor = Alone.remote()
    try:
        return [ray.get(actor.run.remote()) for _ in range(repeats)]
    finally:
        ray.kill(actor)


def run_case(name: str, workdir: str, users: int, items: int, top_n: int, actors: int,
             batch_size: int, peak: float, baseline_users: int = 0, repeats: int = 3,
             threads: int | None = None) -> dict:
    from ezsasrec_ray.dataset import load_prepared
    from ezsasrec_ray.model_io import load_model
    from ezsasrec_ray.score import recommend

    t = time.time()
    data_dir = os.path.join(workdir, f"{name}_prepared")
    lengths = write_prepared(data_dir, users, items)
    data = load_prepared(data_dir)
    model_dir = write_model(os.path.join(workdir, f"{name}_model"), data)
    setup_s = time.time() - t
    model = load_model(model_dir)
    result = {"case": name, "users": users, "items": items, "top_n": top_n, "actors": actors,
              "batch_size": batch_size, "mean_history": round(float(lengths.mean()), 2),
              "setup_s": round(setup_s, 1)}
    if baseline_users:
        result["baseline"] = per_user_baseline(model, data, baseline_users, top_n)
    del model
    runs, peaks_rss = [], {}
    for _ in range(repeats):  # the machine is shared: the median run is reported
        with ProcessMonitor() as memory:
            manifest = recommend(model_dir, data, top_n=top_n, output=os.path.join(
                workdir, f"{name}_scores"), actors=actors, batch_size=batch_size,
                threads_per_actor=threads, overwrite=True, verbose=False)
        for pid, rss in memory.peaks.items():
            peaks_rss[pid] = max(rss, peaks_rss.get(pid, 0))
        runs.append(_run_figures(manifest, lengths, users, actors, peak))
        runs[-1]["cpu_during_scoring"] = memory.cpu_share
    median = sorted(runs, key=lambda r: r["steady_users_per_s"])[len(runs) // 2]
    result.update(median)
    result.update({
        "runs": [{k: r[k] for k in ("steady_users_per_s", "roofline_ratio",
                                    "end_to_end_users_per_s")} for r in runs],
        "actor_peak_rss_mib": sorted(round(v / 2**20) for v in peaks_rss.values()),
        "load_average_after": [round(x, 1) for x in os.getloadavg()],
    })
    threads = threads or os.cpu_count() // actors
    alone = scorer_alone(model_dir, data_dir, top_n, threads, min(users, 16_384), batch_size,
                         repeats)
    rate = sorted(alone)[len(alone) // 2]
    result["scorer_alone"] = {
        "users": min(users, 16_384), "threads": threads,
        "users_per_s": [round(x, 1) for x in alone],
        "roofline_ratio": round(rate * result["flops_per_user_M"]["total"] / 1e3 / peak, 3)}
    if baseline_users:
        result["speedup_steady"] = round(
            result["steady_users_per_s"] / result["baseline"]["users_per_s"], 1)
        result["speedup_end_to_end"] = round(
            result["end_to_end_users_per_s"] / result["baseline"]["users_per_s"], 1)
        result["baseline"]["users_per_s"] = round(result["baseline"]["users_per_s"], 1)
    shutil.rmtree(os.path.join(workdir, f"{name}_scores"), ignore_errors=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="bench_output/score")
    parser.add_argument("--beauty-users", type=int, default=40_226)
    parser.add_argument("--beauty-items", type=int, default=54_542)
    parser.add_argument("--big-users", type=int, default=1_000_000,
                        help="users the (b) figures are extrapolated to")
    parser.add_argument("--big-sample", type=int, default=40_000,
                        help="users of (b) actually scored")
    parser.add_argument("--big-items", type=int, default=100_000)
    parser.add_argument("--baseline-users", type=int, default=300)
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None,
                        help="scorer threads per actor (default: recommend's, its CPUs)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="scoring runs per case; the median (by steady users/s) is reported")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="users per Ray Data batch (default: recommend's)")
    args = parser.parse_args(argv)

    import psutil
    import ray

    from ezsasrec_ray.score import DEFAULT_BATCH_SIZE

    args.batch_size = args.batch_size or DEFAULT_BATCH_SIZE
    started = time.time()
    os.makedirs(args.workdir, exist_ok=True)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {', '.join(f'{x:.1f}' for x in os.getloadavg())} at start, "
          f"numpy {np.__version__}, Ray worker niceness {os.environ['RAY_worker_niceness']}")
    peaks = matmul_peak()
    peak = max(peaks.values())
    print(f"float32 matmul peak (GFLOP/s, best of 2 s each): {peaks}; roofline uses the "
          f"highest, {peak}")
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    results = []
    for name, users, items, top_n, baseline in (
            ("a_beauty_size", args.beauty_users, args.beauty_items, 10, args.baseline_users),
            ("b_1M_x_100k_sample", args.big_sample, args.big_items, 100, 0)):
        result = run_case(name, args.workdir, users, items, top_n, args.actors,
                          args.batch_size, peak, baseline, args.repeats, args.threads)
        results.append(result)
        print(json.dumps(result, indent=None))
    big = results[1]
    extrapolated = args.big_users / big["steady_users_per_s"]
    print("\n== summary (random weights; dim 64, maxlen 50, 2 blocks; "
          f"{args.actors} actor(s) on {os.cpu_count()} CPUs, batches of {args.batch_size:,}; "
          f"median of {args.repeats} runs)")
    print(f"{'case':<28}{'users':>10}{'items':>9}{'top':>5}{'e2e u/s':>10}{'steady u/s':>12}"
          f"{'MFLOP/u':>9}{'GFLOP/s':>9}{'roofline':>10}{'max actor RSS MiB':>19}")
    for r in results:
        print(f"{r['case']:<28}{r['users']:>10,}{r['items']:>9,}{r['top_n']:>5}"
              f"{r['end_to_end_users_per_s']:>10,.0f}{r['steady_users_per_s']:>12,.0f}"
              f"{r['flops_per_user_M']['total']:>9.2f}{r['achieved_gflops']:>9.1f}"
              f"{r['roofline_ratio']:>10.1%}{max(r['actor_peak_rss_mib'], default=0):>19,}")
    for r in results:
        ratios = ", ".join(f"{x['roofline_ratio']:.1%}" for x in r["runs"])
        rates = ", ".join(f"{x['steady_users_per_s']:,.0f}" for x in r["runs"])
        print(f"{r['case']}: each run's roofline ratio {ratios}; steady users/s {rates}")
        alone = r["scorer_alone"]
        print(f"{r['case']}: the same scorer in a plain Ray actor ({alone['threads']} threads, "
              f"{alone['users']:,} users in memory, no Ray Data): users/s "
              f"{', '.join(f'{x:,.0f}' for x in alone['users_per_s'])}; median at "
              f"{alone['roofline_ratio']:.1%} of the peak")
    a = results[0]
    print(f"(a) per-user loop baseline (original ezSASRec style) on {a['baseline']['users']} "
          f"users: {a['baseline']['users_per_s']:.1f} users/s -> speedup {a['speedup_steady']}x "
          f"steady, {a['speedup_end_to_end']}x end to end (with actor start-up)")
    print(f"(b) extrapolated from {args.big_sample:,} scored users: {args.big_users:,} users "
          f"x {args.big_items:,} items, top-100 in {extrapolated / 60:.1f} min "
          f"({extrapolated:,.0f} s) at the steady rate, plus actor start-up")
    print(f"(a) vs the original ezSASRec's recommend_item ({ORIGINAL_USERS_PER_S} users/s on "
          f"Beauty, measured while planning): {a['steady_users_per_s'] / ORIGINAL_USERS_PER_S:,.0f}x"
          f" steady, {a['end_to_end_users_per_s'] / ORIGINAL_USERS_PER_S:,.0f}x end to end")
    for r in results:
        print(f"{r['case']}: the scorer threads' CPU ms per 1k users and GFLOP/s per core, by "
              f"phase: {r['phases']}")
    for r in results:
        c = r["cpu_during_scoring"]
        print(f"{r['case']}: while scoring ({c['seconds']} s), this benchmark used "
              f"{c['ours_cpu_s']} CPU s and other processes on the machine "
              f"{c['others_cpu_s']} CPU s ({c['others_share_of_machine']:.0%} of its "
              f"{os.cpu_count()} cores)")
    print(f"driver RSS at the end {psutil.Process().memory_info().rss / 2**20:,.0f} MiB; "
          f"load average at end {', '.join(f'{x:.1f}' for x in os.getloadavg())}; "
          f"total {time.time() - started:.0f}s")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
