"""The nightly pipeline: prepare -> [tune] -> train -> evaluate -> score, from one YAML config.

``jobs/*.py`` only call :func:`main`. The config (``jobs/config.example.yaml`` documents every
key) has ``workdir``, ``ray`` and one section per stage, whose keys are the fields of that
stage's config dataclass; it is checked whole before any stage starts. Under ``workdir``:
``prepared/``, ``tune/`` (when ``tune.enabled``), ``model/``, ``evaluation.json``, ``scores/<date>/``, the ``scores/latest``
pointer (written last), ``runs/`` (checkpoints), ``stamps/`` and ``.pipeline.lock``.
A stage is skipped when its stamp's fingerprint (inputs and options) matches and its output
is still the one recorded; the tune stage also while the data has not drifted (users, items
or events changed by more than ``tune.drift`` since the search), and training then starts
from its ``best.json``. Layout, re-runs and failures: docs/internals.md, "pipeline".
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import functools
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .errors import EzSASRecError, find_user_error, quiet_ray_data_errors
from .options import check_values, defaults, option, yaml_keys
from .outputs import write_json_atomic
from .runtime import quiet_ray_data_progress, quiet_ray_logs

STAGES = ("prepare", "tune", "train", "evaluate", "score")
SECTIONS = ("workdir", "ray", *STAGES)
RAY_KEYS = ("address",)
DEFAULT_RUN_NAME = "pipeline-train"
STAMP_VERSION = 1
NIGHTS_KEPT = 3  # published nights kept under nights/ (the newest; a rollback needs one)
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
# Arguments the pipeline sets itself (paths come from workdir, Ray from the ray section).
_MANAGED = {
    "prepare": ("output", "overwrite", "address"),
    "tune": ("refit",),  # the train stage trains the final model
    "train": ("data", "output", "overwrite", "address", "init_from"),
    "evaluate": ("data", "model"),
    "score": ("model", "data", "output", "overwrite", "address"),
}
# TrainConfig fields that do not change the model (left out of train's fingerprint).
_TRAIN_NOT_RESULT = ("verbose", "storage_path", "run_name", "max_failures", "keep_checkpoints",
                     "eval_batch_size")


# --------------------------------------------------------------------------------------------
# Config: loading, overrides, validation


@dataclass
class PipelineConfig:
    """A loaded config. Stage sections hold only keys the library accepts."""

    source: str  # the config file, for messages
    workdir: str
    address: str | None = None
    prepare: dict = field(default_factory=dict)
    tune: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    evaluate: dict = field(default_factory=dict)
    score: dict = field(default_factory=dict)

    @property
    def prepared_dir(self) -> str:
        return os.path.join(self.workdir, "prepared")

    @property
    def tune_dir(self) -> str:
        return os.path.join(self.workdir, "tune")

    @property
    def tuned(self) -> bool:
        return bool(self.tune.get("enabled"))

    @property
    def model_dir(self) -> str:
        return os.path.join(self.workdir, "model")

    @property
    def evaluation_path(self) -> str:
        return os.path.join(self.workdir, "evaluation.json")

    @property
    def scores_dir(self) -> str:
        return os.path.join(self.workdir, "scores")

    @property
    def latest_path(self) -> str:
        return os.path.join(self.scores_dir, "latest")

    @property
    def nights_dir(self) -> str:
        return os.path.join(self.workdir, "nights")

    @property
    def stamps_dir(self) -> str:
        return os.path.join(self.workdir, "stamps")

    @property
    def storage_path(self) -> str:
        return os.path.abspath(self.train.get("storage_path") or os.path.join(self.workdir, "runs"))


def section_classes() -> dict[str, type]:
    """Each stage section's config class: the section's keys are its fields (less the ones the
    pipeline sets itself), checked by :func:`.options.check_values`."""
    from .evaluate import EvaluateConfig
    from .prepare import PrepareConfig
    from .score import ScoreConfig
    from .train import TrainConfig
    from .tune import TuneConfig

    return {"prepare": PrepareConfig, "tune": _tune_section(TuneConfig),
            "train": _train_section(TrainConfig),
            "evaluate": _evaluate_section(EvaluateConfig), "score": ScoreConfig}


GATE_KEYS = ("min_ndcg", "min_vs_markov", "min_vs_previous")
TUNE_KEYS = ("enabled", "drift")  # the tune section's keys that are the pipeline's own
# training options a tune trial cannot take (each trial is one worker, run by Tune)
_NOT_IN_TRIALS = ("num_workers", "cpus_per_worker", "run_name", "verbose", "max_failures",
                  "keep_checkpoints", "warm_start")


@functools.cache
def _train_section(base: type) -> type:
    """The train section: train()'s options plus the night's warm start."""

    @dataclass
    class TrainSection(base):
        warm_start: bool = option(False, "start from the last published night's model (items "
                                         "joined by raw id; a cold start on the first night)")

    return TrainSection


@functools.cache
def _tune_section(base: type) -> type:
    """The tune section: tune()'s options plus when the pipeline runs the search."""

    @dataclass
    class TuneSection(base):
        enabled: bool = option(False, "run the tune stage: search on the first night, then "
                                      "again when asked (--force tune) or when the data drifts; "
                                      "training starts from tune/best.json")
        drift: float = option(0.25, "search again when users, items or events changed by more "
                                    "than this share since the last search", min=0)

    return TuneSection


