"""``make demo``: the whole pipeline on the embedded synthetic default.

synth -> prepare -> train -> evaluate -> score every user, in one local Ray.
"""

from __future__ import annotations

import argparse
import os
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", default="demo_output")
    parser.add_argument("--users", type=int, default=5000)
    parser.add_argument("--items", type=int, default=500)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--epochs", type=int, default=None,
                        help="cap on the epochs (default: the library's; early stopping ends "
                             "the run)")
    args = parser.parse_args(argv)

    from .evaluate import evaluate, format_table
    from .prepare import prepare
    from .score import recommend
    from .synth import synth
    from .train import train

    started = time.time()
    # each output replaces only what an earlier demo wrote there (never a user's files)
    log_dir = os.path.join(args.workdir, "log")
    prepared_dir = os.path.join(args.workdir, "prepared")
    print(f"== 1. synth: {args.users:,} users, {args.items:,} items, {args.events:,} events")
    synth(log_dir, users=args.users, items=args.items, events=args.events, seed=0,
          overwrite=True)
    print("== 2. prepare (5-core, leave-one-out)")
    prepare(log_dir, prepared_dir, k_core=5, overwrite=True)
    model_dir = os.path.join(args.workdir, "model")
    print("== 3. train SASRec on Ray Train (the default options: it stops by itself once "
          "validation NDCG@10 stops improving)")
    cap = {} if args.epochs is None else {"epochs": args.epochs}
    train(prepared_dir, model_dir, storage_path=os.path.join(args.workdir, "runs"),
          overwrite=True, **cap)
    print("== 4. evaluate on the test target: full catalog, history excluded")
    result = evaluate(prepared_dir, model_dir, split="test")
    print(format_table(result))
    model, pop, markov = (result[k]["NDCG@10"] for k in ("model", "popularity", "markov"))
    print(f"NDCG@10: SASRec {model:.4f} vs popularity {pop:.4f} ({model / pop:.1f}x) and "
          f"Markov chain {markov:.4f} ({model / markov:.2f}x)")
    scores_dir = os.path.join(args.workdir, "recommendations")
    print("== 5. score every user over the full catalog (top 10, history excluded)")
    manifest = recommend(model_dir, prepared_dir, top_n=10, output=scores_dir, overwrite=True)
    import pandas as pd

    top = pd.read_parquet(os.path.join(scores_dir, "recommendations"))
    print(f"{manifest['counts']['users_scored']:,} users scored; a few of them:")
    for row in top.sort_values("user_id").head(5).itertuples():
        items = ", ".join(str(i) for i in list(row.item_ids)[:5])
        print(f"  user {row.user_id}: {items}, ...")
    print(f"demo finished in {time.time() - started:.0f}s; outputs in {args.workdir}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
