"""Export a model directory for other servers: ``ezsasrec export`` -> a TensorFlow SavedModel.

The SavedModel (Keras 3 ``ExportArchive``) has two serving signatures, so TF Serving, Triton
or any TensorFlow binding serves it without this package:

* ``user_embeddings``: ``histories`` int32 (B, maxlen), each row the user's last ``maxlen``
  item indices left-padded with 0 -> ``user_embeddings`` float32 (B, dim), the same user
  representation as training, scoring and Serve;
* ``item_embeddings``: ``item_indices`` int32 (N,) -> ``item_embeddings`` float32 (N, dim),
  rows of the item table (row 0 is padding).

A user's scores are ``user_embeddings @ item_table.T``. Beside it: ``item_table.npy`` (the
whole table), ``items.tsv`` (index <tab> raw item id), ``export.json`` (maxlen, dim, the model
it came from) and the output marker.
"""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, dataclass

import numpy as np

from . import outputs
from .dataset import load_prepared
from .model_io import item_vocab, load_model
from .options import check_instance, option

FORMATS = ("saved_model",)


@dataclass
class ExportConfig:
    """Options of ``ezsasrec export``."""

    model: str = option(MISSING, "model directory to export")
    output: str = option(MISSING, "directory to write")
    format: str = option("saved_model", "export format", choices=FORMATS)
    data: str | None = option(None, "prepared dataset, only for a model directory without its "
                                    "items/ vocabulary (default: none)")

    def __post_init__(self):
        check_instance(self)


def export(model: str, output: str, *, format: str = "saved_model", data: str | None = None,
           overwrite: bool = False) -> dict:
    """Write ``model`` as a SavedModel to ``output``; returns export.json's content."""
    config = ExportConfig(model=model, output=output, format=format, data=data)
    outputs.check_output(output, overwrite)  # before TensorFlow loads
    sasrec = load_model(config.model)
    info = {"format": config.format, "model": os.path.abspath(config.model),
            "maxlen": sasrec.config.maxlen, "dim": sasrec.config.dim,
            "num_items": sasrec.config.num_items,
            "signatures": {"user_embeddings": "histories int32 (B, maxlen), left-padded with 0 "
                                              "-> user_embeddings float32 (B, dim)",
                           "item_embeddings": "item_indices int32 (N,) -> item_embeddings "
                                              "float32 (N, dim)"}}
    with outputs.writing(output, overwrite=overwrite, kind="export") as pending:
        _write_saved_model(sasrec, os.path.join(pending.tmp, "saved_model"))
        np.save(os.path.join(pending.tmp, "item_table.npy"),
                np.asarray(sasrec.item_embeddings().numpy(), np.float32))
        prepared = load_prepared(config.data) if config.data else None
        items = item_vocab(config.model, prepared).sort_by("index")
        with open(os.path.join(pending.tmp, "items.tsv"), "w") as f:
            for index, item_id in zip(items["index"].to_pylist(), items["raw_id"].to_pylist()):
                f.write(f"{index}\t{item_id}\n")
        with open(os.path.join(pending.tmp, "export.json"), "w") as f:
            json.dump(info, f, indent=2)
    return info


def _write_saved_model(sasrec, path: str):
    import keras
    import tensorflow as tf

    maxlen = sasrec.config.maxlen

    def user_embeddings(histories):
        vectors = sasrec.sequence_embeddings(histories, training=False, last_only=True)
        return {"user_embeddings": vectors[:, -1, :]}

    def item_embeddings(item_indices):
        return {"item_embeddings": tf.gather(sasrec.item_emb.embeddings, item_indices)}

    archive = keras.export.ExportArchive()
    archive.track(sasrec)
    archive.add_endpoint("user_embeddings", user_embeddings, input_signature=[
        tf.TensorSpec([None, maxlen], tf.int32, name="histories")])
    archive.add_endpoint("item_embeddings", item_embeddings, input_signature=[
        tf.TensorSpec([None], tf.int32, name="item_indices")])
    archive.write_out(path, verbose=False)
