"""Leave-one-out evaluation over the full catalog, with two baselines on the same users.

Protocol ``full`` (default): each user's held-out target is ranked among *all* items, the
user's own history excluded (``exclude_seen=False`` keeps it). Protocol ``sampled``: the
target against 100 sampled negatives — only for comparison with older papers, and labelled so.

The model's user representation is :func:`.score.user_vectors` (``SASRec.user_embeddings`` in
fixed-shape calls: the same vectors batch scoring and Serve use); ranks come from :mod:`.topk` and metrics from :mod:`.metrics`, with
the same tie rule and exclusions for the model and for the baselines.
"""

from __future__ import annotations

import numpy as np

from .batching import left_pad, take_rows
from .metrics import DEFAULT_KS, MarkovBaseline, PopularityBaseline, coverage, ranking_metrics
from .topk import TopK, rank_from_scores, sampled_ranks, top_k_from_scores


def _batches(num_rows: int, batch_size: int):
    for start in range(0, num_rows, batch_size):
        yield np.arange(start, min(start + batch_size, num_rows))


def model_ranks(model, histories, targets, *, batch_size: int = 1024, exclude_seen=True,
                protocol: str = "full", negatives=None, top: np.ndarray | None = None):
    """0-based rank of each target. histories: ``(values, offsets)`` ragged item indices.

    With ``top`` (an int array (B, k)), also fills in each user's top-k items (for coverage).
    """
    from .score import user_vectors

    values, offsets = (np.asarray(a) for a in histories)
    table = np.asarray(model.item_embeddings().numpy(), np.float32)
    topk = TopK(table)
    ranks = np.empty(len(targets), np.int64)
    for rows in _batches(len(targets), batch_size):
        seqs = take_rows(values, offsets, rows)
        user_vecs = user_vectors(model, seqs)  # (B, dim), as the nightly job and Serve
        if protocol == "sampled":
            ranks[rows] = sampled_ranks(user_vecs, table, targets[rows], negatives[rows])
            continue
        seen = None
        if exclude_seen:
            width = max(1, int(np.diff(seqs[1]).max(initial=1)))
            seen = left_pad(seqs, width)
        ranks[rows] = topk.target_ranks(user_vecs, targets[rows], histories=seen)
        if top is not None:
            top[rows] = topk(user_vecs, top.shape[1], histories=seen)[0]
    return ranks


def evaluate_examples(model, histories, targets, *, batch_size: int = 1024, ks=DEFAULT_KS,
                      reduce: str = "mean"):
    """Metrics of the model on ``(histories, targets)``.

    ``reduce="mean"``: a metrics dict. ``reduce="sum"``: ``(sums, count)`` so that workers can
    add their shares before dividing (used by training's distributed validation).
    """
    ranks = model_ranks(model, histories, targets, batch_size=batch_size)
    metrics = ranking_metrics(ranks, ks) if len(ranks) else {}
    metrics.pop("users", None)
    if reduce == "sum":
        return {k: v * len(ranks) for k, v in metrics.items()}, float(len(ranks))
    return metrics


def baseline_ranks(baseline, histories, targets, *, batch_size: int = 256,
                   exclude_seen: bool = True, top: np.ndarray | None = None) -> np.ndarray:
    values, offsets = (np.asarray(a) for a in histories)
    ranks = np.empty(len(targets), np.int64)
    for rows in _batches(len(targets), batch_size):
        seqs = take_rows(values, offsets, rows)
        width = max(1, int(np.diff(seqs[1]).max(initial=1)))
        padded = left_pad(seqs, width)
        scores = baseline.scores(padded)
        ranks[rows] = rank_from_scores(scores, targets[rows],
                                       padded if exclude_seen else None)
        if top is not None:
            top[rows] = top_k_from_scores(scores, top.shape[1],
                                          histories=padded if exclude_seen else None)[0]
    return ranks


def evaluate(data, model, *, split: str = "test", protocol: str = "full",
             ks=DEFAULT_KS, exclude_seen: bool = True, batch_size: int = 1024,
             num_negatives: int = 100, negative_sampling: str = "uniform", seed: int = 0,
             baselines: bool = True, holdout: str | None = None) -> dict:
    """Evaluate ``model`` (or a model directory path) on a prepared dataset (or its path).

    ``holdout``: what the model was trained on (``TrainConfig.holdout``; default: read from
    the model directory, else ``"valid"``). The baselines are fitted on the same items, and a
    split whose targets the model was trained on is refused.

    Returns ``{"split", "protocol", "users", "fitted_on", "model": {...},
    "popularity": {...}, "markov": {...}}`` with HR@K, NDCG@K, MRR and coverage@10 for each.
    """
    from .data import check_holdout, load_prepared
    from .errors import EzSASRecError
    from .model_io import check_vocab, load_model

    if isinstance(data, str):
        data = load_prepared(data)
    if isinstance(model, str):
        model = load_model(model)
    check_vocab(model, data)
    if protocol not in ("full", "sampled"):
        raise EzSASRecError(f"--protocol: unknown protocol {protocol!r}; use full or sampled")
    if holdout is None:
        holdout = (getattr(model, "metadata", None) or {}).get("train", {}).get("holdout",
                                                                                 "valid")
    check_holdout(holdout)  # before the ranking, not after it
    if (split == "valid" and holdout != "valid") or holdout == "none":
        raise EzSASRecError(f"--split {split}: the model was trained on these targets (holdout "
                            f"{holdout!r}); evaluate a model trained with holdout 'valid'"
                            f"{'' if split == 'valid' else ' or test'}")
    _, histories, targets = data.holdout_examples(split)
    ragged = (histories.values.to_numpy(), histories.offsets.to_numpy().astype(np.int64))
    result = {"split": split, "protocol": protocol, "users": int(len(targets)),
              "fitted_on": f"holdout {holdout}"}
    if protocol == "sampled":
        result["protocol"] = (f"sampled (target vs {num_negatives} {negative_sampling} "
                              "negatives; not comparable with full ranking)")
        rng = np.random.default_rng(seed)
        if negative_sampling == "popularity":
            counts = data.items()["count"].to_numpy().astype(np.float64)
            negatives = rng.choice(np.arange(1, data.num_items + 1), p=counts / counts.sum(),
                                   size=(len(targets), num_negatives)).astype(np.int32)
        else:
            negatives = rng.integers(1, data.num_items + 1, (len(targets), num_negatives),
                                     dtype=np.int32)
        ranks = model_ranks(model, ragged, targets, batch_size=batch_size, protocol="sampled",
                            negatives=negatives)
        result["model"] = ranking_metrics(ranks, ks)
        return result
    top = np.zeros((len(targets), 10), np.int32)
    ranks = model_ranks(model, ragged, targets, batch_size=batch_size, exclude_seen=exclude_seen,
                        top=top)
    result["model"] = {**ranking_metrics(ranks, ks), "coverage@10": coverage(top, data.num_items)}
    if baselines:
        train = data.training_sequences(holdout)
        for name, baseline in (("popularity", PopularityBaseline(data.num_items)),
                               ("markov", MarkovBaseline(data.num_items))):
            baseline.fit(train)
            ranks = baseline_ranks(baseline, ragged, targets, batch_size=min(batch_size, 256),
                                   exclude_seen=exclude_seen, top=top)
            result[name] = {**ranking_metrics(ranks, ks),
                            "coverage@10": coverage(top, data.num_items)}
    for block in ("model", "popularity", "markov"):
        if block in result:
            result[block].pop("users", None)
    return result


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
