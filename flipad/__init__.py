"""flipad: single-model attribution of generative models ("was this made by *my* generator?").

The package holds the method only (torch, numpy, scikit-learn, Pillow); the MLOps layers live
in ``registry/``, ``monitoring/`` and ``flows/``. Subpackages: ``generators`` (architectures,
loading, tracing, folding, the adapter), ``inversion`` (the final layer's lasso, the latent
search), ``detectors`` (the families, the verdict, calibration, persistence) and ``io`` (data,
decoding, perturbations); ``scoring`` scores raw items with any detector.
"""

from .detectors.base import (
    DETECTOR_KINDS,
    Detector,
    DetectorSettings,
    Scores,
    Seeds,
    Stage,
    Stages,
    detector_class,
    register_kind,
)
from .detectors.bundle import load_bundle, save_bundle
from .detectors.calibration import NotFittedError
from .detectors.features import FeatureConfig
from .detectors.flipad import FlipadDetector
from .detectors.reconstruction import ReconstructionConfig, ReconstructionLossDetector
from .detectors.verdict import AttributionDetector
# after the image families: registration order is the order of the diagnostics' columns
from .detectors.autoencoder import AedrDetector, AutoencoderDetector, AutoencoderGenerator, load_autoencoder  # noqa: E402
from .generators import (
    GeneratorAdapter,
    GeneratorSource,
    NotInvertibleError,
    load_generator,
)
from .inversion import InversionResult, LassoOptions
from .kinds import family_settings

__all__ = [
    "DETECTOR_KINDS",
    "AedrDetector",
    "AutoencoderDetector",
    "AutoencoderGenerator",
    "AttributionDetector",
    "Detector",
    "DetectorSettings",
    "FeatureConfig",
    "FlipadDetector",
    "GeneratorAdapter",
    "GeneratorSource",
    "InversionResult",
    "LassoOptions",
    "NotFittedError",
    "NotInvertibleError",
    "ReconstructionConfig",
    "ReconstructionLossDetector",
    "Scores",
    "Seeds",
    "Stage",
    "Stages",
    "detector_class",
    "family_settings",
    "load_autoencoder",
    "load_bundle",
    "load_generator",
    "register_kind",
    "save_bundle",
]
__version__ = "0.2.0"
