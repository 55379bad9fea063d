"""Search training options on Ray Tune: ``ezsasrec tune``.

Each trial is one training worker (:func:`.train_loop.run_worker` under a
:class:`.train_loop.TuneSession`), so a trial trains, validates and stops exactly as
``ezsasrec train`` does with the same options; it reports validation NDCG@10 each validation
round, and an ASHA scheduler stops the trials that trail at a round. The search space
(:data:`SEARCH_SPACE`, overridden entry by entry from a YAML file) is drawn at random with a
seed. A crashed or interrupted search resumes where it stopped when run again.

Output: ``trials.csv`` (one row per trial), ``trials.png`` (each trial's validation curve),
``space.json`` (the space searched) and ``best.json``, whose ``params`` are the complete
training options of the best trial (``ezsasrec train --params best.json`` trains it again).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from . import outputs
from .dataset import load_prepared
from .errors import EzSASRecError
from .options import check_instance, option
from .runtime import init_ray, quiet_native_logs
from .train_loop import (
    TrainConfig,
    TuneSession,
    run_worker,
    save_sequences,
    valid_baselines,
    write_worker_inputs,
)

METRIC = "NDCG@10"  # what each trial reports per validation round and the search maximises
# The default search: what the SASRec literature and this project's measurements move most.
# "maxlen" choices longer than the longest training history are dropped (they change nothing).
SEARCH_SPACE = {
    "lr": {"loguniform": [3e-4, 5e-3]},
    "dropout": {"uniform": [0.1, 0.6]},
    "dim": {"choice": [32, 64, 128]},
    "blocks": {"choice": [1, 2, 3]},
    "heads": {"choice": [1, 2]},
    "maxlen": {"choice": [50, 100, 200]},
    "loss": {"choice": ["softmax", "sampled_softmax"]},
    "negatives": {"choice": [64, 256]},
    "l2": {"choice": [0.0, 1e-6, 1e-5]},
}
# grid: every value, in order, num_samples times each (a grid over several keys: all combinations)
SAMPLERS = ("choice", "grid", "uniform", "loguniform", "randint")
# Options that say how a run is executed or reported, not what it learns: never searched,
# and not part of best.json's params.
NOT_SEARCHED = ("num_workers", "use_gpu", "cpus_per_worker", "verbose", "run_name",
                "storage_path", "max_failures", "keep_checkpoints", "eval_batch_size",
                "init_from")


@dataclass
class TuneConfig:
    """Options of ``ezsasrec tune`` (the training options of every trial are
    :class:`.train_loop.TrainConfig`'s, which the search space overrides)."""

    num_samples: int = option(12, "trials (configurations drawn from the space)", min=1)
    max_concurrent: int | None = option(None, "trials at once (default: the cluster's CPUs / "
                                              "--cpus-per-trial)", min=1)
    cpus_per_trial: int = option(1, "CPUs (and TensorFlow threads) of each trial", min=1)
    time_budget_min: float | None = option(None, "end the search after this many minutes "
                                                 "(running trials stop; default: no limit)")
    space: str | None = option(None, "YAML file whose entries replace the default search "
                                     "space's, e.g. 'lr: {loguniform: [0.0005, 0.003]}' or "
                                     "'dim: 64' (fixed); default: none, the default space")
    grace_rounds: int = option(2, "validation rounds every trial runs before ASHA may stop it",
                               min=1)
    reduction_factor: int = option(2, "ASHA: keep the best 1/this of the trials at each rung",
                                   min=2)
    search_seed: int = option(0, "seed of the draws (which configurations are tried)")
    refit: bool = option(True, "then train the best configuration on the validation targets too "
                               "(holdout test) for its best epoch count, into OUTPUT/model")
    resume: bool = option(True, "resume an unfinished search of the same output and options "
                                "(--no-resume: start it afresh)")

    def __post_init__(self):
        check_instance(self)
        if self.time_budget_min is not None and self.time_budget_min <= 0:
            raise EzSASRecError(f"--time-budget-min must be > 0, got {self.time_budget_min!r}")


# --------------------------------------------------------------------------------------------
# The search space


def read_space(path: str | None) -> dict:
    """The default space with the entries of a YAML file replacing its own."""
    import yaml

    space = json.loads(json.dumps(SEARCH_SPACE))
    if path is None:
        return space
    try:
        with open(path) as f:
            override = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise EzSASRecError(f"--space {path}: cannot read it as YAML ({exc})") from None
    if not isinstance(override, dict):
        raise EzSASRecError(f"--space {path}: expected a mapping of option: entry, "
                            f"got {override!r}")
    space.update(override)
    return space


def check_space(space: dict, base: TrainConfig, source: str) -> dict:
    """Every entry names a searchable training option and every value it can draw is one that
    option accepts; a fixed value (not a mapping) stays fixed."""
    searchable = set(asdict(base)) - set(NOT_SEARCHED)
    for key, entry in space.items():
        if key not in searchable:
            raise EzSASRecError(f"{source}: {key!r} is not a searchable training option "
                                f"(searchable: {', '.join(sorted(searchable))})")
        values = [entry]
        if isinstance(entry, dict):
            if len(entry) != 1 or next(iter(entry)) not in SAMPLERS:
                raise EzSASRecError(f"{source}: {key}: expected one of {', '.join(SAMPLERS)} "
                                    f"with its values, e.g. {{choice: [1, 2]}}, got {entry!r}")
            (sampler, values), = entry.items()
            if not isinstance(values, list) or not values or \
                    (sampler not in ("choice", "grid") and len(values) != 2):
                wanted = "[low, high]" if sampler not in ("choice", "grid") else "a list of values"
                raise EzSASRecError(f"{source}: {key}: {sampler} takes {wanted}, got {values!r}")
        for value in values:
            try:
                TrainConfig(**{**asdict(base), key: value})
            except (EzSASRecError, TypeError, ValueError) as exc:
                raise EzSASRecError(f"{source}: {key}: {exc}") from None
    return space


def fit_to_data(space: dict, longest: int) -> dict:
    """``maxlen`` values beyond the longest training history dropped (the first one kept)."""
    entry = space.get("maxlen")
    if isinstance(entry, dict) and next(iter(entry)) in ("choice", "grid"):
        (sampler, values), = entry.items()
        space = {**space, "maxlen": {sampler: [m for m in values
                                                if m <= max(longest, values[0])]}}
    return space


def _tune_space(space: dict) -> dict:
    """Ray Tune's sampling objects for the entries of a space."""
    from ray import tune

    samplers = {"choice": lambda v: tune.choice(v), "grid": lambda v: tune.grid_search(v),
                "uniform": lambda v: tune.uniform(*v),
                "loguniform": lambda v: tune.loguniform(*v),
                "randint": lambda v: tune.randint(v[0], v[1] + 1)}
    return {key: samplers[next(iter(entry))](next(iter(entry.values())))
            if isinstance(entry, dict) else entry for key, entry in space.items()}


# --------------------------------------------------------------------------------------------
# One trial (runs in a Ray Tune worker process)


def trial_options(base: dict, params: dict) -> dict:
    """A trial's training options: the base options with the drawn values in place."""
    return {**base, **params, "verbose": False}


def _trial(params: dict, inputs: dict):
    options = trial_options(inputs["train"], params)
    config = TrainConfig(**options)
    loop_config = {"train": options, "model": config.model_config(inputs["num_items"]).to_dict(),
                   "threads": inputs["threads"], "valid_path": inputs["valid_path"],
                   "popularity_path": inputs["popularity_path"]}
    run_worker(loop_config, TuneSession(inputs["sequences_path"]))


# --------------------------------------------------------------------------------------------
# The driver


def tune(data: str, output: str, *, train_options: dict | None = None,
         address: str | None = None, overwrite: bool = False, log=print, **options) -> dict:
    """Search training options on ``data``; write the trials and best.json to ``output``.

    ``train_options`` are the base training options of every trial (those of
    :class:`.train_loop.TrainConfig`); ``options`` those of :class:`TuneConfig`. Returns the
    content of best.json.
    """
    import ray

    config, base = TuneConfig(**options), TrainConfig(**(train_options or {}))
    _check_base(base)
    prepared = load_prepared(data)
    share = prepared.valid_share(base.valid_users)
    sequences = prepared.training_sequences(base.holdout, share)
    lengths = np.diff(sequences.offsets.to_numpy())
    space = fit_to_data(check_space(read_space(config.space), base, config.space or "space"),
                        int(lengths.max(initial=1)))
    outputs.check_output(output, overwrite)
    init_ray(address)
    storage = os.path.abspath(base.storage_path or os.path.join(
        os.path.dirname(os.path.abspath(output)), ".ezsasrec_runs"))
    name = f"tune-{os.path.basename(os.path.abspath(output))}"
    threads = config.cpus_per_trial
    concurrent = config.max_concurrent or max(
        1, int(ray.cluster_resources().get("CPU", 1)) // threads)
    inputs_dir = os.path.join(storage, name + "-inputs")
    record = {"tune": asdict(config), "train": asdict(base), "space": space,
              "vocab": prepared.vocab_fingerprint()}
    resuming = _prepare_experiment(storage, name, record, config.resume, log)
    inputs = {"train": asdict(base), "num_items": prepared.num_items,
              "threads": threads, "sequences_path": os.path.join(inputs_dir, "sequences.npz"),
              **write_worker_inputs(prepared, base.holdout, inputs_dir, share)}
    inputs["train"]["cpus_per_worker"] = threads
    save_sequences(inputs["sequences_path"], sequences.values.to_numpy(),
                   sequences.offsets.to_numpy())
    started = time.time()
    tuner = _tuner(config, space, inputs, storage, name, concurrent, resuming, log)
    results = tuner.fit()
    rows = trial_rows(results, space, base)
    if not any(r["status"] == "done" for r in rows):
        errors = [r["error"] for r in rows if r.get("error")]
        raise EzSASRecError(f"tune: no trial finished{': ' + errors[0] if errors else ''}")
    best = _best_record(rows, base, threads, prepared, space, time.time() - started)
    best["baselines"] = valid_baselines(prepared, base.holdout, share)
    _write_output(output, overwrite, rows, best, space)
    for path in (os.path.join(storage, name), inputs_dir):
        shutil.rmtree(path, ignore_errors=True)  # the search is published: no resume needed
    return best


def _check_base(base: TrainConfig):
    if base.holdout != "valid":
        raise EzSASRecError(f"--holdout {base.holdout}: tune ranks trials on validation "
                            "NDCG@10; use --holdout valid (the refit trains on the rest)")
    if base.init_from:
        raise EzSASRecError(f"--init-from {base.init_from}: tune trials start from scratch "
                            "(compare configurations on equal terms); drop --init-from")
    if base.num_workers != 1:
        raise EzSASRecError(f"--num-workers {base.num_workers}: each tune trial is one worker; "
                            "give trials more CPUs with --cpus-per-trial")


def _prepare_experiment(storage: str, name: str, record: dict, resume: bool, log) -> bool:
    """True when an unfinished search of the same options is resumed. One started with
    other options is an error (a one-line way out), unless ``resume`` is off, which starts
    afresh (only this project's experiment directories are removed)."""
    from ray import tune

    path, inputs_dir = os.path.join(storage, name), os.path.join(storage, name + "-inputs")
    record_path = os.path.join(inputs_dir, "search.json")
    previous = None
    if os.path.exists(record_path):
        with open(record_path) as f:
            previous = json.load(f)
    if resume and previous is not None and tune.Tuner.can_restore(path):
        if previous != json.loads(json.dumps(record)):
            raise EzSASRecError(f"tune: an unfinished search in {path} was started with other "
                                "options or data; re-run it with the same ones, or start "
                                "afresh with --no-resume")
        log(f"resuming the unfinished search in {path}")
        return True
    for stale in (path, inputs_dir):
        shutil.rmtree(stale, ignore_errors=True)
    os.makedirs(inputs_dir)
    outputs.write_json_atomic(record_path, record)
    return False


def _tuner(config: TuneConfig, space: dict, inputs: dict, storage: str, name: str,
           concurrent: int, resuming: bool, log):
    """A Tuner (or the restored one) of one-worker trials under an ASHA scheduler."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    trainable = tune.with_resources(
        tune.with_parameters(_trial, inputs=inputs),
        {"cpu": config.cpus_per_trial, **({"gpu": 1} if inputs["train"]["use_gpu"] else {})})
    # our one line per trial instead of Tune's tables, and no warning about the checkpoint
    # snapshots that each validation round's report triggers (they are what makes resume work)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if resuming:
        return tune.Tuner.restore(os.path.join(storage, name), trainable,
                                  resume_unfinished=True, resume_errored=True)
    with quiet_native_logs():
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=10_000,
                                  grace_period=config.grace_rounds,
                                  reduction_factor=config.reduction_factor)
    return tune.Tuner(
        trainable, param_space=_tune_space(space),
        tune_config=tune.TuneConfig(
            metric=METRIC, mode="max", scheduler=scheduler, num_samples=config.num_samples,
            trial_dirname_creator=_trial_name, trial_name_creator=_trial_name,
            search_alg=BasicVariantGenerator(random_state=config.search_seed,
                                             max_concurrent=concurrent),
            time_budget_s=config.time_budget_min * 60 if config.time_budget_min else None),
        run_config=tune.RunConfig(
            name=name, storage_path=storage, verbose=0, callbacks=[_TrialLines(log)],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))


def _trial_name(trial) -> str:
    return trial.trial_id


class _TrialLines:
    """One line per finished trial (Ray Tune's own progress tables are off: verbose=0)."""

    def __new__(cls, log):
        from ray.tune import Callback

        class TrialLines(Callback):
            def on_trial_complete(self, iteration, trials, trial, **info):
                result = trial.last_result or {}
                log(f"trial {trial.trial_id}: {_short(trial.config)} -> best valid "
                    f"{METRIC} {result.get('best_' + METRIC, float('nan')):.4f} after "
                    f"{result.get('training_iteration', 0)} rounds")

            def on_trial_error(self, iteration, trials, trial, **info):
                log(f"trial {trial.trial_id}: failed ({_short(trial.config)})")

        return TrialLines()


def _short(params: dict) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in params.items())


# --------------------------------------------------------------------------------------------
# Reading the trials


def trial_rows(results, space: dict, base: TrainConfig) -> list[dict]:
    """One row per trial: its drawn values, its best round, and why it stopped."""
    rows = []
    for result in results:
        params = {k: result.config.get(k) for k in space}
        row = {"trial": os.path.basename(result.path or "?"), **params}
        frame = result.metrics_dataframe
        if result.error is not None or frame is None or METRIC not in frame:
            rows.append({**row, "status": "error", "error": str(result.error).splitlines()[0]
                         if result.error else "no report"})
            continue
        best = frame.loc[frame[METRIC].idxmax()]
        last = frame.iloc[-1]
        options = TrainConfig(**trial_options(asdict(base), params))
        rows.append({**row, "status": "done", f"valid_{METRIC}": float(best[METRIC]),
                     "valid_HR@10": float(best.get("valid_HR@10", float("nan"))),
                     "best_epoch": int(best["epoch"]), "best_steps": int(best["total_steps"]),
                     "rounds": len(frame), "epochs": int(last["epoch"]),
                     "train_seconds": round(float(last["train_seconds_total"]), 1),
                     "stopped_by": _stopped_by(options, last),
                     "curve": [[int(s), float(v)] for s, v in
                               zip(frame["total_steps"], frame[METRIC])]})
    return rows


def _stopped_by(options: TrainConfig, last) -> str:
    """Why a trial ended, from its last report: its own rules, else the scheduler."""
    if int(last["epoch"]) >= options.epochs:
        return "epochs"
    if int(last["bad_rounds"]) >= options.patience and int(last["total_steps"]) >= \
            options.min_steps:
        return "patience"
    if options.time_budget_s and float(last["train_seconds_total"]) >= options.time_budget_s:
        return "time budget"
    return "scheduler"


def _best_record(rows: list[dict], base: TrainConfig, threads: int, prepared, space: dict,
                 seconds: float) -> dict:
    """best.json: the best trial's complete training options and what it reached."""
    done = [r for r in rows if r["status"] == "done"]
    best = max(done, key=lambda r: r[f"valid_{METRIC}"])
    options = asdict(TrainConfig(**trial_options(asdict(base), {k: best[k] for k in space})))
    params = {k: v for k, v in options.items() if k not in NOT_SEARCHED}
    params["cpus_per_worker"] = threads  # the trial's thread count: the same numbers again
    return {"params": params, "searched": {k: best[k] for k in space}, "trial": best["trial"],
            "valid": {METRIC: best[f"valid_{METRIC}"], "HR@10": best["valid_HR@10"]},
            "best_epoch": best["best_epoch"], "best_steps": best["best_steps"],
            "data": prepared.uri or os.path.abspath(prepared.path),
            "vocab_fingerprint": prepared.vocab_fingerprint(),
            "trials": len(rows), "trials_done": len(done),
            "stopped_by_scheduler": sum(r.get("stopped_by") == "scheduler" for r in rows),
            "tune_seconds": round(seconds, 1)}


# --------------------------------------------------------------------------------------------
# Writing the output


def _write_output(output: str, overwrite: bool, rows: list[dict], best: dict, space: dict):
    with outputs.writing(output, overwrite=overwrite, kind="tune") as pending:
        columns = list(dict.fromkeys(k for r in rows for k in r if k != "curve"))
        with open(os.path.join(pending.tmp, "trials.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, restval="", extrasaction="ignore")
            writer.writeheader()
            writer.writerows(sorted(rows, key=lambda r: -r.get(f"valid_{METRIC}", -1.0)))
        for file, obj in (("best.json", best), ("space.json", space)):
            with open(os.path.join(pending.tmp, file), "w") as f:
                json.dump(obj, f, indent=2)
        _plot_trials(rows, best, os.path.join(pending.tmp, "trials.png"))


def _plot_trials(rows: list[dict], best: dict, path: str):
    """Each trial's validation NDCG@10 by optimizer step; trials the scheduler stopped are
    dashed, the best is thick; the Markov and popularity baselines as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for row in rows:
        if row["status"] != "done":
            continue
        steps, values = zip(*row["curve"])
        is_best = row["trial"] == best["trial"]
        ax.plot(steps, values, marker=".", linewidth=2.5 if is_best else 1,
                linestyle="--" if row["stopped_by"] == "scheduler" else "-",
                label="best" if is_best else None, color="C1" if is_best else "C0",
                alpha=1.0 if is_best else 0.5)
    for (name, label), color in zip((("popularity", "popularity"), ("markov", "Markov")),
                                    ("C2", "C3")):
        value = best.get("baselines", {}).get(name, {}).get(METRIC)
        if value is not None:
            ax.axhline(value, linestyle=":", color=color, label=label)
    ax.set(xlabel="optimizer steps", ylabel=f"validation {METRIC}",
           title=f"{len(rows)} trials (dashed: stopped by ASHA)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def refit_options(best: dict) -> dict:
    """The final model's training options: the best trial's, trained on the validation targets
    too (holdout test, so no validation) for the epochs that were best on validation."""
    return {**best["params"], "holdout": "test", "epochs": best["best_epoch"],
            "time_budget_s": None}


def print_best(best: dict, stream=sys.stdout):
    print(f"best of {best['trials']} trials ({best['stopped_by_scheduler']} stopped early by "
          f"ASHA, {best['tune_seconds']:.0f} s): valid {METRIC} {best['valid'][METRIC]:.4f} "
          f"at epoch {best['best_epoch']} with {_short(best['searched'])}", file=stream)
