"""Warm start: how many optimizer steps a second night needs to reach the first night's quality.

Night 2 is one synthetic log (``ezsasrec synth``, 5,000 users, 510 items, 210,000 events);
night 1 is the same log without its last 5% of events (by time) and without items 500-509, so
night 2 brings about 5% more events and 2% new items. Night 1 trains cold; night 2 trains
cold and warm (``--init-from`` night 1's model), the same options and seed otherwise, with a
validation round every ``--eval-every-steps``. Reported: the steps each night-2 run took to
reach night 1's best validation NDCG@10, and their ratio (the goal: warm <= 30% of cold).

    RAY_worker_niceness=0 .venv/bin/python benchmarks/warm_start.py --workdir /tmp/bench_warm
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import pandas as pd


def write_nights(workdir: str) -> tuple[str, str]:
    """The two nights' raw logs (CSV) -> their prepared datasets."""
    from ezsasrec_ray.prepare import prepare
    from ezsasrec_ray.synth import synth

    full = os.path.join(workdir, "log_full")
    synth(full, users=5000, items=510, events=210_000, seed=0, overwrite=True, verbose=False,
          format="csv")
    log = pd.concat(pd.read_csv(os.path.join(full, f)) for f in sorted(os.listdir(full))
                    if f.endswith(".csv"))
    cutoff = log["timestamp"].quantile(0.95)
    night1 = log[(log["item_id"] < 500) & (log["timestamp"] <= cutoff)]
    paths = []
    for name, frame in (("night1", night1), ("night2", log)):
        raw = os.path.join(workdir, f"{name}.csv")
        frame.to_csv(raw, index=False)
        prepared = os.path.join(workdir, f"{name}_prepared")
        prepare(raw, prepared, k_core=5, overwrite=True, verbose=False)
        paths.append(prepared)
    print(f"night 1: {len(night1):,} events, {night1['item_id'].nunique()} items; night 2: "
          f"{len(log):,} events, {log['item_id'].nunique()} items", flush=True)
    return paths[0], paths[1]


def steps_to_reach(model_dir: str, target: float) -> int | None:
    history = pd.read_csv(os.path.join(model_dir, "history.csv"))
    rounds = history.dropna(subset=["valid_NDCG@10"])
    reached = rounds[rounds["valid_NDCG@10"] >= target]
    return int(reached["total_steps"].iloc[0]) if len(reached) else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="bench_output/warm_start")
    parser.add_argument("--eval-every-steps", type=int, default=20)
    args = parser.parse_args(argv)
    from ezsasrec_ray.runtime import quiet_ray_data_progress, quiet_ray_logs
    from ezsasrec_ray.train import train

    quiet_ray_logs()
    quiet_ray_data_progress()
    os.makedirs(args.workdir, exist_ok=True)
    night1, night2 = write_nights(args.workdir)
    options = {"eval_every_steps": args.eval_every_steps, "verbose": False, "overwrite": True}
    model1 = os.path.join(args.workdir, "model_night1")
    first = train(night1, model1, **options)
    target = first["valid"]["NDCG@10"]
    steps1 = int(pd.read_csv(os.path.join(model1, "history.csv"))["total_steps"].iloc[-1])
    result = {"night1_valid_NDCG@10": target, "night1_steps": steps1}
    for name, extra in (("cold", {}), ("warm", {"init_from": model1})):
        out = os.path.join(args.workdir, f"model_night2_{name}")
        metrics = train(night2, out, **options, **extra)
        result[name] = {"steps_to_night1": steps_to_reach(out, target),
                        "best_valid_NDCG@10": metrics["valid"]["NDCG@10"],
                        "wall_s": metrics["wall_seconds"], "parent": metrics.get("parent")}
        print(json.dumps({name: result[name]}), flush=True)
    cold, warm = result["cold"]["steps_to_night1"], result["warm"]["steps_to_night1"]
    if cold and warm:
        result["warm_over_cold_steps"] = round(warm / cold, 3)
    print(json.dumps(result, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
