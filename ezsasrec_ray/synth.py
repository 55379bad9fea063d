"""Synthetic interaction logs with planted sequential structure, written in parallel by Ray Data.

The generator (all vectorized numpy, one call per block of users):

* Item popularity is Zipf-like: "noise" events and each user's first item are drawn with
  probability proportional to ``1 / rank ** zipf``.
* There are ``themes`` random permutations of the catalog. Each user has one theme and walks
  along that theme's permutation: the next item is 1 to ``max_step`` places ahead.
  With probability ``noise`` the user instead jumps to a popular random item.
* So the next item depends on the user's theme, which only the *last few* items reveal: a
  first-order Markov chain sees an item followed by successors from every theme and splits
  its bet ``themes x max_step`` ways, while a sequential model that reads the history can tell which
  theme it is in. Popularity alone knows nothing of the walk.
* Timestamps increase along each history (a random start plus exponential gaps).

Every block derives its random state from ``(seed, block index)`` and the per-user history
lengths come from the driver, so the output is identical for a seed whatever the cluster.
Memory is bounded by one block of users (``users_per_block``), so 10^8 events are possible.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pyarrow.csv as pacsv

from . import outputs
from .errors import EzSASRecError
from .options import check_instance, option
from .runtime import init_ray

START_TIME = 1_600_000_000  # 2020-09-13, unix seconds


@dataclass
class SynthConfig:
    """Options of ``ezsasrec synth``; validated on construction."""

    users: int = option(5000, "users (each with at least --min-length events)", min=1)
    items: int = option(500, "catalog size", min=1)
    events: int = option(200_000, "events in total", min=1)
    seed: int = option(0, "random seed (the output is the same for a seed on any cluster)")
    themes: int = option(8, "hidden user themes", min=1)
    max_step: int = option(4, "a walk moves 1..max-step places along its theme", min=1)
    noise: float = option(0.1, "share of random popular jumps", min=0, max=1)
    zipf: float = option(1.0, "popularity skew: rank r is drawn with weight 1 / r ** zipf")
    min_length: int = option(5, "shortest user history", min=1)
    users_per_block: int = option(50_000, "users generated per Ray task (bounds its memory)",
                                  min=1)
    format: str = option("parquet", "output file format", choices=("parquet", "csv", "tsv"))

    def __post_init__(self):
        check_instance(self)
        if self.events < self.users * self.min_length:
            raise EzSASRecError(f"--events {self.events} is too few: each of {self.users} users "
                                f"needs at least {self.min_length}")


def _history_lengths(config: SynthConfig) -> np.ndarray:
    """Per-user lengths, >= min_length, log-normal shaped, summing to exactly ``events``."""
    rng = np.random.default_rng([config.seed, 0])
    weights = rng.lognormal(0.0, 0.8, size=config.users)
    extra = config.events - config.users * config.min_length
    return config.min_length + rng.multinomial(extra, weights / weights.sum()).astype(np.int64)


def _catalog(config: SynthConfig):
    """Theme permutations, their inverses and the Zipf popularity distribution."""
    rng = np.random.default_rng([config.seed, 1])
    perms = np.stack([rng.permutation(config.items) for _ in range(config.themes)])
    position = np.empty_like(perms)
    rows = np.arange(config.themes)[:, None]
    position[rows, perms] = np.arange(config.items)[None, :]
    popularity = 1.0 / np.arange(1, config.items + 1) ** config.zipf
    popular_order = rng.permutation(config.items)  # which item holds popularity rank r
    return perms, position, popular_order, popularity / popularity.sum()


def generate_block(block: dict, config: SynthConfig, lengths_ref, catalog_ref) -> dict:
    """Events of block ``block["id"][0]`` of consecutive users: ``user_id, item_id, timestamp``."""
    import ray

    lengths_all, (perms, position, popular_order, popularity) = (
        ray.get(lengths_ref), ray.get(catalog_ref))
    block_index = int(block["id"][0])
    first_user = block_index * config.users_per_block
    users = np.arange(first_user, min(first_user + config.users_per_block, config.users))
    lengths = lengths_all[users]
    rng = np.random.default_rng([config.seed, 2, block_index])
    num_users, steps = len(users), int(lengths.max())
    theme = rng.integers(0, config.themes, size=num_users)
    current = popular_order[rng.choice(config.items, size=num_users, p=popularity)]
    items = np.empty((num_users, steps), np.int64)
    items[:, 0] = current
    for step in range(1, steps):
        ahead = rng.integers(1, config.max_step + 1, size=num_users)
        pos = (position[theme, current] + ahead) % config.items
        walk = perms[theme, pos]
        jump = popular_order[rng.choice(config.items, size=num_users, p=popularity)]
        current = np.where(rng.random(num_users) < config.noise, jump, walk)
        items[:, step] = current
    gaps = rng.exponential(3600.0, size=(num_users, steps)).astype(np.int64) + 1
    start = START_TIME + rng.integers(0, 86400 * 365, size=num_users)
    times = start[:, None] + np.cumsum(gaps, axis=1)
    valid = np.arange(steps)[None, :] < lengths[:, None]
    return {
        "user_id": np.repeat(users + 1, lengths),
        "item_id": items[valid] + 1,
        "timestamp": times[valid],
    }


def synth(output: str, *, users: int = 5000, items: int = 500, events: int = 200_000,
          seed: int = 0, overwrite: bool = False, address: str | None = None,
          verbose: bool = True, **options) -> dict:
    """Write a synthetic log to ``output`` (a directory of Parquet/CSV files). Returns a summary.

    Deterministic for a seed. Written atomically: a temporary directory renamed at the end.
    """
    import ray
    import ray.data


    config = SynthConfig(users=users, items=items, events=events, seed=seed, **options)
    outputs.check_output(output, overwrite)  # before any work
    init_ray(address)
    lengths_ref = ray.put(_history_lengths(config))
    catalog_ref = ray.put(_catalog(config))
    blocks = max(1, -(-config.users // config.users_per_block))
    dataset = ray.data.range(blocks, override_num_blocks=blocks).map_batches(
        generate_block, batch_size=1, batch_format="numpy",
        fn_kwargs={"config": config, "lengths_ref": lengths_ref, "catalog_ref": catalog_ref})
    with outputs.writing(output, overwrite=overwrite, kind="log") as pending:
        if config.format == "parquet":
            dataset.write_parquet(pending.tmp)
        else:
            delimiter = "," if config.format == "csv" else "\t"
            dataset.write_csv(pending.tmp, arrow_csv_args_fn=lambda: {
                "write_options": pacsv.WriteOptions(delimiter=delimiter,
                                                    include_header=config.format == "csv")})
    summary = {"output": output, **asdict(config)}
    if verbose:
        print(f"synth: wrote {config.events:,} events of {config.users:,} users over "
              f"{config.items:,} items to {output}", flush=True)
    return summary
