"""``onboard_generator``: build a detector of any registered kind, fit it, evaluate, log and register in MLflow.

The detector's own ``fit`` runs every stage of its family. The expensive ones (any family's
:class:`~flipad.detectors.base.Stage`: the final-layer inversion, the latent search, ...) reach
it through :class:`PrefectStages`: each runs as one Prefect task named after the stage (tags
``inversion`` and ``device:cpu|cuda``, so a GPU work pool or a concurrency limit can own it),
retried on failure and cached by a key made of content hashes (the stage's fingerprint: weights
and configuration; the exact samples), never of paths: a rerun with the same inputs skips them.
Nothing here knows a family: each kind's settings arrive as ``--set KIND.KEY=VALUE`` values
(:func:`~flipad.kinds.family_settings`).
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.context import TaskRunContext
from pydantic import BaseModel, ConfigDict, Field, field_validator

import flipad
from flipad.detectors.base import (
    Detector,
    DetectorSettings,
    Scores,
    Seeds,
    Stage,
    Stages,
    detector_class,
    sha256_array,
)
from flipad.detectors.calibration import fnr_upper_bound
from flipad.detectors.evaluation import evaluate_scores
from flipad.generators import GeneratorSource, weights_fingerprint
from flipad.io.data import encode_item, load_dataset, pixel_stats
from flipad.kinds import diagnostic_columns, family_settings
from flipad.io.perturb import perturb
from flipad.progress import stage as progress_stage
from registry.card import model_card
from registry.runs import OnboardingRecord, log_run, onboarding_run
from registry.store import connect, ui_command
from registry.versions import Registration, register_version

from .secrets import master_secret
from .stage_cache import STAGE_CACHE_PREFIX, STAGE_CACHE_TTL

__all__ = ["OnboardConfig", "OnboardResult", "PrefectStages", "onboard_generator", "TEST_SEED_OFFSET", "OWN"]

logger = logging.getLogger(__name__)

OWN = "generator (held-out)"
TEST_SEED_OFFSET = Seeds().test  # held-out generator samples are drawn with Seeds(seed).test


class OnboardConfig(BaseModel):
    """Parameters of one onboarding run (validated at the flow's edge)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$", description="registered model name")
    generator: str = Field(description="built-in name, path/to/file.py:factory or package.module:factory")
    weights: str | None = None
    weights_key: str | None = Field(None, description="the key of the generator's state dict in a checkpoint that holds several")
    generator_kwargs: dict[str, Any] = Field(default_factory=dict)
    latent_shape: tuple[int, ...] | None = None
    real: str = Field(description="folder of images, .npy/.npz, or CSV of real data")
    negatives: tuple[str, ...] = ()
    num_samples: int = Field(2000, ge=10, description="generator samples (and at most as many real items) to train on")
    num_validation: int = Field(1000, ge=20)
    num_test: int = Field(500, ge=10, description="held-out items per source")
    fnr: tuple[float, ...] = (0.005, 0.01, 0.05)
    detector: str | None = Field(None, description="a registered detector kind (flipad.DETECTOR_KINDS); default: the "
                                 "generator's own (autoencoder for diffusers:FOLDER), else reconstruction")
    samples: str | None = Field(None, description="the owner's generated images (a folder or array): own items for "
                                "the thresholds and the evaluation, where the family would otherwise make them")
    family_settings: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="KIND -> KEY -> VALUE: the kinds' own settings (flipad families lists them)")
    open_world: bool = Field(True, description="also evaluate recompressed own samples and look-alike challengers")
    challenger_steps: int = Field(300, ge=0, description="GAN steps of the retrained and fine-tuned look-alikes (0: none)")
    num_challenger: int = Field(200, ge=10, description="held-out items per look-alike and per recompressed variant")
    device: str = "auto"
    promote: str = Field("auto", pattern="^(auto|always|never)$")
    seed: int = 0
    secret_file: str | None = Field(None, description="the owner's master secret, for a kind that declares one "
                                    "(a file with owner-only permissions; default $FLIPAD_KEY_SECRET_FILE)")
    secret_block: str | None = Field(None, description="the master secret as a Prefect Secret block of this name")

    @field_validator("detector")
    @classmethod
    def _known_kind(cls, value: str | None) -> str | None:
        if value is None:
            return None
        kind = detector_class(value).kind  # ValueError naming the known kinds
        return value if ":" in value else kind  # package.module:kind stays, for the process that runs the flow

    @field_validator("family_settings")
    @classmethod
    def _known_settings(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        family_settings(value)  # ValueError naming the KIND.KEY and what to do
        return value

    def detector_settings(self) -> DetectorSettings:
        """The detector settings these parameters ask for."""
        return DetectorSettings(
            fnr=self.fnr, n_generated=self.num_samples, n_validation=self.num_validation,
            n_calibration=self.num_validation, device=self.device, seed=self.seed, progress=False,
            families=family_settings(self.family_settings),
        )


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
    same_generator: tuple[str, ...] = ()  # other registered detectors of the same generator weights


def _stage_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """The cache key, and the result's file under Prefect's storage (``flows/stage_cache.py``):
    the stage's fingerprint, the samples' content and flipad's version."""
    stage, samples = parameters["stage"], parameters["samples"]
    key = f"{stage.name}\0{stage.fingerprint()}\0{sha256_array(samples)}\0{flipad.__version__}"
    return f"{STAGE_CACHE_PREFIX}/{hashlib.sha256(key.encode()).hexdigest()}"


@task(name="stage", tags=["inversion"], cache_key_fn=_stage_key, persist_result=True, cache_expiration=STAGE_CACHE_TTL,
      retries=2, retry_delay_seconds=5)
def run_stage(stage: Stage, samples: np.ndarray, label: str) -> Any:
    """One expensive stage of a family on ``samples``, on the stage's device."""
    return stage.run(samples)


class PrefectStages(Stages):
    """A detector's stages as cached, retried Prefect tasks, one per stage and sample set, named
    ``STAGE [LABEL]`` and tagged with the stage's device; counts the results served from the cache."""

    def __init__(self) -> None:
        self.cached = 0
        self.computed = 0

    def run(self, stage: Stage, samples: np.ndarray, label: str) -> Any:
        task_fn = run_stage.with_options(name=stage.name, task_run_name=f"{stage.name} [{label}]",
                                         tags={"inversion", f"device:{stage.device}"})
        with progress_stage(f"{stage.name} [{label}]", len(samples)):
            state = task_fn(stage, samples, label, return_state=True)
        if state.name == "Cached":
            self.cached += 1
        else:
            self.computed += 1
        return state.result()


@task(name="load-generator", persist_result=False)
def build_detector(config: OnboardConfig) -> tuple[Detector, GeneratorSource]:
    """The generator from its spec and weights, wrapped in an unfitted detector of the asked kind."""
    source = GeneratorSource(config.generator, dict(config.generator_kwargs), config.latent_shape)
    module = source.load(config.weights, weights_key=config.weights_key)
    kind = detector_class(config.detector or getattr(module, "default_detector", "reconstruction"))
    detector = kind.from_settings(module, config.latent_shape, config.detector_settings())
    if kind.secret:
        secret = master_secret(config.secret_file, config.secret_block)
        if secret is None:
            raise ValueError(f"--detector {kind.kind} needs the owner's secret ({kind.secret}): give --secret-file, "
                             "--secret-block or FLIPAD_KEY_SECRET_FILE")
        detector.use_secret(secret)
    return detector, source


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


def source_key(name: str) -> str:
    """A source's name as it appears in metric names (letters, digits, ``_-.``)."""
    return "".join(c if c.isalnum() or c in "_-." else "_" for c in name)


def evaluate(detector: Detector, scores: dict[str, Scores],
             own_variants: dict[str, Scores] | None = None) -> tuple[dict[str, float], pd.DataFrame]:
    """Metrics per other source and FNR of the verdict (unprefixed) and, where the verdict has
    several families, of each family (``flipad.``/``reconstruction.``): balanced accuracy, AUC,
    confusion counts, the empirical FNR on the held-out generator samples with a 95%
    Clopper-Pearson bound; per recompressed variant of the held-out generator samples the share
    attributed; the worst source and variant as the headline; and the verdict's per-source
    results table."""
    own = scores[OWN]
    metrics, pairs = _pair_metrics(detector, {k: s.score for k, s in scores.items()},
                                   {k: s.thresholds for k, s in scores.items()})
    for name, s in scores.items():
        if s.resaved_thresholds:  # scored as lossless by a family that leaves some of them undecided
            metrics[f"undecided_{source_key(name)}"] = float(s.is_undecided().mean())
    for fnr, threshold in (own.resaved_thresholds or own.thresholds).items():
        metrics[f"threshold_fnr{fnr:g}"] = threshold  # on the score: attributed when score >= threshold
    if own.resaved_thresholds:  # the stricter ones lossless items are judged against
        metrics.update({f"threshold_unaltered_fnr{fnr:g}": t for fnr, t in own.thresholds.items()})
    first = next(iter(own.thresholds))
    worst = min((p for p in pairs if p.fnr_target == first), key=lambda p: p.balanced_accuracy)
    metrics["worst_balanced_accuracy"] = worst.balanced_accuracy
    accepted = {"pristine": float(own.is_generated().mean())}
    for variant, s in (own_variants or {}).items():
        for fnr in s.thresholds:
            metrics[f"own_accepted_{source_key(variant)}_fnr{fnr:g}"] = float(s.is_generated(fnr).mean())
        accepted[variant] = float(s.is_generated().mean())
    metrics["worst_own_accepted"] = min(accepted.values())
    if len(own.families) > 1:
        for family, thresholds in own.family_thresholds.items():
            family_metrics, _ = _pair_metrics(detector.parts()[family], {k: s.families[family] for k, s in scores.items()},
                                              {k: s.family_thresholds[family] for k, s in scores.items()})
            metrics.update({f"{family}.{k}": v for k, v in family_metrics.items()})
    table = pd.DataFrame([p.to_dict() for p in pairs])
    table.attrs["worst_source"] = worst.source
    table.attrs["worst_own_variant"] = min(accepted, key=accepted.get)
    return metrics, table


def headline(metrics: dict[str, float], table: pd.DataFrame, fnr: float) -> str:
    """The version's one-line summary: the worst source and the worst recompressed variant, not the mean."""
    return (f"worst source {table.attrs['worst_source']}: balanced accuracy {metrics['worst_balanced_accuracy']:.4f} "
            f"at FNR {fnr}; own items attributed {metrics['worst_own_accepted']:.3f} at worst "
            f"({table.attrs['worst_own_variant']})")


def _pair_metrics(part, scores: dict[str, np.ndarray],
                  thresholds: dict[str, dict[float, float]]) -> tuple[dict[str, float], list]:
    """``scores`` and ``thresholds`` per set (each set is judged against its own: a lossless set
    may have stricter ones); the own set's are the verdict's."""
    own = scores[OWN]
    others = [k for k in scores if k != OWN]
    pairs = evaluate_scores(thresholds[OWN], own, {k: scores[k] for k in others}, {k: thresholds[k] for k in others})
    thresholds = thresholds[OWN]
    metrics: dict[str, float] = {}
    for p in pairs:
        tag = f"{source_key(p.source)}_fnr{p.fnr_target:g}"
        metrics[f"balanced_accuracy_{tag}"] = p.balanced_accuracy
        metrics[f"auc_{source_key(p.source)}"] = p.auc
        for field in ("true_positives", "false_negatives", "true_negatives", "false_positives"):
            metrics[f"{field}_{tag}"] = getattr(p, field)
    for fnr, threshold in thresholds.items():
        misses = int((own < threshold).sum())
        metrics[f"heldout_fnr_fnr{fnr:g}"] = misses / len(own)
        metrics[f"heldout_fnr_upper95_fnr{fnr:g}"] = fnr_upper_bound(misses, len(own))
        metrics[f"validation_fnr_upper95_fnr{fnr:g}"] = part.fnr_upper_bounds_[fnr]
    first = next(iter(thresholds))
    metrics["primary_balanced_accuracy"] = float(np.mean([p.balanced_accuracy for p in pairs if p.fnr_target == first]))
    return metrics, pairs


def score_sets(detector: Detector, samples: dict[str, np.ndarray], lossless: set[str], stages: Stages,
               exhaustive: bool = False) -> dict[str, Scores]:
    """Each held-out set's scores; the sets in ``lossless`` (made in memory, never re-saved) as lossless items."""
    return {name: (detector.score_lossless if name in lossless else detector.score)(x, stages, exhaustive)
            for name, x in samples.items()}


def primary_metric(detector: Detector, samples: dict[str, np.ndarray], lossless: set[str], stages: Stages) -> float:
    """``worst_balanced_accuracy`` of any detector on this run's held-out sets: what promotion compares."""
    scores = score_sets(detector, samples, lossless, stages)
    metrics, pairs = _pair_metrics(detector, {k: s.score for k, s in scores.items()},
                                   {k: s.thresholds for k, s in scores.items()})
    first = next(iter(scores[OWN].thresholds))
    return min(p.balanced_accuracy for p in pairs if p.fnr_target == first)


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5)
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"


