"""Full-catalog ranks of held-out targets, for the model and for baselines.

The model's users go through :func:`.encoder.user_vectors` (the vectors batch scoring and
Serve use) and :class:`.topk.TopK`; baselines' dense scores through the same tie rule and
exclusions (:func:`.topk.rank_from_scores`). Used by evaluation, by training's validation and
by the easy API.
"""

from __future__ import annotations

import numpy as np

from .batching import left_pad, take_rows
from .encoder import user_vectors
from .metrics import DEFAULT_KS, MarkovBaseline, PopularityBaseline, ranking_metrics
from .topk import TopK, rank_from_scores, sampled_ranks, top_k_from_scores


def _batches(num_rows: int, batch_size: int):
    for start in range(0, num_rows, batch_size):
        yield np.arange(start, min(start + batch_size, num_rows))


def model_ranks(model, histories, targets, *, batch_size: int = 1024, exclude_seen=True,
                protocol: str = "full", negatives=None, top: np.ndarray | None = None):
    """0-based rank of each target. histories: ``(values, offsets)`` ragged item indices.

    With ``top`` (an int array (B, k)), also fills in each user's top-k items (for coverage).
    """
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


def fitted_baselines(num_items: int, train_sequences) -> dict:
    """The two baselines every model is compared with, fitted on the model's training items:
    ``{"popularity": PopularityBaseline, "markov": MarkovBaseline}``."""
    return {"popularity": PopularityBaseline(num_items).fit(train_sequences),
            "markov": MarkovBaseline(num_items).fit(train_sequences)}
