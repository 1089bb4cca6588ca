"""Loading a generator from a spec: a built-in name, ``path/to/file.py:factory`` or ``package.module:factory``.

Weights load with ``torch.load(weights_only=True)`` or safetensors only, never by unpickling objects.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from .architectures import BUILTIN_GENERATORS

logger = logging.getLogger(__name__)

__all__ = ["GENERATOR_SCHEMES", "GeneratorLoadError", "GeneratorScheme", "GeneratorSource", "load_generator",
           "load_weights", "parse_latent_shape", "register_generator_scheme"]


class GeneratorLoadError(ValueError):
    """A generator spec or weights file that cannot be loaded, with what to do about it."""


@dataclass(frozen=True)
class GeneratorScheme:
    """A kind of saved model named ``SCHEME:PATH`` (``diffusers:path/to/vae``): ``load(path, **kwargs)``
    builds the generator from the folder ``path``; ``files`` are the folder's files a bundle carries
    to rebuild it (its configuration; the weights travel as the bundle's own)."""

    load: Callable[..., nn.Module]
    files: tuple[str, ...]


GENERATOR_SCHEMES: dict[str, GeneratorScheme] = {}


def register_generator_scheme(name: str, load: Callable[..., nn.Module], files: Sequence[str]) -> None:
    """Make ``NAME:PATH`` specs load with ``load(path, **kwargs)`` (a family's module registers the
    models it takes, as the autoencoder family registers ``diffusers``)."""
    GENERATOR_SCHEMES[name] = GeneratorScheme(load, tuple(files))


def split_scheme(spec: str) -> tuple[GeneratorScheme, str] | None:
    """``(scheme, path)`` for a ``SCHEME:PATH`` spec of a registered scheme, else None."""
    name, sep, path = spec.partition(":")
    return (GENERATOR_SCHEMES[name], path) if sep and name in GENERATOR_SCHEMES else None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def _factory_from_spec(spec: str):
    if spec.lower() in BUILTIN_GENERATORS:
        return BUILTIN_GENERATORS[spec.lower()]
    scheme = split_scheme(spec)
    if scheme is not None:
        return functools.partial(scheme[0].load, scheme[1])
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise GeneratorLoadError(
            f"unknown generator {spec!r}: use a built-in name ({', '.join(BUILTIN_GENERATORS)}), "
            f"path/to/file.py:factory, package.module:factory or {'|'.join(GENERATOR_SCHEMES) or 'SCHEME'}:FOLDER"
        )
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise GeneratorLoadError(f"generator file {path} does not exist")
        module_spec = importlib.util.spec_from_file_location(f"flipad_user_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        # registered while it runs, as an import would: dataclasses, pickling and typing look a
        # class's module up in sys.modules
        sys.modules[module_spec.name] = module
        try:
            module_spec.loader.exec_module(module)
        except (Exception, SystemExit) as exc:
            del sys.modules[module_spec.name]
            raise GeneratorLoadError(f"importing {path} failed: {_one_line(exc)}") from exc
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise GeneratorLoadError(f"cannot import {target!r} ({exc}); is it installed / on PYTHONPATH?") from exc
        except (Exception, SystemExit) as exc:
            raise GeneratorLoadError(f"importing {target!r} failed: {_one_line(exc)}") from exc
    factory = getattr(module, name, None)
    if not callable(factory):
        raise GeneratorLoadError(f"{target} has no callable {name!r}")
    return factory


def load_weights(path: str | os.PathLike, key: str | None = None) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file or a ``torch.save``d checkpoint (weights_only), as
    checkpoints ship: the state dict itself or nested under a key (``state_dict``,
    ``netG_state_dict``, ``generator``, ``g_ema``, ...; ``key`` picks one where several are
    stored), with the ``module.`` (DataParallel) or ``_orig_mod.`` (torch.compile) prefix removed."""
    path = Path(path)
    if not path.is_file():
        raise GeneratorLoadError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            return _without_wrapper_prefix(_state_dict(load_file(str(path)), path, key))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise GeneratorLoadError(
            f"cannot load weights from {path} safely, without unpickling objects ({type(exc).__name__}: {first[:200]}); "
            "save them with torch.save(model.state_dict(), ...) or as .safetensors"
        ) from exc
    return _without_wrapper_prefix(_state_dict(state, path, key))


# names under which GAN code stores the generator's weights beside a discriminator and optimisers
# (first the names of a generator, then the generic names of a lone model's weights)
GENERATOR_KEY_WORDS = ("gen", "netg", "g_state", "ema")
MODEL_KEYS = ("state_dict", "model", "model_state_dict")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _state_dict(state: Any, path: Path, key: str | None = None) -> dict[str, torch.Tensor]:
    """The generator's tensors in a loaded checkpoint: the dict itself, the dict nested under
    ``key``, or the one dict of tensors nested under a key that names a generator."""
    def tensors(value: Any) -> bool:
        return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())

    nested = {str(k): v for k, v in state.items() if tensors(v)} if isinstance(state, dict) else {}
    if key is not None:
        if key not in nested:
            found = ", ".join(nested) or "none"
            raise GeneratorLoadError(f"--weights-key {key!r}: {path} holds no state dict under that key (state dicts "
                                     f"found under: {found})")
        return nested[key]
    if tensors(state):
        # a flat file of one model (safetensors) may still prefix a generator's tensors by its name
        return state
    preferred = [k for k in nested if any(w in k.lower() for w in GENERATOR_KEY_WORDS)] or \
        [k for k in nested if k.lower() in MODEL_KEYS]
    if len(nested) == 1 or len(preferred) == 1:
        key = preferred[0] if len(preferred) == 1 else next(iter(nested))
        logger.warning("%s: using the state dict stored under %r", path, key)
        return nested[key]
    if nested:
        raise GeneratorLoadError(f"{path} holds several state dicts ({', '.join(nested)}); pick the generator's "
                                 "with --weights-key KEY")
    raise GeneratorLoadError(f"{path} does not hold a state dict of tensors")


def _without_wrapper_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with the prefix a training wrapper adds to every key removed (DataParallel's
    ``module.``, torch.compile's ``_orig_mod.``), repeatedly where wrappers nest."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                state = {k.removeprefix(prefix): v for k, v in state.items()}
                changed = True
    return state


def load_generator(
    spec: str, weights: str | os.PathLike | None = None, *, weights_key: str | None = None, **factory_kwargs: Any
) -> nn.Module:
    """Build the generator named by ``spec`` (with ``factory_kwargs``), load ``weights`` (the state
    dict under ``weights_key`` where the checkpoint holds several: :func:`load_weights`), return
    it in eval mode."""
    factory = _factory_from_spec(spec)
    try:
        module = factory(**factory_kwargs)
    except (Exception, SystemExit) as exc:  # a user's factory may raise anything, or exit
        raise GeneratorLoadError(f"calling the factory of {spec!r} failed: {_one_line(exc)}") from exc
    if not isinstance(module, nn.Module):
        raise GeneratorLoadError(f"the factory of {spec!r} returned {type(module).__name__}, not a torch.nn.Module")
    if weights is not None:
        try:
            module.load_state_dict(load_weights(weights, weights_key))
        except RuntimeError as exc:
            detail = "; ".join(line.strip() for line in str(exc).strip().splitlines()[1:4])
            raise GeneratorLoadError(f"weights {weights} do not fit {spec!r}: {detail or str(exc).strip()[:300]}") from exc
    elif spec in BUILTIN_GENERATORS:
        logger.warning("generator %r has no weights: it is randomly initialised (pass the trained weights)", spec)
    state = module.state_dict()
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise GeneratorLoadError(f"weights of {spec!r} hold NaN or infinite values ({', '.join(bad[:3])}); "
                                 "load a checkpoint from before training diverged")
    return module.eval()


@dataclass(frozen=True)
class GeneratorSource:
    """How to rebuild a generator: its spec, the factory's keyword arguments and its latent shape.

    Serialisable as JSON, so a saved detector can carry its generator (weights stored apart).
    """

    spec: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    latent_shape: tuple[int, ...] | None = None

    def load(self, weights: str | os.PathLike | None = None, base: str | os.PathLike | None = None,
             weights_key: str | None = None) -> nn.Module:
        """The generator in eval mode; a relative ``file.py`` in the spec is resolved against ``base``;
        ``weights_key`` picks the state dict of a checkpoint that holds several."""
        spec = self.spec
        target, sep, name = spec.rpartition(":")
        scheme = split_scheme(spec)
        if base is not None and scheme is not None and not Path(scheme[1]).is_absolute():
            spec = f"{spec.partition(':')[0]}:{Path(base) / scheme[1]}"
        elif base is not None and sep and target.endswith(".py") and not Path(target).is_absolute():
            spec = f"{Path(base) / target}:{name}"
        return load_generator(spec, weights, weights_key=weights_key, **self.kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec, "kwargs": self.kwargs, "latent_shape": list(self.latent_shape or []) or None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GeneratorSource:
        shape = data.get("latent_shape")
        return cls(data["spec"], dict(data.get("kwargs") or {}), tuple(shape) if shape else None)


def parse_latent_shape(text: str | Sequence[int] | None) -> tuple[int, ...] | None:
    """``"64"`` or ``"64,1,1"`` (or a sequence) as a tuple of positive ints."""
    if text is None or text == "":
        return None
    parts = text.split(",") if isinstance(text, str) else list(text)
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError as exc:
        raise GeneratorLoadError(f"latent shape {text!r} is not a comma-separated list of integers") from exc
    if not shape or any(d <= 0 for d in shape):
        raise GeneratorLoadError(f"latent shape {text!r} must have positive sizes")
    return shape
