"""flipad: single-model attribution of generative models by final-layer inversion (FLIPAD).

The package holds the method only (torch, numpy, scikit-learn, Pillow); the MLOps
layers live in ``registry/``, ``monitoring/`` and ``flows/``.
"""

from .adapter import GeneratorAdapter
from .calibration import NotFittedError
from .combined import AttributionDetector
from .detector import FlipadDetector
from .features import FeatureConfig
from .generators import load_generator
from .inversion import InversionResult, LassoOptions
from .reconstruction import ReconstructionConfig, ReconstructionLossDetector
from .tracing import NotInvertibleError

__all__ = [
    "GeneratorAdapter",
    "AttributionDetector",
    "FlipadDetector",
    "NotFittedError",
    "FeatureConfig",
    "InversionResult",
    "LassoOptions",
    "NotInvertibleError",
    "load_generator",
    "ReconstructionConfig",
    "ReconstructionLossDetector",
]
__version__ = "0.1.0"
