"""Leave-one-out evaluation over the full catalog, with two baselines on the same users.

Protocol ``full`` (default): each user's held-out target is ranked among *all* items, the
user's own history excluded (``exclude_seen=False`` keeps it). Protocol ``sampled``: the
target against 100 sampled negatives — only for comparison with older papers, and labelled so.

The model's users are encoded by :func:`.encoder.user_vectors` (the vectors batch scoring and
Serve use); ranks come from :mod:`.ranking` (over :mod:`.topk`) and metrics from
:mod:`.metrics`, with the same tie rule and exclusions for the model and for the baselines.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .dataset import check_holdout, load_prepared
from .errors import EzSASRecError
from .metrics import DEFAULT_KS, coverage, ranking_metrics
from .model_io import check_vocab, load_model
from .options import check_instance, option
from .ranking import baseline_ranks, fitted_baselines, model_ranks


@dataclass
class EvaluateConfig:
    """Options of :func:`evaluate` (and ``ezsasrec evaluate``); validated on construction."""

    split: str = option("test", "held-out targets to rank", choices=("valid", "test"))
    protocol: str = option("full", "full: rank the target among all items; sampled: against "
                                   "--num-negatives sampled items (older papers only)",
                           choices=("full", "sampled"))
    ks: tuple[int, ...] = option(DEFAULT_KS, "cut-offs K of HR@K and NDCG@K", min=1, flag="--k")
    exclude_seen: bool = option(True, "exclude the user's history from the ranking")
    batch_size: int = option(1024, "users per batch", min=1)
    num_negatives: int = option(100, "sampled negatives per user (--protocol sampled)", min=1)
    negative_sampling: str = option("uniform", "how negatives are drawn (--protocol sampled)",
                                    choices=("uniform", "popularity"))
    seed: int = option(0, "seed of the sampled negatives (--protocol sampled)")
    baselines: bool = option(True, "also evaluate most-popular and first-order Markov baselines")
    holdout: str | None = option(None, "what the model was trained on; the baselines are "
                                       "fitted on the same items (default: from the model's "
                                       "metrics.json)", choices=("valid", "test"))
    valid_users: int | None = option(None, "the model's validation sample (train "
                                           "--valid-users; default: from its metrics.json, "
                                           "0 for models trained before the option)", min=0)

    def __post_init__(self):
        check_instance(self)


def evaluate(data, model, *, split: str = "test", protocol: str = "full",
             ks=DEFAULT_KS, exclude_seen: bool = True, batch_size: int = 1024,
             num_negatives: int = 100, negative_sampling: str = "uniform", seed: int = 0,
             baselines: bool = True, holdout: str | None = None,
             valid_users: int | None = None) -> dict:
    """Evaluate ``model`` (or a model directory path) on a prepared dataset (or its path).

    ``holdout`` and ``valid_users``: what the model was trained on (``TrainConfig``'s; default:
    read from the model directory). The baselines are fitted on the same items, a split whose
    targets the model was trained on is refused, and the validation split ranks only the
    validation sample.

    Returns ``{"split", "protocol", "users", "fitted_on", "model": {...},
    "popularity": {...}, "markov": {...}}`` with HR@K, NDCG@K, MRR and coverage@10 for each.
    """
    config = EvaluateConfig(split=split, protocol=protocol, ks=ks, exclude_seen=exclude_seen,
                            batch_size=batch_size, num_negatives=num_negatives,
                            negative_sampling=negative_sampling, seed=seed, baselines=baselines,
                            holdout=holdout, valid_users=valid_users)  # checked first
    data = load_prepared(data) if isinstance(data, str) else data
    model = load_model(model) if isinstance(model, str) else model
    check_vocab(model, data)
    holdout, valid_users = _trained_holdout(model, config)
    share = data.valid_share(valid_users)
    _, histories, targets = data.holdout_examples(split, share)
    ragged = (histories.values.to_numpy(), histories.offsets.to_numpy().astype(np.int64))
    sample = f", a validation sample of {valid_users} users" if share < 1 else ""
    result = {"split": split, "protocol": protocol, "users": int(len(targets)),
              "fitted_on": f"holdout {holdout}{sample if holdout == 'valid' else ''}"}
    if protocol == "sampled":
        return {**result, **_sampled(model, data, ragged, targets, config)}
    top = np.zeros((len(targets), 10), np.int32)
    ranks = model_ranks(model, ragged, targets, batch_size=batch_size, exclude_seen=exclude_seen,
                        top=top)
    result["model"] = _metrics(ranks, config.ks, top, data.num_items)
    if baselines:
        fitted = fitted_baselines(data.num_items, data.training_sequences(holdout, share))
        for name, baseline in fitted.items():
            ranks = baseline_ranks(baseline, ragged, targets, batch_size=min(batch_size, 256),
                                   exclude_seen=exclude_seen, top=top)
            result[name] = _metrics(ranks, config.ks, top, data.num_items)
    return result


def _trained_holdout(model, config: EvaluateConfig) -> tuple[str, int]:
    """What the model was trained on (holdout, validation sample); refuses a split whose
    targets it has seen."""
    trained = (getattr(model, "metadata", None) or {}).get("train", {})
    holdout = config.holdout if config.holdout is not None else trained.get("holdout", "valid")
    valid_users = (config.valid_users if config.valid_users is not None
                   else trained.get("valid_users", 0))
    check_holdout(holdout)  # before the ranking, not after it
    split = config.split
    if (split == "valid" and holdout != "valid") or holdout == "none":
        raise EzSASRecError(f"--split {split}: the model was trained on these targets (holdout "
                            f"{holdout!r}); evaluate a model trained with holdout 'valid'"
                            f"{'' if split == 'valid' else ' or test'}")
    return holdout, valid_users


def _metrics(ranks, ks, top, num_items: int) -> dict:
    metrics = {**ranking_metrics(ranks, ks), "coverage@10": coverage(top, num_items)}
    metrics.pop("users", None)
    return metrics


def _sampled(model, data, ragged, targets, config: EvaluateConfig) -> dict:
    """The target against sampled negatives: only for comparison with older papers."""
    rng = np.random.default_rng(config.seed)
    size = (len(targets), config.num_negatives)
    if config.negative_sampling == "popularity":
        counts = data.items()["count"].to_numpy().astype(np.float64)
        negatives = rng.choice(np.arange(1, data.num_items + 1), p=counts / counts.sum(),
                               size=size).astype(np.int32)
    else:
        negatives = rng.integers(1, data.num_items + 1, size, dtype=np.int32)
    ranks = model_ranks(model, ragged, targets, batch_size=config.batch_size,
                        protocol="sampled", negatives=negatives)
    return {"protocol": f"sampled (target vs {config.num_negatives} "
                        f"{config.negative_sampling} negatives; not comparable with full "
                        "ranking)", "model": ranking_metrics(ranks, config.ks)}


def format_table(result: dict) -> str:
    """A plain-text table: one row per metric, one column per model/baseline."""
    columns = [c for c in ("model", "popularity", "markov") if c in result]
    names = list(result["model"])
    fitted = f" fitted_on={result['fitted_on'].replace(' ', '_')}" if "fitted_on" in result else ""
    lines = [f"split={result['split']} protocol={result['protocol']} users={result['users']:,}"
             f"{fitted}",
             f"{'metric':<10}" + "".join(f"{c:>12}" for c in columns)]
    for name in names:
        lines.append(f"{name:<10}" + "".join(f"{result[c].get(name, float('nan')):>12.4f}"
                                             for c in columns))
    return "\n".join(lines)
