"""Generators: the built-in architectures, loading from a spec, tracing the final layer, folding and the adapter."""

from .adapter import GeneratorAdapter, weights_fingerprint
from .loading import GeneratorLoadError, GeneratorSource, load_generator
from .tracing import NotInvertibleError

__all__ = ["GeneratorAdapter", "GeneratorLoadError", "GeneratorSource", "NotInvertibleError", "load_generator",
           "weights_fingerprint"]
