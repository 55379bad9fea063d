"""Quality out of the box: logs x settings x seeds, against popularity and a Markov chain.

For each log and seed, ``defaults`` is what a new user runs: ``ezsasrec train`` with no
options (only ``--seed``), then ``ezsasrec evaluate --split test``. ``tuned`` runs
``ezsasrec tune`` once per log (its time reported apart) and refits the best configuration
per seed as the tune command does (holdout test, the best trial's epoch count). Every row is
the test split, full catalog, history excluded; the baselines are fitted on the same items as
the model. Prints one JSON line per run and, at the end, a Markdown table of means and
standard deviations over the seeds.

    RAY_worker_niceness=0 .venv/bin/python benchmarks/quality.py --workdir /tmp/bench \
        --logs synthetic,ml-latest-small,beauty --seeds 0,1,2 --settings defaults
    ... --logs synthetic --settings tuned --tune-samples 12 --tune-budget-min 20

Logs: ``synthetic`` (the default of ``ezsasrec synth``, 5-core, as ``make demo``),
``ml-latest-small`` and ``beauty`` from ../shared/data (skipped when absent).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from train import BEAUTY, MOVIELENS, prepared_beauty, prepared_movielens  # noqa: E402


def prepared_synthetic(workdir: str) -> str:
    """The synthetic default (``ezsasrec synth`` with its defaults), 5-core like the demo."""
    from ezsasrec_ray.prepare import prepare
    from ezsasrec_ray.synth import synth

    out = os.path.join(workdir, "synthetic_prepared")
    if not os.path.exists(out):
        synth(os.path.join(workdir, "synthetic_log"), overwrite=True, verbose=False)
        prepare(os.path.join(workdir, "synthetic_log"), out, k_core=5, verbose=False)
    return out


LOGS = {"synthetic": (None, prepared_synthetic),
        "ml-latest-small": (MOVIELENS, prepared_movielens),
        "beauty": (BEAUTY, prepared_beauty)}


def test_metrics(data: str, model: str) -> dict:
    from ezsasrec_ray.evaluate import evaluate

    result = evaluate(data, model, split="test")
    return {name: {k: result[name][k] for k in ("HR@10", "NDCG@10")}
            for name in ("model", "popularity", "markov")}


def run_defaults(data: str, out: str, seed: int, options: dict) -> dict:
    from ezsasrec_ray.train import train

    started = time.time()
    metrics = train(data, out, overwrite=True, seed=seed, verbose=False, **options)
    return {"train_s": round(time.time() - started, 1), "epochs": metrics["epochs_run"],
            "best_epoch": metrics["best_epoch"], **test_metrics(data, out)}


def run_tune(data: str, out: str, args) -> dict:
    from ezsasrec_ray.tune import tune

    return tune(data, out, overwrite=True, num_samples=args.tune_samples,
                time_budget_min=args.tune_budget_min, refit=False,
                train_options={"storage_path": os.path.join(args.workdir, "runs")})


def run_refit(data: str, out: str, best: dict, seed: int) -> dict:
    from ezsasrec_ray.train import train
    from ezsasrec_ray.tune import refit_options

    started = time.time()
    train(data, out, overwrite=True, verbose=False, **{**refit_options(best), "seed": seed})
    return {"train_s": round(time.time() - started, 1), "epochs": best["best_epoch"],
            **test_metrics(data, out)}


def summarize(rows: list[dict]) -> str:
    def cell(values, digits=4):
        mean = statistics.fmean(values)
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{mean:.{digits}f} ± {spread:.{digits}f}"

    lines = ["| log | setting | seeds | SASRec HR@10 | SASRec NDCG@10 | Markov NDCG@10 | "
             "popularity NDCG@10 | SASRec / Markov | train min | tune min |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    groups = {}
    for r in rows:
        groups.setdefault((r["log"], r["setting"]), []).append(r)
    for (log, setting), runs in groups.items():
        ratio = [r["model"]["NDCG@10"] / r["markov"]["NDCG@10"] for r in runs]
        tune_min = runs[0].get("tune_s")
        lines.append(
            f"| {log} | {setting} | {len(runs)} | {cell([r['model']['HR@10'] for r in runs])} "
            f"| {cell([r['model']['NDCG@10'] for r in runs])} "
            f"| {cell([r['markov']['NDCG@10'] for r in runs])} "
            f"| {cell([r['popularity']['NDCG@10'] for r in runs])} | {cell(ratio, 2)}x "
            f"| {cell([r['train_s'] / 60 for r in runs], 1)} "
            f"| {'' if tune_min is None else f'{tune_min / 60:.1f}'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="bench_output")
    parser.add_argument("--logs", default="synthetic,ml-latest-small,beauty")
    parser.add_argument("--settings", default="defaults", help="defaults,tuned")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--tune-samples", type=int, default=12)
    parser.add_argument("--tune-budget-min", type=float, default=None)
    parser.add_argument("--results", default=None, help="append JSON lines here too")
    parser.add_argument("--options", default="{}",
                        help="JSON training options over the defaults, for trying a new default "
                             "(the setting is then labelled with them)")
    args = parser.parse_args(argv)
    from ezsasrec_ray.runtime import quiet_ray_data_progress, quiet_ray_logs

    quiet_ray_logs()  # the JSON lines and the table, not Ray's progress lines
    quiet_ray_data_progress()
    os.makedirs(args.workdir, exist_ok=True)
    print(f"# {platform.node()} {os.cpu_count()} CPUs, python {platform.python_version()}",
          flush=True)
    rows = []
    for log in args.logs.split(","):
        source, prepare = LOGS[log]
        if source is not None and not os.path.exists(source):
            print(f"# {log}: {source} not found, skipped", flush=True)
            continue
        data = prepare(args.workdir)
        for setting in args.settings.split(","):
            rows += run_setting(log, setting, data, args)
    print(summarize(rows), flush=True)
    return 0


def run_setting(log: str, setting: str, data: str, args) -> list[dict]:
    rows, extra = [], {}
    if setting == "tuned":
        started = time.time()
        best = run_tune(data, os.path.join(args.workdir, f"{log}_tune"), args)
        extra = {"tune_s": round(time.time() - started, 1), "searched": best["searched"],
                 "tune_valid_NDCG@10": best["valid"]["NDCG@10"]}
    for seed in (int(s) for s in args.seeds.split(",")):
        out = os.path.join(args.workdir, f"{log}_{setting}_model_{seed}")
        options = json.loads(args.options)
        result = run_defaults(data, out, seed, options) if setting == "defaults" else \
            run_refit(data, out, best, seed)
        label = setting if setting != "defaults" or not options else f"defaults + {options}"
        row = {"log": log, "setting": label, "seed": seed, **extra, **result}
        print(json.dumps(row), flush=True)
        if args.results:
            with open(args.results, "a") as f:
                f.write(json.dumps(row) + "\n")
        rows.append(row)
    return rows


if __name__ == "__main__":
    sys.exit(main())
