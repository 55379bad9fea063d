"""ezsasrec_ray: SASRec from raw interaction logs to top-N recommendations, on Ray.

The stages are functions: ``prepare``, ``train``, ``evaluate``, ``recommend`` (batch
scoring), ``score_pairs`` and ``load_model``, imported here on first use, so that
``import ezsasrec_ray`` stays light (TensorFlow and Ray load only when a stage runs).
The ezSASRec-compatible notebook API is :mod:`ezsasrec_ray.easy` (``docs/easy_api.md``);
``DEVELOPERS.md`` maps the modules.
"""

from importlib import import_module

from .errors import EzSASRecError, PrepareError

__version__ = "0.1.0"

# public name -> module that defines it (loaded on first access, PEP 562)
_LAZY = {
    "PrepareConfig": "prepare",
    "prepare": "prepare",
    "PreparedDataset": "dataset",
    "load_prepared": "dataset",
    "load_model": "model_io",
    "train": "train",
    "TrainConfig": "train",
    "evaluate": "evaluate",
    "recommend": "score",
    "score_pairs": "score",
    "synth": "synth",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["EzSASRecError", "PrepareError", "__version__", *_LAZY]
