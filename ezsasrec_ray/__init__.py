"""ezsasrec_ray: SASRec from raw interaction logs to top-N recommendations, on Ray.

Stages, one module each: :mod:`.data` (prepare), :mod:`.synth`, :mod:`.model`,
:mod:`.train`, :mod:`.evaluate`, :mod:`.score`, :mod:`.serve`.
"""

from .data import PrepareConfig, PreparedDataset, load_prepared, prepare
from .errors import EzSASRecError, PrepareError
from .synth import synth

__version__ = "0.1.0"

__all__ = [
    "EzSASRecError",
    "PrepareConfig",
    "PrepareError",
    "PreparedDataset",
    "load_prepared",
    "prepare",
    "synth",
    "__version__",
]
