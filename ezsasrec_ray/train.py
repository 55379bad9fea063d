"""Train SASRec data-parallel on Ray Train (``TensorflowTrainer``), with checkpoints.

The shape of a run::

    driver:   load_prepared -> validate configs (before any worker starts) -> Ray Data dataset
              of training sequences -> TensorflowTrainer(train_loop_per_worker, datasets)
    worker:   its shard of sequences (get_dataset_shard) -> per epoch: length-bucketed,
              shuffled batches built with numpy -> custom tf.function step under
              MultiWorkerMirroredStrategy (strategy.run + strategy.reduce; Keras 3's
              model.fit does not work under MWMS, keras-team/keras#20585) -> validation
              NDCG@10 etc. on this worker's share of users, summed across workers ->
              ray.train.report(metrics, checkpoint)

Batches: each batch is trimmed to its longest history (positions stay absolute, so results
do not change) and sequences are bucketed by length, so a batch of short histories is not
mostly padding. Histories longer than ``maxlen + 1`` give a random window each epoch.

Learning rate: the global batch is ``batch_size x num_workers``; the learning rate applied is
``lr x sqrt(num_workers)`` (the square-root rule for Adam) unless ``lr_scaling="none"``
(or ``"linear"``).

Optimizer: Adam (:class:`Adam`: Keras Adam's formula, with TF's fused kernel per weight; an
embedding's gradient crosses workers as rows, not as a dense table; ``optimizer="auto"`` (the
default) means this dense Adam for every loss). ``optimizer="lazy_adam"``
updates the item table lazily, as TF-Addons' LazyAdam: with a sampled loss (``bce``,
``sampled_softmax``, ``gbce``) only the rows of the batch and their moments, with scatter ops.
It is not the default: on Beauty it was at most 1.1x faster and its validation NDCG@10 a little
lower at equal epochs (benchmarks/RESULTS.md, "train speed").

Checkpoints carry the weights, the optimizer state and the loop state (epoch, best metric,
patience). Re-running with the same ``run_name`` and ``storage_path`` resumes from the latest
checkpoint; ``max_failures`` lets Ray Train restart failed workers from it.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, fields

import numpy as np

from .data import HOLDOUTS
from .errors import EzSASRecError
from .model import SASRecConfig
from .model_io import MODEL_FORMAT_VERSION

TRAIN_STATE = "train_state.json"
OPTIMIZER_FILE = "optimizer.npz"
OPTIMIZERS = ("auto", "adam", "lazy_adam")


@dataclass
class TrainConfig:
    """Options of ``ezsasrec train``. Model shape fields go to :class:`SASRecConfig`."""

    epochs: int = 20
    batch_size: int = 128  # per worker; the global batch is batch_size x num_workers
    lr: float = 1e-3
    lr_scaling: str = "sqrt"  # sqrt | linear | none: how lr grows with num_workers
    # constant | cosine: lr x (1 + cos(pi x progress)) / 2, set at each epoch's start, where
    # progress = the larger of epochs done / epochs and training time / time_budget_s
    lr_schedule: str = "constant"
    loss: str = "softmax"  # bce | sampled_softmax | softmax | gbce
    negatives: int = 256  # sampled_softmax and gbce
    negative_sampling: str = "uniform"  # uniform | popularity (sampled_softmax, with log-q)
    gbce_t: float = 0.75
    maxlen: int = 50
    dim: int = 64
    blocks: int = 2
    heads: int = 1
    dropout: float = 0.2
    l2: float = 0.0
    optimizer: str = "auto"  # auto | adam | lazy_adam; see resolved_optimizer
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int | None = None  # default: the cluster's CPUs / num_workers
    precision: str = "float32"  # float32 | mixed_bfloat16 | mixed_float16 (GPU)
    xla: bool = False
    patience: int = 3  # epochs without a better validation NDCG@10 before stopping
    # What to train on (data.fit_lengths): valid = hold out the validation and test targets
    # (validation metrics, early stopping, best epoch kept); test = also train on the
    # validation targets, the final model for a test evaluation (no validation: runs the
    # epochs or the time budget, keeps the last epoch); none = every event (production).
    holdout: str = "valid"
    time_budget_s: float | None = None  # stop after the epoch that crosses this training time
    trim_batches: bool = True  # False: fixed maxlen-wide batches, no bucketing (for benchmarks)
    seed: int = 0
    max_failures: int = 2
    keep_checkpoints: int = 2
    run_name: str | None = None
    storage_path: str | None = None
    eval_batch_size: int = 1024
    verbose: bool = True

    def __post_init__(self):
        from .losses import LOSSES

        checks = {
            "epochs": self.epochs >= 1, "batch_size": self.batch_size >= 1, "lr": self.lr > 0,
            "negatives": self.negatives >= 1, "num_workers": self.num_workers >= 1,
            "patience": self.patience >= 1, "keep_checkpoints": self.keep_checkpoints >= 1,
            "max_failures": self.max_failures >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise EzSASRecError(f"--{name.replace('_', '-')}: invalid value "
                                    f"{getattr(self, name)!r}")
        if self.loss not in LOSSES:
            raise EzSASRecError(f"--loss: unknown loss {self.loss!r}; use one of {sorted(LOSSES)}")
        choices = {"lr_scaling": ("sqrt", "linear", "none"),
                   "lr_schedule": ("constant", "cosine"),
                   "negative_sampling": ("uniform", "popularity"),
                   "precision": ("float32", "mixed_bfloat16", "mixed_float16"),
                   "optimizer": OPTIMIZERS, "holdout": HOLDOUTS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise EzSASRecError(f"--{name.replace('_', '-')}: unknown value "
                                    f"{getattr(self, name)!r}; use one of {allowed}")
        if self.xla and self.optimizer == "lazy_adam":
            raise EzSASRecError("--optimizer lazy_adam: not with --xla (XLA cannot compile "
                                "its dynamic row set); use --optimizer adam")

    def model_config(self, num_items: int) -> SASRecConfig:
        """The model shape; raises a one-line error for a bad shape (before any worker)."""
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


# --------------------------------------------------------------------------------------------
# Batches (numpy, vectorized)


def epoch_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator,
                  bucket_batches: int = 32) -> list[np.ndarray]:
    """Row indices of each batch of an epoch: shuffled, then sorted by length within buckets of
    ``bucket_batches`` batches, so each batch holds histories of similar length."""
    order = rng.permutation(len(lengths))
    bucket = batch_size * bucket_batches
    batches = []
    for start in range(0, len(order), bucket):
        rows = order[start:start + bucket]
        rows = rows[np.argsort(lengths[rows], kind="stable")]
        batches.extend(rows[i:i + batch_size] for i in range(0, len(rows), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


# --------------------------------------------------------------------------------------------
# Optimizer: fused Adam, with lazy (row-sparse) updates of the item table


class Adam:
    """Adam for a model's weights, with the formula, defaults and bias correction of
    ``keras.optimizers.Adam``, built for a small model where the per-op cost dominates a step.

    * Dense weights: one fused kernel per weight and step (TF's ``ResourceApplyAdam``), where
      Keras' Adam builds ~40 graph ops per weight (about 1,000 a step for SASRec). A sparse
      gradient (an embedding's) is summed across replicas as rows, then made dense locally.
    * ``lazy`` weights (the item table, with a sampled loss): only the rows in the step's
      gradient (``tf.IndexedSlices``; rows may repeat, they are summed) are updated, together
      with their m and v, with scatter ops: O(rows in the batch x dim) a step instead of
      O(table). As TF-Addons' LazyAdam: bias correction by the shared step count; rows without
      a gradient keep their value and moments (dense Adam keeps moving them with their decaying
      momentum). A dense gradient for a lazy weight updates every row (= dense Adam).

    Use :meth:`apply` inside ``strategy.run`` (or with no strategy) and create the optimizer
    under ``strategy.scope()``: gradients are summed across replicas first (the sparse rows are
    all-gathered under MultiWorkerMirroredStrategy), then every replica applies the same update
    to its copy, so the copies stay identical. ``variables`` is the whole state in a fixed
    order (step, then m and v of each weight), for checkpoints.
    """

    def __init__(self, weights, learning_rate: float, lazy=(), beta_1: float = 0.9,
                 beta_2: float = 0.999, epsilon: float = 1e-7):
        import keras
        import tensorflow as tf

        self.variables_to_train = list(weights)
        lazy_ids = {id(w) for w in lazy}
        self.lazy = [id(w) in lazy_ids for w in self.variables_to_train]
        self._targets = [w.value if isinstance(w, keras.Variable) else w  # the tf.Variables
                         for w in self.variables_to_train]
        self.beta_1, self.beta_2 = beta_1, beta_2
        # a variable, so a schedule can change it between steps (set_learning_rate)
        self.learning_rate = tf.Variable(float(learning_rate), dtype=tf.float32,
                                         trainable=False, name="adam_learning_rate")
        self.epsilon = epsilon
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="adam_step")
        self.m = [tf.Variable(tf.zeros(w.shape, tf.float32), trainable=False, name=f"adam_m_{i}")
                  for i, w in enumerate(self._targets)]
        self.v = [tf.Variable(tf.zeros(w.shape, tf.float32), trainable=False, name=f"adam_v_{i}")
                  for i, w in enumerate(self._targets)]

    @property
    def variables(self) -> list:
        return [self.step, *self.m, *self.v]

    def set_learning_rate(self, value: float):
        """Outside the step (every replica gets the same value)."""
        self.learning_rate.assign(float(value))

    def apply(self, gradients):
        """gradients: this replica's gradient of each of ``variables_to_train`` (in order)."""
        import tensorflow as tf

        dense, sparse = [], []
        for gradient, lazy in zip(gradients, self.lazy):
            if lazy or isinstance(gradient, tf.IndexedSlices):  # rows: all-gathered, not summed
                (sparse if lazy else dense).append(_as_row_slices(gradient))
            else:
                dense.append(tf.cast(gradient, tf.float32))
        context = tf.distribute.get_replica_context()
        if context.num_replicas_in_sync > 1:
            dense, sparse = context.all_reduce(tf.distribute.ReduceOp.SUM, [dense, sparse])
        dense_targets = [w for w, lazy in zip(self._targets, self.lazy) if not lazy]
        dense = [tf.math.unsorted_segment_sum(g.values, g.indices, w.shape[0])  # (rows, ...)
                 if isinstance(g, tf.IndexedSlices) else g for g, w in zip(dense, dense_targets)]
        rows, values = [], []
        for gradient in sparse:
            unique, index = tf.unique(gradient.indices)  # (R,), (K,): first-occurrence order
            rows.append(unique)
            values.append(tf.math.unsorted_segment_sum(gradient.values, index,
                                                       tf.shape(unique)[0]))  # (R, d)
        t = tf.cast(self.step + 1, tf.float32)  # this update's step count
        powers = (tf.pow(self.beta_1, t), tf.pow(self.beta_2, t))
        context.merge_call(self._distributed_update, args=(powers, dense, rows, values))

    def _distributed_update(self, strategy, powers, dense, rows, values):
        """Cross-replica context: the same update on every replica's copy of each weight."""
        strategy.extended.update(self.step, lambda step: step.assign_add(1), group=False)
        dense, sparse = iter(dense), iter(zip(rows, values))
        for i, (target, lazy) in enumerate(zip(self._targets, self.lazy)):
            if lazy:
                strategy.extended.update(target, self._update_rows,
                                         args=(i, powers, *next(sparse)), group=False)
            else:
                strategy.extended.update(target, self._update_dense,
                                         args=(i, powers, next(dense)), group=False)

    def _update_dense(self, weight, i, powers, gradient):
        import tensorflow as tf

        tf.raw_ops.ResourceApplyAdam(
            var=weight.handle, m=self.m[i].handle, v=self.v[i].handle,
            beta1_power=powers[0], beta2_power=powers[1], lr=tf.identity(self.learning_rate),
            beta1=self.beta_1, beta2=self.beta_2, epsilon=self.epsilon,
            grad=tf.cast(gradient, weight.dtype))

    def _update_rows(self, weight, i, powers, rows, values):
        """rows (R,) unique int32, values (R, d) float32: the summed gradient of those rows."""
        import tensorflow as tf

        m_var, v_var = self.m[i], self.v[i]
        alpha = self.learning_rate * tf.sqrt(1.0 - powers[1]) / (1.0 - powers[0])
        m = tf.gather(m_var, rows) * self.beta_1 + (1.0 - self.beta_1) * values  # (R, d)
        v = tf.gather(v_var, rows) * self.beta_2 + (1.0 - self.beta_2) * tf.square(values)
        m_var.scatter_update(tf.IndexedSlices(m, rows))
        v_var.scatter_update(tf.IndexedSlices(v, rows))
        weight.scatter_sub(tf.IndexedSlices(alpha * m / (tf.sqrt(v) + self.epsilon), rows))


def _as_row_slices(gradient):
    """A table's gradient as float32 IndexedSlices with int32 row indices (a dense gradient:
    every row)."""
    import tensorflow as tf

    if not isinstance(gradient, tf.IndexedSlices):
        gradient = tf.convert_to_tensor(gradient)
        return tf.IndexedSlices(tf.cast(gradient, tf.float32), tf.range(tf.shape(gradient)[0]))
    return tf.IndexedSlices(tf.cast(gradient.values, tf.float32),
                            tf.cast(gradient.indices, tf.int32))


def build_optimizer(model, cfg: TrainConfig) -> Adam:
    """The optimizer of a run: the item table lazy when ``cfg.resolved_optimizer()`` is
    ``lazy_adam``."""
    lazy = [model.item_embeddings()] if cfg.resolved_optimizer() == "lazy_adam" else []
    return Adam(model.trainable_variables, cfg.effective_lr(), lazy=lazy)


def make_train_step(optimizer: Adam, strategy, compute_loss, xla: bool = False):
    """A tf.function ``(inputs, positives, negatives) -> mean loss`` that runs one step on every
    replica: ``compute_loss(inputs, positives, negatives) -> scalar``, gradients, update."""
    import tensorflow as tf

    spec = tf.TensorSpec([None, None], tf.int32)

    @tf.function(input_signature=[spec, spec, spec], jit_compile=xla or None)
    def train_step(inputs, positives, negatives):
        def step(inputs, positives, negatives):
            with tf.GradientTape() as tape:
                loss = compute_loss(inputs, positives, negatives)
                scaled = loss / strategy.num_replicas_in_sync
            optimizer.apply(tape.gradient(scaled, optimizer.variables_to_train))
            return loss

        per_replica = strategy.run(step, args=(inputs, positives, negatives))
        return strategy.reduce(tf.distribute.ReduceOp.MEAN, per_replica, axis=None)

    return train_step


# --------------------------------------------------------------------------------------------
# The worker loop


def _set_threads(threads: int):
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, threads)))
    except RuntimeError:  # already initialized in this process
        pass


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
    """Ray Train worker: train, validate and checkpoint. ``loop_config`` is plain data."""
    import ray.train
    import tensorflow as tf

    from .batching import make_inputs, take_rows
    from .evaluate import evaluate_examples
    from .losses import get_loss, sample_negatives
    from .model import build_model

    cfg = TrainConfig(**loop_config["train"])
    model_config = SASRecConfig.from_dict(loop_config["model"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    _set_threads(loop_config["threads"])
    if cfg.precision != "float32":
        import keras

        keras.mixed_precision.set_global_policy(cfg.precision)
    strategy = (tf.distribute.MultiWorkerMirroredStrategy() if world > 1
                else tf.distribute.get_strategy())

    values, offsets = _load_worker_shard(ray.train.get_dataset_shard("train"))
    lengths = np.diff(offsets)
    validate = cfg.holdout == "valid"  # otherwise the validation targets are trained on
    if validate:
        valid = np.load(loop_config["valid_path"], allow_pickle=False)
        rows = np.flatnonzero(valid["user_index"] % world == rank)  # this worker's share
        v_values, v_offsets = take_rows(valid["history_values"], valid["history_offsets"], rows)
        v_targets = valid["targets"][rows]
    popularity = np.load(loop_config["popularity_path"], allow_pickle=False)

    with strategy.scope():
        model = build_model(model_config)
        optimizer = build_optimizer(model, cfg)
    loss_fn = get_loss(cfg.loss)
    num_items = model_config.num_items
    log_q = None
    probs = None
    if cfg.negative_sampling == "popularity":
        probs = popularity[1:] ** 0.75 + 1e-12
        log_q = tf.constant(np.log(np.concatenate([[1.0], probs / probs.sum()]) * cfg.negatives),
                            tf.float32)

    def compute_loss(inputs, positives, negatives):
        seq = model.sequence_embeddings(inputs, training=True)
        table = model.item_embeddings()
        if cfg.loss == "softmax":
            loss = loss_fn(seq, table, positives)
        elif cfg.loss == "sampled_softmax":
            loss = loss_fn(seq, table, positives, negatives, log_q=log_q)
        elif cfg.loss == "gbce":
            loss = loss_fn(seq, table, positives, negatives, t=cfg.gbce_t)
        else:
            loss = loss_fn(seq, table, positives, negatives)
        return tf.cast(loss, tf.float32) + model.regularization_loss()

    train_step = make_train_step(optimizer, strategy, compute_loss, cfg.xla)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.float64)])
    def all_sum(values):
        per_replica = strategy.run(lambda v: tf.identity(v), args=(values,))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    state = {"epoch": 0, "best": -1.0, "bad_epochs": 0, "history": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = _restore_checkpoint(directory, model, optimizer)
        state["resumed_from_epoch"] = state["epoch"]

    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        if state["bad_epochs"] >= cfg.patience:
            break
        if cfg.time_budget_s and state.get("train_seconds", 0.0) >= cfg.time_budget_s:
            break
        rng = np.random.default_rng([cfg.seed, epoch, rank])
        # from the all-reduced state, so every worker sets the same rate
        lr = cfg.effective_lr() * cfg.lr_factor(epoch - 1, state.get("train_seconds", 0.0))
        optimizer.set_learning_rate(lr)
        started = time.time()
        total_loss, steps, sequences_seen = 0.0, 0, 0
        positions = 0
        bucket_batches = 32 if cfg.trim_batches else 1
        for rows in epoch_batches(lengths, cfg.batch_size, rng, bucket_batches):
            batch_values, batch_offsets = take_rows(values, offsets, rows)
            inputs, positives = make_inputs((batch_values, batch_offsets), model_config.maxlen,
                                            rng)
            if not cfg.trim_batches and inputs.shape[1] < model_config.maxlen:
                pad = ((0, 0), (model_config.maxlen - inputs.shape[1], 0))
                inputs, positives = np.pad(inputs, pad), np.pad(positives, pad)
            positions += inputs.size
            if cfg.loss == "bce":
                negatives = sample_negatives(rng, positives.shape, num_items)
            elif cfg.loss in ("sampled_softmax", "gbce"):
                negatives = sample_negatives(rng, (len(rows), cfg.negatives), num_items, probs)
            else:
                negatives = np.zeros((1, 1), np.int32)
            total_loss += float(train_step(inputs, positives, negatives))
            steps += 1
            sequences_seen += len(rows)
        train_seconds = time.time() - started
        metrics = {}
        if validate:
            sums, counts = evaluate_examples(model, (v_values, v_offsets), v_targets,
                                             batch_size=cfg.eval_batch_size, reduce="sum")
            names = sorted(sums)
            totals = all_sum(tf.constant([sums[n] for n in names] + [counts],
                                         tf.float64)).numpy()
            users = max(totals[-1], 1.0)
            metrics = {name: float(totals[i] / users) for i, name in enumerate(names)}
        throughput, positions = all_sum(
            tf.constant([sequences_seen, positions], tf.float64)).numpy()
        record = {"epoch": epoch, "loss": total_loss / max(steps, 1), "lr": lr,
                  "sequences_per_s": throughput / max(train_seconds, 1e-9),
                  "positions_per_s": positions / max(train_seconds, 1e-9),
                  "epoch_seconds": time.time() - started, "train_seconds": train_seconds,
                  **({"valid_users": int(totals[-1])} if validate else {}),
                  **{f"valid_{k}": v for k, v in metrics.items()}}
        # without validation every epoch counts as an improvement: the last one is kept
        score = metrics.get("NDCG@10", 0.0) if validate else float(epoch)
        improved = score > state["best"]
        # every worker sees the same (all-reduced) numbers, so all stop at the same epoch
        mean_seconds = all_sum(tf.constant([train_seconds], tf.float64)).numpy()[0] / world
        mine = _weights_fingerprint(model)
        mean_fingerprint = all_sum(tf.constant([mine], tf.float64)).numpy()[0] / world
        # 0 when every worker holds the same weights (data-parallel replicas in sync)
        record["replica_weight_gap"] = abs(mean_fingerprint - mine) / max(abs(mine), 1e-30)
        state.update(epoch=epoch, best=max(state["best"], score),
                     bad_epochs=0 if improved else state["bad_epochs"] + 1,
                     train_seconds=state.get("train_seconds", 0.0) + float(mean_seconds))
        state["history"].append(record)
        report = ({**record, "NDCG@10": score, "best_NDCG@10": state["best"]} if validate
                  else dict(record))
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                _save_checkpoint(tmp, model, optimizer, state)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(report, checkpoint=ckpt)
        if rank == 0 and loop_config["train"].get("verbose", True):
            valid_text = (f"valid NDCG@10 {score:.4f} HR@10 {metrics.get('HR@10', 0.0):.4f}"
                          f"{'  *' if improved else ''}" if validate
                          else f"(holdout {cfg.holdout}: no validation)")
            print(f"epoch {epoch:>3}: loss {record['loss']:.4f}  "
                  f"{record['sequences_per_s']:,.0f} seq/s  {valid_text}", flush=True)
        _maybe_inject_fault(loop_config.get("fault"), epoch, rank, world)


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

    from .data import training_sequences

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
    import ray.train
    from ray.train.tensorflow import TensorflowTrainer

    from .data import init_ray, load_prepared

    config = TrainConfig(**options)
    prepared = load_prepared(data)
    model_config = config.model_config(prepared.num_items)  # fails before any worker starts
    if os.path.exists(output) and not overwrite:
        raise EzSASRecError(f"--output {output}: already exists; pass --overwrite to replace it")
    init_ray(address)
    run_name = config.run_name or f"ezsasrec-{os.path.basename(os.path.abspath(output))}"
    storage = os.path.abspath(config.storage_path or os.path.join(
        os.path.dirname(os.path.abspath(output)), ".ezsasrec_runs"))
    os.makedirs(storage, exist_ok=True)

    # Validation examples and item popularity: small arrays on the shared storage path.
    aux_dir = os.path.join(storage, run_name + "-inputs")
    os.makedirs(aux_dir, exist_ok=True)
    valid_path = None
    if config.holdout == "valid":
        user_index, histories, targets = prepared.holdout_examples("valid")
        valid_path = os.path.join(aux_dir, "valid.npz")
        np.savez(valid_path, user_index=user_index, history_values=histories.values.to_numpy(),
                 history_offsets=histories.offsets.to_numpy().astype(np.int64),
                 targets=targets)
    score_attribute = "NDCG@10" if config.holdout == "valid" else "epoch"
    popularity = np.zeros(prepared.num_items + 1, np.float64)
    counts = prepared.items()
    popularity[counts["index"].to_numpy()] = counts["count"].to_numpy()
    popularity_path = os.path.join(aux_dir, "popularity.npy")
    np.save(popularity_path, popularity)

    cpus = config.cpus_per_worker or max(1, int(ray.cluster_resources().get("CPU", 1))
                                         // config.num_workers)
    loop_config = {"train": asdict(config), "model": model_config.to_dict(),
                   "threads": cpus, "valid_path": valid_path,
                   "popularity_path": popularity_path,
                   "fault": _fault_from_env()}
    trainer = TensorflowTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.num_workers, use_gpu=config.use_gpu,
            resources_per_worker={"CPU": cpus, **({"GPU": 1} if config.use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=config.keep_checkpoints, checkpoint_score_attribute=score_attribute,
                checkpoint_score_order="max")),
        # Materialized first, so feeding the workers needs no CPU slot: on a small machine
        # the training workers hold every CPU and a lazy read would wait forever.
        datasets={"train": _training_dataset(prepared, config.holdout).materialize()},
    )
    started = time.time()
    result = trainer.fit()
    if result.error:
        raise result.error
    best = max(result.best_checkpoints, key=lambda cm: cm[1].get(score_attribute, -1))
    best_checkpoint, best_metrics = best
    with result.checkpoint.as_directory() as latest:
        with open(os.path.join(latest, TRAIN_STATE)) as f:
            state = json.load(f)
    with best_checkpoint.as_directory() as directory:
        metrics = write_model_dir(directory, output, prepared, config, model_config, state,
                                  best_metrics, time.time() - started, overwrite)
    return metrics


def write_model_dir(checkpoint_dir: str, output: str, prepared, config: TrainConfig,
                    model_config: SASRecConfig, state: dict, best_metrics: dict,
                    wall_seconds: float, overwrite: bool) -> dict:
    """Model directory, written atomically: config, weights, item embeddings, vocabularies,
    metrics.json, history.csv and training_curves.png."""
    import datetime as dt

    from .data import publish_directory
    from .model import load_model_files

    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.tmp-", dir=parent)
    try:
        for name in ("config.json", "model.weights.h5"):
            shutil.copy(os.path.join(checkpoint_dir, name), os.path.join(tmp, name))
        model = load_model_files(tmp)
        np.save(os.path.join(tmp, "item_embeddings.npy"),
                np.asarray(model.item_embeddings().numpy(), np.float32))
        for name in ("users", "items"):
            shutil.copytree(os.path.join(prepared.path, name), os.path.join(tmp, name))
        history = state["history"]
        with open(os.path.join(tmp, "history.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(history[0]))
            writer.writeheader()
            writer.writerows(history)
        _plot_curves(history, os.path.join(tmp, "training_curves.png"))
        best_epoch = int(best_metrics.get("epoch", 0))
        metrics = {
            "format_version": MODEL_FORMAT_VERSION,
            "kind": "ezsasrec_ray.model",
            "trained_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "data": os.path.abspath(prepared.path),
            "vocab_fingerprint": prepared.vocab_fingerprint(),
            "model": model_config.to_dict(),
            "train": {**{k: v for k, v in asdict(config).items() if k != "verbose"},
                      "optimizer": config.resolved_optimizer()},
            "best_epoch": best_epoch,
            "epochs_run": len(history),
            "stopped_early": len(history) < config.epochs,
            "wall_seconds": round(wall_seconds, 2),
            "valid": {k[6:]: v for k, v in best_metrics.items() if k.startswith("valid_")},
        }
        with open(os.path.join(tmp, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        if os.path.exists(output) and not overwrite:
            raise EzSASRecError(f"--output {output}: already exists; pass --overwrite")
        publish_directory(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return metrics


def _plot_curves(history: list[dict], path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(epochs, [h["loss"] for h in history], marker="o")
    left.set(xlabel="epoch", ylabel="training loss", title="loss")
    if "valid_NDCG@10" in history[0]:
        right.plot(epochs, [h["valid_NDCG@10"] for h in history], marker="o", color="C1")
    right.set(xlabel="epoch", ylabel="NDCG@10", title="validation NDCG@10 (full catalog)"
              if "valid_NDCG@10" in history[0] else "no validation (holdout test / none)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def train_config_fields() -> list[str]:
    return [f.name for f in fields(TrainConfig)]
