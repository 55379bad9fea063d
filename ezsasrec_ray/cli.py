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
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--items", type=int, default=1000)
    p.add_argument("--events", type=int, default=60_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--themes", type=int, default=8, help="hidden user themes (default 8)")
    p.add_argument("--noise", type=float, default=0.15, help="share of random popular jumps")
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
    return parser


def run(args: argparse.Namespace) -> int:
    if args.command == "synth":
        from .synth import synth

        synth(args.output, users=args.users, items=args.items, events=args.events,
              seed=args.seed, themes=args.themes, noise=args.noise, format=args.format,
              overwrite=args.overwrite, address=args.address)
    elif args.command == "prepare":
        from .data import prepare

        options = {k: getattr(args, k) for k in (
            "format", "user_col", "item_col", "time_col", "delimiter", "header", "k_core",
            "min_user", "min_item", "max_history", "dedupe", "split", "cutoff",
            "on_bad_lines", "num_partitions", "overwrite")}
        prepare(args.input, args.output, address=args.address, **options)
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
