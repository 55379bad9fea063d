"""One training worker: the options of a run and the loop each worker runs.

:class:`TrainConfig` holds every option of a training run. :func:`run_worker` is the loop of
one worker: its shard of sequences, length-bucketed shuffled batches, the one training step of
:mod:`.fit` under MultiWorkerMirroredStrategy, validation NDCG@10 on its share of users summed
across workers, a report with a checkpoint each validation round. It runs under Ray Train
(:func:`train_loop_per_worker`, one of a ``TensorflowTrainer``'s workers) or as one Ray Tune
trial (:class:`TuneSession`): the session says where the data comes from and where reports go.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import numpy as np

from .batching import epoch_batches, history_windows, make_inputs, take_rows
from .dataset import HOLDOUTS
from .errors import EzSASRecError
from .metrics import ranking_metrics
from .model_io import WEIGHTS_FILE
from .options import check_instance, option
from .ranking import baseline_ranks, evaluate_examples, fitted_baselines
from .runtime import quiet_ray_logs, set_threads
from .tracking import round_logger

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

    # a cap, not a length: early stopping (patience in validation rounds) ends a run; a cap of
    # 20 cut off every default run on the synthetic and ml-latest-small logs while they were
    # still improving (benchmarks/RESULTS.md, "quality out of the box")
    epochs: int = option(200, "most passes over the data (early stopping or a time budget "
                              "usually ends a run first)", min=1)
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
    precision: str = option("float32", "float32, or mixed precision on a GPU (mixed_float16 "
                                       "with dynamic loss scaling)",
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
    valid_users: int = option(10000, "users in the validation sample (holdout valid, "
                                     "leave-one-out): their validation targets are held out "
                                     "for early stopping, the other users train on theirs "
                                     "(0: hold out every user's)", min=0)
    time_budget_s: float | None = option(None, "stop after the epoch that crosses this much "
                                               "training time, in seconds (default: no limit)")
    trim_batches: bool = option(True, "trim each batch to its longest history, bucketed by "
                                      "length (off: fixed maxlen-wide batches, for benchmarks)")
    seed: int = option(0, "random seed")
    init_from: str | None = option(None, "warm start from this model directory: rows of items "
                                         "both know are copied by raw id, new items start "
                                         "fresh, the other weights are copied (same maxlen, "
                                         "dim, blocks and heads; default: none, a cold start)")
    max_failures: int = option(2, "restarts of failed workers from the latest checkpoint", min=0)
    keep_checkpoints: int = option(2, "best checkpoints kept, by validation NDCG@10", min=1)
    run_name: str | None = option(None, "Ray Train run name; re-running with the same name "
                                        "and options resumes from its latest checkpoint "
                                        "(default: a new run each time, its checkpoints "
                                        "removed once the model is written)")
    storage_path: str | None = option(None, "checkpoint directory (shared on a cluster; "
                                            "default: .ezsasrec_runs beside the output, or "
                                            "~/.cache/ezsasrec_ray/runs for an output on "
                                            "object storage)")
    eval_batch_size: int = option(1024, "users per validation batch", min=1)
    tracking_uri: str | None = option(None, "MLflow tracking URI (e.g. file:///path/mlruns, "
                                            "http://host:5000): one run per training, every "
                                            "validation round as metrics (needs the mlflow "
                                            "extra; default: no tracking)")
    experiment: str = option("ezsasrec", "MLflow experiment of the run (with --tracking-uri)")
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
    ``lazy_adam``; dynamic loss scaling with ``mixed_float16`` (float16 gradients underflow
    without it; bfloat16 has float32's range)."""
    from .fit import Adam

    lazy = [model.item_embeddings()] if cfg.resolved_optimizer() == "lazy_adam" else []
    return Adam(model.trainable_variables, cfg.effective_lr(), lazy=lazy,
                loss_scale=cfg.precision == "mixed_float16")


def _load_worker_shard(shard) -> tuple[np.ndarray, np.ndarray]:
    """This worker's training sequences as one ragged (values, offsets) pair, in user order
    (whatever order Ray Data streams them in, the same seed gives the same batches)."""
    users, values, lengths = [], [], []
    for batch in shard.iter_batches(batch_size=4096, batch_format="pyarrow"):
        lists = batch["items"].combine_chunks()
        offsets = lists.offsets.to_numpy()
        users.append(batch["user_index"].to_numpy())
        values.append(lists.values.to_numpy()[offsets[0]:offsets[-1]])
        lengths.append(np.diff(offsets))
    if not lengths:
        return np.zeros(0, np.int32), np.zeros(1, np.int64)
    values = np.concatenate(values).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(np.concatenate(lengths))]).astype(np.int64)
    return take_rows(values, offsets, np.argsort(np.concatenate(users), kind="stable"))


def _save_checkpoint(directory: str, model, optimizer, state: dict):
    from .model import save_model_files

    save_model_files(model, directory)
    np.savez(os.path.join(directory, OPTIMIZER_FILE),
             *[np.asarray(v.numpy()) for v in optimizer.variables])
    with open(os.path.join(directory, TRAIN_STATE), "w") as f:
        json.dump(state, f)


