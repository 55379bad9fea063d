"""Loading a trained model directory (written by :func:`.train.train`), without pickle.

A model directory holds ``config.json`` + ``model.weights.h5`` (Keras 3 weights, HDF5),
``item_embeddings.npy``, the ``users/`` and ``items/`` vocabularies it was trained with,
``metrics.json``, ``history.csv`` and ``training_curves.png``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from types import SimpleNamespace

import numpy as np

from . import outputs
from .dataset import sha256_file
from .errors import EzSASRecError
from .storage import is_remote, local_dir, staged

MODEL_FORMAT_VERSION = 1
NIGHT_FILE = "night.json"  # in a pipeline's nights/<date>/: what that night published
CONFIG_FILE = "config.json"  # SASRecConfig as JSON
WEIGHTS_FILE = "model.weights.h5"  # Keras 3 weights (HDF5)


def read_model_dir(path: str) -> tuple[dict, dict]:
    """Check a model directory (local, or a URI: see :mod:`.storage`) without loading
    TensorFlow -> ``(config dict, metadata)``."""
    path = local_dir(path)
    metrics_path = os.path.join(path, "metrics.json")
    if not os.path.isdir(path):
        raise EzSASRecError(f"{path}: model directory not found")
    if not os.path.exists(metrics_path):
        raise EzSASRecError(f"{path}: not a model directory (no metrics.json)")
    metadata = _json_object(metrics_path)
    if metadata.get("kind") != "ezsasrec_ray.model" or \
            metadata.get("format_version") != MODEL_FORMAT_VERSION:
        raise EzSASRecError(f"{metrics_path}: unsupported model format "
                            f"{metadata.get('format_version')!r}")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not os.path.exists(os.path.join(path, name)):
            raise EzSASRecError(f"{path}: incomplete model directory ({name} missing)")
    return _json_object(os.path.join(path, CONFIG_FILE)), metadata


def _json_object(path: str) -> dict:
    """A JSON file holding an object, or a one-line error naming the file."""
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise EzSASRecError(f"{path}: unreadable JSON ({exc})") from None
    if not isinstance(value, dict):
        raise EzSASRecError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def load_model(path: str):
    """Load a model directory -> :class:`.model.SASRec` with ``.model_dir`` and ``.metadata``."""
    from .model import load_model_files

    path = local_dir(path)
    config, metadata = read_model_dir(path)
    model_config(path, config)  # a bad config.json is one line, before TensorFlow builds it
    model = load_model_files(path)
    model.model_dir = os.path.abspath(path)
    model.metadata = metadata
    return model


def check_vocab(model, data):
    """Refuse a model and a prepared dataset whose vocabularies differ."""
    metadata = getattr(model, "metadata", None)
    if not metadata:
        if model.config.num_items != data.num_items:
            raise EzSASRecError(f"model has {model.config.num_items} items but {data.path} has "
                                f"{data.num_items}: different vocabularies")
        return
    if metadata.get("vocab_fingerprint") != data.vocab_fingerprint():
        raise EzSASRecError(
            f"model {getattr(model, 'model_dir', '?')} was trained with other vocabularies than "
            f"{data.path} (vocab fingerprint differs); re-train or use the matching data")


def resolve_night(model: str, data: str | None = None) -> tuple[str, str | None]:
    """``(model directory, prepared dataset)`` for a ``model`` that names a pipeline night
    instead of a model directory: a workdir, its ``scores/latest`` pointer or one
    ``nights/<date>/``. A night's model and data were published together, so a server that
    reads through it never pairs tonight's data with last night's model; ``data``, when given,
    is kept. Any other path comes back as it is."""
    night = None
    if is_remote(model):  # a model directory on object storage (nights stay on a filesystem)
        return model, data
    if os.path.isfile(model) or os.path.isfile(os.path.join(model, "scores", "latest")):
        pointer = model if os.path.isfile(model) else os.path.join(model, "scores", "latest")
        night = _json_object(pointer).get("night")
        if not night:
            raise EzSASRecError(f"{pointer}: names no published night (written by an older "
                                "pipeline?); give the model directory")
    elif os.path.isfile(os.path.join(model, NIGHT_FILE)):
        night = model
    if night is None:
        return model, data
    _json_object(os.path.join(night, NIGHT_FILE))  # a night in place, or one line
    return os.path.join(night, "model"), data or os.path.join(night, "prepared")


def model_info(path: str) -> SimpleNamespace:
    """What the driver needs of a model directory (its config and metadata; no weights)."""
    path = local_dir(path)
    config, metadata = read_model_dir(path)
    return SimpleNamespace(config=model_config(path, config), metadata=metadata,
                           model_dir=os.path.abspath(path))


def model_config(path: str, config: dict):
    """A model directory's config.json as a SASRecConfig, or a one-line error naming it."""
    from .model import SASRecConfig

    try:
        return SASRecConfig.from_dict(config)
    except (TypeError, ValueError) as exc:
        raise EzSASRecError(f"{os.path.join(path, CONFIG_FILE)}: not a model config ({exc})") \
            from None


def item_vocab(model_dir: str, data):
    """The item vocabulary the model was trained with (copied into its directory by train),
    else the prepared dataset's (whose fingerprint the model matched)."""
    import pyarrow.parquet as pq

    path = os.path.join(local_dir(model_dir), "items")
    if os.path.isdir(path):
        return pq.read_table(path)
    if data is None:
        raise EzSASRecError(f"{model_dir}: model directory has no items/ vocabulary; "
                            "give the prepared dataset (--data)")
    return data.items()


def model_version(model_dir: str) -> str:
    digest = sha256_file(os.path.join(local_dir(model_dir), WEIGHTS_FILE))
    return f"{os.path.basename(os.path.abspath(model_dir))}-{digest[:12]}"


def write_model_dir(output: str, model, metadata: dict, *, overwrite: bool,
                    extra=None) -> dict:
    """The one writer of a model directory, published atomically (:mod:`.outputs`).

    Writes the config and weights, ``item_embeddings.npy``, whatever ``extra(tmp)`` adds
    (vocabularies, history, curves) and ``metrics.json``: ``metadata`` with the format
    version, kind and time. Returns that ``metrics.json`` content.
    """
    from .model import save_model_files

    metrics = {"format_version": MODEL_FORMAT_VERSION, "kind": "ezsasrec_ray.model",
               "trained_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               **metadata}
    if is_remote(output):  # written here, then uploaded with its _SUCCESS last
        with staged(output, overwrite=overwrite) as local:
            return write_model_dir(local, model, metadata, overwrite=False, extra=extra)
    with outputs.writing(output, overwrite=overwrite, kind="model") as pending:
        save_model_files(model, pending.tmp)
        np.save(os.path.join(pending.tmp, "item_embeddings.npy"),
                np.asarray(model.item_embeddings().numpy(), np.float32))
        if extra is not None:
            extra(pending.tmp)
        with open(os.path.join(pending.tmp, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
    return metrics
