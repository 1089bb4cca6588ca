"""A self-contained detector bundle: the fitted detector plus everything needed to rebuild its generator.

Layout of the folder (no pickles anywhere)::

    generator.json          GeneratorSource (spec, factory kwargs, latent shape)
    generator.safetensors   the generator's weights
    code/<file>.py          the factory's source, for ``file.py:factory`` specs
    detector/               FlipadDetector.save (config.json + tensors.safetensors)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

from .adapter import GeneratorAdapter
from .detector import FlipadDetector
from .generators import GeneratorSource

__all__ = ["save_bundle", "load_bundle"]


def save_bundle(folder: str | Path, detector: FlipadDetector, source: GeneratorSource) -> Path:
    """Write ``detector`` and its generator (weights taken from the live module) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target, sep, name = source.spec.rpartition(":")
    if sep and target.endswith(".py"):
        code = folder / "code"
        code.mkdir(exist_ok=True)
        shutil.copyfile(target, code / Path(target).name)
        source = GeneratorSource(f"code/{Path(target).name}:{name}", source.kwargs, source.latent_shape)
    state = {k: v.detach().cpu().contiguous() for k, v in detector.adapter.module.state_dict().items()}
    save_file(state, str(folder / "generator.safetensors"))
    source_dict = {**source.to_dict(), "latent_shape": list(detector.adapter.latent_shape),
                   "final_layer": detector.adapter.final_layer_name, "activation": detector.adapter.activation.name}
    (folder / "generator.json").write_text(json.dumps(source_dict, indent=2))
    detector.save(folder / "detector")
    return folder


def load_bundle(folder: str | Path, device: str = "auto") -> FlipadDetector:
    """The detector saved by :func:`save_bundle`, with its generator rebuilt on ``device``."""
    folder = Path(folder)
    try:
        info = json.loads((folder / "generator.json").read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{folder} does not hold a detector bundle ({exc})") from exc
    source = GeneratorSource.from_dict(info)
    module = source.load(folder / "generator.safetensors", base=folder)
    adapter = GeneratorAdapter.from_module(
        module, source.latent_shape, final_layer=info.get("final_layer"), activation=info.get("activation"), device=device
    )
    return FlipadDetector.load(folder / "detector", adapter, device=device)
