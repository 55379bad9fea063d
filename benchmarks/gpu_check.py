"""The GPU check: training and scoring on a machine with one or more GPUs, in a few minutes.

(a) trains ``--epochs`` epochs on Beauty with one GPU worker in float32 and in mixed_bfloat16,
    beside one CPU worker (sequences/s, validation NDCG@10, last loss);
(b) with two or more GPUs, the same on two workers (the scaling over one);
(c) scores every user with ``--gpus-per-actor 1`` (``--scan tensorflow``), checks the file
    equals the CPU path's item for item, and reports users/s and the catalog scan's share of
    the GPU's float32 matmul peak (measured here, TF32 off);
(d) writes everything to one JSON (``--out``).

    python benchmarks/gpu_check.py --out bench_output/gpu_check.json   # a GPU machine
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check.json  # anywhere (CI): a tiny
                                                  # synthetic log, the CPU as the "GPU"

``--log`` is the raw Beauty file (default ../shared/data/beauty/beauty.txt); when it is absent a
synthetic log of Beauty's size stands in, and the JSON says so.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(__file__))
from train import BEAUTY  # noqa: E402

TINY_TRAIN = {"dim": 16, "maxlen": 10, "blocks": 1, "heads": 1, "batch_size": 64,
              "eval_every_steps": 1, "min_steps": 0}
BEAUTY_TRAIN = {"dim": 64, "maxlen": 50, "blocks": 2, "heads": 1, "batch_size": 128,
                "eval_every_steps": 1, "min_steps": 0}


def gpu_names() -> list[str]:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    return [tf.config.experimental.get_device_details(g).get("device_name", g.name) for g in gpus]


def prepared_log(args) -> tuple[str, str]:
    """The prepared dataset to check on, and where it came from."""
    from ezsasrec_ray.prepare import prepare
    from ezsasrec_ray.synth import synth

    out = os.path.join(args.workdir, "prepared")
    if args.dry_run:
        source, size = "synthetic (dry run)", {"users": 300, "items": 80, "events": 6000}
    elif os.path.exists(args.log):
        source, size = args.log, None
    else:
        source, size = "synthetic, Beauty-sized", {"users": 40_000, "items": 54_000,
                                                   "events": 350_000}
    if size is None:
        prepare(args.log, out, min_user=5, min_item=1, overwrite=True, verbose=False)
    else:
        raw = os.path.join(args.workdir, "log")
        synth(raw, seed=0, overwrite=True, verbose=False, **size)
        prepare(raw, out, k_core=5, overwrite=True, verbose=False)
    return out, source


def train_run(data: str, out: str, args, **options) -> dict:
    """One training run -> its figures (history.csv of the model directory)."""
    from ezsasrec_ray.train import train

    shape = TINY_TRAIN if args.dry_run else BEAUTY_TRAIN
    started = time.perf_counter()
    metrics = train(data, out, epochs=args.epochs, patience=args.epochs, overwrite=True,
                    verbose=False, **shape, **options)
    history = pd.read_csv(os.path.join(out, "history.csv"))
    later = history.iloc[1:] if len(history) > 1 else history  # epoch 1 includes tracing
    return {"options": options, "wall_s": round(time.perf_counter() - started, 1),
            "sequences_per_s": round(float(later["sequences_per_s"].mean()), 1),
            "loss": round(float(history["loss"].iloc[-1]), 4),
            "valid_NDCG@10": round(float(metrics["valid"]["NDCG@10"]), 4), "model": out}


def check_training(data: str, args, gpus: int) -> dict:
    """(a) and (b)."""
    use_gpu = gpus > 0
    runs = {}
    for precision in ("float32", "mixed_bfloat16"):
        runs[f"gpu_{precision}"] = train_run(
            data, os.path.join(args.workdir, f"model_{precision}"), args, num_workers=1,
            use_gpu=use_gpu, precision=precision)
    if use_gpu:
        runs["cpu_float32"] = train_run(data, os.path.join(args.workdir, "model_cpu"), args,
                                        num_workers=1, use_gpu=False)
    one = runs["gpu_float32"]["sequences_per_s"]
    for name in [n for n in runs if n.startswith("gpu_")]:
        runs[name]["speedup_over_cpu"] = (round(runs[name]["sequences_per_s"] / runs[
            "cpu_float32"]["sequences_per_s"], 2) if "cpu_float32" in runs else None)
    if gpus >= 2:
        two = train_run(data, os.path.join(args.workdir, "model_2gpu"), args, num_workers=2,
                        use_gpu=True, precision="float32")
        two["scaling_over_one_gpu"] = round(two["sequences_per_s"] / one, 2)
        runs["two_gpus_float32"] = two
    else:
        runs["two_gpus_float32"] = {"skipped": f"needs 2 GPUs, this machine has {gpus}"}
    return runs


def read_scores(directory: str) -> pd.DataFrame:
    frame = pd.read_parquet(os.path.join(directory, "recommendations"))
    return frame.sort_values("user_id").reset_index(drop=True)


def check_scoring(data: str, model: str, args, gpus: int) -> dict:
    """(c): the GPU path's file against the CPU path's, users/s, share of the matmul peak."""
    from ezsasrec_ray.score import recommend

    runs = {}
    for name, options in (("gpu", {"gpus_per_actor": 1 if gpus else 0, "scan": "tensorflow"}),
                          ("cpu", {"gpus_per_actor": 0, "scan": "numpy"})):
        output = os.path.join(args.workdir, f"scores_{name}")
        manifest = recommend(model, data, top_n=10, output=output, overwrite=True,
                             verbose=False, **options)
        runs[name] = {"options": options, "users": manifest["counts"]["users_scored"],
                      "users_per_s": manifest["timings"]["users_per_s"],
                      "score_s": manifest["timings"]["score_s"]}
    gpu, cpu = (read_scores(os.path.join(args.workdir, f"scores_{n}")) for n in ("gpu", "cpu"))
    same = (gpu["user_id"].tolist() == cpu["user_id"].tolist()
            and all(np.array_equal(a, b) for a, b in zip(gpu["item_ids"], cpu["item_ids"]))
            and all(np.array_equal(a, b) for a, b in zip(gpu["scores"], cpu["scores"])))
    runs["identical"] = bool(same)
    runs["speedup_over_cpu"] = round(runs["gpu"]["users_per_s"] / runs["cpu"]["users_per_s"], 2)
    runs["scan"] = scan_share_of_peak(model, users=256 if args.dry_run else 4096,
                                      peak_n=512 if args.dry_run else 8192)
    return runs


def scan_share_of_peak(model_dir: str, users: int, peak_n: int) -> dict:
    """The device scan alone (DeviceTopK, top 10 of the whole catalog for random users)
    against a square float32 matmul on the same device."""
    import tensorflow as tf

    from ezsasrec_ray.topk_device import DeviceTopK

    table = np.load(os.path.join(model_dir, "item_embeddings.npy"))
    index = DeviceTopK(table)  # turns TF32 off for the peak below too
    queries = np.random.default_rng(0).standard_normal((users, table.shape[1]), np.float32)
    index(queries, 10)  # traces the step
    started = time.perf_counter()
    index(queries, 10)
    scan_s = time.perf_counter() - started
    with tf.device(index.device):
        a = tf.random.normal((peak_n, peak_n))
        tf.matmul(a, a).numpy()
        started = time.perf_counter()
        for _ in range(5):
            b = tf.matmul(a, a)
        b.numpy()
        peak = 5 * 2 * peak_n**3 / (time.perf_counter() - started)
    achieved = 2 * users * table.shape[0] * table.shape[1] / scan_s
    return {"device": index.device, "users": users, "items": int(table.shape[0] - 1),
            "dim": int(table.shape[1]), "scan_s": round(scan_s, 4),
            "scan_gflops": round(achieved / 1e9, 1), "matmul_peak_gflops": round(peak / 1e9, 1),
            "share_of_peak": round(achieved / peak, 3)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log", default=BEAUTY, help="raw Beauty log (default: ../shared)")
    parser.add_argument("--workdir", default="bench_output/gpu_check")
    parser.add_argument("--out", default="bench_output/gpu_check.json")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--dry-run", action="store_true",
                        help="a tiny synthetic log on the CPU: checks the script, not a GPU")
    args = parser.parse_args(argv)
    from ezsasrec_ray.runtime import init_ray, quiet_ray_data_progress, quiet_ray_logs

    quiet_ray_logs()
    quiet_ray_data_progress()
    os.makedirs(args.workdir, exist_ok=True)
    names = gpu_names()
    if not names and not args.dry_run:
        print("gpu_check: no GPU is visible (use --dry-run to check the script on a CPU)",
              file=sys.stderr)
        return 2
    init_ray()
    data, source = prepared_log(args)
    report = {"gpus": names, "dry_run": args.dry_run, "log": source, "epochs": args.epochs}
    report["training"] = check_training(data, args, len(names))
    report["scoring"] = check_scoring(data, report["training"]["gpu_float32"]["model"], args,
                                      len(names))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump(report, f, indent=2)
    os.replace(args.out + ".tmp", args.out)
    print(json.dumps(report, indent=2))
    return 0 if report["scoring"]["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
