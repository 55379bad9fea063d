"""Train SASRec data-parallel on Ray Train (``TensorflowTrainer``), with checkpoints.

The driver: load the prepared dataset, check every option before a worker starts, hand the
training sequences to a ``TensorflowTrainer`` whose workers run
:func:`.train_loop.train_loop_per_worker`, then write the best checkpoint as a model directory.
Re-running with the same ``run_name`` and ``storage_path`` resumes; ``max_failures`` restarts
failed workers from the latest checkpoint. The learning rate grows as sqrt(num_workers) by
default (``lr_scaling``). Batching and optimizer choices: docs/internals.md, "train".
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
import uuid
from dataclasses import asdict
from typing import TYPE_CHECKING

import numpy as np

from . import outputs, tracking
from .dataset import load_prepared, training_sequences
from .errors import EzSASRecError
from .model_io import WEIGHTS_FILE
from .model_io import write_model_dir as save_model_dir
from .runtime import init_ray, quiet_native_logs
from .storage import check_output, is_remote
from .train_loop import (  # noqa: F401 - the options and worker loop, re-exported
    LOSS_NAMES,
    TRAIN_STATE,
    TrainConfig,
    build_optimizer,
    check_parent,
    item_map,
    train_config_fields,
    train_loop_per_worker,
    valid_baselines,
    write_worker_inputs,
)

if TYPE_CHECKING:
    from .model import SASRecConfig


# --------------------------------------------------------------------------------------------
# The worker loop


























# --------------------------------------------------------------------------------------------
# The driver


def _training_dataset(data, holdout: str = "valid", valid_share: float = 1.0):
    """Ray Data dataset of training sequences (columns ``user_index``, ``items``) from a
    prepared dataset."""
    import pyarrow as pa

    kind = data.split_kind

    def to_train(batch: pa.Table) -> pa.Table:
        items = training_sequences(batch, holdout, kind, valid_share)
        return pa.table({"user_index": batch["user_index"], "items": items})

    columns = ["user_index", "item_indices", "n_events", "n_train", "train_only"]
    return data.sequences_dataset(columns=columns).map_batches(
        to_train, batch_format="pyarrow", batch_size=None)


def _fault_from_env() -> dict | None:
    epoch = os.environ.get("EZSASREC_FAULT_KILL_AT_EPOCH")
    marker = os.environ.get("EZSASREC_FAULT_MARKER")
    return {"kill_at_epoch": int(epoch), "marker": marker} if epoch and marker else None


def train(data: str, output: str, *, address: str | None = None, overwrite: bool = False,
          **options) -> dict:
    """Train SASRec on a prepared dataset and write a model directory to ``output``.

    Options are those of :class:`TrainConfig`. Returns the model's metrics dict.
    """
    import ray

    config = TrainConfig(**options)
    prepared = load_prepared(data)
    model_config = config.model_config(prepared.num_items)  # fails before any worker starts
    if config.init_from:
        check_parent(config.init_from, model_config)
    check_output(output, overwrite)  # before any work
    init_ray(address)
    storage = os.path.abspath(config.storage_path or _default_storage(output))
    run_name = _run_name(config, model_config, prepared, output, storage)

    inputs_dir = os.path.join(storage, run_name + "-inputs")
    share = prepared.valid_share(config.valid_users)
    parent = _parent(config, prepared, inputs_dir)
    init_from = parent.pop("loop") if parent else None  # for the workers, not metrics.json
    loop_config = {"train": asdict(config), "model": model_config.to_dict(),
                   "threads": config.cpus_per_worker or max(
                       1, int(ray.cluster_resources().get("CPU", 1)) // config.num_workers),
                   "fault": _fault_from_env(), "init_from": init_from,
                   **write_worker_inputs(prepared, config.holdout, inputs_dir, share)}
    loop_config["tracking"] = _start_tracking(config, model_config, data, output, run_name)
    score_attribute = "NDCG@10" if config.holdout == "valid" else "epoch"
    trainer = _trainer(config, loop_config, run_name, storage, score_attribute,
                       _training_dataset(prepared, config.holdout, share))
    started = time.time()
    try:
        result = trainer.fit()
        if result.error:
            raise result.error
    except BaseException:
        tracking.finish_run(loop_config["tracking"], None, failed=True)
        raise
    best = max(result.best_checkpoints, key=lambda cm: cm[1].get(score_attribute, -1))
    best_checkpoint, best_metrics = best
    with result.checkpoint.as_directory() as latest:
        with open(os.path.join(latest, TRAIN_STATE)) as f:
            state = json.load(f)
    baselines = valid_baselines(prepared, config.holdout, share)
    with best_checkpoint.as_directory() as directory:
        metrics = write_model_dir(directory, output, prepared, config, model_config, state,
                                  best_metrics, time.time() - started, overwrite,
                                  baselines=baselines, parent=parent)
    tracking.finish_run(loop_config["tracking"], output)
    if config.run_name is None:  # not resumable by name: its checkpoints served their turn
        for path in (os.path.join(storage, run_name), os.path.join(storage, run_name + "-inputs")):
            shutil.rmtree(path, ignore_errors=True)
    return metrics


# Options a resumed run may change: how long it trains and how it reports, not what it learns.
RESUMABLE_CHANGES = ("epochs", "patience", "min_steps", "eval_every_steps", "time_budget_s",
                     "verbose", "max_failures", "keep_checkpoints", "eval_batch_size", "run_name",
                     "storage_path", "tracking_uri", "experiment")


def _start_tracking(config: TrainConfig, model_config, data: str, output: str,
                    run_name: str) -> dict | None:
    """The MLflow run of this training (``--tracking-uri``), its params the options."""
    if not config.tracking_uri:
        return None
    params = {**{k: v for k, v in asdict(config).items()
                 if k not in ("verbose", "tracking_uri", "experiment")},
              **{f"model.{k}": v for k, v in model_config.to_dict().items()},
              "data": data, "output": output}
    return tracking.start_run(config.tracking_uri, config.experiment, run_name, params)


def _default_storage(output: str) -> str:
    """Checkpoints beside a local output; for an output on object storage, a local directory
    (give --storage-path on a shared filesystem when workers span nodes)."""
    if is_remote(output):
        return os.path.join(os.path.expanduser("~"), ".cache", "ezsasrec_ray", "runs")
    return os.path.join(os.path.dirname(os.path.abspath(output)), ".ezsasrec_runs")


def _run_name(config: TrainConfig, model_config, prepared, output: str, storage: str) -> str:
    """The Ray Train run. Without ``run_name`` a new run, never a resumed one (its checkpoints
    go once the model is written). With one, a run of that name resumes, but only with the
    options it was started with (``RESUMABLE_CHANGES`` aside): else a one-line error."""
    os.makedirs(storage, exist_ok=True)
    if config.run_name is None:
        return f"ezsasrec-{os.path.basename(os.path.abspath(output))}-{uuid.uuid4().hex[:8]}"
    started_with = {"train": {k: v for k, v in asdict(config).items()
                              if k not in RESUMABLE_CHANGES},
                    "model": model_config.to_dict(), "vocab": prepared.vocab_fingerprint()}
    record = os.path.join(storage, config.run_name + "-inputs", "run.json")
    if os.path.isdir(os.path.join(storage, config.run_name)) and os.path.exists(record):
        with open(record) as f:
            previous = json.load(f)
        for section in ("train", "model"):
            for key in sorted(set(previous[section]) | set(started_with[section])):
                old, new = previous[section].get(key), started_with[section].get(key)
                if old != new:
                    raise EzSASRecError(
                        f"--run-name {config.run_name}: its checkpoints in {storage} were "
                        f"trained with {key}={old!r}, not {new!r}; resume with the same "
                        "options, or start afresh under another --run-name")
        if previous["vocab"] != started_with["vocab"]:
            raise EzSASRecError(f"--run-name {config.run_name}: its checkpoints in {storage} "
                                "were trained on other data; start afresh under another "
                                "--run-name")
    outputs.write_json_atomic(record, started_with)
    return config.run_name






def _parent(config: TrainConfig, prepared, inputs_dir: str) -> dict | None:
    """A warm start's parent model: checked (same shape), its item rows mapped by raw id
    (written for the workers), and what metrics.json records of it."""
    if not config.init_from:
        return None
    from .model_io import model_version

    mapping, counts = item_map(config.init_from, prepared)
    os.makedirs(inputs_dir, exist_ok=True)
    path = os.path.join(inputs_dir, "item_map.npy")
    np.save(path, mapping)
    return {"model": os.path.abspath(config.init_from),
            "version": model_version(config.init_from), **counts,
            "loop": {"model": os.path.abspath(config.init_from), "item_map": path}}


def _trainer(config: TrainConfig, loop_config: dict, run_name: str, storage: str,
             score_attribute: str, dataset):
    """The TensorflowTrainer of a run: workers, failures, checkpoints kept by score."""
    import ray.train

    with quiet_native_logs():  # ray.train.tensorflow imports TensorFlow
        from ray.train.tensorflow import TensorflowTrainer

    return TensorflowTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.num_workers, use_gpu=config.use_gpu,
            resources_per_worker={"CPU": loop_config["threads"],
                                  **({"GPU": 1} if config.use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=storage,
            # Ray Train's INFO lines (every report, checkpoint, resource request) stay in its
            # log files; the console gets our epoch lines, Ray's warnings and errors
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=config.keep_checkpoints, checkpoint_score_attribute=score_attribute,
                checkpoint_score_order="max")),
        # Materialized first, so feeding the workers needs no CPU slot: on a small machine
        # the training workers hold every CPU and a lazy read would wait forever.
        datasets={"train": dataset.materialize()},
    )


def write_model_dir(checkpoint_dir: str, output: str, prepared, config: TrainConfig,
                    model_config: SASRecConfig, state: dict, best_metrics: dict,
                    wall_seconds: float, overwrite: bool, baselines: dict | None = None,
                    parent: dict | None = None) -> dict:
    """The model directory of a run (:func:`.model_io.write_model_dir`): the best checkpoint's
    weights, the vocabularies, metrics.json, history.csv and training_curves.png.
    ``baselines``: ``{"popularity": {...}, "markov": {...}}`` validation metrics
    (:func:`_valid_baselines`), kept in metrics.json and drawn on the curves."""
    from .model import build_model

    model = build_model(model_config)
    model.load_weights(os.path.join(checkpoint_dir, WEIGHTS_FILE))
    history = state["history"]

    def extra(tmp: str):
        for name in ("users", "items"):
            shutil.copytree(os.path.join(prepared.path, name), os.path.join(tmp, name))
        with open(os.path.join(tmp, "history.csv"), "w", newline="") as f:
            # every key of every epoch (epochs between validation rounds have no valid_*)
            writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(
                k for record in history for k in record)), restval="")
            writer.writeheader()
            writer.writerows(history)
        _plot_curves(history, os.path.join(tmp, "training_curves.png"), baselines)

    metadata = {
        "data": prepared.uri or os.path.abspath(prepared.path),
        "vocab_fingerprint": prepared.vocab_fingerprint(),
        "model": model_config.to_dict(),
        "train": {**{k: v for k, v in asdict(config).items() if k != "verbose"},
                  "optimizer": config.resolved_optimizer()},
        "best_epoch": int(best_metrics.get("epoch", 0)),
        "epochs_run": len(history),
        "stopped_early": len(history) < config.epochs,
        "wall_seconds": round(wall_seconds, 2),
        "valid": {k[6:]: v for k, v in best_metrics.items() if k.startswith("valid_")},
        # the same validation users and targets, baselines fitted on the same items
        "baselines": dict(baselines or {}),
        "parent": parent,  # the warm start's model, or None
    }
    return save_model_dir(output, model, metadata, overwrite=overwrite, extra=extra)


def _plot_curves(history: list[dict], path: str, baselines: dict | None = None):
    """Training loss per epoch; validation NDCG@10 per validation round, with the popularity
    and Markov baselines' validation NDCG@10 as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    rounds = [h for h in history if "valid_NDCG@10" in h]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(epochs, [h["loss"] for h in history], marker="o")
    left.set(xlabel="epoch", ylabel="training loss", title="loss")
    if rounds:
        right.plot([h["epoch"] for h in rounds], [h["valid_NDCG@10"] for h in rounds],
                   marker="o", color="C1", label="SASRec")
        for (name, label), color in zip((("popularity", "popularity"), ("markov", "Markov")),
                                        ("C2", "C3")):
            value = (baselines or {}).get(name, {}).get("NDCG@10")
            if value is not None:
                right.axhline(value, linestyle="--", color=color, label=label)
        right.legend(fontsize="small")
    right.set(xlabel="epoch", ylabel="NDCG@10", title="validation NDCG@10 (full catalog)"
              if rounds else "no validation (holdout test / none)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