def _reference(scores: dict[str, Scores], samples: dict[str, np.ndarray]) -> pd.DataFrame:
    """Per held-out item: source, score and input/stage summaries, the reference monitoring compares
    with, as attribution scores them (``Scores.attributed`` where it differs from the exhaustive):
    the own items pristine and re-saved, real items, negatives and look-alikes."""
    frames = []
    for name, s in scores.items():
        s = s.attributed or s
        pixel_mean, pixel_std = pixel_stats(samples[name])
        nan = np.full(len(s), np.nan)
        frames.append(pd.DataFrame({
            "source": name, "score": s.score, "is_generated": s.is_generated(),
            **{column: s.diagnostics.get(column, nan) for column in diagnostic_columns()},
            "pixel_mean": pixel_mean, "pixel_std": pixel_std,
            **({"height": float(samples[name].shape[-2]), "width": float(samples[name].shape[-1])}
               if samples[name].ndim == 4 else {}),
        }))
    return pd.concat(frames, ignore_index=True)


RESAVED_CHALLENGER = "jpeg q80"  # the re-save the first look-alike is also evaluated after


@task(name="open-world-sets", persist_result=False)
def open_world_sets(detector: Detector, config: OnboardConfig, real: np.ndarray,
                    own: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The owner's held-out items after each recompression the thresholds were calibrated for
    (as own variants), and items of the look-alikes the detector's family builds from the
    generator and the real data alone (:meth:`~flipad.detectors.base.Detector.lookalikes`), the
    first of them also as JPEG q80 (as other sources)."""
    n = min(config.num_challenger, config.num_test)
    variants: dict[str, np.ndarray] = {}
    if not config.open_world or own.ndim != 4 or own.dtype != np.uint8:
        return variants, {}
    for name in ("jpeg q90", "jpeg q80", "jpeg q70"):  # q70: the lowest the default thresholds are calibrated on
        variants[f"{OWN} {name}"] = perturb(own[:n], name)
    challengers = detector.lookalikes(real, Seeds(config.seed), config.challenger_steps, n)
    first = next((name for name in challengers if not name.endswith("perturbed")), None)
    if first is not None:
        challengers[f"{first} {RESAVED_CHALLENGER}"] = perturb(challengers[first], RESAVED_CHALLENGER)
    return variants, challengers


@flow(name="onboard-generator")
def onboard_generator(config: OnboardConfig) -> OnboardResult:
    """Onboard one generator: a new registered version of its detector, aliased by the promotion policy.

    Everything after the tracking server answers runs inside one MLflow run, so a failure at any
    step leaves a FAILED run with its reason, never a half-registered version."""
    tracking_uri = connect()  # an unreachable server fails here, before any work
    with onboarding_run(config.name), progress_to_run_log():
        return _onboard(config, tracking_uri)


class _RunLogHandler(logging.Handler):
    """Forwards ``flipad.progress`` lines to a flow run's logger (the Prefect UI's run log)."""

    def __init__(self, run_logger: logging.LoggerAdapter) -> None:
        super().__init__(logging.INFO)
        self.run_logger = run_logger

    def emit(self, record: logging.LogRecord) -> None:
        self.run_logger.info(record.getMessage())


@contextmanager
def progress_to_run_log() -> Iterator[None]:
    """While the flow runs, its progress lines (:mod:`flipad.progress`) also go to its run log."""
    handler = _RunLogHandler(get_run_logger())
    shown = logging.getLogger("flipad.progress")
    shown.addHandler(handler)
    if shown.level == logging.NOTSET or shown.level > logging.INFO:
        shown.setLevel(logging.INFO)
    try:
        yield
    finally:
        shown.removeHandler(handler)


def _onboard(config: OnboardConfig, tracking_uri: str) -> OnboardResult:
    timings: dict[str, float] = {}
    start = time.perf_counter()
    with progress_stage("load the generator and the data"):
        detector, source = build_detector(config)
        shape = detector.sample_shape()
        train: dict[str, np.ndarray] = {}
        test: dict[str, np.ndarray] = {}
        for k, path in enumerate((config.real, *config.negatives)):
            label = "real" if k == 0 else f"negatives_{k}"
            train[label], test[label] = load_split(path, shape, config.num_samples, config.num_test, config.seed + k)
        generated = None
        if config.samples:  # the owner's own items: half set the thresholds, the rest are held out
            given, held_out = load_split(config.samples, shape, config.num_samples, config.num_test, config.seed)
            generated, test[OWN] = given, held_out
        else:
            test[OWN] = detector.own_samples(config.num_test, Seeds(config.seed).test, test["real"])
        test = {OWN: test.pop(OWN), **test}
    timings["time_sample_and_load_s"] = time.perf_counter() - start

    stages = PrefectStages()
    start = time.perf_counter()
    with progress_stage(f"fit the {detector.kind} detector"):
        detector.fit(generated=generated, real=train["real"], negatives=[v for k, v in train.items() if k != "real"],
                     stages=stages)
    timings["time_fit_s"] = time.perf_counter() - start
    start = time.perf_counter()
    with progress_stage("build the look-alike challengers", config.challenger_steps if config.open_world else None, "GAN steps"):
        variants, challengers = open_world_sets(detector, config, train["real"], test[OWN])
    test.update(challengers)
    # the sets made in memory are scored as lossless items; those read from files may have been re-saved
    lossless = ({OWN} if not config.samples else set()) | {
        name for name in challengers if not name.endswith(f" {RESAVED_CHALLENGER}")}
    timings["time_challengers_s"] = time.perf_counter() - start
    start = time.perf_counter()
    with progress_stage("evaluate on the held-out sets", sum(map(len, [*test.values(), *variants.values()]))):
        # the verdict as attribution gives it (each search stops once its verdict is settled): the
        # rates are what users get, at a fraction of the exhaustive searches' cost; a verdict of
        # several families is scored exhaustively, so that each family's own figures exist
        exhaustive = len(detector.parts()) > 1
        scores = score_sets(detector, test, lossless, stages, exhaustive)
        own_variants = score_sets(detector, variants, set(), stages, exhaustive)
        metrics, table = evaluate(detector, scores, own_variants)
    timings["time_evaluate_s"] = time.perf_counter() - start
    metrics.update(detector.fit_summary())
    metrics.update(timings)
    cached = stages.cached

    record = OnboardingRecord(
        name=config.name,
        detector=detector,
        source=source,
        params={**config.model_dump(exclude={"generator_kwargs", "family_settings"}),
                **{f"generator_kwargs.{k}": v for k, v in config.generator_kwargs.items()},
                **{f"settings.{k}": v for k, v in config.detector_settings().as_params().items()},
                **{f"generator.{k}": v for k, v in detector.generator_info().items()}, "output_shape": list(shape)},
        metrics=metrics,
        results=table,
        scores={name: s.score for name, s in scores.items()},
        own_source=OWN,
        mean_activations=detector.feature_means(test, stages),
        reference=_reference({**scores, **own_variants}, {**test, **variants}),
        input_example=[encode_item(test[OWN][i]) for i in range(min(2, config.num_test))],
        tags={"generator_sha256": weights_fingerprint(detector.module), "detector_kind": detector.kind,
              "flipad_version": flipad.__version__, "git_commit": _git_commit(), "mlflow.source.git.commit": _git_commit(),
              **{f"data_sha256.{'own' if name == OWN else source_key(name)}": sha256_array(data)
                 for name, data in test.items()}},
    )
    record.datasets = {**{f"{name} (train)": (x, "training") for name, x in train.items()},
                       **{name: (x, "evaluation") for name, x in test.items()}}
    summary = f"{detector.description} detector for {config.generator}"
    record.card = model_card(
        config.name, headline(metrics, table, config.fnr[0]), summary,
        {"spec": config.generator, "weights sha256": record.tags["generator_sha256"], "kind": detector.kind,
         "families": ", ".join(detector.parts()), **detector.generator_info()},
        {name: sha256 for name, sha256 in record.tags.items() if name.startswith("data_sha256.")},
        metrics, table,
        f"git checkout {record.tags['git_commit']}\npython -c 'from flows.onboard import OnboardConfig, onboard_generator; "
        f"onboard_generator(OnboardConfig.model_validate_json({config.model_dump_json()!r}))'",
    )
    with progress_stage("log the run and register the version in MLflow"):
        logged = log_run(record)
        registration: Registration = register_version(
            config.name,
            logged.model_uri,
            metrics["worst_balanced_accuracy"],
            lambda champion: primary_metric(champion, test, lossless, stages),
            promote=config.promote,
            tags={**record.tags, "run_id": logged.run_id},
            description=record.card,
        )
    return OnboardResult(
        config.name, registration.version, registration.alias, logged.run_id, logged.run_url, tracking_uri,
        ui_command(tracking_uri), metrics, table, cached, detector, registration.same_generator,
    )
