"""flipad: single-model attribution of generative models ("was this made by *my* generator?").

The package holds the method only (torch, numpy, scikit-learn, Pillow); the MLOps layers live
in ``registry/``, ``monitoring/`` and ``flows/``. Subpackages: ``generators`` (architectures,
loading, tracing, folding, the adapter), ``inversion`` (the final layer's lasso, the latent
search), ``detectors`` (the families, the verdict, calibration, persistence) and ``io`` (data,
decoding, perturbations); ``scoring`` scores raw items with any detector.
"""

# before anything imports torch: idle compute threads sleep rather than spin (flipad/cpu.py)
from .cpu import share_cores, size_threads

share_cores()

from .detectors.base import (  # noqa: E402
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
from .detectors.bundle import load_bundle, save_bundle  # noqa: E402
from .detectors.calibration import NotFittedError  # noqa: E402
from .detectors.features import FeatureConfig  # noqa: E402
from .detectors.flipad import FlipadDetector  # noqa: E402
from .detectors.reconstruction import ReconstructionConfig, ReconstructionLossDetector  # noqa: E402
from .detectors.verdict import AttributionDetector  # noqa: E402
# after the image families: registration order is the order of the diagnostics' columns
from .detectors.autoencoder import AedrDetector, AutoencoderDetector, AutoencoderGenerator, load_autoencoder  # noqa: E402
from .generators import (  # noqa: E402
    GeneratorAdapter,
    GeneratorSource,
    NotInvertibleError,
    load_generator,
)
from .inversion import InversionResult, LassoOptions  # noqa: E402
from .kinds import family_settings  # noqa: E402

size_threads()  # torch's pool: the cores this process may use, not the host's

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