def data_profile(prepared_dir: str) -> dict:
    """The sizes of a prepared dataset that decide whether a search still holds."""
    from .dataset import load_prepared

    counts = load_prepared(prepared_dir).manifest["counts"]
    return {k: counts[k] for k in ("users_kept", "items_kept", "events_kept")}


def drifted(before: dict, now: dict, share: float) -> bool:
    return any(abs(now[k] - before[k]) > share * max(before[k], 1) for k in now)


@functools.cache
def _evaluate_section(base: type) -> type:
    """The evaluate section: evaluate()'s options plus the night's quality gate."""

    @dataclass
    class EvaluateSection(base):
        min_ndcg: float | None = option(
            None, "quality gate: the model's test NDCG@10 must reach this, else the night "
                  "stops before scoring and scores/latest stays where it was", min=0)
        min_vs_markov: float | None = option(
            None, "quality gate: the model's test NDCG@10 must reach this multiple of the "
                  "Markov chain's", min=0)
        min_vs_previous: float | None = option(
            None, "quality gate: the model's test NDCG@10 must reach this multiple of that of "
                  "the night scores/latest points at", min=0)

    return EvaluateSection


def quality_gate(result: dict, gate: dict, previous: float | None = None) -> str | None:
    """Why an evaluation fails the gate (one line), or None when it passes. ``gate``: the
    section's ``min_*`` keys; ``previous``: the NDCG@10 of the night scores/latest names."""
    ndcg = result["model"]["NDCG@10"]
    checks = [("min_ndcg", 1.0, "the threshold"),
              ("min_vs_markov", result.get("markov", {}).get("NDCG@10"), "x the Markov chain's"),
              ("min_vs_previous", previous, "x the previous night's")]
    for key, base, what in checks:
        need = gate.get(key)
        if need is None or base is None:
            continue
        if ndcg < need * base:
            against = f"{need}" if key == "min_ndcg" else f"{need} {what} ({need * base:.4f})"
            return (f"quality gate evaluate.{key}: test NDCG@10 {ndcg:.4f} is below {against}; "
                    "scores/latest stays where it was")
    return None


def section_keys() -> dict[str, tuple[str, ...]]:
    """The keys each stage section accepts."""
    return {stage: tuple(k for k in yaml_keys(cls) if k not in _MANAGED[stage])
            for stage, cls in section_classes().items()}


def parse_override(text: str) -> tuple[list[str], object]:
    """``"train.epochs=3"`` -> (["train", "epochs"], 3). The value is read as YAML, so
    ``true``, ``0.5``, ``[1, 10]`` and ``null`` have their YAML types."""
    import yaml

    key, sep, value = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts) or len(parts) > 2:
        raise EzSASRecError(f"--set {text!r}: expected SECTION.KEY=VALUE (or workdir=PATH)")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return parts, parsed


def _read_yaml(path: str) -> dict:
    import yaml

    if not os.path.isfile(path):
        raise EzSASRecError(f"--config {path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise EzSASRecError(f"{path}: invalid YAML{where} "
                            f"({getattr(exc, 'problem', None) or exc})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise EzSASRecError(f"{path}: the config must be a mapping of sections, "
                            f"got {type(data).__name__}")
    return data


def load_config(path: str, overrides: Sequence[str] = (), *, workdir: str | None = None,
                address: str | None = None) -> PipelineConfig:
    """Read a YAML config, apply ``--set`` overrides (then ``workdir``/``address``) and check
    its structure. Values are checked by :func:`validate`."""
    raw = _read_yaml(path)
    for text in overrides:
        parts, value = parse_override(text)
        if parts[0] not in SECTIONS:
            raise EzSASRecError(f"--set {text}: unknown section {parts[0]!r} "
                                f"(sections: {', '.join(SECTIONS)})")
        if len(parts) == 1:
            raw[parts[0]] = value
        else:
            section = raw.get(parts[0])
            raw[parts[0]] = section = dict(section) if isinstance(section, dict) else {}
            section[parts[1]] = value
    if workdir is not None:
        raw["workdir"] = workdir
    if address is not None:
        raw.setdefault("ray", {})
        raw["ray"] = {**(raw["ray"] or {}), "address": address}
    for key in raw:
        if key not in SECTIONS:
            raise EzSASRecError(f"{path}: unknown section {key!r} "
                                f"(sections: {', '.join(SECTIONS)})")
    return _structure(path, raw)