def _restore_checkpoint(directory: str, model, optimizer) -> dict:
    model.load_weights(os.path.join(directory, WEIGHTS_FILE))
    path = os.path.join(directory, OPTIMIZER_FILE)
    with np.load(path, allow_pickle=False) as saved:
        arrays = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    shapes = [tuple(v.shape) for v in optimizer.variables]
    if [a.shape for a in arrays] != shapes:
        raise EzSASRecError(f"{path}: optimizer state of {len(arrays)} arrays does not fit this "
                            f"run's optimizer ({len(shapes)} variables); was the checkpoint "
                            "written with another --optimizer, --precision or model "
                            "shape?")
    for variable, value in zip(optimizer.variables, arrays):
        variable.assign(value)
    with open(os.path.join(directory, TRAIN_STATE)) as f:
        return json.load(f)


def train_loop_per_worker(loop_config: dict):
    """Ray Train worker: train, validate and checkpoint. ``loop_config`` is plain data."""
    run_worker(loop_config, RayTrainSession())


def run_worker(loop_config: dict, session):
    """Train, validate and checkpoint under ``session`` (:class:`RayTrainSession` or
    :class:`TuneSession`).

    Validation rounds follow the data, not the epoch count: a round (validate, checkpoint,
    report) ends after the epoch that completes ``eval_every`` optimizer steps since the last
    one, and after the last epoch; patience counts rounds, and no run stops early before
    ``min_steps``.
    """
    quiet_ray_logs()  # also on a cluster: no INFO line per report and checkpoint
    w = _Worker(loop_config, session)
    log_round = round_logger(loop_config.get("tracking"))
    state = {"epoch": 0, "best": -1.0, "bad_rounds": 0, "steps": 0, "history": []}
    checkpoint = session.get_checkpoint()
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
        _report(w, session, state, record, score)
        if log_round:
            log_round(record, state["steps"])
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
    """One worker's model, optimizer, step and data shares."""

    def __init__(self, loop_config: dict, session):
        import keras
        import tensorflow as tf

        from .model import SASRecConfig, build_model

        self.cfg = cfg = TrainConfig(**loop_config["train"])
        self.model_config = SASRecConfig.from_dict(loop_config["model"])
        self.rank, self.world = session.rank, session.world
        set_threads(loop_config["threads"])
        if cfg.precision != "float32":
            keras.mixed_precision.set_global_policy(cfg.precision)
        self.strategy = (tf.distribute.MultiWorkerMirroredStrategy() if self.world > 1
                         else tf.distribute.get_strategy())
        # every position of a long history is trained on each epoch (windows that cover it)
        self.values, self.offsets = history_windows(
            *session.training_sequences(), self.model_config.maxlen)
        self.valid = None  # without a validation holdout its targets are trained on
        if cfg.holdout == "valid":
            self.valid = _valid_share(loop_config["valid_path"], self.rank, self.world)
        # the seed fixes the initial weights and the dropout masks too: the same options give
        # the same run (a tuned trial trains again as it did; replicas start equal)
        keras.utils.set_random_seed(cfg.seed)
        with self.strategy.scope():
            self.model = build_model(self.model_config)
            self.optimizer = build_optimizer(self.model, cfg)
        if loop_config.get("init_from"):  # a checkpoint, when resuming, overwrites it later
            warm_start(self.model, loop_config["init_from"]["model"],
                       np.load(loop_config["init_from"]["item_map"], allow_pickle=False))
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


def _report(w: _Worker, session, state: dict, record: dict, score: float):
    """Report the round to the session, with a checkpoint written by rank 0. The state's
    early-stopping counters go too: whoever reads the reports can tell a run that ended by
    itself from one stopped from outside (a Tune scheduler)."""
    report = ({**record, "NDCG@10": score, "best_NDCG@10": state["best"]}
              if w.valid is not None else dict(record))
    report.update(bad_rounds=state["bad_rounds"], train_seconds_total=state["train_seconds"])
    with tempfile.TemporaryDirectory() as tmp:
        if w.rank == 0:
            _save_checkpoint(tmp, w.model, w.optimizer, state)
        session.report(report, tmp if w.rank == 0 else None)


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


def train_config_fields() -> list[str]:
    return [f.name for f in fields(TrainConfig)]


class RayTrainSession:
    """A Ray Train worker's view: rank and world, its dataset shard, Ray Train's checkpoints."""

    def __init__(self):
        import ray.train

        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()

    def training_sequences(self) -> tuple[np.ndarray, np.ndarray]:
        import ray.train

        return _load_worker_shard(ray.train.get_dataset_shard("train"))

    def get_checkpoint(self):
        import ray.train

        return ray.train.get_checkpoint()

    def report(self, metrics: dict, checkpoint_dir: str | None):
        import ray.train

        ray.train.report(metrics, checkpoint=None if checkpoint_dir is None else
                         ray.train.Checkpoint.from_directory(checkpoint_dir))


