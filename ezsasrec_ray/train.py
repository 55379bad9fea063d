"""Train SASRec data-parallel on Ray Train (``TensorflowTrainer``), with checkpoints.

driver: load the prepared dataset, check every option before a worker starts, hand the
training sequences to a ``TensorflowTrainer``. worker (:func:`train_loop_per_worker`): its
shard of sequences, length-bucketed shuffled batches, the one training step of :mod:`.fit`
under MultiWorkerMirroredStrategy, validation NDCG@10 on its share of users summed across
workers, ``ray.train.report`` with a checkpoint (weights, optimizer state, loop state).
Re-running with the same ``run_name`` and ``storage_path`` resumes; ``max_failures`` restarts
failed workers from the latest checkpoint. The learning rate grows as sqrt(num_workers) by
default (``lr_scaling``). Batching and optimizer choices: docs/internals.md, "train".
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

import numpy as np

from . import outputs
from .batching import epoch_batches, history_windows, make_inputs, take_rows
from .dataset import HOLDOUTS, load_prepared, training_sequences
from .errors import EzSASRecError
from .metrics import ranking_metrics
from .model_io import WEIGHTS_FILE
from .model_io import write_model_dir as save_model_dir
from .options import check_instance, option
from .ranking import baseline_ranks, evaluate_examples, fitted_baselines
from .runtime import init_ray, quiet_native_logs, quiet_ray_logs, set_threads

if TYPE_CHECKING:  # TensorFlow loads only when a model is built (``ezsasrec --help`` stays fast)
    from .fit import Adam
    from .model import SASRecConfig

TRAIN_STATE = "train_state.json"
OPTIMIZER_FILE = "optimizer.npz"
OPTIMIZERS = ("auto", "adam", "lazy_adam")
AUTO_EVAL_STEPS = 100  # fewest optimizer steps between validation rounds by default
LOSS_NAMES = ("bce", "sampled_softmax", "softmax", "gbce")  # the keys of losses.LOSSES


@dataclass
class TrainConfig:
    """Options of ``ezsasrec train``; validated on construction. Model shape fields go to
    :class:`SASRecConfig`."""

    epochs: int = option(20, "passes over the data (fewer with early stopping or a time budget)",
                         min=1)
    batch_size: int = option(128, "sequences per batch and worker; the global batch is "
                                  "batch-size x num-workers", min=1)
    lr: float = option(1e-3, "learning rate; applied: lr x sqrt(num-workers) with --lr-scaling "
                             "sqrt")
    lr_scaling: str = option("sqrt", "how the learning rate grows with --num-workers",
                             choices=("sqrt", "linear", "none"))
    # cosine: lr x (1 + cos(pi x progress)) / 2, set at each epoch's start, where
    # progress = the larger of epochs done / epochs and training time / time_budget_s
    lr_schedule: str = option("constant", "cosine: decay to 0 over --epochs or the time budget",
                              choices=("constant", "cosine"))
    loss: str = option("softmax", "training loss (softmax: full catalog; the others sample "
                                  "negatives)", choices=LOSS_NAMES)
    negatives: int = option(256, "sampled negatives per sequence (sampled_softmax and gbce)",
                            min=1)
    negative_sampling: str = option("uniform", "how negatives are drawn (popularity: "
                                               "sampled_softmax with log-q correction)",
                                    choices=("uniform", "popularity"))
    gbce_t: float = option(0.75, "calibration t of the gbce loss")
    maxlen: int = option(50, "longest history the model reads")
    dim: int = option(64, "embedding size (divisible by --heads)")
    blocks: int = option(2, "self-attention blocks")
    heads: int = option(1, "attention heads")
    dropout: float = option(0.2, "dropout rate")
    l2: float = option(0.0, "L2 penalty on the embedding tables")
    optimizer: str = option("auto", "auto: dense Adam for every loss; lazy_adam updates only the "
                                    "item rows a batch touches", choices=OPTIMIZERS)
    num_workers: int = option(1, "Ray Train workers (data parallel)", min=1)
    use_gpu: bool = option(False, "one GPU per worker")
    cpus_per_worker: int | None = option(None, "CPUs per worker (default: the cluster's CPUs / "
                                               "num-workers)")
    precision: str = option("float32", "float32, or mixed precision on a GPU",
                            choices=("float32", "mixed_bfloat16", "mixed_float16"))
    xla: bool = option(False, "jit-compile the training step with XLA")
    patience: int = option(3, "validation rounds without a better validation NDCG@10 before "
                              "stopping", min=1)
    eval_every_steps: int | None = option(
        None, "optimizer steps between validation rounds (a round ends with the epoch that "
              f"completes them; default: the larger of {AUTO_EVAL_STEPS} and one epoch)", min=1)
    min_steps: int = option(500, "optimizer steps before early stopping may end a run", min=0)
    # What to train on (data.fit_lengths): valid = hold out the validation and test targets
    # (validation metrics, early stopping, best epoch kept); test = also train on the
    # validation targets, the final model for a test evaluation (no validation: runs the
    # epochs or the time budget, keeps the last epoch); none = every event (production).
    holdout: str = option("valid", "targets kept out of training: valid (validation metrics, "
                                   "early stopping), test (also train on the validation "
                                   "targets), none (every event: production)", choices=HOLDOUTS)
    time_budget_s: float | None = option(None, "stop after the epoch that crosses this much "
                                               "training time, in seconds (default: no limit)")
    trim_batches: bool = option(True, "trim each batch to its longest history, bucketed by "
                                      "length (off: fixed maxlen-wide batches, for benchmarks)")
    seed: int = option(0, "random seed")
    max_failures: int = option(2, "restarts of failed workers from the latest checkpoint", min=0)
    keep_checkpoints: int = option(2, "best checkpoints kept, by validation NDCG@10", min=1)
    run_name: str | None = option(None, "Ray Train run name; re-running with the same name "
                                        "and options resumes from its latest checkpoint "
                                        "(default: a new run each time, its checkpoints "
                                        "removed once the model is written)")
    storage_path: str | None = option(None, "checkpoint directory (shared on a cluster; "
                                            "default: .ezsasrec_runs beside the output)")
    eval_batch_size: int = option(1024, "users per validation batch", min=1)
    verbose: bool = option(True, "print one line per epoch")

    def __post_init__(self):
        check_instance(self)
        if self.lr <= 0:
            raise EzSASRecError(f"--lr must be > 0, got {self.lr!r}")
        if self.xla and self.optimizer == "lazy_adam":
            raise EzSASRecError("--optimizer lazy_adam: not with --xla (XLA cannot compile "
                                "its dynamic row set); use --optimizer adam")

    def model_config(self, num_items: int) -> SASRecConfig:
        """The model shape; raises a one-line error for a bad shape (before any worker)."""
        from .model import SASRecConfig

        try:
            return SASRecConfig(num_items=num_items, maxlen=self.maxlen, dim=self.dim,
                                blocks=self.blocks, heads=self.heads, dropout=self.dropout,
                                l2=self.l2)
        except ValueError as exc:
            raise EzSASRecError(str(exc)) from None

    def resolved_optimizer(self) -> str:
        """``adam`` or ``lazy_adam``. ``auto`` is the measured choice for the loss: dense Adam
        for every loss today (lazy Adam reached a lower validation NDCG@10 with ``bce`` on
        Beauty at equal epochs and was at most 1.2x faster; benchmarks/RESULTS.md)."""
        return "adam" if self.optimizer == "auto" else self.optimizer

    def effective_lr(self) -> float:
        scale = {"sqrt": math.sqrt(self.num_workers), "linear": float(self.num_workers),
                 "none": 1.0}[self.lr_scaling]
        return self.lr * scale

    def lr_factor(self, epochs_done: int, train_seconds: float) -> float:
        """The schedule's multiplier of the learning rate for the next epoch."""
        if self.lr_schedule == "constant":
            return 1.0
        progress = epochs_done / self.epochs
        if self.time_budget_s:
            progress = max(progress, train_seconds / self.time_budget_s)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))