def _structure(path: str, raw: dict) -> PipelineConfig:
    workdir = raw.get("workdir")
    if not isinstance(workdir, str) or not workdir.strip():
        raise EzSASRecError(f"{path}: workdir: a directory path is required, got {workdir!r}")
    if "://" in workdir and not workdir.startswith("file://"):
        raise EzSASRecError(f"{path}: workdir {workdir}: use a filesystem path every node can "
                            "see (outputs are renamed into place, which needs one)")
    sections = {}
    for name in ("ray", *STAGES):
        value = raw.get(name) or {}
        if not isinstance(value, dict):
            raise EzSASRecError(f"{path}: section '{name}' must be a mapping, "
                                f"got {type(value).__name__}")
        sections[name] = dict(value)
    for key in sections["ray"]:
        if key not in RAY_KEYS:
            raise EzSASRecError(f"{path}: unknown key {key!r} in section 'ray' (keys: address)")
    address = sections["ray"].get("address")
    if address is not None and not isinstance(address, str):
        raise EzSASRecError(f"{path}: ray.address: expected a string, got {address!r}")
    allowed = section_keys()
    for stage in STAGES:
        for key in sections[stage]:
            if key in _MANAGED[stage]:
                raise EzSASRecError(f"{path}: key {key!r} in section '{stage}' is set by the "
                                    "pipeline (paths come from workdir, Ray from ray.address)")
            if key not in allowed[stage]:
                raise EzSASRecError(f"{path}: unknown key {key!r} in section '{stage}'")
    return PipelineConfig(source=path, workdir=os.path.abspath(workdir.removeprefix("file://")),
                          address=address, **{s: sections[s] for s in STAGES})


def _named(stage: str, message: str) -> str:
    """A library message names options CLI-style (``--epochs``); name them as in the config."""
    return re.sub(r"--([a-z][a-z0-9-]*)",
                  lambda m: f"{stage}.{m.group(1).replace('-', '_')}", message)


def validate(config: PipelineConfig, stages: Sequence[str] = STAGES) -> PipelineConfig:
    """Check every value of every section (and, when prepare runs, that its input exists):
    each section against its config class (types, choices, limits: one definition, in
    :mod:`.options`), then the configs' own cross-field checks. Raises a one-line
    EzSASRecError naming ``<section>.<key>``."""
    from .readers import list_input_files

    src = config.source
    classes = section_classes()
    if "input" in config.prepare and config.prepare["input"] is None:
        del config.prepare["input"]  # needed only when prepare runs (checked below)
    for stage in STAGES:  # normalizes in place: e.g. a column position becomes its text
        check_values(classes[stage], getattr(config, stage), source=f"{src}: {stage}")
    managed = {"prepare": {"input": config.prepare.get("input") or "",
                           "output": config.prepared_dir}}
    for stage in STAGES:
        try:
            built = classes[stage](**{**getattr(config, stage), **managed.get(stage, {})})
            if stage == "train":
                built.model_config(num_items=1)
        except EzSASRecError as exc:
            raise EzSASRecError(f"{src}: {_named(stage, exc.message)}") from None
    if "prepare" in stages:
        if not config.prepare.get("input"):
            raise EzSASRecError(f"{src}: prepare.input: the raw log to read is required")
        try:
            list_input_files(config.prepare["input"])
        except EzSASRecError as exc:
            raise EzSASRecError(f"{src}: prepare.input: {exc.message}") from None
    if config.tuned and config.train.get("holdout", "valid") != "valid":
        raise EzSASRecError(f"{src}: train.holdout: the tune stage ranks trials on validation "
                            "NDCG@10; keep holdout valid while tune.enabled is true")
    if "evaluate" in stages and config.train.get("holdout") == "none":
        raise EzSASRecError(f"{src}: train.holdout: 'none' trains on the test targets, so the "
                            "evaluate stage cannot measure the model")
    for key in ("users", "exclude_items", "candidates"):
        value = config.score.get(key)
        if isinstance(value, str) and not os.path.isfile(value):
            raise EzSASRecError(f"{src}: score.{key}: file not found: {value}")
    return config


# --------------------------------------------------------------------------------------------
# Fingerprints and output ids


def _digest(obj) -> str:
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def input_files(source: str) -> list[list]:
    """The files a prepare input expands to, as ``[uri, size, mtime_ns]`` (read no bytes)."""
    from .readers import _resolve, list_input_files

    files = list_input_files(source)
    rows = []
    for uri in files:
        fs, path = _resolve(uri)
        info = fs.get_file_info(path)
        mtime = info.mtime_ns if info.mtime is not None else None
        rows.append([uri, info.size, mtime])
    return rows


def prepared_id(path: str) -> str | None:
    """Id of a prepared dataset: the hash of its content hashes; None if absent/incomplete."""
    from .dataset import load_prepared

    try:
        return _digest(load_prepared(path).manifest["content_hashes"])
    except (EzSASRecError, KeyError, OSError):
        return None


def model_id(path: str) -> str | None:
    """Id of a model directory: its config, weights and vocabularies; None if absent."""
    from .dataset import sha256_file
    from .model_io import WEIGHTS_FILE, read_model_dir

    try:
        model_config, metadata = read_model_dir(path)
        weights = sha256_file(os.path.join(path, WEIGHTS_FILE))
    except (EzSASRecError, OSError, ValueError):
        return None
    return _digest({"config": model_config, "weights": weights,
                    "vocab": metadata.get("vocab_fingerprint")})


