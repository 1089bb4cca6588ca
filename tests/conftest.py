"""Shared fixtures: tiny seeded generators, Fashion-MNIST, a briefly trained generator."""

from __future__ import annotations

import functools
import os
from pathlib import Path

# Prefect's temporary servers (in this process and in the commands the tests start) get 120 s
# to start, as the flipad command gives them: 20 s, Prefect's default, is exceeded on a busy
# 2-core machine. Set before Prefect is first imported, which reads it then.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

import numpy as np
import pytest
import torch
from helpers import GENERATOR_CODE, VectorLatentGenerator
from torch import nn

from flipad.cpu import usable_cpus
from flipad.generators.architectures import DCGANGenerator
from flipad.io.data import encode_item
from flows.datasets import load_fashion_mnist
from flipad.generators.training import train_gan


# session fixtures that cost minutes: the test modules naming one run on one worker, so it is built once
SHARED_FIXTURES = ("demo_onboarded", "trained_generator")


@functools.cache
def _group(module: Path) -> str:
    """The xdist work unit of a test module: the first costly shared fixture the module's text
    names (as a test's or a fixture's argument), else the module itself."""
    text = module.read_text()
    return next((name for name in SHARED_FIXTURES if name in text), str(module))


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto`` (the suite's default): one worker per CPU this process may use (affinity and
    cgroup quota, as flipad sizes its threads), at most 4: each worker runs its own MLflow and
    Prefect servers and holds up to 5 GB of fixtures (measured on the two-core machine)."""
    return min(usable_cpus(), 4)


def pytest_xdist_make_scheduler(config, log):
    """Whole work units of :func:`_group` per worker, in collection order. (xdist's own
    ``loadgroup`` marks do not reach its scheduler under pytest 9.2, whose node ids are no longer
    the ``_nodeid`` it rewrites.)"""
    from xdist.scheduler import LoadScopeScheduling

    class SharedFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group(config.rootpath / nodeid.split("::")[0])

    return SharedFixtureScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    """Skip GPU tests without CUDA; put the work units holding a slow test first (xdist keeps the
    collection order with ``--no-loadscope-reorder``), so the longest work starts earliest."""
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)
    slow = {_group(item.path) for item in items if "slow" in item.keywords}
    items.sort(key=lambda item: _group(item.path) not in slow)  # stable: the order within is kept


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Seed torch; give it this worker's share of the CPUs (all of them without xdist)."""
    torch.manual_seed(0)
    torch.set_num_threads(max(1, usable_cpus() // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


@pytest.fixture(scope="session")
def fashion_train() -> np.ndarray:
    return load_fashion_mnist("train", 32, limit=12_000)


@pytest.fixture(scope="session")
def fashion_test() -> np.ndarray:
    return load_fashion_mnist("test", 32, limit=1_000)


@pytest.fixture(scope="session")
def trained_generator(fashion_train) -> nn.Module:
    """A small DCGAN (latent 64 as a (64, 1, 1) map, 16 -> 1 channels at 32x32) trained briefly."""
    generator = DCGANGenerator(latent_dim=64, channels=1, image_size=32, width=16)
    return train_gan(generator, fashion_train, steps=600, seed=0, device="cpu", progress=False)


@pytest.fixture
def vector_generator() -> nn.Module:
    torch.manual_seed(1)
    return VectorLatentGenerator().eval()


@pytest.fixture(scope="session")
def mlflow_tracking(tmp_path_factory):
    """A real MLflow tracking server (SQLite backend, proxied artifacts) for the whole session."""
    from servers import mlflow_server

    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as url:
        yield url


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """Prefect's test harness (a temporary server and database) for the session."""
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def tracking(mlflow_tracking, prefect_harness):
    """MLFLOW_TRACKING_URI pointing at the session's server (failures surface at once)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_tracking)
        patch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        patch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        yield mlflow_tracking


@pytest.fixture(scope="session")
def user_generator(tmp_path_factory):
    import torch
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("usergen")
    code = root / "tiny_gen.py"
    code.write_text(GENERATOR_CODE)
    namespace: dict = {}
    exec(compile(GENERATOR_CODE, str(code), "exec"), namespace)
    module = namespace["make"]()
    save_file(module.state_dict(), str(root / "tiny.safetensors"))
    torch.save(module.state_dict(), root / "tiny.pt")
    return f"{code}:make", root / "tiny.safetensors"


@pytest.fixture(scope="session")
def real_folder(tmp_path_factory, fashion_test):
    root = tmp_path_factory.mktemp("real")
    for i, img in enumerate(fashion_test[:260]):
        sub = root / f"class{i % 3}"
        sub.mkdir(exist_ok=True)
        (sub / f"{i:04d}.png").write_bytes(encode_item(img))
    return root


@pytest.fixture(scope="session")
def demo_onboarded(tracking, tmp_path_factory, fashion_train, fashion_test):
    """The demo's shipped generator (32x32 grey DCGAN trained 1,000 steps, latent 64) onboarded as
    ``demo-default`` with the default detector (reconstruction loss, calibrated on JPEG q95-q70) at
    reduced sizes: (the flow's result, the served model, the monitoring reference, the demo's
    other-seed look-alike generator)."""
    from flows import demo
    from flows.onboard import OnboardConfig, onboard_generator
    from registry.runs import load_reference
    from registry.versions import load_model

    work = tmp_path_factory.mktemp("demo-default")
    _, weights = demo.demo_generator(work, 0, 1000, fashion_train, "cpu")
    other, _ = demo.demo_generator(work, 1, 1000, fashion_train, "cpu")
    real = work / "real.npy"
    np.save(real, np.concatenate([fashion_train[-400:], fashion_test[:300]]))
    result = onboard_generator(OnboardConfig(
        name="demo-default", generator="dcgan", weights=str(weights), generator_kwargs=demo.DEMO_GENERATOR,
        real=str(real), num_samples=400, num_validation=200, num_test=150, num_challenger=150, challenger_steps=100,
        family_settings={"reconstruction": {"n_perturbed": 150, "encoder_steps": 400}}, fnr=(0.005,)))
    model, _ = load_model("demo-default", result.version)
    return result, model, load_reference(result.run_id), other