class TuneSession:
    """One Ray Tune trial, one worker: the training sequences from a ragged .npz file
    (:func:`save_sequences`), Ray Tune's checkpoints and reports."""

    rank, world = 0, 1

    def __init__(self, sequences_path: str):
        self.sequences_path = sequences_path

    def training_sequences(self) -> tuple[np.ndarray, np.ndarray]:
        with np.load(self.sequences_path, allow_pickle=False) as saved:
            return saved["values"], saved["offsets"]

    def get_checkpoint(self):
        import ray.tune

        return ray.tune.get_checkpoint()

    def report(self, metrics: dict, checkpoint_dir: str | None):
        import ray.tune

        ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(checkpoint_dir))


def save_sequences(path: str, values: np.ndarray, offsets: np.ndarray):
    """Training sequences as the ragged (values, offsets) .npz a :class:`TuneSession` reads."""
    np.savez(path, values=values.astype(np.int32), offsets=offsets.astype(np.int64))


def valid_baselines(prepared, holdout: str, valid_share: float = 1.0) -> dict:
    """Validation metrics of the popularity and first-order Markov baselines, fitted on the
    model's training items and ranked on the validation users and targets the model is
    validated on (same exclusions and tie rule); ``{}`` without a validation holdout."""
    if holdout != "valid":
        return {}
    _, histories, targets = prepared.holdout_examples("valid", valid_share)
    ragged = (histories.values.to_numpy(), histories.offsets.to_numpy().astype(np.int64))
    result = {}
    for name, baseline in fitted_baselines(prepared.num_items,
                                           prepared.training_sequences(holdout, valid_share)
                                           ).items():
        metrics = ranking_metrics(baseline_ranks(baseline, ragged, targets))
        metrics.pop("users", None)
        result[name] = metrics
    return result


def write_worker_inputs(prepared, holdout: str, aux_dir: str, valid_share: float = 1.0) -> dict:
    """Validation examples and item popularity as small .npz/.npy files on the storage path
    (every worker reads them; no pickle)."""
    os.makedirs(aux_dir, exist_ok=True)
    valid_path = None
    if holdout == "valid":
        user_index, histories, targets = prepared.holdout_examples("valid", valid_share)
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


def read_params(path: str) -> dict:
    """Training options from a JSON file: ``best.json`` of ``ezsasrec tune`` (its ``params``)
    or a plain mapping of options; checked like a config file's ``train`` section."""
    from .options import check_values

    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise EzSASRecError(f"--params {path}: cannot read it as JSON ({exc})") from None
    params = data.get("params", data) if isinstance(data, dict) else data
    return check_values(TrainConfig, dict(params) if isinstance(params, dict) else params,
                        source=f"--params {path}: params")


# --------------------------------------------------------------------------------------------
# Warm start


def item_map(parent_dir: str, prepared) -> tuple[np.ndarray, dict]:
    """For each item index of ``prepared`` (0 = padding), the parent model's row of the same
    raw id, or -1 for an item the parent never saw -> (map (num_items + 1,), counts)."""
    from .model_io import item_vocab

    parent = item_vocab(parent_dir, None)
    old = dict(zip(parent["raw_id"].to_pylist(), parent["index"].to_pylist()))
    items = prepared.items()
    mapping = np.full(prepared.num_items + 1, -1, np.int64)
    mapping[0] = 0
    for raw, index in zip(items["raw_id"].to_pylist(), items["index"].to_pylist()):
        mapping[index] = old.get(raw, -1)
    copied = int((mapping[1:] >= 0).sum())
    return mapping, {"items_copied": copied, "items_new": prepared.num_items - copied,
                     "items_dropped": len(old) - copied}


def check_parent(parent_dir: str, model_config) -> dict:
    """The parent model's config, or a one-line error naming the shape option that differs."""
    from .model_io import model_info

    parent = model_info(parent_dir).config
    for name in ("maxlen", "dim", "blocks", "heads"):
        if getattr(parent, name) != getattr(model_config, name):
            raise EzSASRecError(
                f"--init-from {parent_dir}: its {name} is {getattr(parent, name)}, this run's "
                f"{getattr(model_config, name)}; warm start needs the same maxlen, dim, blocks "
                "and heads (or drop --init-from)")
    return parent.to_dict()


def warm_start(model, parent_dir: str, mapping: np.ndarray):
    """Copy a parent model's weights into ``model``: item rows by ``mapping`` (-1: the row
    keeps its fresh initial value), every other weight as it is."""
    from .model import load_model_files

    parent = load_model_files(parent_dir)
    table = model.item_embeddings()
    for new, old in zip(model.weights, parent.weights):
        if new is table:
            rows = np.flatnonzero(mapping >= 0)
            values = np.array(new.numpy())
            values[rows] = old.numpy()[mapping[rows]]
            new.assign(values)
        else:
            new.assign(old.numpy())