def _file_id(path: str) -> str | None:
    from .dataset import sha256_file

    return sha256_file(path) if os.path.isfile(path) else None


def tune_id(path: str) -> str | None:
    """Id of a tune output: its best.json's hash, when complete (_SUCCESS present)."""
    if not os.path.exists(os.path.join(path, "_SUCCESS")):
        return None
    return _file_id(os.path.join(path, "best.json"))


def scores_id(path: str) -> str | None:
    """Id of a scores directory: its manifest's hash, when complete (_SUCCESS present)."""
    if not os.path.exists(os.path.join(path, "_SUCCESS")):
        return None
    return _file_id(os.path.join(path, "manifest.json"))




def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def latest_scores(workdir: str) -> str:
    """The directory ``<workdir>/scores/latest`` points to."""
    pointer = _read_json(os.path.join(workdir, "scores", "latest"))
    if not pointer or "date" not in pointer:
        raise EzSASRecError(f"{workdir}/scores/latest: no scores published yet")
    return os.path.join(workdir, "scores", pointer["date"])


# --------------------------------------------------------------------------------------------
# Running stages


@dataclass
class StagePlan:
    """One stage of a run: what it reads, with which options, and where it writes."""

    name: str
    inputs: dict
    options: dict
    output: str
    stamp_path: str
    output_id: Callable[[str], str | None]
    run: Callable[[str], dict]  # fingerprint -> details for the stamp

    @property
    def fingerprint(self) -> str:
        return _digest({"stage": self.name, "inputs": self.inputs, "options": self.options})


class StageFailed(Exception):
    """A stage raised; ``stage`` names it, the original exception is the cause."""

    def __init__(self, stage: str, exc: BaseException):
        self.stage = stage
        super().__init__(f"stage {stage} failed: {type(exc).__name__}: {exc}")


def _why_run(plan: StagePlan, stamp: dict | None, current_id: str | None,
             force: bool) -> str | None:
    """None when the stage can be skipped, else the reason to run it."""
    if force:
        return "forced"
    if current_id is None:
        return "no output yet"
    if stamp is None:
        return "no stamp for the existing output"
    if stamp.get("output_id") != current_id:
        return "output changed since its stamp"
    if stamp.get("fingerprint") == plan.fingerprint:
        return None
    if stamp.get("inputs") != json.loads(json.dumps(plan.inputs, default=str)):
        return "inputs changed"
    return "options changed"


def _actor_nodes(class_part: str) -> dict:
    """``{"nodes": {node_id: actors}}`` of this driver's actors whose class name contains
    ``class_part`` (from the Ray state API, which needs the dashboard), or
    ``{"unavailable": reason}``. Dead actors are listed too, so this works after a stage."""
    try:
        import ray
        from ray.util.state import list_actors

        context = ray.get_runtime_context()
        actors = list_actors(address=context.gcs_address, limit=10_000, timeout=15,
                             filters=[("job_id", "=", context.get_job_id())],
                             raise_on_missing_output=False)
        nodes = Counter(a.node_id for a in actors if class_part in (a.class_name or ""))
        ours = {n["NodeID"] for n in ray.nodes()}
        if not nodes or not set(nodes) <= ours:  # no dashboard: a default URL may be another's
            return {"class": class_part, "unavailable": "no such actors in this cluster's "
                                                        "state API"}
        return {"class": class_part, "nodes": dict(nodes)}
    except Exception as exc:  # noqa: BLE001 - recording placement must never fail a stage
        return {"class": class_part, "unavailable": f"{type(exc).__name__}: {exc}"[:300]}


def _cluster_nodes() -> list[dict]:
    import ray

    if not ray.is_initialized():
        return []
    return [{"node_id": n["NodeID"], "ip": n.get("NodeManagerAddress"),
             "cpus": n.get("Resources", {}).get("CPU", 0), "gpus": n.get("Resources", {}).get(
                 "GPU", 0)} for n in ray.nodes() if n.get("Alive")]


