"""Ray and TensorFlow process set-up shared by the stages."""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import logging
import os
import re
import sys
import tempfile
import warnings

logger = logging.getLogger("ezsasrec_ray")

# TensorFlow's C++ start-up lines: absl INFO/WARNING lines written before its logging is set
# up (TF_CPP_MIN_LOG_LEVEL does not reach them), the CPU-feature notice, and the cuInit error
# of a machine without a GPU. Everything else written to stderr is passed through.
_NATIVE_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called|[IW]\d{4} "
    r"|E\d{4} .*failed call to cuInit|To enable the following instructions)")
# Ray loggers that report every checkpoint, report and resource request at INFO level, and the
# placement-group cleaner that warns every second when the State API (dashboard) is off.
_QUIET_LOGGERS = ("ray.train", "ray.data",
                  "ray.train.v2._internal.execution.controller.placement_group_cleaner")


def init_ray(address: str | None = None):
    """Connect to ``address`` (or ``RAY_ADDRESS``), else start a local Ray; reuse if running.

    A local Ray runs :func:`quiet_ray_logs` in every worker process, so what reaches the
    user is our own lines, warnings and errors (a cluster keeps its own logging set-up).
    """
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        kwargs = {"address": address} if address else {
            "include_dashboard": False,
            "runtime_env": {"worker_process_setup_hook": "ezsasrec_ray.runtime.quiet_ray_logs"}}
        ray.init(log_to_driver=True, configure_logging=False, **kwargs)
    return ray


def quiet_ray_logs():
    """Keep a process's output to what its user reads: Ray's per-report, per-checkpoint and
    progress INFO lines and the placement-group cleaner's every-second State API warning go
    to the debug level (Ray's warnings and errors still show), and TensorFlow's C++ start-up
    lines go too, whoever imports it (Ray Train's controller does). Run in the CLI's driver
    and, through ``worker_process_setup_hook``, in every worker of a local Ray."""
    for name in _QUIET_LOGGERS[:2]:
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger(_QUIET_LOGGERS[2]).setLevel(logging.ERROR)
    # Ray Train logs each report on a logger named after its source file, not under ray.train
    context = sys.modules.get("ray.train.v2._internal.execution.context")
    if context is not None:
        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*ExecutionOptions.exclude_resources")
    if "tensorflow" not in sys.modules and not any(
            isinstance(f, _QuietTensorFlowImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowImport())


def quiet_ray_data_progress():
    """No Ray Data plan and progress lines (the stages print their own); after importing
    ray.data, which sets its logger up on import."""
    import ray.data

    ray.data.DataContext.get_current().print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` once and runs its import under :func:`quiet_native_logs`."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        with quiet_native_logs():
            self.loader.exec_module(module)


@contextlib.contextmanager
def quiet_native_logs():
    """Capture what C++ code writes to stderr (fd 2) meanwhile: TensorFlow's start-up noise
    (see ``_NATIVE_NOISE``) goes to the debug log, every other line back to stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            for line in capture.read().decode(errors="replace").splitlines():
                if _NATIVE_NOISE.match(line):
                    logger.debug(line)
                else:
                    print(line, file=sys.stderr)


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


STORAGE_ENV_PREFIXES = ("AWS_", "GOOGLE_", "AZURE_", "EZSASREC_CACHE")


def storage_env() -> dict:
    """This process's object-storage settings (endpoint, credentials, region, the local
    cache), for the actors and replicas it starts: they read a model from where it does."""
    return {k: v for k, v in os.environ.items() if k.startswith(STORAGE_ENV_PREFIXES)}


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
        with quiet_native_logs():  # device discovery: the cuInit line without a GPU
            gpus = tf.config.list_physical_devices("GPU")
        for gpu in gpus:
            tf.config.experimental.set_memory_growth(gpu, True)
        if gpus:
            tf.config.experimental.enable_tensor_float_32_execution(False)
    except RuntimeError:  # TF already initialized in this process
        pass
