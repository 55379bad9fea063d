"""``make demo``: the whole pipeline on the embedded synthetic default.

synth -> prepare (and, as they land, train -> evaluate -> score) in one local Ray.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", default="demo_output")
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--events", type=int, default=60_000)
    args = parser.parse_args(argv)

    from . import data, synth

    started = time.time()
    shutil.rmtree(args.workdir, ignore_errors=True)
    log_dir = os.path.join(args.workdir, "log")
    prepared_dir = os.path.join(args.workdir, "prepared")
    print(f"== 1. synth: {args.users:,} users, {args.items:,} items, {args.events:,} events")
    synth.synth(log_dir, users=args.users, items=args.items, events=args.events, seed=0)
    print("== 2. prepare (5-core, leave-one-out)")
    data.prepare(log_dir, prepared_dir, k_core=5)
    print(f"demo finished in {time.time() - started:.0f}s; outputs in {args.workdir}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
