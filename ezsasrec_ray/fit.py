"""One training step, shared by Ray Train workers and the easy API.

:func:`epoch_batches` orders an epoch, :class:`Adam` is the optimizer (fused, optionally lazy
on the item table), :func:`make_train_step` runs a loss from :mod:`.losses` under any
``tf.distribute`` strategy (MultiWorkerMirroredStrategy on Ray Train; the default strategy in
a notebook). Keras 3's ``model.fit`` does not work under MultiWorkerMirroredStrategy
(keras-team/keras#20585), hence this custom step.
"""

from __future__ import annotations

import functools

import numpy as np

from .losses import NEGATIVES, negative_shape, sample_negatives


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
    order (step, then m and v of each weight, then the loss scale and its good-step count when
    scaling), for checkpoints.

    ``loss_scale`` (for ``mixed_float16``, whose small gradients underflow in float16): dynamic
    loss scaling as ``keras.optimizers.LossScaleOptimizer``'s. :meth:`scale_loss` multiplies
    the loss by the scale (initially 2**15); :meth:`apply` divides the summed gradients by it.
    A step with an inf or NaN gradient changes no weight, moment or step count and halves the
    scale (not below 1); ``growth_steps`` finite steps in a row double it.
    """

    def __init__(self, weights, learning_rate: float, lazy=(), beta_1: float = 0.9,
                 beta_2: float = 0.999, epsilon: float = 1e-7, loss_scale: bool = False,
                 growth_steps: int = 2000):
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
        self.loss_scale, self.good_steps, self.growth_steps = None, None, growth_steps
        if loss_scale:
            self.loss_scale = tf.Variable(2.0 ** 15, dtype=tf.float32, trainable=False,
                                          name="loss_scale")
            self.good_steps = tf.Variable(0, dtype=tf.int64, trainable=False,
                                          name="loss_scale_good_steps")

    @property
    def variables(self) -> list:
        # without loss scaling, the layout of float32 and bfloat16 checkpoints stays as it was
        scaling = [] if self.loss_scale is None else [self.loss_scale, self.good_steps]
        return [self.step, *self.m, *self.v, *scaling]

    def scale_loss(self, loss):
        """The loss to differentiate: times the loss scale when scaling."""
        return loss if self.loss_scale is None else loss * self.loss_scale

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
        finite, scaling = None, None
        if self.loss_scale is not None:
            dense, values, finite = self._unscale(dense, values)
            scaling = self._next_scale(finite)
        t = tf.cast(self.step + 1, tf.float32)  # this update's step count
        powers = (tf.pow(self.beta_1, t), tf.pow(self.beta_2, t))
        context.merge_call(self._distributed_update,
                           args=(powers, dense, rows, values, finite, scaling))

    def _unscale(self, dense, values):
        """Summed gradients / the loss scale, and whether all are finite. After the all-reduce:
        every replica sees the same sums, so all of them skip the same steps."""
        import tensorflow as tf

        inverse = 1.0 / self.loss_scale
        dense, values = [g * inverse for g in dense], [g * inverse for g in values]
        finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in dense + values])
        return dense, values, finite

    def _next_scale(self, finite):
        """(loss scale, good steps) after this step."""
        import tensorflow as tf

        good = tf.where(finite, self.good_steps + 1, 0)
        grow = good >= self.growth_steps
        scale = tf.where(finite, tf.where(grow, 2.0 * self.loss_scale, self.loss_scale),
                         tf.maximum(0.5 * self.loss_scale, 1.0))
        return scale, tf.where(grow, tf.zeros_like(good), good)

    def _distributed_update(self, strategy, powers, dense, rows, values, finite, scaling):
        """Cross-replica context: the same update on every replica's copy of each weight (on
        a step with a non-finite gradient, only the loss scale changes)."""
        update = functools.partial(strategy.extended.update, group=False)
        update(self.step, _count_step, args=(finite,))
        dense, sparse = iter(dense), iter(zip(rows, values))
        for i, (target, lazy) in enumerate(zip(self._targets, self.lazy)):
            if lazy:
                update(target, _if_finite(self._update_rows),
                       args=(finite, i, powers, *next(sparse)))
            else:
                update(target, _if_finite(self._update_dense),
                       args=(finite, i, powers, next(dense)))
        if scaling is not None:
            for variable, value in zip((self.loss_scale, self.good_steps), scaling):
                update(variable, lambda variable, value: variable.assign(value), args=(value,))

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


def _count_step(step, finite):
    """One more step, or none when loss scaling skips this one (``finite`` False)."""
    import tensorflow as tf

    return step.assign_add(1 if finite is None else tf.cast(finite, tf.int64))


def _if_finite(update):
    """``update(weight, *args)`` as an update function ``(weight, finite, *args)`` that skips
    a step with a non-finite gradient (a ``tf.cond``: the decision is a tensor under
    tf.function); ``finite`` None (no loss scaling): always."""
    import tensorflow as tf

    def run(weight, finite, *args):
        if finite is None:
            return update(weight, *args)
        return tf.cond(finite, lambda: update(weight, *args), lambda: None)

    return run


def _as_row_slices(gradient):
    """A table's gradient as float32 IndexedSlices with int32 row indices (a dense gradient:
    every row)."""
    import tensorflow as tf

    if not isinstance(gradient, tf.IndexedSlices):
        gradient = tf.convert_to_tensor(gradient)
        return tf.IndexedSlices(tf.cast(gradient, tf.float32), tf.range(tf.shape(gradient)[0]))
    return tf.IndexedSlices(tf.cast(gradient.values, tf.float32),
                            tf.cast(gradient.indices, tf.int32))


def make_train_step(optimizer: Adam, strategy, compute_loss, xla: bool = False):
    """A tf.function ``(inputs, positives, negatives) -> mean loss`` that runs one step on every
    replica: ``compute_loss(inputs, positives, negatives) -> scalar``, gradients (of the scaled
    loss when the optimizer scales it), update."""
    import tensorflow as tf

    spec = tf.TensorSpec([None, None], tf.int32)

    @tf.function(input_signature=[spec, spec, spec], jit_compile=xla or None)
    def train_step(inputs, positives, negatives):
        def step(inputs, positives, negatives):
            with tf.GradientTape() as tape:
                loss = compute_loss(inputs, positives, negatives)
                scaled = optimizer.scale_loss(loss / strategy.num_replicas_in_sync)
            optimizer.apply(tape.gradient(scaled, optimizer.variables_to_train))
            return loss

        per_replica = strategy.run(step, args=(inputs, positives, negatives))
        return strategy.reduce(tf.distribute.ReduceOp.MEAN, per_replica, axis=None)

    return train_step


def model_loss(model, loss):
    """``(inputs, positives, negatives) -> scalar``: a loss of :func:`.losses.make_loss` on the
    model's sequence embeddings, plus its L2 term, in float32 (also under mixed precision)."""
    import tensorflow as tf

    def compute(inputs, positives, negatives):
        seq = model.sequence_embeddings(inputs, training=True)
        value = loss(seq, model.item_embeddings(), positives, negatives)
        return tf.cast(value, tf.float32) + model.regularization_loss()

    return compute


def batch_negatives(loss_name: str, rng, positives: np.ndarray, num_negatives: int,
                    num_items: int, probs=None) -> np.ndarray:
    """Negatives for one batch of loss ``loss_name``: uniform per position (bce), ``probs``
    (or uniform) per user (sampled losses), a (1, 1) placeholder when the loss takes none."""
    kind = NEGATIVES[loss_name]
    shape = negative_shape(loss_name, positives.shape, num_negatives)
    if kind is None:
        return np.zeros(shape, np.int32)
    return sample_negatives(rng, shape, num_items, probs if kind == "per_user" else None)
