"""The default verdict in the wild: recompressed own items are attributed, a look-alike is not,
and a generator FLIPAD refuses onboards through the command line with the defaults."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest
from helpers import GENERATOR_CODE
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from flipad import ReconstructionLossDetector
from flipad.detectors.base import ROBUST_PERTURBATIONS
from flipad.generators.architectures import DCGANGenerator
from flipad.generators.sampling import generate_samples
from flipad.generators.training import train_gan
from flipad.inversion.latent import ReconstructionConfig
from flipad.io.data import encode_item
from flipad.io.perturb import perturb
from flows.cli import app
from registry.pyfunc import to_request_cell

# the onboarding default's search (an encoder + Levenberg-Marquardt), its encoder trained briefly
DEFAULT_SEARCH = ReconstructionConfig(method="encoder-lm", encoder_steps=300)


@pytest.fixture(scope="module")
def lookalike(fashion_train):
    """The trained generator's architecture, trained as briefly from another seed."""
    generator = DCGANGenerator(latent_dim=64, channels=1, image_size=32, width=16)
    return train_gan(generator, fashion_train, steps=600, seed=21, device="cpu", progress=False)


@pytest.mark.slow
def test_recompressed_own_items_are_attributed_and_a_lookalike_is_not(trained_generator, lookalike, fashion_test):
    robust = ReconstructionLossDetector(trained_generator, fnr=(0.02,), n_validation=150, config=DEFAULT_SEARCH, progress=False,
                                        perturbations=ROBUST_PERTURBATIONS, n_perturbed=100).fit()
    pristine_only = ReconstructionLossDetector(trained_generator, fnr=(0.02,), n_validation=150, config=DEFAULT_SEARCH,
                                               progress=False).fit()
    assert set(robust.condition_scores_) == set(ROBUST_PERTURBATIONS)
    # the robust threshold is the largest per-condition quantile, so it is at least the pristine one
    assert robust.thresholds_[robust.fnr[0]] >= pristine_only.thresholds_[pristine_only.fnr[0]]
    own = robust.generate(60, seed=123)
    others = generate_samples(lookalike, lookalike.latent_shape, 60, 123, (-1.0, 1.0))
    accepted = {name: robust.predict(perturb(own, name)).mean() for name in ("jpeg q90", "jpeg q80")}
    accepted["pristine"] = robust.predict(own).mean()
    # the stated FNR (0.02) with the slack of 60 test items: at most 4 own items of 60 missed
    assert min(accepted.values()) >= 0.93, accepted
    assert robust.predict(others).mean() <= 0.1 and robust.predict(fashion_test[:60]).mean() <= 0.05
    # the default scoring stops each search once its verdict is settled: the exhaustive search's
    # verdict, and what it reports is what the exhaustive scores say it would (Scores.attributed)
    mixed = np.concatenate([perturb(own, "jpeg q80"), others, fashion_test[:60]])
    settled, exhaustive = robust.score(mixed), robust.score(mixed, exhaustive=True)
    np.testing.assert_allclose(settled.score, exhaustive.attributed.score, rtol=1e-3)
    assert (settled.is_generated() == exhaustive.is_generated()).mean() >= 0.98
    assert (settled.score <= exhaustive.score + 1e-9).all()  # a stopped search reports no lower loss
    # calibrated on pristine samples only, the same scores lose recompressed own items
    assert pristine_only.predict(perturb(own, "jpeg q80")).mean() < accepted["jpeg q80"]


@pytest.mark.slow
def test_cli_onboards_a_skip_connection_generator_with_the_defaults(tracking, real_folder, tmp_path):
    code = tmp_path / "skip_gen.py"
    code.write_text(GENERATOR_CODE + '''

class Skip(Tiny):
    """Tiny with a skip connection into the output: FLIPAD refuses it."""

    def __init__(self, width=8):
        super().__init__(width)
        self.skip = nn.Conv2d(width, 1, 1)

    def forward(self, z):
        h = self.body(self.fc(z).view(-1, self.width, 8, 8))
        return torch.tanh(self.out(h) + self.skip(h))


def make_skip(width=8):
    torch.manual_seed(4)
    return Skip(width)
''')
    result = CliRunner().invoke(app, [
        "onboard", "skip-gen", "--generator", f"{code}:make_skip", "--latent-shape", "64", "--real", str(real_folder),
        "--num-samples", "100", "--num-validation", "60", "--num-test", "30", "--set", "reconstruction.encoder_steps=150",
        "--challenger-steps", "20",
    ])
    assert result.exit_code == 0, result.output
    assert "registered skip-gen version 1 as champion" in result.output and "worst source" in result.output
    version = MlflowClient().get_model_version("skip-gen", "1")
    assert version.tags["detector_kind"] == "reconstruction" and version.tags["flipad.registration"] == "complete"
    assert "worst source" in version.description
    metrics = MlflowClient().get_run(version.run_id).data.metrics
    assert {"worst_balanced_accuracy", "worst_own_accepted", "threshold_fnr0.005"} <= set(metrics)
    assert any(k.startswith("balanced_accuracy_lookalike_retrained") for k in metrics)
    pyfunc = mlflow.pyfunc.load_model("models:/skip-gen@champion")
    own = pyfunc.unwrap_python_model().detector.generate(4, seed=5)
    out = pyfunc.predict(pd.DataFrame({"image": [to_request_cell(encode_item(x)) for x in own]}))
    assert (out["error"] == "").all() and np.isfinite(out["score"].to_numpy(float)).all()