def build_optimizer(model, cfg: TrainConfig) -> Adam:
    """The optimizer of a run: the item table lazy when ``cfg.resolved_optimizer()`` is
    ``lazy_adam``."""
    from .fit import Adam

    lazy = [model.item_embeddings()] if cfg.resolved_optimizer() == "lazy_adam" else []
    return Adam(model.trainable_variables, cfg.effective_lr(), lazy=lazy)




# --------------------------------------------------------------------------------------------
# The worker loop


def _load_worker_shard(shard) -> tuple[np.ndarray, np.ndarray]:
    """This worker's training sequences as one ragged (values, offsets) pair."""
    values, lengths = [], []
    for batch in shard.iter_batches(batch_size=4096, batch_format="pyarrow"):
        lists = batch["items"].combine_chunks()
        offsets = lists.offsets.to_numpy()
        values.append(lists.values.to_numpy()[offsets[0]:offsets[-1]])
        lengths.append(np.diff(offsets))
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    values = np.concatenate(values) if values else np.zeros(0, np.int32)
    return values.astype(np.int32), np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def _save_checkpoint(directory: str, model, optimizer, state: dict):
    from .model import save_model_files

    save_model_files(model, directory)
    np.savez(os.path.join(directory, OPTIMIZER_FILE),
             *[np.asarray(v.numpy()) for v in optimizer.variables])
    with open(os.path.join(directory, TRAIN_STATE), "w") as f:
        json.dump(state, f)