class Pipeline:
    """The stages of one run over one validated config."""

    def __init__(self, config: PipelineConfig, *, date: str, log=print):
        self.config = config
        self.date = date
        self.log = log

    # plans: each built only when its stage is reached (inputs are upstream outputs)

    def plan_prepare(self) -> StagePlan:
        from .prepare import PrepareConfig

        c = self.config
        opts = {k: v for k, v in c.prepare.items() if k not in ("input", "verbose")}
        options = PrepareConfig(input=c.prepare["input"], output=c.prepared_dir,
                                **opts).options()

        def run(_fingerprint):
            from .prepare import prepare

            manifest = prepare(c.prepare["input"], c.prepared_dir, address=c.address,
                               overwrite=True, verbose=c.prepare.get("verbose", True), **opts)
            return {"counts": manifest["counts"], "vocab": manifest["vocab"]}

        return StagePlan("prepare", {"input": c.prepare["input"],
                                     "files": input_files(c.prepare["input"])},
                         options, c.prepared_dir, self._stamp("prepare"), prepared_id, run)

    def plan_tune(self) -> StagePlan:
        from .tune import TuneConfig

        c = self.config
        opts = {k: v for k, v in c.tune.items() if k not in TUNE_KEYS}
        base = {**{k: v for k, v in c.train.items() if k not in _NOT_IN_TRIALS},
                "storage_path": c.storage_path}
        options = {"tune": self._with_defaults(TuneConfig, opts), "train": base}
        self._require(prepared_id, c.prepared_dir, "prepare")
        profile = data_profile(c.prepared_dir)
        tuned_on = ((_read_json(self._stamp("tune")) or {}).get("inputs") or {}).get("profile")
        if tuned_on and not drifted(tuned_on, profile, c.tune.get("drift", 0.25)):
            profile = tuned_on  # within the drift: the search still holds (same fingerprint)

        def run(_fingerprint):
            from .tune import tune

            best = tune(c.prepared_dir, c.tune_dir, train_options=base, address=c.address,
                        overwrite=True, log=self.log, refit=False, **opts)
            return {"valid": best["valid"], "searched": best["searched"],
                    "best_epoch": best["best_epoch"], "trials": best["trials"],
                    "tune_seconds": best["tune_seconds"]}

        return StagePlan("tune", {"profile": profile}, options, c.tune_dir, self._stamp("tune"),
                         tune_id, run)

    def train_options(self) -> dict:
        """The train section, over tune/best.json's params when the tune stage is on."""
        c = self.config
        section = {k: v for k, v in c.train.items() if k != "warm_start"}
        parent = self.parent_model() if c.train.get("warm_start") else None
        if parent:
            section["init_from"] = parent
        if not c.tuned:
            return section
        from .train_loop import read_params

        best = os.path.join(c.tune_dir, "best.json")
        self._require(tune_id, c.tune_dir, "tune")
        params = {k: v for k, v in read_params(best).items() if k not in _NOT_IN_TRIALS}
        return {**params, **section}  # keys the train section sets win

    def parent_model(self) -> str | None:
        """The last published night's model (a warm start's parent), if there is one."""
        model = (_read_json(self.config.latest_path) or {}).get("model")
        return model if model and os.path.isdir(model) else None

    def plan_train(self) -> StagePlan:
        from .train import TrainConfig

        c = self.config
        train_options = self.train_options()
        options = {k: v for k, v in dataclasses.asdict(TrainConfig(**train_options)).items()
                   if k not in _TRAIN_NOT_RESULT}
        inputs = {"prepared": self._require(prepared_id, c.prepared_dir, "prepare")}
        if c.tuned:
            inputs["tune"] = tune_id(c.tune_dir)
        if train_options.get("init_from"):  # the parent by content, not by path
            inputs["parent"] = model_id(train_options["init_from"])
            options.pop("init_from")

        def run(fingerprint):
            from .train import train

            prefix = c.train.get("run_name") or DEFAULT_RUN_NAME
            run_name = f"{prefix}-{fingerprint[:12]}"
            stamp = _read_json(self._stamp("train"))
            if "train" in self.force or (stamp and stamp.get("fingerprint") == fingerprint):
                self._remove_run(run_name)  # finished before: start afresh, do not resume it
            opts = {k: v for k, v in train_options.items()
                    if k not in ("run_name", "storage_path")}
            metrics = train(c.prepared_dir, c.model_dir, address=c.address, overwrite=True,
                            run_name=run_name, storage_path=c.storage_path, **opts)
            placement = _actor_nodes("RayTrainWorker")
            self._remove_old_runs(prefix, run_name)
            return {"run": os.path.join(c.storage_path, run_name),
                    "best_epoch": metrics["best_epoch"], "epochs_run": metrics["epochs_run"],
                    "valid": metrics["valid"], "placement": placement}

        return StagePlan("train", inputs, options, c.model_dir, self._stamp("train"), model_id,
                         run)

    def plan_evaluate(self) -> StagePlan:
        from .evaluate import EvaluateConfig, evaluate

        c = self.config
        wanted = {k: v for k, v in c.evaluate.items() if k not in GATE_KEYS}  # the gate: after
        options = self._with_defaults(EvaluateConfig, wanted)
        inputs = {"prepared": self._require(prepared_id, c.prepared_dir, "prepare"),
                  "model": self._require(model_id, c.model_dir, "train")}

        def run(fingerprint):
            from .evaluate import format_table

            result = evaluate(c.prepared_dir, c.model_dir, **wanted)
            write_json_atomic(c.evaluation_path, {
                "kind": "ezsasrec_ray.evaluation", "data": c.prepared_dir, "model": c.model_dir,
                "options": options, "fingerprint": fingerprint, "result": result,
                "evaluated_at": _now()})
            self.log(format_table(result))
            return {"users": result["users"],
                    "NDCG@10": {k: result[k].get("NDCG@10") for k in ("model", "popularity",
                                                                        "markov") if k in result}}

        return StagePlan("evaluate", inputs, options, c.evaluation_path, self._stamp("evaluate"),
                         _file_id, run)

    def plan_score(self) -> StagePlan:
        from .score import ScoreConfig, recommend

        c = self.config
        options = self._with_defaults(ScoreConfig, c.score)
        options.pop("verbose", None)
        inputs = {"prepared": self._require(prepared_id, c.prepared_dir, "prepare"),
                  "model": self._require(model_id, c.model_dir, "train")}
        for key in ("users", "exclude_items", "candidates"):
            if isinstance(c.score.get(key), str):
                inputs[key] = _file_id(c.score[key])
        output = os.path.join(c.scores_dir, self.date)

        def run(_fingerprint):
            manifest = recommend(c.model_dir, c.prepared_dir, output=output, overwrite=True,
                                 address=c.address, **c.score)
            return {"counts": manifest["counts"], "timings": manifest["timings"],
                    "placement": _actor_nodes("BatchScorer")}

        return StagePlan("score", inputs, options, output, self._stamp(f"score-{self.date}"),
                         scores_id, run)

    # helpers

    def _stamp(self, name: str) -> str:
        return os.path.join(self.config.stamps_dir, f"{name}.json")

    @staticmethod
    def _require(id_fn, path: str, stage: str) -> str:
        value = id_fn(path)
        if value is None:
            raise EzSASRecError(f"{path}: missing or incomplete; run the {stage} stage first")
        return value

    @staticmethod
    def _with_defaults(cls, values: dict) -> dict:
        """The config class's defaults updated with the section's values (stable hashes)."""
        return json.loads(json.dumps({**defaults(cls), **values}, default=str))

    def _remove_run(self, run_name: str):
        for name in (run_name, f"{run_name}-inputs"):
            shutil.rmtree(os.path.join(self.config.storage_path, name), ignore_errors=True)

    def _remove_old_runs(self, prefix: str, keep: str):
        """Delete the checkpoints of this pipeline's earlier training runs (``prefix-<hex12>``)."""
        pattern = re.compile(re.escape(prefix) + r"-[0-9a-f]{12}(-inputs)?$")
        storage = self.config.storage_path
        for name in os.listdir(storage) if os.path.isdir(storage) else []:
            if pattern.match(name) and name not in (keep, f"{keep}-inputs"):
                shutil.rmtree(os.path.join(storage, name), ignore_errors=True)

    # running

    def run(self, stages: Sequence[str], force: Sequence[str] = (), check: bool = False) -> list:
        """Run (or with ``check``, only plan) ``stages`` in order -> one record per stage."""
        self.force = set(force)
        records = []
        upstream_reruns = False
        for name in stages:
            try:
                record = self._stage(name, check, upstream_reruns)
                if name == "evaluate" and not check:
                    self._check_gate()
            except Exception as exc:
                raise StageFailed(name, exc) from exc
            upstream_reruns |= record["status"] in ("would run", "ran")
            records.append(record)
            if name == "score" and not check:
                self._publish_night(record)
        return records

    def _stage(self, name: str, check: bool, upstream_reruns: bool) -> dict:
        if check and upstream_reruns and name != "prepare":
            self.log(f"[pipeline] {name}: would run (an earlier stage reruns)")
            return {"stage": name, "status": "would run", "reason": "an earlier stage reruns"}
        plan = getattr(self, f"plan_{name}")()
        stamp = _read_json(plan.stamp_path)
        current = plan.output_id(plan.output)
        reason = _why_run(plan, stamp, current, name in self.force)
        base = {"stage": name, "output": plan.output, "fingerprint": plan.fingerprint}
        if reason is None:
            self.log(f"[pipeline] {name}: skipped, {plan.output} is up to date "
                     f"(fingerprint {plan.fingerprint[:12]})")
            return {**base, "status": "skipped", "seconds": 0.0, "stamp": stamp}
        if check:
            self.log(f"[pipeline] {name}: would run ({reason})")
            return {**base, "status": "would run", "reason": reason}
        self.log(f"[pipeline] {name}: running ({reason}) -> {plan.output}")
        started = time.time()
        details = plan.run(plan.fingerprint)
        seconds = round(time.time() - started, 2)
        stamp = {"version": STAMP_VERSION, "stage": name, "fingerprint": plan.fingerprint,
                 "inputs": plan.inputs, "options": plan.options, "output": plan.output,
                 "output_id": plan.output_id(plan.output), "reason": reason,
                 "seconds": seconds, "finished_at": _now(), "nodes": _cluster_nodes(),
                 **details}
        write_json_atomic(plan.stamp_path, stamp)
        self.log(f"[pipeline] {name}: done in {seconds:.1f}s")
        return {**base, "status": "ran", "seconds": seconds, "stamp": stamp}

    def _check_gate(self):
        """The night's quality gate on evaluation.json (ran now or up to date)."""
        gate = {k: self.config.evaluate.get(k) for k in GATE_KEYS}
        if all(v is None for v in gate.values()):
            return
        evaluation = _read_json(self.config.evaluation_path) or {}
        previous = (_read_json(self.config.latest_path) or {}).get("NDCG@10")
        why = quality_gate(evaluation.get("result") or {"model": {"NDCG@10": 0.0}}, gate,
                           previous)
        if why:
            raise EzSASRecError(why)
        self.log("[pipeline] quality gate passed")

    def _publish_night(self, record: dict):
        """Publish the night as a whole: ``nights/<date>/`` holds its prepared data, model and
        evaluation (hard links: no copy of the bytes), then ``scores/latest`` moves to it, last.
        A night that fails before this leaves the last published night whole. A back-filled
        date is published but does not move ``scores/latest`` back."""
        c = self.config
        night = os.path.join(c.nights_dir, self.date)
        current = _read_json(c.latest_path)
        if current and current.get("date") == self.date and current.get("night") == night \
                and current.get("fingerprint") == record["fingerprint"] and os.path.isdir(night):
            return  # this night, published already
        self._write_night(night, record)
        if current and current.get("date", "") > self.date:
            self.log(f"[pipeline] scores/latest stays at {current['date']} (newer than "
                     f"{self.date}); this night is in {night}")
            return
        stamp = record.get("stamp") or {}
        write_json_atomic(c.latest_path, {
            "date": self.date, "path": record["output"], "night": night,
            "model": os.path.join(night, "model"), "data": os.path.join(night, "prepared"),
            "manifest": os.path.join(record["output"], "manifest.json"),
            "fingerprint": record["fingerprint"],
            "users_scored": (stamp.get("counts") or {}).get("users_scored"),
            # the night's test NDCG@10, for the next night's evaluate.min_vs_previous
            "NDCG@10": ((_read_json(c.evaluation_path) or {}).get("result") or {})
            .get("model", {}).get("NDCG@10"),
            "updated_at": _now()})
        self.log(f"[pipeline] scores/latest -> {self.date} ({night})")
        self._prune_nights(keep=night)

    def _write_night(self, night: str, record: dict):
        from .model_io import NIGHT_FILE
        from .outputs import writing

        c = self.config
        with writing(night, overwrite=True, kind="night") as pending:
            for name, source in (("prepared", c.prepared_dir), ("model", c.model_dir)):
                shutil.copytree(source, os.path.join(pending.tmp, name),
                                copy_function=_link_or_copy)
            if os.path.exists(c.evaluation_path):
                _link_or_copy(c.evaluation_path, os.path.join(pending.tmp, "evaluation.json"))
            write_json_atomic(os.path.join(pending.tmp, NIGHT_FILE), {
                "date": self.date, "prepared": prepared_id(c.prepared_dir),
                "model": model_id(c.model_dir), "scores": record["output"],
                "published_at": _now()})

    def _prune_nights(self, keep: str):
        """Keep the newest ``NIGHTS_KEPT`` nights (and the one latest names); older ones go.
        Only directories this project wrote are removed."""
        from .outputs import written_by_us

        root = self.config.nights_dir
        ours = sorted((d for d in os.listdir(root)
                       if _DATE.match(d) and written_by_us(os.path.join(root, d))), reverse=True)
        for date in ours[NIGHTS_KEPT:]:
            if os.path.join(root, date) != keep:
                shutil.rmtree(os.path.join(root, date), ignore_errors=True)


