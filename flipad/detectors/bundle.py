"""A self-contained detector bundle: the fitted detector plus everything needed to rebuild its generator.

Layout of the folder (no pickles anywhere)::

    generator.json          GeneratorSource (spec, factory kwargs, latent shape) and the detector's kind
    generator.safetensors   the generator's weights
    code/<file>.py          the factory's source, for ``file.py:factory`` specs
    detector/               the detector's ``save`` (config.json + tensors.safetensors [+ sub-folders])

Kinds: ``flipad`` (:class:`FlipadDetector`), ``attribution`` (:class:`AttributionDetector`, the
combined verdict) and ``reconstruction`` (:class:`ReconstructionLossDetector`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from ..generators.adapter import GeneratorAdapter
from .verdict import AttributionDetector
from .flipad import FlipadDetector
from ..generators.loading import GeneratorSource
from .reconstruction import ReconstructionLossDetector

__all__ = ["Detector", "save_bundle", "load_bundle", "detector_kind", "flipad_family", "generator_module"]

Detector = FlipadDetector | AttributionDetector | ReconstructionLossDetector
KINDS = {"flipad": FlipadDetector, "attribution": AttributionDetector, "reconstruction": ReconstructionLossDetector}


def detector_kind(detector: Detector) -> str:
    """``flipad``, ``attribution`` or ``reconstruction``."""
    for kind, cls in KINDS.items():
        if isinstance(detector, cls):
            return kind
    raise TypeError(f"not a flipad detector: {type(detector).__name__}")


def generator_module(detector: Detector) -> nn.Module:
    """The generator module a fitted detector wraps."""
    return detector.adapter.module if isinstance(detector, FlipadDetector) else detector.module


def flipad_family(detector: Detector) -> FlipadDetector | None:
    """The FLIPAD part of a detector: itself, a combined verdict's ``flipad_``, or None."""
    return detector if isinstance(detector, FlipadDetector) else getattr(detector, "flipad_", None)


def save_bundle(folder: str | Path, detector: Detector, source: GeneratorSource) -> Path:
    """Write ``detector`` and its generator (weights taken from the live module) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target, sep, name = source.spec.rpartition(":")
    if sep and target.endswith(".py"):
        code = folder / "code"
        code.mkdir(exist_ok=True)
        shutil.copyfile(target, code / Path(target).name)
        source = GeneratorSource(f"code/{Path(target).name}:{name}", source.kwargs, source.latent_shape)
    state = {k: v.detach().cpu().contiguous() for k, v in generator_module(detector).state_dict().items()}
    save_file(state, str(folder / "generator.safetensors"))
    kind = detector_kind(detector)
    info = {**source.to_dict(), "detector": kind}
    if kind == "flipad":
        info.update(latent_shape=list(detector.adapter.latent_shape), final_layer=detector.adapter.final_layer_name,
                    activation=detector.adapter.activation.name)
    else:
        recon = detector.reconstruction_ if kind == "attribution" else detector
        info.update(latent_shape=list(recon.latent_shape_))
    (folder / "generator.json").write_text(json.dumps(info, indent=2))
    detector.save(folder / "detector")
    return folder


def load_bundle(folder: str | Path, device: str = "auto") -> Detector:
    """The detector saved by :func:`save_bundle`, with its generator rebuilt on ``device``."""
    folder = Path(folder)
    try:
        info = json.loads((folder / "generator.json").read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{folder} does not hold a detector bundle ({exc})") from exc
    kind = info.get("detector", "flipad")
    if kind not in KINDS:
        raise ValueError(f"{folder} holds an unknown detector kind {kind!r}; upgrade flipad")
    source = GeneratorSource.from_dict(info)
    module = source.load(folder / "generator.safetensors", base=folder)
    if kind != "flipad":
        return KINDS[kind].load(folder / "detector", module, device=device)
    adapter = GeneratorAdapter.from_module(
        module, source.latent_shape, final_layer=info.get("final_layer"), activation=info.get("activation"), device=device
    )
    return FlipadDetector.load(folder / "detector", adapter, device=device)