def _restore_checkpoint(directory: str, model, optimizer) -> dict:
    model.load_weights(os.path.join(directory, "model.weights.h5"))
    path = os.path.join(directory, OPTIMIZER_FILE)
    with np.load(path, allow_pickle=False) as saved:
        arrays = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    shapes = [tuple(v.shape) for v in optimizer.variables]
    if [a.shape for a in arrays] != shapes:
        raise EzSASRecError(f"{path}: optimizer state of {len(arrays)} arrays does not fit this "
                            f"run's optimizer ({len(shapes)} variables); was the checkpoint "
                            "written with another --optimizer or model shape?")
    for variable, value in zip(optimizer.variables, arrays):
        variable.assign(value)
    with open(os.path.join(directory, TRAIN_STATE)) as f:
        return json.load(f)


def train_loop_per_worker(loop_config: dict):
    """Ray Train worker: train, validate and checkpoint. ``loop_config`` is plain data.

    Validation rounds follow the data, not the epoch count: a round (validate, checkpoint,
    report) ends after the epoch that completes ``eval_every`` optimizer steps since the last
    one, and after the last epoch; patience counts rounds, and no run stops early before
    ``min_steps``.
    """
    import ray.train

    quiet_ray_logs()  # also on a cluster: no INFO line per report and checkpoint
    w = _Worker(loop_config)
    state = {"epoch": 0, "best": -1.0, "bad_rounds": 0, "steps": 0, "history": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = _restore_checkpoint(directory, w.model, w.optimizer)
        state["resumed_from_epoch"] = state["epoch"]
    cfg, since_round = w.cfg, 0
    verbose = w.rank == 0 and loop_config["train"].get("verbose", True)
    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        if _should_stop(cfg, state):
            break
        # from the all-reduced state, so every worker sets the same rate
        lr = cfg.effective_lr() * cfg.lr_factor(epoch - 1, state.get("train_seconds", 0.0))
        started = time.time()
        record = {"epoch": epoch, "lr": lr, **w.train_epoch(epoch, lr)}
        state["steps"] = state.get("steps", 0) + record["steps"]
        state["train_seconds"] = state.get("train_seconds", 0.0) + w.mean(record["train_seconds"])
        record["total_steps"] = state["steps"]
        since_round += record["steps"]
        budget_spent = cfg.time_budget_s and state["train_seconds"] >= cfg.time_budget_s
        if since_round < w.eval_every and epoch < cfg.epochs and not budget_spent:
            state["history"].append(record)  # a round ends later: no validation now
            if verbose:
                print(_epoch_line(record, None, False, cfg.holdout), file=sys.__stdout__,
                      flush=True)
            continue
        since_round = 0
        record.update(w.validate())
        record["epoch_seconds"] = time.time() - started
        record["replica_weight_gap"] = w.replica_weight_gap()
        improved, score = _update_state(state, record, cfg.holdout == "valid")
        _report(w, state, record, score)
        if verbose:
            # sys.__stdout__: Ray Train's patched print would write the line twice
            print(_epoch_line(record, score, improved, cfg.holdout), file=sys.__stdout__,
                  flush=True)
        _maybe_inject_fault(loop_config.get("fault"), epoch, w.rank, w.world)


def _should_stop(cfg: TrainConfig, state: dict) -> bool:
    """Early stopping (patience in validation rounds, never before min_steps) or the budget."""
    if state.get("bad_rounds", state.get("bad_epochs", 0)) >= cfg.patience and \
            state.get("steps", 0) >= cfg.min_steps:
        return True
    return bool(cfg.time_budget_s and state.get("train_seconds", 0.0) >= cfg.time_budget_s)


class _Worker:
    """One Ray Train worker's model, optimizer, step and data shares."""

    def __init__(self, loop_config: dict):
        import ray.train
        import tensorflow as tf

        from .model import SASRecConfig, build_model

        self.cfg = cfg = TrainConfig(**loop_config["train"])
        self.model_config = SASRecConfig.from_dict(loop_config["model"])
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        set_threads(loop_config["threads"])
        if cfg.precision != "float32":
            import keras

            keras.mixed_precision.set_global_policy(cfg.precision)
        self.strategy = (tf.distribute.MultiWorkerMirroredStrategy() if self.world > 1
                         else tf.distribute.get_strategy())
        # every position of a long history is trained on each epoch (windows that cover it)
        self.values, self.offsets = history_windows(
            *_load_worker_shard(ray.train.get_dataset_shard("train")), self.model_config.maxlen)
        self.valid = None  # without a validation holdout its targets are trained on
        if cfg.holdout == "valid":
            self.valid = _valid_share(loop_config["valid_path"], self.rank, self.world)
        with self.strategy.scope():
            self.model = build_model(self.model_config)
            self.optimizer = build_optimizer(self.model, cfg)
        popularity = np.load(loop_config["popularity_path"], allow_pickle=False)
        self.train_step, self.probs = self._step(popularity)
        self.all_sum = self._all_sum()
        self.steps_per_epoch, self.eval_every = self._schedule()

    def _schedule(self) -> tuple[int, int]:
        """Steps per epoch, the same on every worker (the smallest shard's: every replica must
        run each step), and the steps between validation rounds."""
        mine = np.zeros(self.world)
        mine[self.rank] = -(-(len(self.offsets) - 1) // self.cfg.batch_size)
        steps = int(self.all_sum(mine).min())
        return steps, self.cfg.eval_every_steps or max(AUTO_EVAL_STEPS, steps)

    def _step(self, popularity):
        """The compiled step of the configured loss, and the negative-sampling weights."""
        import tensorflow as tf

        from .fit import make_train_step, model_loss
        from .losses import make_loss

        cfg, log_q, probs = self.cfg, None, None
        if cfg.negative_sampling == "popularity":
            probs = popularity[1:] ** 0.75 + 1e-12
            log_q = tf.constant(np.log(np.concatenate([[1.0], probs / probs.sum()])
                                       * cfg.negatives), tf.float32)
        loss = make_loss(cfg.loss, log_q=log_q, gbce_t=cfg.gbce_t)
        step = make_train_step(self.optimizer, self.strategy, model_loss(self.model, loss),
                               cfg.xla)
        return step, probs

    def _all_sum(self):
        import tensorflow as tf

        strategy = self.strategy

        @tf.function(input_signature=[tf.TensorSpec([None], tf.float64)])
        def all_sum(values):
            per_replica = strategy.run(lambda v: tf.identity(v), args=(values,))
            return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

        return lambda values: all_sum(np.asarray(values, np.float64)).numpy()

    def train_epoch(self, epoch: int, lr: float) -> dict:
        """One pass over this worker's shard -> loss and throughput (summed over workers)."""
        from .fit import batch_negatives

        cfg, maxlen = self.cfg, self.model_config.maxlen
        rng = np.random.default_rng([cfg.seed, epoch, self.rank])
        self.optimizer.set_learning_rate(lr)
        started = time.time()
        total_loss, steps, sequences, positions = 0.0, 0, 0, 0
        batches = epoch_batches(np.diff(self.offsets), cfg.batch_size, rng,
                                32 if cfg.trim_batches else 1)
        for rows in batches[:self.steps_per_epoch]:  # the same step count on every worker
            inputs, positives = make_inputs(take_rows(self.values, self.offsets, rows), maxlen,
                                            rng)
            if not cfg.trim_batches and inputs.shape[1] < maxlen:
                pad = ((0, 0), (maxlen - inputs.shape[1], 0))
                inputs, positives = np.pad(inputs, pad), np.pad(positives, pad)
            negatives = batch_negatives(cfg.loss, rng, positives, cfg.negatives,
                                        self.model_config.num_items, self.probs)
            total_loss += float(self.train_step(inputs, positives, negatives))
            steps, sequences, positions = steps + 1, sequences + len(rows), \
                positions + inputs.size
        seconds = time.time() - started
        sequences, positions = self.all_sum([sequences, positions])
        return {"loss": total_loss / max(steps, 1), "steps": steps,
                "sequences_per_s": sequences / max(seconds, 1e-9),
                "positions_per_s": positions / max(seconds, 1e-9), "train_seconds": seconds}

    def validate(self) -> dict:
        """Validation metrics over every worker's share of users ({} without validation)."""
        if self.valid is None:
            return {}
        histories, targets = self.valid
        sums, counts = evaluate_examples(self.model, histories, targets,
                                         batch_size=self.cfg.eval_batch_size, reduce="sum")
        names = sorted(sums)
        totals = self.all_sum([sums[n] for n in names] + [counts])
        users = max(totals[-1], 1.0)
        return {"valid_users": int(totals[-1]),
                **{f"valid_{name}": float(totals[i] / users) for i, name in enumerate(names)}}

    def mean(self, value: float) -> float:
        return float(self.all_sum([value])[0] / self.world)

    def replica_weight_gap(self) -> float:
        """0 when every worker holds the same weights (data-parallel replicas in sync)."""
        mine = _weights_fingerprint(self.model)
        return abs(self.mean(mine) - mine) / max(abs(mine), 1e-30)


def _valid_share(path: str, rank: int, world: int):
    """This worker's share of the validation examples: ((values, offsets), targets)."""
    valid = np.load(path, allow_pickle=False)
    rows = np.flatnonzero(valid["user_index"] % world == rank)
    return (take_rows(valid["history_values"], valid["history_offsets"], rows),
            valid["targets"][rows])


def _update_state(state: dict, record: dict, validate: bool):
    """Early-stopping state after a validation round -> (improved, score). Every worker sees
    the same all-reduced numbers, so all stop at the same epoch."""
    # without validation every round counts as an improvement: the last one is kept
    score = record.get("valid_NDCG@10", 0.0) if validate else float(record["epoch"])
    improved = score > state["best"]
    state.update(epoch=record["epoch"], best=max(state["best"], score),
                 bad_rounds=0 if improved else state.get("bad_rounds", 0) + 1)
    state["history"].append(record)
    return improved, score


def _report(w: _Worker, state: dict, record: dict, score: float):
    """ray.train.report the epoch, with a checkpoint written by rank 0."""
    import ray.train

    report = ({**record, "NDCG@10": score, "best_NDCG@10": state["best"]}
              if w.valid is not None else dict(record))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if w.rank == 0:
            _save_checkpoint(tmp, w.model, w.optimizer, state)
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(report, checkpoint=ckpt)


def _epoch_line(record: dict, score, improved: bool, holdout: str) -> str:
    """One line a user reads per epoch (validation metrics on the epochs that end a round)."""
    if score is None:
        valid = ""
    elif holdout == "valid":
        valid = (f"valid NDCG@10 {score:.4f} HR@10 {record.get('valid_HR@10', 0.0):.4f}"
                 f"{'  *' if improved else ''}")
    else:
        valid = f"(holdout {holdout}: no validation)"
    return (f"epoch {record['epoch']:>3}: loss {record['loss']:.4f}  {record['steps']} steps "
            f"({record['total_steps']:,} in all)  {record['sequences_per_s']:,.0f} seq/s  "
            f"{valid}").rstrip()


def _weights_fingerprint(model) -> float:
    """A float64 checksum of every trainable weight (position-weighted, so swaps count)."""
    total = 0.0
    for weight in model.trainable_variables:
        w = np.asarray(weight.numpy(), np.float64).ravel()
        total += float(w @ (1.0 + np.arange(w.size) % 7))
    return total


def _maybe_inject_fault(fault: dict | None, epoch: int, rank: int, world: int):
    """Test hook: the last worker's process dies once, right after reporting ``epoch``.

    Enabled by ``EZSASREC_FAULT_KILL_AT_EPOCH=N`` and ``EZSASREC_FAULT_MARKER=path`` in the
    driver's environment; the marker file makes it happen only once.
    """
    if not fault or fault.get("kill_at_epoch") != epoch or rank != world - 1:
        return
    marker = fault["marker"]
    if not os.path.exists(marker):
        # Ray Train's controller collects reports by polling the workers; give it time to
        # register this epoch's checkpoint first, as a crash later in a real epoch would.
        time.sleep(fault.get("delay_s", 5.0))
        with open(marker, "w") as f:
            f.write(f"killed worker rank {rank} after epoch {epoch}\n")
        os._exit(1)


# --------------------------------------------------------------------------------------------
# The driver


def _training_dataset(data, holdout: str = "valid"):
    """Ray Data dataset of training sequences (column ``items``) from a prepared dataset."""
    import pyarrow as pa


    kind = data.split_kind

    def to_train(batch: pa.Table) -> pa.Table:
        items = training_sequences(batch, holdout, kind)
        return pa.table({"items": items})

    columns = ["item_indices", "n_events", "n_train", "train_only"]
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
    outputs.check_output(output, overwrite)  # before any work
    init_ray(address)
    storage = os.path.abspath(config.storage_path or os.path.join(
        os.path.dirname(os.path.abspath(output)), ".ezsasrec_runs"))
    run_name = _run_name(config, model_config, prepared, output, storage)

    loop_config = {"train": asdict(config), "model": model_config.to_dict(),
                   "threads": config.cpus_per_worker or max(
                       1, int(ray.cluster_resources().get("CPU", 1)) // config.num_workers),
                   "fault": _fault_from_env(),
                   **_worker_inputs(prepared, config, os.path.join(storage, run_name + "-inputs"))}
    score_attribute = "NDCG@10" if config.holdout == "valid" else "epoch"
    trainer = _trainer(config, loop_config, run_name, storage, score_attribute,
                       _training_dataset(prepared, config.holdout))
    started = time.time()
    result = trainer.fit()
    if result.error:
        raise result.error
    best = max(result.best_checkpoints, key=lambda cm: cm[1].get(score_attribute, -1))
    best_checkpoint, best_metrics = best
    with result.checkpoint.as_directory() as latest:
        with open(os.path.join(latest, TRAIN_STATE)) as f:
            state = json.load(f)
    baselines = _valid_baselines(prepared, config.holdout)
    with best_checkpoint.as_directory() as directory:
        metrics = write_model_dir(directory, output, prepared, config, model_config, state,
                                  best_metrics, time.time() - started, overwrite,
                                  baselines=baselines)
    if config.run_name is None:  # not resumable by name: its checkpoints served their turn
        for path in (os.path.join(storage, run_name), os.path.join(storage, run_name + "-inputs")):
            shutil.rmtree(path, ignore_errors=True)
    return metrics


# Options a resumed run may change: how long it trains and how it reports, not what it learns.
RESUMABLE_CHANGES = ("epochs", "patience", "min_steps", "eval_every_steps", "time_budget_s",
                     "verbose", "max_failures", "keep_checkpoints", "eval_batch_size", "run_name",
                     "storage_path")


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


def _valid_baselines(prepared, holdout: str) -> dict:
    """Validation metrics of the popularity and first-order Markov baselines, fitted on the
    model's training items and ranked on the validation users and targets the model is
    validated on (same exclusions and tie rule); ``{}`` without a validation holdout."""
    if holdout != "valid":
        return {}
    _, histories, targets = prepared.holdout_examples("valid")
    ragged = (histories.values.to_numpy(), histories.offsets.to_numpy().astype(np.int64))
    result = {}
    for name, baseline in fitted_baselines(prepared.num_items,
                                           prepared.training_sequences(holdout)).items():
        metrics = ranking_metrics(baseline_ranks(baseline, ragged, targets))
        metrics.pop("users", None)
        result[name] = metrics
    return result


def _worker_inputs(prepared, config: TrainConfig, aux_dir: str) -> dict:
    """Validation examples and item popularity as small .npz/.npy files on the storage path
    (every worker reads them; no pickle)."""
    os.makedirs(aux_dir, exist_ok=True)
    valid_path = None
    if config.holdout == "valid":
        user_index, histories, targets = prepared.holdout_examples("valid")
        valid_path = os.path.join(aux_dir, "valid.npz")
        np.savez(valid_path, user_index=user_index, history_values=histories.values.to_numpy(),
                 history_offsets=histories.offsets.to_numpy().astype(np.int64),
                 targets=targets)
    popularity = np.zeros(prepared.num_items + 1, np.float64)
    counts = prepared.items()
    popularity[counts["index"].to_numpy()] = counts["count"].to_numpy()
    popularity_path = os.path.join(aux_dir, "popularity.npy")
    np.save(popularity_path, popularity)
    return {"valid_path": valid_path, "popularity_path": popularity_path}


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
                    wall_seconds: float, overwrite: bool, baselines: dict | None = None) -> dict:
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
        "data": os.path.abspath(prepared.path),
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


def train_config_fields() -> list[str]:
    return [f.name for f in fields(TrainConfig)]