def _link_or_copy(source: str, target: str):
    """A hard link (outputs are replaced by rename, never rewritten, so a link keeps the
    night's bytes), or a copy across filesystems."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def check_date(text: str | None) -> str:
    """``YYYY-MM-DD`` (default: today in UTC) -> the same string, validated."""
    if text is None:
        return _dt.datetime.now(_dt.timezone.utc).date().isoformat()
    try:
        if not _DATE.match(text):
            raise ValueError
        _dt.date.fromisoformat(text)
    except ValueError:
        raise EzSASRecError(f"--date {text!r}: expected YYYY-MM-DD") from None
    return text




@contextlib.contextmanager
def workdir_lock(workdir: str):
    """One run at a time per workdir: an exclusive ``flock`` on ``<workdir>/.pipeline.lock``,
    which says who holds it (host, pid, start time). The kernel drops the lock when its
    process dies, so a killed run never blocks the next one and two runs can never both take
    over a stale lock; a second run fails with one line naming the holder."""
    path = os.path.join(workdir, ".pipeline.lock")
    os.makedirs(workdir, exist_ok=True)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started_at": _now()}
    fd = _acquire(path)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(me).encode())
        yield
    finally:
        os.unlink(path)  # before the unlock: a waiting run then opens a new file
        os.close(fd)


def _acquire(path: str) -> int:
    """An fd of ``path`` holding its exclusive lock, or a one-line error naming the holder."""
    import fcntl

    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = _read_json(path) or {}
            raise EzSASRecError(
                f"{path}: another pipeline run holds this workdir (pid {holder.get('pid')} on "
                f"{holder.get('host')} since {holder.get('started_at')})") from None
        try:  # the file we locked may have been unlinked by its last holder meanwhile
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def run_pipeline(config: PipelineConfig, *, stages: Sequence[str] = STAGES,
                 force: Sequence[str] = (), date: str | None = None, check: bool = False,
                 log=print) -> list[dict]:
    """Validate ``config`` and run ``stages`` (see the module docstring) -> one record per
    stage (``status``: ran | skipped | would run). Raises :class:`StageFailed`."""
    from . import __version__

    if config.train.get("holdout") == "none" and "evaluate" in stages:
        # a model trained on every event has seen the test targets: nothing to measure
        stages = [s for s in stages if s != "evaluate"]
        log("[pipeline] evaluate skipped: train.holdout is 'none' (the model trains on the "
            "test targets)")
    if not config.tuned:  # an optional stage, off unless tune.enabled
        stages = [s for s in stages if s != "tune"]
    validate(config, stages)
    date = check_date(date)
    package = os.path.dirname(os.path.abspath(__file__))
    log(f"[pipeline] ezsasrec_ray {__version__} from {package}; config {config.source}; "
        f"workdir {config.workdir}; date {date}; stages {', '.join(stages)}")
    pipeline = Pipeline(config, date=date, log=log)
    started = time.time()
    if check:
        records = pipeline.run(stages, force=force, check=True)
    else:
        with workdir_lock(config.workdir):
            records = pipeline.run(stages, force=force)
            write_json_atomic(os.path.join(config.stamps_dir, "last_run.json"), {
                "date": date, "config": os.path.abspath(config.source), "finished_at": _now(),
                "seconds": round(time.time() - started, 2),
                "stages": [{k: r.get(k) for k in ("stage", "status", "seconds", "output",
                                                  "fingerprint")} for r in records]})
    log(format_summary(records, date))
    return records


def format_summary(records: list[dict], date: str) -> str:
    lines = [f"{'stage':<10}{'status':<11}{'seconds':>9}  output"]
    for r in records:
        seconds = f"{r['seconds']:.1f}" if "seconds" in r else "-"
        lines.append(f"{r['stage']:<10}{r['status']:<11}{seconds:>9}  {r.get('output', '')}")
    width = max(len(line) for line in lines)
    return "\n".join([f"pipeline summary ({date})", "-" * width, *lines])


# --------------------------------------------------------------------------------------------
# Command line (jobs/*.py)


def build_parser(prog: str, stages: Sequence[str]) -> argparse.ArgumentParser:
    what = " -> ".join(stages)
    parser = argparse.ArgumentParser(
        prog=prog, description=f"ezsasrec_ray {what}, driven by a YAML config "
                               "(see jobs/config.example.yaml).")
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (read as YAML); repeatable, e.g. "
                             "--set train.epochs=3 --set score.top_n=50")
    parser.add_argument("--workdir", default=None, help="override workdir")
    parser.add_argument("--address", default=None, help="override ray.address")
    parser.add_argument("--date", default=None,
                        help="date of the scores directory, YYYY-MM-DD (default: today, UTC)")
    parser.add_argument("--force", nargs="*", choices=list(stages), default=None,
                        metavar="STAGE",
                        help="redo these stages even if up to date (no names: all of them)")
    parser.add_argument("--check", action="store_true",
                        help="validate the config and print what would run; run nothing")
    return parser


def main(argv: Sequence[str] | None = None, *, stages: Sequence[str] = STAGES,
         prog: str = "pipeline") -> int:
    """Entry point of ``jobs/*.py``: 0 on success; 2 with one line for a bad config or input;
    1 with the traceback and one closing line for anything else."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser(prog, stages).parse_args(argv)
    quiet_ray_data_errors()
    quiet_ray_logs()  # our own lines, Ray's warnings and errors; Ray's INFO lines in its logs
    quiet_ray_data_progress()
    force = () if args.force is None else (args.force or stages)
    try:
        config = load_config(args.config, args.set, workdir=args.workdir, address=args.address)
        run_pipeline(config, stages=stages, force=force, date=args.date, check=args.check,
                     log=lambda message: print(message, flush=True))
        return 0
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line for bad input, traceback otherwise
        stage = getattr(exc, "stage", None)
        where = f" in stage {stage}" if stage else ""
        user_error = find_user_error(exc)
        if user_error is not None:
            print(f"{prog}: error{where}: {user_error.message}", file=sys.stderr, flush=True)
            return 2
        cause = exc.__cause__ if isinstance(exc, StageFailed) and exc.__cause__ else exc
        traceback.print_exception(cause)
        reason = " ".join(f"{type(cause).__name__}: {cause}".split())
        print(f"{prog}: failed{where}: {reason[:500]}", file=sys.stderr, flush=True)
        return 1


__all__ = ["PipelineConfig", "STAGES", "StageFailed", "check_date", "latest_scores",
           "load_config", "main", "model_id", "prepared_id", "run_pipeline", "scores_id",
           "section_keys", "validate"]
