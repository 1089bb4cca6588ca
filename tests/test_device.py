"""The device and memory layout a latent search runs a generator in."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import VectorLatentGenerator
from torch import nn

from flipad import ReconstructionLossDetector
from flipad.cpu import usable_cpus
from flipad.device import (
    FALLBACK_BYTES,
    _available_cpu_memory,
    native_bfloat16,
    search_layout,
    training_precision,
    working_memory,
)
from flipad.generators.adapter import weights_fingerprint
from flipad.inversion.latent import ReconstructionConfig


class FlattensConvOutput(nn.Module):
    """A generator whose forward calls ``.view`` on a convolution's output: it fails channels-last."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 4 * 8 * 8)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, z):
        h = self.conv(self.fc(z).view(-1, 4, 8, 8))
        return h.view(len(z), -1).tanh().view(-1, 1, 16, 16)


def test_a_conv_generator_runs_channels_last_in_a_copy_with_the_same_outputs_and_fingerprint():
    torch.manual_seed(0)
    module = VectorLatentGenerator().eval()
    fast = search_layout(module, (16,))
    assert fast is not module
    assert fast.body[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert all(p.is_contiguous() for p in module.parameters())  # the user's module is left as it was
    assert weights_fingerprint(fast) == weights_fingerprint(module)
    z = torch.randn(32, 16)
    with torch.no_grad():
        torch.testing.assert_close(fast(z), module(z), rtol=1e-5, atol=1e-6)


def test_a_generator_that_fails_channels_last_or_has_no_conv_weights_keeps_its_own_layout():
    failing = FlattensConvOutput().eval()
    assert search_layout(failing, (16,)) is failing
    linear = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Unflatten(1, (1, 8, 8))).eval()
    assert search_layout(linear, (16,)) is linear


def test_the_detector_searches_with_the_fast_copy_and_saves_the_users_weights(tmp_path):
    torch.manual_seed(0)
    module = VectorLatentGenerator()
    det = ReconstructionLossDetector(module, (16,), n_validation=20, progress=False,
                                     config=ReconstructionConfig(steps=5, candidates=4, starts=2)).fit()
    assert det.search_.module is not module and det.module_ is module
    det.save(tmp_path / "det")
    loaded = ReconstructionLossDetector.load(tmp_path / "det", module)
    samples = det.generate(6, seed=1)
    np.testing.assert_allclose(loaded.score_samples(samples), det.score_samples(samples))


def test_threads_are_sized_to_the_affinity_mask_and_the_cgroup_quota(tmp_path):
    cores = len(os.sched_getaffinity(0))
    v2, v1 = tmp_path / "cpu.max", tmp_path / "v1"
    assert usable_cpus(v2, v1) == cores  # no quota file: the affinity mask
    v2.write_text("max 100000\n")
    assert usable_cpus(v2, v1) == cores
    v2.write_text("50000 100000\n")  # docker run --cpus 0.5
    assert usable_cpus(v2, v1) == 1
    v2.unlink()
    v1.mkdir()
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cpus(v2, v1) == cores
    (v1 / "cpu.cfs_quota_us").write_text("100000\n")
    assert usable_cpus(v2, v1) == 1
    (v1 / "cpu.cfs_quota_us").write_text("garbage\n")
    assert usable_cpus(v2, v1) == cores


@pytest.mark.parametrize("environment, policy", [({}, "PASSIVE"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE"),
                                                 ({"GOMP_SPINCOUNT": "1000"}, None)])
def test_importing_flipad_makes_idle_threads_sleep_unless_the_environment_chose(environment, policy):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    probe = "import os, flipad, torch; print(os.environ.get('OMP_WAIT_POLICY'), torch.get_num_threads())"
    out = subprocess.run([sys.executable, "-c", probe], env={**env, **environment}, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[0] == str(policy)
    assert 1 <= int(out[1]) <= usable_cpus()


def test_the_working_memory_is_a_share_of_what_the_host_and_its_cgroup_leave(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:   20000000 kB\n")
    limit, current = tmp_path / "memory.max", tmp_path / "memory.current"
    limit.write_text("max\n")
    current.write_text("1000\n")
    assert _available_cpu_memory(meminfo, (limit, current)) == 20_000_000 * 1024
    limit.write_text(f"{4 << 30}\n")  # docker run --memory 4g, 1000 bytes of it used
    assert _available_cpu_memory(meminfo, (limit, current)) == (4 << 30) - 1000
    meminfo.write_text("garbage")
    assert _available_cpu_memory(meminfo, (limit, current)) == (4 << 30) - 1000
    assert _available_cpu_memory(tmp_path / "absent", (tmp_path / "absent", current)) is None
    budget = working_memory("cpu")
    assert 0 < budget and (budget == FALLBACK_BYTES or budget <= _available_cpu_memory())


def test_training_runs_its_products_in_bfloat16_only_where_the_device_has_it_natively():
    conv, x = nn.Conv2d(3, 4, 3), torch.randn(2, 3, 8, 8)
    cpu = torch.device("cpu")
    with training_precision(cpu):
        out = conv(x)
        loss = out.float().square().mean()
    loss.backward()
    # the weights and their gradients stay float32 either way; the product is bfloat16 only natively
    assert conv.weight.dtype == conv.weight.grad.dtype == torch.float32
    assert out.dtype == (torch.bfloat16 if native_bfloat16(cpu) else torch.float32)
    assert not torch.is_autocast_enabled("cpu")  # the context ends with the block
