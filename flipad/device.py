"""Resolving the compute device once, from "auto", "cpu", "cuda" or "cuda:N", the memory layout a
generator runs fastest in there, whether it computes in bfloat16 natively (and so trains faster in
it), and how much memory a batched computation may hold there."""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

__all__ = ["native_bfloat16", "resolve_device", "search_layout", "training_precision", "working_memory"]

logger = logging.getLogger(__name__)

WORKING_SHARE = 0.125  # of the memory available on the device, what one batched computation may hold
MEMINFO = Path("/proc/meminfo")
CGROUP_MEMORY = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory.current"))  # cgroup v2
FALLBACK_BYTES = 1 << 30  # where the available memory cannot be read


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The torch device for ``device``: "auto" picks CUDA when available, else the CPU."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available; use --device cpu or auto")
    return dev


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 natively: a CPU whose oneDNN has bfloat16 kernels
    (AVX512-BF16 or AMX), or a CUDA device that supports it."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return (device.type == "cpu" and torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def training_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """The precision a training loop on ``device`` runs its forward pass in: bfloat16 autocast where
    the device has it natively (the weights, their gradients and the optimiser stay float32;
    normalisations and losses run in float32 under autocast's rules), float32 elsewhere. The
    look-alike challengers' GAN steps at 64x64 RGB ran 1.4x faster this way on two cores with AMX
    (docs/design.md)."""
    if native_bfloat16(device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def search_layout(module: nn.Module, latent_shape: Sequence[int]) -> nn.Module:
    """The generator as a latent search should run it: on the CPU, a copy with its 4-D weights in
    ``channels_last`` when it has any and the copy gives the same outputs (1.2x faster for
    transposed-convolution generators, 1.8x for upsample+conv and skip ones on two cores:
    docs/design.md); else ``module`` itself. The copy holds the same values, so
    its :func:`~flipad.generators.adapter.weights_fingerprint` is the module's. CUDA keeps the
    module as it is (not measured there)."""
    parameter = next(module.parameters(), None)
    if parameter is None or parameter.device.type != "cpu" or not any(p.dim() == 4 for p in module.parameters()):
        return module
    probe = torch.randn(4, *latent_shape, generator=torch.Generator().manual_seed(0))
    try:
        fast = copy.deepcopy(module).to(memory_format=torch.channels_last)
        with torch.no_grad():
            expected, got = module(probe), fast(probe)
        same = got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-4, atol=1e-5)
    except Exception as exc:  # a module that cannot be copied or run channels-last keeps its layout
        logger.debug("generator kept in its own layout: %s", exc)
        return module
    return fast if same else module


def _available_cpu_memory(meminfo: Path = MEMINFO, cgroup: tuple[Path, Path] = CGROUP_MEMORY) -> int | None:
    """Bytes this process may still allocate: the host's ``MemAvailable``, capped by what its
    cgroup's limit leaves (a container's ``--memory``); None where neither can be read."""
    found = []
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit, current = (path.read_text().strip() for path in cgroup)
        if limit != "max":
            found.append(max(int(limit) - int(current), 0))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def working_memory(device: torch.device | str) -> int:
    """Bytes one batched computation of the latent search may hold on ``device``:
    ``WORKING_SHARE`` of the free memory of a CUDA device, or of what the host (and its cgroup)
    leaves this process on the CPU; ``FALLBACK_BYTES`` where that cannot be read. The search
    sizes its chunks from this, not from constants, so a GPU takes large batches and a small
    container small ones."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * WORKING_SHARE)
    available = _available_cpu_memory()
    return int(available * WORKING_SHARE) if available else FALLBACK_BYTES
