"""``onboard_generator``: sample a generator, invert, train Deep SAD, evaluate, log and register in MLflow.

The inversion is the expensive step: it runs as the task ``compute_features`` (tag ``inversion``,
so a GPU work pool or a concurrency limit can own it; CUDA when the worker has it), retried on
failure and cached by a key made of content hashes (generator weights, the exact samples, the
feature configuration), never of paths: a rerun with the same inputs skips it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from prefect import flow, task
from prefect.context import TaskRunContext
from pydantic import BaseModel, ConfigDict, Field

import flipad
from flipad.generators.adapter import GeneratorAdapter
from flipad.detectors.bundle import Detector, detector_kind, flipad_family
from flipad.detectors.calibration import fnr_upper_bound
from flipad.detectors.verdict import CALIBRATION_SEED_OFFSET, AttributionDetector
from flipad.io.data import encode_item, load_dataset, pixel_stats
from flipad.detectors.deepsad import DeepSADConfig
from flipad.detectors.flipad import TRAIN_SEED_OFFSET, VALIDATION_SEED_OFFSET, FlipadDetector
from flipad.detectors.evaluation import evaluate_scores
from flipad.detectors.features import FeatureConfig, FeatureExtractor
from flipad.generators.loading import GeneratorSource
from flipad.detectors.reconstruction import ReconstructionConfig
from registry.runs import OnboardingRecord, log_run
from registry.store import connect, ui_command
from registry.versions import Registration, register_version

__all__ = ["OnboardConfig", "OnboardResult", "onboard_generator"]

logger = logging.getLogger(__name__)

TEST_SEED_OFFSET = 3000
OWN = "generator (held-out)"


class OnboardConfig(BaseModel):
    """Parameters of one onboarding run (validated at the flow's edge)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$", description="registered model name")
    generator: str = Field(description="built-in name, path/to/file.py:factory or package.module:factory")
    weights: str | None = None
    generator_kwargs: dict[str, Any] = Field(default_factory=dict)
    latent_shape: tuple[int, ...] | None = None
    real: str = Field(description="folder of images, .npy/.npz, or CSV of real data")
    negatives: tuple[str, ...] = ()
    num_samples: int = Field(2000, ge=10, description="generator samples (and at most as many real items) to train on")
    num_validation: int = Field(1000, ge=20)
    num_test: int = Field(500, ge=10, description="held-out items per source")
    fnr: tuple[float, ...] = (0.005, 0.01, 0.05)
    features: Literal["flipad", "raw", "dct"] = "flipad"
    constrained: bool = Field(False, description="bounded + censored inversion (open-world; see docs/benchmarks.md)")
    deep_sad_epochs: int = Field(50, ge=1)
    detector: Literal["flipad", "combined"] = Field(
        "flipad", description="flipad, or combined: FLIPAD + reconstruction loss, one calibrated verdict (slower)")
    search_steps: int = Field(ReconstructionConfig.steps, ge=10, description="combined: Adam steps of the latent search per item")
    search_starts: int = Field(ReconstructionConfig.starts, ge=1, description="combined: starts of the latent search per item")
    device: str = "auto"
    promote: Literal["auto", "always", "never"] = "auto"
    seed: int = 0


@dataclass(frozen=True)
class FeatureSet:
    """Unscaled features of one sample set, with per-item inversion diagnostics (NaN for raw/dct)."""

    features: torch.Tensor
    residual: np.ndarray
    sparsity: np.ndarray
    iterations: np.ndarray
    converged: np.ndarray
    seconds: float


@dataclass(frozen=True)
class OnboardResult:
    name: str
    version: str
    alias: str
    run_id: str
    run_url: str
    tracking_uri: str
    ui_command: str
    metrics: dict[str, float]
    results: pd.DataFrame
    cached_feature_sets: int
    detector: Detector


def sha256_array(array: np.ndarray) -> str:
    digest = hashlib.sha256(str((array.shape, array.dtype.str)).encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _features_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    adapter: GeneratorAdapter = parameters["adapter"]
    parts = {
        "generator": adapter.fingerprint,
        "anchor": [adapter.seed, adapter.anchor_samples],
        "device": adapter.device.type,
        "features": parameters["config"].to_dict(),
        "samples": sha256_array(parameters["samples"]),
        "flipad": flipad.__version__,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


@task(name="load-generator", persist_result=False)
def load_generator_task(config: OnboardConfig) -> tuple[GeneratorAdapter, GeneratorSource]:
    """Build the generator from its spec and weights and trace its final layer."""
    source = GeneratorSource(config.generator, dict(config.generator_kwargs), config.latent_shape)
    module = source.load(config.weights)
    adapter = GeneratorAdapter.from_module(module, config.latent_shape, device=config.device, seed=config.seed)
    logger.info("generator %s sha256 %s", config.generator, adapter.fingerprint)
    return adapter, source


@task(name="draw-samples", persist_result=False)
def draw_samples(adapter: GeneratorAdapter, n: int, seed: int) -> np.ndarray:
    """``n`` samples of the generator in eval mode, quantised to 8 bits (images)."""
    return adapter.generate(n, seed=seed)


@task(name="load-data", persist_result=False)
def load_split(path: str, shape: tuple[int, ...], num_train: int, num_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Load a data set for the generator's output shape and split it into train and held-out test."""
    data = load_dataset(path, shape)
    if len(data) < 4:
        raise ValueError(f"{path} holds {len(data)} items; at least 4 are needed to train and test")
    order = np.random.default_rng(seed).permutation(len(data))
    n_test = min(num_test, max(1, len(data) // 5))
    test, train = order[:n_test], order[n_test:][:num_train]
    return data[train], data[test]


@task(
    name="compute-features",
    tags=["inversion"],
    cache_key_fn=_features_cache_key,
    persist_result=True,
    retries=2,
    retry_delay_seconds=5,
)
def compute_features(adapter: GeneratorAdapter, config: FeatureConfig, samples: np.ndarray, label: str) -> FeatureSet:
    """Features of ``samples`` (the final-layer inversion for FLIPAD), on the adapter's device."""
    start = time.perf_counter()
    extractor = FeatureExtractor(adapter, config)
    features = extractor(samples, progress=True)
    result = extractor.last_inversion
    n = len(samples)
    if result is None:
        nan = np.full(n, np.nan)
        return FeatureSet(features, nan, nan, nan, np.ones(n, bool), time.perf_counter() - start)
    return FeatureSet(
        features,
        result.residual.double().numpy(),
        result.sparsity.numpy(),
        result.iterations.double().numpy(),
        result.converged.numpy(),
        time.perf_counter() - start,
    )


@task(name="train-detector", persist_result=False, retries=1)
def train_detector(
    adapter: GeneratorAdapter, config: OnboardConfig, own: FeatureSet, negatives: list[FeatureSet], validation: FeatureSet
) -> FlipadDetector:
    """Deep SAD on the generator's features (normal) against the negatives, thresholds on validation."""
    detector = FlipadDetector(
        adapter, features=config.features, fnr=config.fnr, n_generated=config.num_samples,
        n_validation=config.num_validation, device=config.device, seed=config.seed,
        deep_sad=DeepSADConfig(epochs=config.deep_sad_epochs, seed=config.seed),
    )
    stats = {"converged_fraction": float(own.converged.mean()), "iterations_mean": float(np.nanmean(own.iterations))}
    return detector.fit_features(
        own.features, torch.cat([n.features for n in negatives]), validation.features, stats
    )


@task(name="calibrate-combined", tags=["inversion"], persist_result=False, retries=1)
def calibrate_combined(
    adapter: GeneratorAdapter, config: OnboardConfig, flipad_detector: FlipadDetector, validation: np.ndarray,
    calibration: np.ndarray, calibration_features: FeatureSet,
) -> AttributionDetector:
    """The combined verdict around the trained FLIPAD detector: the reconstruction family's latent
    search on the validation samples, then the joint thresholds on the calibration samples."""
    search = ReconstructionConfig(steps=config.search_steps, starts=config.search_starts, seed=config.seed,
                                  candidates=max(ReconstructionConfig.candidates, config.search_starts))
    detector = AttributionDetector(adapter.module, adapter.latent_shape, fnr=config.fnr, n_validation=len(validation),
                                   n_calibration=len(calibration), reconstruction=search, device=config.device,
                                   seed=config.seed, progress=False)
    return detector.fit_families(flipad_detector, validation, calibration=calibration,
                                 flipad_calibration_scores=flipad_detector.score_features(calibration_features.features))


def _key(name: str) -> str:
    return "".join(c if c.isalnum() or c in "_-." else "_" for c in name)


def family_anomaly(detector: Detector, test: dict[str, FeatureSet], samples: dict[str, np.ndarray],
                   feature_config: FeatureConfig, adapter: GeneratorAdapter) -> dict[str, dict[str, np.ndarray]]:
    """Anomaly scores per family ("combined" is the verdict's own; FLIPAD alone: "flipad") and source.

    Features computed by this run are reused whenever the detector's FLIPAD part would compute
    the same ones (same generator, anchor and feature configuration).
    """
    flipad_part = flipad_family(detector)
    reuse = flipad_part is not None and (
        flipad_part.feature_config == feature_config
        and flipad_part.adapter.fingerprint == adapter.fingerprint
        and torch.equal(flipad_part.adapter.anchor.cpu(), adapter.anchor.cpu())
    )
    out: dict[str, dict[str, np.ndarray]] = {}
    for name, fs in test.items():
        flipad_scores = flipad_part.score_features(fs.features) if reuse else None
        if isinstance(detector, FlipadDetector):
            scores = {"flipad": flipad_scores if reuse else detector.anomaly_scores(samples[name])}
        else:
            scores = detector.family_scores(samples[name], flipad_scores=flipad_scores)
        for family, values in scores.items():
            out.setdefault(family, {})[name] = values.double().numpy()
    return out


def _verdict(detector: Detector) -> str:
    return "flipad" if isinstance(detector, FlipadDetector) else "combined"


def evaluate(detector: Detector, anomaly: dict[str, dict[str, np.ndarray]]) -> tuple[dict[str, float], pd.DataFrame, dict[str, np.ndarray]]:
    """Metrics per other source and FNR of the verdict (unprefixed) and of each family of a combined
    detector (``flipad.``/``reconstruction.``), the empirical FNR on the held-out generator samples with
    a 95% Clopper-Pearson bound, and the per-source results table. Scores: higher = more typical."""
    verdict = _verdict(detector)
    metrics: dict[str, float] = {}
    table = None
    for family, per_source in anomaly.items():
        part = detector if family == verdict else getattr(detector, f"{family}_")
        prefix = "" if family == verdict else f"{family}."
        family_metrics, pairs = _pair_metrics(part, per_source)
        metrics.update({prefix + k: v for k, v in family_metrics.items()})
        if family == verdict:
            table = pd.DataFrame([p.to_dict() for p in pairs])
    return metrics, table, {name: -scores for name, scores in anomaly[verdict].items()}


def _pair_metrics(detector, anomaly: dict[str, np.ndarray]) -> tuple[dict[str, float], list]:
    own = anomaly[OWN]
    pairs = evaluate_scores(detector.thresholds_, own, {k: v for k, v in anomaly.items() if k != OWN})
    metrics: dict[str, float] = {}
    for p in pairs:
        tag = f"{_key(p.source)}_fnr{p.fnr_target:g}"
        metrics[f"balanced_accuracy_{tag}"] = p.balanced_accuracy
        metrics[f"auc_{_key(p.source)}"] = p.auc
        for field in ("true_positives", "false_negatives", "true_negatives", "false_positives"):
            metrics[f"{field}_{tag}"] = getattr(p, field)
    for fnr, threshold in detector.thresholds_.items():
        misses = int((own > threshold).sum())
        metrics[f"heldout_fnr_fnr{fnr:g}"] = misses / len(own)
        metrics[f"heldout_fnr_upper95_fnr{fnr:g}"] = fnr_upper_bound(misses, len(own))
        metrics[f"validation_fnr_upper95_fnr{fnr:g}"] = detector.fnr_upper_bounds_[fnr]
    first = detector.fnr[0]
    metrics["primary_balanced_accuracy"] = float(np.mean([p.balanced_accuracy for p in pairs if p.fnr_target == first]))
    return metrics, pairs


def primary_metric(
    detector: Detector,
    feature_config: FeatureConfig,
    adapter: GeneratorAdapter,
    test: dict[str, FeatureSet],
    samples: dict[str, np.ndarray],
) -> float:
    """``primary_balanced_accuracy`` of any detector (FLIPAD or combined) on this run's held-out sets."""
    anomaly = family_anomaly(detector, test, samples, feature_config, adapter)[_verdict(detector)]
    first = detector.fnr[0]
    others = {k: v for k, v in anomaly.items() if k != OWN}
    return float(np.mean([p.balanced_accuracy for p in evaluate_scores({first: detector.thresholds_[first]}, anomaly[OWN], others)]))


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5)
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"


def _summary(sets: list[FeatureSet]) -> dict[str, float]:
    residual = np.concatenate([s.residual for s in sets])
    return {
        "inversion_converged_fraction": float(np.mean(np.concatenate([s.converged for s in sets]))),
        "inversion_iterations_mean": float(np.nanmean(np.concatenate([s.iterations for s in sets]))) if np.isfinite(residual).any() else 0.0,
        "inversion_residual_median": float(np.nanmedian(residual)) if np.isfinite(residual).any() else 0.0,
    }


def _reference(
    scores: dict[str, np.ndarray], threshold: float, test: dict[str, FeatureSet], samples: dict[str, np.ndarray]
) -> pd.DataFrame:
    """Per held-out item: source, score and input/feature summaries, the reference monitoring compares with."""
    frames = []
    for name, fs in test.items():
        pixel_mean, pixel_std = pixel_stats(samples[name])
        frames.append(pd.DataFrame({
            "source": name, "score": scores[name], "is_generated": scores[name] >= threshold,
            "residual": fs.residual, "sparsity": fs.sparsity,
            "pixel_mean": pixel_mean, "pixel_std": pixel_std,
        }))
    return pd.concat(frames, ignore_index=True)


@flow(name="onboard-generator")
def onboard_generator(config: OnboardConfig) -> OnboardResult:
    """Onboard one generator: a new registered version of its detector, aliased by the promotion policy."""
    tracking_uri = connect()  # an unreachable server fails here, before any work
    timings: dict[str, float] = {}
    start = time.perf_counter()
    adapter, source = load_generator_task(config)
    shape = adapter.output_shape
    samples = {
        "train": draw_samples(adapter, config.num_samples, TRAIN_SEED_OFFSET + config.seed),
        "validation": draw_samples(adapter, config.num_validation, VALIDATION_SEED_OFFSET + config.seed),
        OWN: draw_samples(adapter, config.num_test, TEST_SEED_OFFSET + config.seed),
    }
    negatives_train: dict[str, np.ndarray] = {}
    for k, path in enumerate((config.real, *config.negatives)):
        label = "real" if k == 0 else f"negatives {k}: {Path(path).name}"
        negatives_train[label], samples[label] = load_split(path, shape, config.num_samples, config.num_test, config.seed + k)
    timings["time_sample_and_load_s"] = time.perf_counter() - start

    feature_config = FeatureConfig(kind=config.features, bounded=config.constrained, censored=config.constrained)
    start = time.perf_counter()
    states = {name: compute_features(adapter, feature_config, data, name, return_state=True) for name, data in samples.items()}
    negative_states = {name: compute_features(adapter, feature_config, data, f"{name} (train)", return_state=True)
                       for name, data in negatives_train.items()}
    cached = sum(s.name == "Cached" for s in [*states.values(), *negative_states.values()])
    features = {name: state.result() for name, state in states.items()}
    negative_features = [state.result() for state in negative_states.values()]
    n_items = sum(len(d) for d in samples.values()) + sum(len(d) for d in negatives_train.values())
    timings["time_features_s"] = time.perf_counter() - start
    timings["throughput_features_items_per_s"] = n_items / max(timings["time_features_s"], 1e-9)

    start = time.perf_counter()
    detector = train_detector(adapter, config, features["train"], negative_features, features["validation"])
    timings["time_deep_sad_s"] = time.perf_counter() - start
    if config.detector == "combined":
        start = time.perf_counter()
        calibration = draw_samples(adapter, config.num_validation, CALIBRATION_SEED_OFFSET + config.seed)
        calibration_features = compute_features(adapter, feature_config, calibration, "calibration")
        detector = calibrate_combined(adapter, config, detector, samples["validation"], calibration, calibration_features)
        timings["time_combined_calibration_s"] = time.perf_counter() - start

    start = time.perf_counter()
    test = {name: fs for name, fs in features.items() if name not in ("train", "validation")}
    test_samples = {name: samples[name] for name in test}
    metrics, table, scores = evaluate(detector, family_anomaly(detector, test, test_samples, feature_config, adapter))
    metrics.update(_summary([*features.values(), *negative_features]))
    timings["time_evaluate_s"] = time.perf_counter() - start
    metrics.update(timings)

    flipad_part = flipad_family(detector)
    activation_means = {name: fs.features.mean(0).numpy() for name, fs in test.items()} if config.features == "flipad" else {}
    record = OnboardingRecord(
        name=config.name,
        detector=detector,
        source=source,
        params={**config.model_dump(exclude={"generator_kwargs"}), **{f"generator_kwargs.{k}": v for k, v in config.generator_kwargs.items()},
                "feature_config": feature_config.to_dict(), "deep_sad": flipad_part.trainer_.config.__dict__,
                **({"reconstruction_search": asdict(detector.reconstruction_.config)} if config.detector == "combined" else {}),
                "final_layer": adapter.final_layer_name, "activation": adapter.activation.name,
                "output_shape": list(shape), "latent_shape_traced": list(adapter.latent_shape)},
        metrics=metrics,
        results=table,
        scores=scores,
        own_source=OWN,
        mean_activations=activation_means,
        reference=_reference(scores, -detector.threshold(), test, test_samples),
        input_example=[encode_item(samples[OWN][i]) for i in range(min(2, config.num_test))],
        tags={"generator_sha256": adapter.fingerprint, "detector_kind": detector_kind(detector), "flipad_version": flipad.__version__, "git_commit": _git_commit(),
              **{f"data_sha256.{_key(name)}": sha256_array(data) for name, data in samples.items()}},
    )
    logged = log_run(record)
    registration: Registration = register_version(
        config.name,
        logged.model_uri,
        metrics["primary_balanced_accuracy"],
        lambda champion: primary_metric(champion, feature_config, adapter, test, test_samples),
        promote=config.promote,
        tags={**record.tags, "run_id": logged.run_id},
        description=(f"{'FLIPAD' if config.detector == 'flipad' else 'Combined (FLIPAD + reconstruction loss)'} detector for {config.generator} (sha256 {adapter.fingerprint[:12]}); held-out balanced "
                     f"accuracy {metrics['primary_balanced_accuracy']:.4f} at FNR {config.fnr[0]}"),
    )
    return OnboardResult(
        config.name, registration.version, registration.alias, logged.run_id, logged.run_url, tracking_uri,
        ui_command(tracking_uri), metrics, table, cached, detector,
    )

