"""The encoder-lm latent search: exact on the generator's own 8-bit samples, deterministic, saved whole."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import SkipToOutput
from torch import nn

from flipad import ReconstructionLossDetector
from flipad.generators.sampling import generate_samples
from flipad.inversion.amortised import (
    Exits,
    encoder_lm_trajectories,
    fixed_point_trajectories,
    jacobian,
    levenberg_marquardt,
    lm_trajectories,
    encoder_steps_within,
    quantisation_floor,
    sketch_basis,
    train_encoder,
)
from flipad.inversion.latent import ReconstructionConfig
from flipad.inversion.metrics import ResidualMetric
from flipad.inversion.tangents import search_jacobian
from flipad.io.data import to_output_range
from flipad.io.perturb import perturb

LATENT, SHAPE, RANGE = (64, 1, 1), (1, 32, 32), (-1.0, 1.0)


@pytest.fixture(scope="module")
def encoder(trained_generator):
    return train_encoder(trained_generator, LATENT, SHAPE, RANGE, steps=300, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("tangents", [False, True], ids=["forward-differences", "search-jacobian"])
def test_own_8bit_samples_invert_to_the_quantisation_floor(trained_generator, encoder, fashion_test, tangents):
    floor = quantisation_floor(RANGE)
    own = to_output_range(generate_samples(trained_generator, LATENT, 60, 99, RANGE), *RANGE)
    differentiate = search_jacobian(trained_generator, LATENT) if tangents else None
    with torch.no_grad():
        start = encoder(own)
        start_loss = ((trained_generator(start) - own) ** 2).flatten(1).mean(1)
    loss = levenberg_marquardt(trained_generator, own, start.clone(), 10, floor, differentiate=differentiate)
    # an 8-bit copy of G(z) is within half a step of G(z) (at most 3 floors): the exact inversion ends
    # at ~floor. One item in 60 may stall in another basin: the fixture GAN differs bit for bit between
    # CPUs, and on CI's one item ended at 3.5 floors (every item at <= 2 floors here).
    assert np.median(loss.numpy()) <= 2 * floor and (loss > 3 * floor).sum() <= 1, loss / floor
    assert (loss <= start_loss).all()  # LM only accepts improving steps
    real = to_output_range(fashion_test[:30], *RANGE)
    with torch.no_grad():
        real_loss = levenberg_marquardt(trained_generator, real, encoder(real), 10, floor, differentiate=differentiate)
    assert real_loss.min() > 30 * floor  # what the generator cannot make stays far above it
    assert loss.max() < real_loss.min()  # and above every own item, stalled or not


def test_encoder_training_is_deterministic_for_a_seed():
    torch.manual_seed(0)
    skip = SkipToOutput().eval()
    a = train_encoder(skip, skip.latent_shape, (1, 8, 8), RANGE, steps=20, seed=3)
    b = train_encoder(skip, skip.latent_shape, (1, 8, 8), RANGE, steps=20, seed=3)
    c = train_encoder(skip, skip.latent_shape, (1, 8, 8), RANGE, steps=20, seed=4)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    assert not torch.equal(a.head[-1].weight, c.head[-1].weight)


def test_encoder_lm_detector_scores_the_same_after_save_and_load(tmp_path):
    torch.manual_seed(0)
    skip = SkipToOutput().eval()
    config = ReconstructionConfig(method="encoder-lm", encoder_steps=30, lm_iterations=4)
    det = ReconstructionLossDetector(skip, n_validation=30, config=config, progress=False).fit()
    samples = det.generate(8, seed=5)
    loaded = ReconstructionLossDetector.load(det.save(tmp_path / "det"), skip, device="cpu")
    np.testing.assert_array_equal(det.score_samples(samples), loaded.score_samples(samples))
    assert loaded.search_.fingerprint() == det.search_.fingerprint()
    assert loaded.exits_ == det.exits_ and det.exits_.accept == min(det.thresholds_.values())
    refit = ReconstructionLossDetector(skip, n_validation=30, config=config, progress=False).fit()
    np.testing.assert_array_equal(det.score_samples(samples), refit.score_samples(samples))


def test_forward_difference_jacobian_matches_forward_mode_differentiation(trained_generator):
    z = torch.randn(6, *LATENT, generator=torch.Generator().manual_seed(2))
    exact = torch.func.vmap(torch.func.jacfwd(lambda zi: trained_generator(zi.view(1, *LATENT))[0].flatten()))(z.flatten(1))
    approx = jacobian(trained_generator, z)
    assert approx.shape == (6, 32 * 32, 64)
    assert (approx - exact).norm() / exact.norm() < 0.03  # the ~1% LM tolerates, not a different matrix
    with pytest.raises(ValueError, match="chord_steps must be at least 1, got 0"):
        levenberg_marquardt(trained_generator, trained_generator(z), z.clone(), 2, 1e-6, chord_steps=0)


def test_unknown_search_method_is_refused_in_one_line():
    with pytest.raises(ValueError, match="unknown search method 'lbfgs'; use one of adam, encoder-lm") as info:
        ReconstructionConfig(method="lbfgs")
    assert "\n" not in str(info.value)


def test_concurrent_searches_in_threads_match_the_serial_ones():
    # the attribution flow scores batches in threads: a search must hold no state shared between calls
    from concurrent.futures import ThreadPoolExecutor

    torch.manual_seed(0)
    skip = SkipToOutput().eval()
    encoder = train_encoder(skip, skip.latent_shape, (1, 8, 8), RANGE, steps=20, seed=0)
    floor = quantisation_floor(RANGE)
    batches = [torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(i)) * 2 - 1 for i in range(6)]

    def search(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            z = encoder(x)
        return levenberg_marquardt(skip, x, z, 5, floor)

    serial = [search(x) for x in batches]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(search, batches))
    for a, b in zip(serial, threaded):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_exits_settle_where_the_trajectory_first_crosses_an_exit():
    exits = Exits(accept=0.1, screen=(5.0, 1.0))
    trajectories = torch.tensor([
        [0.5, 0.2, 0.05, 0.01],  # accepted once at or below 0.1: stops before its third Jacobian
        [6.0, 0.2, 0.05, 0.01],  # above the first screen: rejected at the start
        [0.5, 2.0, 1.5, 0.5],  # above the second screen after one Jacobian
        [0.5, 0.9, 0.9, 0.9],  # never settled: its last loss
    ])
    torch.testing.assert_close(exits.settle(trajectories), torch.tensor([0.05, 6.0, 2.0, 0.9]))
    torch.testing.assert_close(Exits().settle(trajectories), trajectories[:, -1])


def test_screens_are_checked_on_the_half_of_the_items_they_were_not_set_on():
    pristine = torch.tensor([
        [2.0, 0.5, 0.1],  # item 0 (fold 0)
        [5.0, 0.5, 0.5],  # item 1 (fold 1): attributed, but far above fold 0's first screen (2 x 1.5)
        [1.0, 0.4, 0.2],  # item 2 (fold 0)
        [1.0, 1.0, 3.0],  # item 3 (fold 1): not attributed, so neither sets nor meets a screen
    ])
    resaved = torch.tensor([
        [2.0, 0.9, 0.3],
        [4.0, math.nan, 0.6],  # item 1 re-saved: above fold 0's first screen too; NaN: never there
        [1.0, 0.8, 0.4],
        [1.0, 0.6, 0.2],  # item 3 re-saved: attributed, within fold 0's screens
    ])
    # fold 1 sets its first screen from items 1 and 3 (5 x 1.5): nothing of fold 0 is cut; fold 0's
    # (2 x 1.5) cuts item 1 pristine and re-saved, but not item 3 re-saved: 2 of 7 attributed items
    assert Exits.held_out_cuts([pristine, resaved], threshold=1.0, accept=0.05) == pytest.approx(2 / 7)
    assert Exits.held_out_cuts([pristine, resaved], threshold=1.0, accept=0.05, margin=3.0) == 0.0  # 2 x 3 > 5


def _own_and_noise() -> tuple[nn.Module, nn.Module, float, torch.Tensor]:
    """A tiny generator, its briefly trained encoder, the quantisation floor, and 48 targets: 24
    of its own 8-bit samples, then 24 noise images."""
    torch.manual_seed(0)
    skip = SkipToOutput().eval()
    encoder = train_encoder(skip, skip.latent_shape, (1, 8, 8), RANGE, steps=30, seed=0)
    own = to_output_range(generate_samples(skip, skip.latent_shape, 24, 7, RANGE), *RANGE)
    noise = torch.rand(24, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return skip, encoder, quantisation_floor(RANGE), torch.cat([own, noise])


def test_a_search_with_exits_stops_where_its_exhaustive_trajectory_settles():
    skip, encoder, floor, targets = _own_and_noise()
    with torch.no_grad():
        start = encoder(targets)
    full = lm_trajectories(skip, targets, start.clone(), 6, floor)
    assert (full.diff(dim=1) <= 0).all()  # a trajectory only goes down
    threshold = float(full[:24, -1].quantile(0.9))
    exits = Exits.calibrated(full[:24], threshold=threshold, accept=threshold)
    assert len(exits.screen) == 6
    stopped = lm_trajectories(skip, targets, start.clone(), 6, floor, exits)[:, -1]
    torch.testing.assert_close(stopped, exits.settle(full), rtol=1e-4, atol=1e-7)
    # the verdict is the exhaustive one's, and no own item within the threshold is cut by the screen
    assert torch.equal(stopped <= threshold, full[:, -1] <= threshold)
    assert (stopped[24:] > threshold).all()
    assert (stopped[24:] > full[24:, -1]).all()  # each rejected item stopped before its search's end


def test_fixed_point_steps_bring_own_items_closer_and_a_search_with_them_stops_where_its_trajectory_settles():
    skip, encoder, floor, targets = _own_and_noise()
    z, steps, settled = fixed_point_trajectories(skip, encoder, targets, 4, floor)
    assert steps.shape == (48, 5) and not settled[24:].any()  # no exits: only the floor settles an item
    assert (steps.diff(dim=1) <= 0).all()
    assert steps[:24, -1].median() < steps[:24, 0].median() / 4, steps[:24].median(0).values
    with torch.no_grad():  # the latents returned are those of the lowest loss reached
        torch.testing.assert_close(((skip(z) - targets) ** 2).flatten(1).mean(1), steps[:, -1])
    full = encoder_lm_trajectories(skip, encoder, targets, 4, 6, floor)
    assert full.shape == (48, 11) and (full.diff(dim=1) <= 0).all()
    torch.testing.assert_close(full[:, :5], steps)
    threshold = float(full[:24, -1].quantile(0.9))
    exits = Exits.calibrated(full[:24], threshold=threshold, accept=threshold)
    assert len(exits.screen) == 10
    stopped = encoder_lm_trajectories(skip, encoder, targets, 4, 6, floor, exits)[:, -1]
    torch.testing.assert_close(stopped, exits.settle(full), rtol=1e-4, atol=1e-7)
    assert torch.equal(stopped <= threshold, full[:, -1] <= threshold)
    assert (stopped[24:] > full[24:, -1]).all()  # each rejected item stopped before its search's end


def test_steps_that_minimise_the_metric_end_lower_in_it_than_steps_that_minimise_the_mse():
    skip, encoder, floor, _ = _own_and_noise()
    resaved = to_output_range(perturb(generate_samples(skip, skip.latent_shape, 24, 7, RANGE), "jpeg q70"), *RANGE)
    metric = ResidualMetric("jpeg", (1, 8, 8), RANGE)
    with torch.no_grad():
        start = encoder(resaved)
    by_mse = lm_trajectories(skip, resaved, start.clone(), 6, floor, metric=metric)[:, -1]
    z = start.clone()
    by_metric = lm_trajectories(skip, resaved, z, 6, metric.floor, whitened=metric)
    assert (by_metric.diff(dim=1) <= 0).all()
    with torch.no_grad():  # the loss reported is the metric at the latent returned
        torch.testing.assert_close(metric(skip(z) - resaved), by_metric[:, -1], rtol=1e-4, atol=1e-7)
    assert (by_metric[:, -1] <= by_mse * 1.001).all()
    assert by_metric[:, -1].median() < 0.9 * by_mse.median(), (by_metric[:, -1].median(), by_mse.median())


class FewDirections(nn.Module):
    """A generator whose output moves mostly along a few latent directions (``decay`` per
    direction, in a random orthonormal frame), as briefly trained DCGANs' do; ``decay=1``: every
    direction alike."""

    def __init__(self, decay: float, dim: int = 32):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        frame = torch.linalg.qr(torch.randn(dim, dim, generator=g))[0]
        self.latent_shape = (dim,)
        self.register_buffer("mix", frame * decay ** torch.arange(dim, dtype=torch.float32))
        self.head = nn.Linear(dim, 2 * 8 * 8)
        self.up = nn.ConvTranspose2d(2, 1, 4, 2, 1)

    def forward(self, z):
        return torch.tanh(self.up(torch.tanh(self.head(z @ self.mix.T)).view(-1, 2, 8, 8)))


def test_the_sketch_holds_the_directions_that_move_the_output_most():
    module = FewDirections(decay=0.3).eval()
    differentiate = search_jacobian(module, module.latent_shape)
    basis = sketch_basis(differentiate, module.latent_shape, max_dims=16, seed=0)
    k = basis.shape[1]
    assert basis.shape[0] == 32 and 1 <= k <= 8
    torch.testing.assert_close(basis.T @ basis, torch.eye(k), rtol=0, atol=1e-4)  # orthonormal
    z = torch.randn(32, 32, generator=torch.Generator().manual_seed(9))
    jac = jacobian(module, z)
    captured = float((jac @ basis).norm() ** 2 / jac.norm() ** 2)
    random = torch.linalg.qr(torch.randn(32, k, generator=torch.Generator().manual_seed(1)))[0]
    # at latents it was not estimated at, the sketch keeps what moves the output; k random
    # directions keep about k / 32 of it
    assert captured > 0.98 and captured > 2 * float((jac @ random).norm() ** 2 / jac.norm() ** 2)
    # where every direction moves the output alike, no few directions do: no sketch
    alike = FewDirections(decay=1.0).eval()
    assert sketch_basis(search_jacobian(alike, alike.latent_shape), alike.latent_shape, max_dims=16, seed=0) is None


@pytest.mark.slow
def test_a_sketched_first_step_settles_most_own_items_and_the_search_still_reaches_the_floor():
    torch.manual_seed(0)
    module = FewDirections(decay=0.3).eval()
    latent, shape = module.latent_shape, (1, 16, 16)
    floor = quantisation_floor(RANGE)
    differentiate = search_jacobian(module, latent)
    basis = sketch_basis(differentiate, latent, max_dims=16, seed=0)
    encoder = train_encoder(module, latent, shape, RANGE, steps=20, seed=0)  # a rough start
    own = to_output_range(generate_samples(module, latent, 40, 99, RANGE), *RANGE)
    noise = torch.rand(40, *shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    targets = torch.cat([own, noise])
    with torch.no_grad():
        start = encoder(targets)
    full = lm_trajectories(module, targets, start.clone(), 6, floor, differentiate=differentiate)
    sketched = lm_trajectories(module, targets, start.clone(), 6, floor, differentiate=differentiate, basis=basis)
    assert (sketched.diff(dim=1) <= 0).all()
    # exhaustive, the sketched search ends where the full one does: own items at the floor, noise far above
    assert np.quantile(sketched[:40, -1].numpy(), 0.95) <= 3 * floor
    assert sketched[40:, -1].min() > 30 * floor
    # the sketched step alone takes own items most of the way a full first Jacobian does
    gain_sketch, gain_full = (sketched[:40, 0] / sketched[:40, 1]).median(), (full[:40, 0] / full[:40, 1]).median()
    assert gain_sketch > 0.3 * gain_full and gain_sketch > 3, (gain_sketch, gain_full)
    # with exits calibrated on the sketched trajectories, each item stops where its exhaustive one settles
    threshold = float(sketched[:40, -1].quantile(0.9))
    exits = Exits.calibrated(sketched[:40], threshold=threshold, accept=threshold)
    stopped = lm_trajectories(module, targets, start.clone(), 6, floor, exits, differentiate=differentiate, basis=basis)
    torch.testing.assert_close(stopped[:, -1], exits.settle(sketched), rtol=1e-4, atol=1e-7)
    assert torch.equal(stopped[:, -1] <= threshold, sketched[:, -1] <= threshold)


@pytest.mark.slow
def test_calibration_stops_milder_conditions_early_and_sets_the_thresholds_an_exhaustive_search_would(trained_generator):
    from flipad.detectors.calibration import CalibratedDetector
    from flipad.io.perturb import perturb

    config = ReconstructionConfig(method="encoder-lm", encoder_steps=150)
    det = ReconstructionLossDetector(trained_generator, LATENT, fnr=(0.005, 0.05), n_validation=120, config=config,
                                     progress=False, perturbations=("jpeg q95", "jpeg q90", "jpeg q80", "jpeg q70"),
                                     n_perturbed=80)
    validation = det.generate(120, seed=3)
    det.fit(validation=validation)
    info = det.fit_info_["perturbations"]
    assert info["jpeg q70"]["searched_until"] == 0.0  # the lowest quality is searched to the end
    assert all(info[name]["searched_until"] > 0 for name in ("jpeg q95", "jpeg q90", "jpeg q80"))
    assert det.fit_info_["searched_until"] >= info["jpeg q80"]["searched_until"]  # the pristine set last
    assert det.fit_summary()["validation_settled_early"] > 0.5
    # the screens' two-fold check: the share of own calibration items cut by the other half's screens
    assert 0.0 <= det.fit_summary()["screens_cut_held_out"] <= 0.05
    # every search to its end: the same thresholds, and looser (or equal) screens
    exhaustive = {name: det.search_.trajectories(perturb(validation[:80], name)) for name in info}
    reference = CalibratedDetector()
    reference.fnr = det.fnr
    reference._calibrate(det.search_.trajectories(validation)[:, -1], {k: t[:, -1] for k, t in exhaustive.items()})
    for fnr, threshold in reference.thresholds_.items():
        assert det.thresholds_[fnr] == pytest.approx(threshold, rel=1e-6)
    stopped = det.condition_scores_["jpeg q95"]
    exact = exhaustive["jpeg q95"][:, -1].double()
    assert (stopped >= exact - 1e-9).all() and (stopped > exact + 1e-9).sum() > 20  # most stopped early


def test_the_encoder_trains_fewer_batches_on_a_costlier_generator_within_its_budget():
    from flipad.generators.architectures import DCGANGenerator

    small = DCGANGenerator(latent_dim=64, channels=1, image_size=32, width=16).eval()
    paper = DCGANGenerator(latent_dim=100, channels=3, image_size=64, width=64).eval()  # the paper's 64x64 RGB
    assert encoder_steps_within(small, LATENT, SHAPE, RANGE, 1000, tflop=48) == 1000
    steps = encoder_steps_within(paper, (100, 1, 1), (3, 64, 64), RANGE, 1000, tflop=48)
    # one step of 256 pairs is about 0.8 GFLOP per pair at 64x64 RGB: about 235 batches in 48 TFLOP
    assert 150 <= steps <= 350, steps
    assert encoder_steps_within(paper, (100, 1, 1), (3, 64, 64), RANGE, 1000, tflop=96) > steps
    assert encoder_steps_within(paper, (100, 1, 1), (3, 64, 64), RANGE, 1000, tflop=0) == 1000  # no budget
    assert encoder_steps_within(paper, (100, 1, 1), (3, 64, 64), RANGE, 1000, tflop=1) == 100  # the floor
    assert encoder_steps_within(paper, (100, 1, 1), (3, 64, 64), RANGE, 40, tflop=1) == 40  # never past the maximum
