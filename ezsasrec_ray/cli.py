"""The ``ezsasrec`` command line. It only parses arguments and calls the library."""

from __future__ import annotations

import argparse
import os
import sys

from .errors import EzSASRecError, find_user_error, quiet_ray_data_errors


def _bool_or_none(text: str) -> bool:
    return text.lower() in ("1", "true", "yes", "y")


def _add_address(parser: argparse.ArgumentParser):
    parser.add_argument("--address", default=None,
                        help="Ray cluster address (default: $RAY_ADDRESS, else start a local Ray)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ezsasrec", description="SASRec from raw logs to top-N recommendations on Ray.")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("synth", help="write a synthetic log with sequential structure")
    p.add_argument("--users", type=int, default=5000)
    p.add_argument("--items", type=int, default=500)
    p.add_argument("--events", type=int, default=200_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--themes", type=int, default=8, help="hidden user themes (default 8)")
    p.add_argument("--max-step", type=int, default=4,
                   help="a walk moves 1..max-step places along its theme (default 4)")
    p.add_argument("--noise", type=float, default=0.1, help="share of random popular jumps")
    p.add_argument("--min-length", type=int, default=5, help="shortest user history")
    p.add_argument("--format", choices=["parquet", "csv", "tsv"], default="parquet")
    p.add_argument("--output", required=True)
    p.add_argument("--overwrite", action="store_true")
    _add_address(p)

    p = commands.add_parser("prepare", help="raw log -> k-core filtered, encoded sequences")
    p.add_argument("--input", required=True,
                   help="file, directory, glob or URI (s3://, gs://, file://)")
    p.add_argument("--output", required=True, help="prepared-dataset directory")
    p.add_argument("--format", choices=["csv", "tsv", "parquet", "json"], default=None,
                   help="input format (default: from the file extension)")
    p.add_argument("--user-col", default=None, help="user column name (or 0-based position)")
    p.add_argument("--item-col", default=None, help="item column name (or 0-based position)")
    p.add_argument("--time-col", default=None,
                   help="time column name or position; 'none' for file order")
    p.add_argument("--delimiter", default=None, help="text delimiter (default: detected)")
    p.add_argument("--header", type=_bool_or_none, default=None,
                   help="text has a header line: true/false (default: detected)")
    core = p.add_mutually_exclusive_group()
    core.add_argument("--k-core", type=int, default=None, help="sets --min-user and --min-item")
    p.add_argument("--min-user", type=int, default=5)
    p.add_argument("--min-item", type=int, default=5)
    p.add_argument("--max-history", type=int, default=None,
                   help="keep each user's most recent N events")
    p.add_argument("--dedupe", action="store_true", help="drop exact duplicate events")
    p.add_argument("--split", choices=["loo", "time"], default="loo")
    p.add_argument("--cutoff", default=None, help="time split cutoff: unix time or ISO-8601")
    p.add_argument("--on-bad-lines", choices=["error", "skip"], default="error")
    p.add_argument("--num-partitions", type=int, default=None,
                   help="shuffle partitions (default: sized to the cluster and data)")
    p.add_argument("--overwrite", action="store_true")
    _add_address(p)
    p = commands.add_parser("train", help="train SASRec on Ray Train")
    p.add_argument("--data", required=True, help="prepared-dataset directory")
    p.add_argument("--output", required=True, help="model directory to write")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=128, help="per worker")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-scaling", choices=["sqrt", "linear", "none"], default="sqrt")
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                   help="cosine: decay to 0 over --epochs or the time budget")
    p.add_argument("--maxlen", type=int, default=50)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--l2", type=float, default=0.0)
    p.add_argument("--loss", default="softmax",
                   help="bce | sampled_softmax | softmax | gbce (default softmax)")
    p.add_argument("--negatives", type=int, default=256)
    p.add_argument("--negative-sampling", choices=["uniform", "popularity"], default="uniform")
    p.add_argument("--optimizer", choices=["auto", "adam", "lazy_adam"], default="auto")
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--precision", choices=["float32", "mixed_bfloat16", "mixed_float16"],
                   default="float32")
    p.add_argument("--xla", action="store_true")
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="stop after the epoch that crosses this much training time")
    p.add_argument("--holdout", choices=["valid", "test", "none"], default="valid",
                   help="targets kept out of training: valid (default; validation metrics and "
                        "early stopping), test (also train on the validation targets: the "
                        "final model for a test evaluation), none (every event: production)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-name", default=None,
                   help="re-running with the same name resumes from its latest checkpoint")
    p.add_argument("--storage-path", default=None, help="checkpoints (shared on a cluster)")
    p.add_argument("--overwrite", action="store_true")
    _add_address(p)

    p = commands.add_parser("evaluate", help="full-catalog leave-one-out metrics + baselines")
    p.add_argument("--data", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--split", choices=["valid", "test"], default="test")
    p.add_argument("--protocol", choices=["full", "sampled"], default="full")
    p.add_argument("--k", type=int, nargs="+", default=[1, 5, 10, 20, 50])
    p.add_argument("--include-seen", action="store_true",
                   help="do not exclude the user's history from the ranking")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")

    p = commands.add_parser("score", help="top-N over the full catalog for every user")
    p.add_argument("--data", required=True, help="prepared-dataset directory")
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--output", required=True, help="output directory to write")
    p.add_argument("--top-n", type=int, default=10)
    p.add_argument("--include-seen", action="store_true",
                   help="also recommend items in the user's history")
    p.add_argument("--holdout", choices=["test"], default=None,
                   help="score as of before the test target (offline checks)")
    p.add_argument("--users", default=None, help="file of raw user ids (one a line): a subset")
    p.add_argument("--exclude-items", default=None, help="file of raw item ids never returned")
    p.add_argument("--candidates", default=None, help="file of raw item ids: only these")
    p.add_argument("--batch-size", type=int, default=4096, help="users per batch")
    p.add_argument("--actors", type=int, default=1, help="scoring actors")
    p.add_argument("--gpus-per-actor", type=float, default=0)
    p.add_argument("--format", choices=["parquet", "jsonl", "csv"], default="parquet")
    p.add_argument("--overwrite", action="store_true")
    _add_address(p)

    p = commands.add_parser("serve", help="answer recommendations online with Ray Serve")
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--data", default=None,
                   help="prepared dataset: user histories for user-id requests")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, default=None, help="fixed replicas (default 1)")
    scale.add_argument("--autoscale", default=None, metavar="MIN:MAX",
                       help="autoscale between MIN and MAX replicas")
    p.add_argument("--num-cpus", type=float, default=1, help="CPUs per replica")
    p.add_argument("--num-gpus", type=float, default=0, help="GPUs per replica")
    p.add_argument("--max-k", type=int, default=100)
    p.add_argument("--max-batch-size", type=int, default=32, help="requests batched per call")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="how long a batch waits for more requests")
    _add_address(p)
    return parser


