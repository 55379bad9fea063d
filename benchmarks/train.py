"""Training benchmarks on Amazon Beauty (../shared/data/beauty/beauty.txt).

speed:   sequences/s for maxlen 50, dim 64, 2 blocks, 1 head, batch 128, ``bce`` — 1 and 2
         workers, with length-trimmed bucketed batches and dense Adam (the defaults) and, in
         the same run, the lazy item-table Adam and fixed maxlen-wide batches (how the
         original ezSASRec batches), plus the achieved GFLOP/s next to the
         machine's TensorFlow float32 matmul peak measured in the same run, and the load.
quality: each loss trained for the same time budget; full-catalog test HR@10 / NDCG@10 (history
         excluded) next to the popularity and Markov-chain baselines on the same users,
         fitted on the same items as the model (``--holdout``). ``--dataset
         ml-latest-small`` runs it on MovieLens (../shared/data/ml-latest-small).

    .venv/bin/python benchmarks/train.py speed --workdir bench_output
    .venv/bin/python benchmarks/train.py quality --budget-min 10 --losses softmax,bce
    .venv/bin/python benchmarks/train.py quality --budget-min 60 --dim 128 --dropout 0.5 \
        --lr 0.002 --lr-schedule cosine --holdout test --losses softmax
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

BEAUTY = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "beauty",
                      "beauty.txt")
SHAPE = {"maxlen": 50, "dim": 64, "blocks": 2, "heads": 1, "batch_size": 128}


MOVIELENS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                         "ml-latest-small", "ratings.csv")


def prepared_movielens(workdir: str) -> str:
    """ml-latest-small, every rating an interaction in time order, 5-core users (610 x 9,7xx)."""
    from ezsasrec_ray.prepare import prepare

    out = os.path.join(workdir, "ml_latest_small_prepared")
    if not os.path.exists(out):
        prepare(MOVIELENS, out, user_col="userId", item_col="movieId", time_col="timestamp",
                min_user=5, min_item=1, verbose=False)
    return out


def prepared_beauty(workdir: str) -> str:
    from ezsasrec_ray.prepare import prepare

    out = os.path.join(workdir, "beauty_prepared")
    if not os.path.exists(out):
        # The file is user-5-core, not item-5-core: keep it as published (40,226 x 54,542).
        prepare(BEAUTY, out, min_user=5, min_item=1, verbose=False)
    return out


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    import tensorflow as tf

    a = tf.random.normal((n, n))
    b = tf.random.normal((n, n))
    tf.matmul(a, b).numpy()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        tf.matmul(a, b).numpy()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def flops_per_position(loss: str, negatives: int = 1, num_items: int = 0) -> float:
    """Forward+backward matmul FLOPs per (sequence, position), approximately 3x forward."""
    d, blocks, w = SHAPE["dim"], SHAPE["blocks"], SHAPE["maxlen"]
    per_block = 2 * (4 * d * d + 2 * d * d) + 2 * 2 * (w / 2) * d  # projections, FFN, attention
    scoring = {"bce": 2, "softmax": num_items}.get(loss, negatives + 1) * 2 * d
    return 3 * (blocks * per_block + scoring)


SPEED_RUNS = {  # name -> train options: the default (dense Adam), the lazy item table, and
    # fixed maxlen-wide batches (as the original ezSASRec batches)
    "trimmed+dense": {"trim_batches": True, "optimizer": "adam"},
    "trimmed+lazy": {"trim_batches": True, "optimizer": "lazy_adam"},
    "fixed+dense": {"trim_batches": False, "optimizer": "adam"},
}


def run_speed(args):
    from ezsasrec_ray.train import train

    data = prepared_beauty(args.workdir)
    peak = matmul_peak_gflops()
    print(f"TensorFlow float32 matmul peak (2048^3): {peak:.1f} GFLOP/s")
    print(f"{'workers':>7} {'run':>14} {'seq/s':>9} {'positions/s':>12} {'GFLOP/s':>8} "
          f"{'% peak':>7} {'load':>5}")
    rows = []
    for workers in [int(w) for w in args.workers.split(",")]:
        for name in args.runs.split(","):
            out = os.path.join(args.workdir, f"speed_w{workers}_{name.replace('+', '_')}")
            train(data, out, epochs=args.epochs, loss="bce", num_workers=workers,
                  patience=args.epochs, overwrite=True, verbose=False,
                  storage_path=os.path.join(args.workdir, "runs"),
                  run_name=f"speed-{workers}-{name.replace('+', '-')}-{time.time():.0f}",
                  **SPEED_RUNS[name], **SHAPE)
            import pandas as pd

            history = pd.read_csv(os.path.join(out, "history.csv"))
            steady = history.iloc[1:] if len(history) > 1 else history  # skip the tracing epoch
            seq_s = float(steady["sequences_per_s"].median())
            pos_s = float(steady["positions_per_s"].median())
            gflops = pos_s * flops_per_position("bce") / 1e9
            load = os.getloadavg()[0]
            rows.append({"workers": workers, "run": name, "sequences_per_s": seq_s,
                         "positions_per_s": pos_s, "gflops": gflops, "peak_gflops": peak,
                         "load_1min": load})
            print(f"{workers:>7} {name:>14} {seq_s:>9,.0f} {pos_s:>12,.0f} {gflops:>8.1f} "
                  f"{100 * gflops / peak:>6.1f}% {load:>5.1f}", flush=True)
    for workers in sorted({r["workers"] for r in rows}):
        seq = {r["run"]: r["sequences_per_s"] for r in rows if r["workers"] == workers}
        ratios = [f"{name}/{base} = {seq[name] / seq[base]:.2f}x"
                  for name, base in (("trimmed+lazy", "trimmed+dense"),
                                     ("trimmed+dense", "fixed+dense"))
                  if name in seq and base in seq]
        best = max(seq.values())
        print(f"{workers} worker(s): {'; '.join(ratios)}; best vs the original ezSASRec's "
              f"1,850 seq/s measured while planning: {best / 1850:.2f}x (target 3x)")
    return rows


def run_quality(args):
    from ezsasrec_ray.evaluate import evaluate, format_table
    from ezsasrec_ray.train import train

    if args.dataset == "ml-latest-small":
        data, prefix = prepared_movielens(args.workdir), "quality_ml_"
    else:
        data, prefix = prepared_beauty(args.workdir), "quality_"
    results = []

    def run_one(loss, holdout, epochs, budget_s, tag=""):
        out = os.path.join(args.workdir, f"{prefix}{loss}{tag}")
        started = time.time()
        shape = {**SHAPE, "dim": args.dim, "blocks": args.blocks, "heads": args.heads,
                 "maxlen": args.maxlen}
        metrics = train(data, out, epochs=epochs, loss=loss, negatives=args.negatives,
                        optimizer=args.optimizer, seed=args.seed, holdout=holdout,
                        lr=args.lr, lr_schedule=args.lr_schedule, dropout=args.dropout,
                        patience=args.patience, l2=args.l2, time_budget_s=budget_s,
                        overwrite=True, verbose=True,
                        storage_path=os.path.join(args.workdir, "runs"),
                        run_name=f"quality-{loss}{tag}-{time.time():.0f}", **shape)
        wall = time.time() - started
        # the baselines are fitted on the items the model was trained on (its holdout)
        result = evaluate(data, out, split="test")
        print(format_table(result))
        import pandas as pd

        history = pd.read_csv(os.path.join(out, "history.csv"))
        return {"loss": loss + tag, "dim": args.dim, "holdout": holdout,
                "lr_schedule": args.lr_schedule, "fitted_on": result["fitted_on"],
                "epochs": int(len(history)), "best_epoch": metrics["best_epoch"],
                "train_seconds": float(history["train_seconds"].sum()), "wall_seconds": wall,
                "test": {k: result["model"][k] for k in ("HR@10", "NDCG@10")},
                "baselines": {b: {k: result[b][k] for k in ("HR@10", "NDCG@10")}
                              for b in ("popularity", "markov")},
                "valid_NDCG@10": metrics["valid"].get("NDCG@10"),
                "optimizer": metrics["train"]["optimizer"],
                "valid_NDCG@10_by_epoch": [round(x, 5)
                                           for x in history.get("valid_NDCG@10", [])]}

    for loss in args.losses.split(","):
        row = run_one(loss, args.holdout, args.max_epochs, args.budget_min * 60)
        results.append(row)
        print(json.dumps(row), flush=True)
        if args.refit:
            # the epochs chosen on validation, refitted with the validation targets trained
            # on: the final model for the test split; training time = both runs
            refit = run_one(loss, "test", row["best_epoch"], None, tag="+refit")
            refit["train_seconds_with_selection"] = row["train_seconds"] + refit["train_seconds"]
            results.append(refit)
            print(json.dumps(refit), flush=True)
    print(f"{'loss':<16}{'epochs':>7}{'train s':>9}{'HR@10':>8}{'NDCG@10':>9}"
          f"{'NDCG@10/min':>13}")
    for row in results:
        per_min = row["test"]["NDCG@10"] / (row["train_seconds"] / 60)
        print(f"{row['loss']:<16}{row['epochs']:>7}{row['train_seconds']:>9.0f}"
              f"{row['test']['HR@10']:>8.4f}{row['test']['NDCG@10']:>9.4f}{per_min:>13.5f}")
    for row in results:
        for name, block in row["baselines"].items():
            print(f"{name + ' (' + row['fitted_on'] + ')':<32}{block['HR@10']:>8.4f}"
                  f"{block['NDCG@10']:>9.4f}")
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["speed", "quality"])
    parser.add_argument("--workdir", default="bench_output")
    parser.add_argument("--epochs", type=int, default=3, help="speed: epochs per run")
    parser.add_argument("--workers", default="1,2", help="speed: worker counts")
    parser.add_argument("--runs", default=",".join(SPEED_RUNS),
                        help=f"speed: runs per worker count, of {list(SPEED_RUNS)}")
    parser.add_argument("--losses", default="softmax,sampled_softmax,gbce,bce")
    parser.add_argument("--budget-min", type=float, default=10.0)
    parser.add_argument("--max-epochs", type=int, default=1000, help="quality: epoch cap")
    parser.add_argument("--optimizer", default="adam", help="quality: adam | lazy_adam")
    parser.add_argument("--seed", type=int, default=0, help="quality: training seed")
    parser.add_argument("--negatives", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--patience", type=int, default=5)
    parser.add_argument("--refit", action="store_true",
                        help="quality: after each run (holdout valid), train again with "
                             "holdout test for its best epoch count and evaluate that model")
    parser.add_argument("--dataset", default="beauty", choices=["beauty", "ml-latest-small"],
                        help="quality: ../shared/data set")
    parser.add_argument("--maxlen", type=int, default=SHAPE["maxlen"], help="quality")
    parser.add_argument("--dim", type=int, default=SHAPE["dim"], help="quality: model dim")
    parser.add_argument("--blocks", type=int, default=SHAPE["blocks"])
    parser.add_argument("--heads", type=int, default=SHAPE["heads"])
    parser.add_argument("--l2", type=float, default=0.0)
    parser.add_argument("--lr-schedule", default="constant", help="quality: constant | cosine")
    parser.add_argument("--holdout", default="valid",
                        help="quality: valid (validation, early stopping; baselines fitted on "
                             "the training items) | test (also trains on the validation "
                             "targets, keeps the last epoch; baselines fitted on the same)")
    args = parser.parse_args()
    needed = MOVIELENS if args.mode == "quality" and args.dataset != "beauty" else BEAUTY
    if not os.path.exists(needed):
        sys.exit(f"{needed} not found: this benchmark needs ../shared/data")
    os.makedirs(args.workdir, exist_ok=True)
    import ray

    ray.init(include_dashboard=False, log_to_driver=args.mode == "quality")
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}, numpy {np.__version__}")
    rows = run_speed(args) if args.mode == "speed" else run_quality(args)
    name = args.mode if args.mode == "speed" else f"quality_{args.dataset}"
    with open(os.path.join(args.workdir, f"train_{name}.json"), "w") as f:
        json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
