"""A self-contained detector bundle: the fitted detector plus everything needed to rebuild its generator.

Layout of the folder (no pickles anywhere)::

    generator.json          GeneratorSource (spec, factory kwargs, latent shape), the detector's kind and
                            the module that defines it (imported on load when the kind is not yet known)
    generator.safetensors   the generator's weights
    code/<file>.py          the factory's source, for ``file.py:factory`` specs
    code/<folder>/          a ``SCHEME:FOLDER`` spec's configuration files (``diffusers:path/to/vae``)
    detector/               the detector's ``save`` (config.json + tensors.safetensors [+ sub-folders])

The kind names a class of :data:`~flipad.detectors.base.DETECTOR_KINDS`; nothing here depends on
which one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

from ..generators.loading import GeneratorSource, split_scheme
from ..kinds import import_kind
from .base import Detector

__all__ = ["save_bundle", "load_bundle"]


def save_bundle(folder: str | Path, detector: Detector, source: GeneratorSource) -> Path:
    """Write ``detector`` and its generator (weights taken from the live module) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target, sep, name = source.spec.rpartition(":")
    scheme = split_scheme(source.spec)
    if scheme is not None:
        carried = folder / "code" / (Path(scheme[1]).name or "model")
        carried.mkdir(parents=True, exist_ok=True)
        for file in scheme[0].files:
            shutil.copyfile(Path(scheme[1]) / file, carried / file)
        source = GeneratorSource(f"{source.spec.partition(':')[0]}:{carried.relative_to(folder)}", source.kwargs,
                                 source.latent_shape)
    elif sep and target.endswith(".py"):
        code = folder / "code"
        code.mkdir(exist_ok=True)
        shutil.copyfile(target, code / Path(target).name)
        source = GeneratorSource(f"code/{Path(target).name}:{name}", source.kwargs, source.latent_shape)
    state = {k: v.detach().cpu().contiguous() for k, v in detector.module.state_dict().items()}
    save_file(state, str(folder / "generator.safetensors"))
    info = {**source.to_dict(), "detector": detector.kind, "detector_module": type(detector).__module__,
            **detector.generator_info()}
    (folder / "generator.json").write_text(json.dumps(info, indent=2))
    detector.save(folder / "detector")
    return folder


def load_bundle(folder: str | Path, device: str = "auto", secret: bytes | None = None) -> Detector:
    """The detector saved by :func:`save_bundle`, with its generator rebuilt on ``device``;
    ``secret`` (the owner's master secret) is handed to a kind that declares one
    (:meth:`~flipad.detectors.base.Detector.use_secret`) and ignored by the others."""
    folder = Path(folder)
    try:
        info = json.loads((folder / "generator.json").read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{folder} does not hold a detector bundle ({exc})") from exc
    kind = info.get("detector", "flipad")
    try:
        cls = import_kind(kind, info.get("detector_module"))
    except ValueError:
        raise ValueError(f"{folder} holds an unknown detector kind {kind!r}; install the package that defines it "
                         "or upgrade flipad") from None
    source = GeneratorSource.from_dict(info)
    module = source.load(folder / "generator.safetensors", base=folder)
    detector = cls.load(folder / "detector", module, device=device, latent_shape=source.latent_shape)
    if cls.secret and secret is not None:
        detector.use_secret(secret)
    return detector