def run(args: argparse.Namespace) -> int:
    if args.command == "synth":
        from .synth import synth

        synth(args.output, users=args.users, items=args.items, events=args.events,
              seed=args.seed, themes=args.themes, noise=args.noise, format=args.format,
              min_length=args.min_length, max_step=args.max_step,
              overwrite=args.overwrite, address=args.address)
    elif args.command == "prepare":
        from .data import prepare

        options = {k: getattr(args, k) for k in (
            "format", "user_col", "item_col", "time_col", "delimiter", "header", "k_core",
            "min_user", "min_item", "max_history", "dedupe", "split", "cutoff",
            "on_bad_lines", "num_partitions", "overwrite")}
        prepare(args.input, args.output, address=args.address, **options)
    elif args.command == "train":
        from .train import TrainConfig, train

        options = {k: getattr(args, k) for k in TrainConfig.__dataclass_fields__
                   if hasattr(args, k)}
        metrics = train(args.data, args.output, address=args.address,
                        overwrite=args.overwrite, **options)
        if metrics["valid"]:
            print(f"model written to {args.output}: best epoch {metrics['best_epoch']}, "
                  f"validation NDCG@10 {metrics['valid']['NDCG@10']:.4f}, "
                  f"HR@10 {metrics['valid']['HR@10']:.4f}")
        else:
            print(f"model written to {args.output}: epoch {metrics['best_epoch']} "
                  f"(holdout {args.holdout}: no validation)")
    elif args.command == "evaluate":
        import json

        from .evaluate import evaluate, format_table

        result = evaluate(args.data, args.model, split=args.split, protocol=args.protocol,
                          ks=tuple(args.k), exclude_seen=not args.include_seen)
        print(json.dumps(result) if args.json else format_table(result))
    elif args.command == "score":
        from .score import recommend

        recommend(args.model, args.data, top_n=args.top_n, output=args.output,
                  include_seen=args.include_seen, holdout=args.holdout, users=args.users,
                  exclude_items=args.exclude_items, candidates=args.candidates,
                  batch_size=args.batch_size, actors=args.actors,
                  gpus_per_actor=args.gpus_per_actor, format=args.format,
                  overwrite=args.overwrite, address=args.address)
    elif args.command == "serve":
        from .serve import run_server

        run_server(args.model, args.data, host=args.host, port=args.port,
                   replicas=args.replicas, autoscale=args.autoscale, address=args.address,
                   num_cpus=args.num_cpus, num_gpus=args.num_gpus, max_k=args.max_k,
                   max_batch_size=args.max_batch_size,
                   batch_wait_timeout_s=args.batch_wait_ms / 1000.0)
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    quiet_ray_data_errors()
    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line for bad input, traceback otherwise
        user_error = find_user_error(exc)
        if user_error is None:
            raise
        print(f"ezsasrec {args.command}: error: {user_error.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["main", "build_parser", "EzSASRecError"]
