"""flipad: single-model attribution of generative models by final-layer inversion (FLIPAD).

The package holds the method only (torch, numpy, scikit-learn, Pillow); the MLOps
layers live in ``registry/``, ``monitoring/`` and ``flows/``.
"""

from .generators.adapter import GeneratorAdapter
from .detectors.calibration import NotFittedError
from .detectors.verdict import AttributionDetector
from .detectors.flipad import FlipadDetector
from .detectors.features import FeatureConfig
from .generators.loading import load_generator
from .inversion.lasso import InversionResult, LassoOptions
from .detectors.reconstruction import ReconstructionConfig, ReconstructionLossDetector
from .generators.tracing import NotInvertibleError

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
