"""ezsasrec_ray: SASRec from raw interaction logs to top-N recommendations, on Ray.

``prepare``, ``synth`` and ``load_model`` are here; the stages that import TensorFlow are
imported from their modules: ``from ezsasrec_ray.train import train``,
``from ezsasrec_ray.evaluate import evaluate``.

Stages, one module each: :mod:`.data` (prepare), :mod:`.synth`, :mod:`.model`,
:mod:`.train`, :mod:`.evaluate`, :mod:`.score`, :mod:`.serve`.
The ezSASRec-compatible notebook API is :mod:`ezsasrec_ray.easy` (``docs/easy_api.md``).
"""

from .data import PrepareConfig, PreparedDataset, load_prepared, prepare
from .errors import EzSASRecError, PrepareError
from .model_io import load_model
from .score import recommend, score_pairs
from .synth import synth

__version__ = "0.1.0"

__all__ = [
    "EzSASRecError",
    "PrepareConfig",
    "PrepareError",
    "PreparedDataset",
    "load_model",
    "load_prepared",
    "prepare",
    "recommend",
    "score_pairs",
    "synth",
    "__version__",
]
