"""Ray and TensorFlow process set-up shared by the stages."""

from __future__ import annotations

import os


def init_ray(address: str | None = None):
    """Connect to ``address`` (or ``RAY_ADDRESS``), else start a local Ray; reuse if running."""
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        kwargs = {"address": address} if address else {"include_dashboard": False}
        ray.init(log_to_driver=True, configure_logging=False, **kwargs)
    return ray


def cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def keyed_stats_actor(**actor_options):
    """A tiny actor that stores stats by key (file, batch...), so a retried task that records
    its stats again replaces them instead of counting twice."""
    import ray

    @ray.remote(num_cpus=0, **actor_options)
    class KeyedStats:
        def __init__(self):
            self.entries = {}

        def record(self, key, stats):
            self.entries[key] = stats

        def get(self):
            return self.entries

    return KeyedStats.remote()


# Environment of a scoring actor: the scorer's threads run one BLAS call each (BatchScorer).
SCORER_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
              "TF_CPP_MIN_LOG_LEVEL": "2"}


def set_threads(threads: int | None, *, concurrent_calls: bool = False):
    """TF threads for this process; on GPUs, memory growth (actors may share a GPU) and no
    TF32 (user vectors stay float32, as on CPU).

    concurrent_calls: the caller runs ``threads`` encoder calls at once from its own threads
    (BatchScorer), so each op runs on one thread, the calling one (no hand-offs between
    threads). Small ops (SASRec's at dim 64) run much faster that way than split over threads.
    """
    import tensorflow as tf

    try:
        if threads:
            threads = int(threads)
            tf.config.threading.set_intra_op_parallelism_threads(
                1 if concurrent_calls else threads)
            tf.config.threading.set_inter_op_parallelism_threads(
                -1 if concurrent_calls else max(1, min(2, threads)))  # -1: in the caller
        gpus = tf.config.list_physical_devices("GPU")
        for gpu in gpus:
            tf.config.experimental.set_memory_growth(gpu, True)
        if gpus:
            tf.config.experimental.enable_tensor_float_32_execution(False)
    except RuntimeError:  # TF already initialized in this process
        pass
