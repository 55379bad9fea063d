"""Loading a trained model directory (written by :func:`.train.train`), without pickle.

A model directory holds ``config.json`` + ``model.weights.h5`` (Keras 3 weights, HDF5),
``item_embeddings.npy``, the ``users/`` and ``items/`` vocabularies it was trained with,
``metrics.json``, ``history.csv`` and ``training_curves.png``.
"""

from __future__ import annotations

import json
import os

from .errors import EzSASRecError

MODEL_FORMAT_VERSION = 1


def read_model_dir(path: str) -> tuple[dict, dict]:
    """Check a model directory without loading TensorFlow -> ``(config dict, metadata)``."""
    from .model import CONFIG_FILE, WEIGHTS_FILE

    metrics_path = os.path.join(path, "metrics.json")
    if not os.path.isdir(path):
        raise EzSASRecError(f"{path}: model directory not found")
    if not os.path.exists(metrics_path):
        raise EzSASRecError(f"{path}: not a model directory (no metrics.json)")
    with open(metrics_path) as f:
        metadata = json.load(f)
    if metadata.get("kind") != "ezsasrec_ray.model" or \
            metadata.get("format_version") != MODEL_FORMAT_VERSION:
        raise EzSASRecError(f"{metrics_path}: unsupported model format "
                            f"{metadata.get('format_version')!r}")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not os.path.exists(os.path.join(path, name)):
            raise EzSASRecError(f"{path}: incomplete model directory ({name} missing)")
    with open(os.path.join(path, CONFIG_FILE)) as f:
        return json.load(f), metadata


def load_model(path: str):
    """Load a model directory -> :class:`.model.SASRec` with ``.model_dir`` and ``.metadata``."""
    from .model import load_model_files

    _, metadata = read_model_dir(path)
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
