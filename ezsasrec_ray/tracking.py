"""Experiment tracking on MLflow, optional (``pip install 'ezsasrec_ray[mlflow]'``).

One MLflow run per training: the driver creates it (the options as params) before any worker
starts, rank 0 logs every validation round into it through Ray's own integration
(``ray.air.integrations.mlflow.setup_mlflow``, which resumes the run named by
``MLFLOW_RUN_ID``), and the driver adds the model directory's ``metrics.json``,
``history.csv`` and curves as artifacts and closes it. The run belongs to the driver, so a
worker restarted from a checkpoint logs into the same run. mlflow is imported only when a
tracking URI is given.
"""

from __future__ import annotations

import os

from .errors import EzSASRecError
from .storage import local_dir

ARTIFACTS = ("metrics.json", "history.csv", "training_curves.png")
ROUND_METRICS = ("loss", "lr", "sequences_per_s", "train_seconds")


def _mlflow():
    try:
        import mlflow
    except ImportError:
        raise EzSASRecError("--tracking-uri: mlflow is not installed; pip install "
                            "'ezsasrec_ray[mlflow]' (or mlflow)") from None
    return mlflow


def start_run(tracking_uri: str, experiment: str, run_name: str, params: dict) -> dict:
    """Create the run on the driver; returns what the workers need to log into it."""
    mlflow = _mlflow()
    client = mlflow.tracking.MlflowClient(tracking_uri)
    try:
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(experiment)
        run = client.create_run(experiment_id, run_name=run_name)
        for key, value in sorted(params.items()):
            client.log_param(run.info.run_id, key, str(value)[:6000])
    except mlflow.exceptions.MlflowException as exc:
        raise EzSASRecError(f"--tracking-uri {tracking_uri}: {str(exc).splitlines()[0]}") \
            from None
    return {"tracking_uri": tracking_uri, "experiment_id": experiment_id,
            "run_id": run.info.run_id,  # and the driver's MLflow settings, for the workers
            "env": {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}}


def round_logger(tracking: dict | None):
    """In a worker: a ``log(record, step)`` for the validation rounds (rank 0 only), or None."""
    if not tracking:
        return None
    from ray.air.integrations.mlflow import setup_mlflow

    os.environ.update(tracking["env"])
    os.environ["MLFLOW_RUN_ID"] = tracking["run_id"]  # setup_mlflow resumes the driver's run
    mlflow = setup_mlflow(tracking_uri=tracking["tracking_uri"],
                          experiment_id=tracking["experiment_id"], rank_zero_only=True)

    def log(record: dict, step: int):
        metrics = {metric_name(k): float(v) for k, v in record.items()
                   if (k.startswith("valid_") or k in ROUND_METRICS)
                   and isinstance(v, (int, float))}
        mlflow.log_metrics(metrics, step=step)

    return log


def metric_name(key: str) -> str:
    """MLflow names take no ``@``: ``valid_NDCG@10`` -> ``valid_NDCG_at_10``."""
    return key.replace("@", "_at_")


def finish_run(tracking: dict | None, model_dir: str | None, failed: bool = False):
    """Attach the model directory's reports as artifacts and close the run (a model on
    object storage is read from its local copy, fetched only when tracking)."""
    if not tracking:
        return
    model_dir = local_dir(model_dir) if model_dir else None
    client = _mlflow().tracking.MlflowClient(tracking["tracking_uri"])
    for name in ARTIFACTS if model_dir else ():
        path = os.path.join(model_dir, name)
        if os.path.exists(path):
            client.log_artifact(tracking["run_id"], path)
    client.set_terminated(tracking["run_id"], "FAILED" if failed else "FINISHED")
