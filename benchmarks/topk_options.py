"""Per-query exclusions and candidates on one prebuilt ``TopK`` against a new index per request.

A serve request is one user vector with a 30-item history, top 10, on a random float32 item
table. Timed in the same run, inputs drawn once per repeat and shared by the four cases, the
cases interleaved so that noise from other processes falls on all of them alike:

(a) ``index(u, 10, histories=h)``: the plain call on the prebuilt index;
(b) the same with ``exclude=[20 random items]``;
(c) the same with ``candidates=[500 random items]``;
(d) the old way: ``top_k(u, table, 10, histories=h, exclude_items=..., chunk_size=...)``,
    which builds a new index (a permuted copy of the table) for the request.

(b) and (d) must return the same items and scores (checked on every repeat). Prints the median
ms of each case and the ratios to (a) as a markdown table. Usage::

    .venv/bin/python benchmarks/topk_options.py --items 100000,500000 --repeats 50
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from ezsasrec_ray.topk import TopK, top_k

K, HISTORY, EXCLUDE, CANDIDATES = 10, 30, 20, 500


def timed(fn):
    """-> (seconds, result) of one call."""
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def bench(num_items, dim, repeats, rng):
    """-> {case: median ms} for one catalog size."""
    table = rng.standard_normal((num_items + 1, dim), dtype=np.float32)
    index = TopK(table)
    index.warm_up()  # compiled loops loaded before the first timed call
    times = {case: [] for case in "abcd"}
    for rep in range(repeats + 2):  # the first two rounds are a warm-up, not timed
        u = rng.standard_normal((1, dim), dtype=np.float32)
        h = rng.integers(1, num_items + 1, (1, HISTORY))
        ex = rng.choice(np.arange(1, num_items + 1), EXCLUDE, replace=False)
        cand = rng.choice(np.arange(1, num_items + 1), CANDIDATES, replace=False)
        cases = {
            "a": lambda u=u, h=h: index(u, K, histories=h),
            "b": lambda u=u, h=h, ex=ex: index(u, K, histories=h, exclude=[ex]),
            "c": lambda u=u, h=h, cand=cand: index(u, K, histories=h, candidates=[cand]),
            "d": lambda u=u, h=h, ex=ex: top_k(u, table, K, histories=h, exclude_items=ex,
                                               chunk_size=index.chunk_size),
        }
        results = {}
        for case, fn in cases.items():
            seconds, results[case] = timed(fn)
            if rep >= 2:
                times[case].append(seconds)
        for got, want in zip(results["b"], results["d"]):  # same answer, old way and new
            np.testing.assert_array_equal(got, want)
    return {case: 1000 * float(np.median(t)) for case, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", default="100000,500000",
                        help="catalog sizes, comma-separated (default 100000,500000)")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=50, help="timed calls per case")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    print(f"top-{K}, batch of 1, history {HISTORY}, dim {args.dim}, median of {args.repeats} "
          f"calls (ms)\n")
    print("| items | (a) plain | (b) exclude 20 | (c) candidates 500 | (d) new index "
          "| (b)/(a) | (c)/(a) | (d)/(a) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for num_items in (int(n) for n in args.items.split(",")):
        ms = bench(num_items, args.dim, args.repeats, rng)
        a = ms["a"]
        print(f"| {num_items:,} | {a:.2f} | {ms['b']:.2f} | {ms['c']:.2f} | {ms['d']:.1f} "
              f"| {ms['b'] / a:.2f} | {ms['c'] / a:.2f} | {ms['d'] / a:.1f} |", flush=True)


if __name__ == "__main__":
    main()
