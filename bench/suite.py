"""The paper's protocol on the generator zoo: FLIPAD, RAWPAD, DCTPAD and reconstruction loss.

1. The zoo (:mod:`bench.common`): DCGAN, WGAN-GP, LSGAN and EBGAN generators, two seeds each, on
   Fashion-MNIST (trained on the first run, cached afterwards) and their 8-bit PNG sample sets.
2. Attribution (the paper's Tables 1 and 2): for each family's seed-0 generator as the target,
   detectors on FLIPAD, RAWPAD and DCTPAD features trained on the target's train PNGs against
   real images (the only negatives), thresholded at FNR 0.005 on its val PNGs, and evaluated on
   its test PNGs against held-out real images, each other family's seed-0 generator and the same
   family's seed-1 generator: balanced accuracy at FNR 0.005 and AUC, mean and spread over
   ``repeats`` Deep SAD seeds (features computed once); beside them the full-generator
   reconstruction-loss detector on a subset of the images (it is slow).
3. Robustness (the paper's Table 3): the same detectors on the target's and the real test images
   under JPEG, blur, centre crop + resize and Gaussian noise (test-only), and detectors trained
   and thresholded on perturbed images too for the size's ``immunised`` perturbations.
4. Speed: the inversion solvers on the DCGAN target (:mod:`bench.inversion_speed`'s comparison
   and convergence curves) and samples per second of inversion, Deep SAD training, onboarding
   and attribution.

Plots go to ``--plots`` (default ``docs/benchmarks/``: ROC curves, balanced accuracy against
perturbation strength, solver convergence). ``--size smoke`` runs in seconds (the quick run);
``--size full`` is the paper-sized protocol (a GPU's work).
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_curve

from flipad import FeatureConfig, FlipadDetector, GeneratorAdapter
from flipad.detectors.deepsad import DeepSADConfig
from flipad.detectors.evaluation import evaluate_scores
from flipad.detectors.features import FeatureExtractor
from flipad.detectors.reconstruction import ReconstructionConfig, ReconstructionLossDetector
from flipad.io.data import load_images
from flipad.io.perturb import PERTURBATIONS, perturb
from flows.datasets import load_fashion_mnist

from .common import FAMILIES, SEEDS, ZOO_SIZES, generator_name, train_zoo
from .inversion_speed import CONVERGENCE_BUDGETS, compare_solvers, convergence_curves
from .report import DOC, Benchmark

KINDS = {"flipad": "FLIPAD", "raw": "RAWPAD", "dct": "DCTPAD"}
FNR = 0.005
PLOTS = DOC.parent / "benchmarks"


@dataclass(frozen=True)
class SuiteSize:
    zoo: str
    train: int  # generator PNGs and real images to train on
    val: int
    test: int  # per source
    epochs: int  # Deep SAD
    repeats: int
    robustness_test: int
    speed_samples: int
    immunised: tuple[str, ...]  # perturbations also applied to the training and validation images
    reconstruction_val: int  # the reconstruction baseline's threshold images (0: baseline off)
    reconstruction_test: int  # its test images per source




SUITE_SIZES = {
    "smoke": SuiteSize(zoo="smoke", train=8, val=8, test=8, epochs=1, repeats=1, robustness_test=8, speed_samples=2,
                       immunised=("jpeg q90",), reconstruction_val=4, reconstruction_test=3),
    "cpu": SuiteSize(zoo="cpu", train=500, val=300, test=200, epochs=30, repeats=2, robustness_test=100, speed_samples=50,
                     immunised=("jpeg q90",), reconstruction_val=60, reconstruction_test=20),
    "full": SuiteSize(zoo="full", train=2000, val=1000, test=1000, epochs=50, repeats=3, robustness_test=1000,
                      speed_samples=1000, immunised=tuple(PERTURBATIONS), reconstruction_val=1000, reconstruction_test=200),
}


def zoo_split_sizes(size: SuiteSize) -> dict[str, int]:
    return {"train": size.train, "val": size.val, "test": max(size.test, size.robustness_test)}


def load_split(cache: Path, name: str, split: str, count: int) -> np.ndarray:
    images = load_images(cache / "samples" / name / split, channels=1)
    if len(images) < count:
        raise SystemExit(f"{cache / 'samples' / name / split} holds {len(images)} PNGs, the suite needs {count}")
    return images[:count]


def other_generators(target: str) -> dict[str, str]:
    """The zoo generators a target is tested against, by table label: each other family's seed 0 and
    the same family's seed 1."""
    family = target.rsplit("-s", 1)[0]
    others = {generator_name(f, 0): generator_name(f, 0) for f in FAMILIES if f != family}
    return {**others, f"{generator_name(family, 1)} (same family)": generator_name(family, 1)}


def prepare(size: SuiteSize, cache: Path, device: str, counts: dict[str, int]) -> tuple[dict[str, GeneratorAdapter], np.ndarray, np.ndarray]:
    """The zoo's adapters (trained and sampled if missing, ``counts`` PNGs per split), the real
    training negatives (the end of Fashion-MNIST's train split; the GANs train on its start) and
    the real test images."""
    adapters = train_zoo(size.zoo, cache, device, counts)
    image_size = ZOO_SIZES[size.zoo].image_size
    real_train = load_fashion_mnist("train", image_size)[-size.train :]
    real_test = load_fashion_mnist("test", image_size, limit=max(size.test, size.robustness_test))
    return adapters, real_train, real_test


def features_of(adapter: GeneratorAdapter, kind: str, sets: dict[str, np.ndarray]) -> tuple[dict[str, torch.Tensor], float]:
    """Unscaled features of every set (one extraction over all of them) and the seconds per image."""
    extractor = FeatureExtractor(adapter, FeatureConfig(kind=kind))
    images = np.concatenate(list(sets.values()))
    start = time.perf_counter()
    features = extractor(images)
    seconds = time.perf_counter() - start
    bounds = np.cumsum([0, *(len(x) for x in sets.values())])
    return {name: features[a:b] for name, a, b in zip(sets, bounds[:-1], bounds[1:])}, seconds / len(images)


FIT_SETS = ("train", "real_train", "val")


def run_target(name: str, adapter: GeneratorAdapter, cache: Path, size: SuiteSize, real_train, real_test, device: str) -> dict:
    """Attribution and robustness rows of one target, for every feature kind and the reconstruction baseline."""
    sources = {"real": real_test, **{label: load_split(cache, g, "test", size.test) for label, g in other_generators(name).items()}}
    own = {split: load_split(cache, name, split, count) for split, count in zoo_split_sizes(size).items()}
    fit_sets = dict(zip(FIT_SETS, (own["train"], real_train, own["val"])))
    sets = {**fit_sets, "own": own["test"][: size.test], **sources}
    for label in PERTURBATIONS:
        sets[f"own|{label}"] = perturb(own["test"][: size.robustness_test], label)
        sets[f"real|{label}"] = perturb(real_test[: size.robustness_test], label)
    for label in size.immunised:
        sets.update({f"{split}|{label}": perturb(images, label) for split, images in fit_sets.items()})
    result = {"target": name, "kinds": {}}
    for kind in KINDS:
        feats, per_image_s = features_of(adapter, kind, sets)
        runs = []
        for repeat in range(size.repeats):
            det, fit_s = _fit(adapter, kind, repeat, size, device, *(feats[split] for split in FIT_SETS))
            scores = {k: det.score_features(v) for k, v in feats.items() if k.split("|")[0] not in FIT_SETS}
            pairs = evaluate_scores(det.thresholds, scores["own"], {s: scores[s] for s in sources})
            runs.append({
                "deep_sad_s": fit_s,
                "pairs": [p.to_dict() for p in pairs],
                "robustness": {label: _versus_real(det, scores[f"own|{label}"], scores[f"real|{label}"])
                               for label in PERTURBATIONS},
                "roc": {s: _roc(scores["own"], scores[s]) for s in sources} if repeat == 0 else None,
            })
        immunised = {}
        for label in size.immunised:  # one Deep SAD seed: trained, thresholded and tested on perturbed images
            det, _ = _fit(adapter, kind, 0, size, device, *(feats[f"{split}|{label}"] for split in FIT_SETS))
            own_scores, real_scores = (det.score_features(feats[f"{k}|{label}"]) for k in ("own", "real"))
            immunised[label] = _versus_real(det, own_scores, real_scores)
        result["kinds"][kind] = {"feature_s_per_image": per_image_s, "runs": runs, "immunised": immunised}
    if size.reconstruction_val:
        result["reconstruction"] = reconstruction_baseline(adapter, own, sources, size, device)
    return result


def _fit(adapter: GeneratorAdapter, kind: str, seed: int, size: SuiteSize, device: str, train, real_train, val):
    det = FlipadDetector(adapter, features=kind, fnr=(FNR,), deep_sad=DeepSADConfig(epochs=size.epochs, seed=seed),
                         device=device, progress=False)
    start = time.perf_counter()
    det.fit_features(train, real_train, val)
    return det, time.perf_counter() - start


def _versus_real(det: FlipadDetector, own: np.ndarray, real: np.ndarray) -> dict[str, float]:
    (pair,) = evaluate_scores(det.thresholds, own, {"real": real})
    return {"balanced_accuracy": pair.balanced_accuracy, "auc": pair.auc}


def reconstruction_baseline(adapter: GeneratorAdapter, own: dict[str, np.ndarray], sources: dict[str, np.ndarray],
                            size: SuiteSize, device: str) -> dict:
    """The full-generator reconstruction-loss detector on a subset: its threshold from the first
    ``reconstruction_val`` val PNGs, its pairs on the first ``reconstruction_test`` test PNGs per source."""
    n = size.reconstruction_test
    det = ReconstructionLossDetector(adapter.module, adapter.latent_shape, fnr=(FNR,), device=device, progress=False)
    start = time.perf_counter()
    det.fit(validation=own["val"][: size.reconstruction_val])
    own_scores = det.score_samples(own["test"][:n])
    pairs = evaluate_scores(det.thresholds, own_scores, {s: det.score_samples(images[:n]) for s, images in sources.items()})
    items = size.reconstruction_val + n * (len(sources) + 1)
    return {"pairs": [p.to_dict() for p in pairs], "s_per_image": (time.perf_counter() - start) / items}


def _roc(own: np.ndarray, other: np.ndarray) -> dict[str, list[float]]:
    fpr, tpr, _ = roc_curve(np.r_[np.ones(len(own)), np.zeros(len(other))], np.r_[own, other])
    keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), 200)).astype(int))
    return {"fpr": fpr[keep].round(5).tolist(), "tpr": tpr[keep].round(5).tolist()}


def summarise(results: list[dict]) -> dict:
    """Mean and standard deviation over repeats: per (target, kind, source) and per kind overall."""
    table, overall, robust, immunised = [], {k: [] for k in KINDS}, {}, {}
    for res in results:
        for kind, data in res["kinds"].items():
            for label, value in data["immunised"].items():
                immunised.setdefault(f"{kind}|{label}", []).append(value["balanced_accuracy"])
            by_source: dict[str, list[tuple[float, float]]] = {}
            for run in data["runs"]:
                for pair in run["pairs"]:
                    by_source.setdefault(pair["source"], []).append((pair["balanced_accuracy"], pair["auc"]))
                for label, value in run["robustness"].items():
                    robust.setdefault((kind, label), []).append(value["balanced_accuracy"])
            for source, values in by_source.items():
                acc = np.array([v[0] for v in values])
                auc = np.array([v[1] for v in values])
                table.append({"target": res["target"], "kind": kind, "source": source, "acc_mean": float(acc.mean()),
                              "acc_std": float(acc.std()), "auc_mean": float(auc.mean())})
                overall[kind].append(float(acc.mean()))
    return {
        "table": table,
        "overall": {k: float(np.mean(v)) if v else float("nan") for k, v in overall.items()},
        "robustness": {f"{k}|{label}": float(np.mean(v)) for (k, label), v in robust.items()},
        "immunised": {key: float(np.mean(v)) for key, v in immunised.items()},
        "reconstruction": {f"{res['target']}|{pair['source']}": pair["balanced_accuracy"]
                           for res in results if "reconstruction" in res for pair in res["reconstruction"]["pairs"]},
    }


def throughput(results: list[dict], size: SuiteSize) -> dict[str, float]:
    """Samples per second of the stages, from the FLIPAD runs' timings."""
    feature_s = np.mean([r["kinds"]["flipad"]["feature_s_per_image"] for r in results])
    deep_sad_s = np.mean([run["deep_sad_s"] for r in results for run in r["kinds"]["flipad"]["runs"]])
    train_items = 2 * size.train
    onboarding_s = feature_s * (train_items + size.val) + deep_sad_s
    return {
        "inversion_per_s": 1.0 / feature_s,
        "deep_sad_training_per_s": train_items / deep_sad_s,
        "onboarding_s": onboarding_s,
        "onboarding_per_s": (train_items + size.val) / onboarding_s,
        "attribution_per_s": 1.0 / feature_s,  # scoring is the inversion plus one network pass
    }


def write_plots(results: list[dict], summary: dict, convergence: list, folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 4), squeeze=False)
    for ax, res in zip(axes[0], results):
        for kind, data in res["kinds"].items():
            roc = data["runs"][0]["roc"]
            fpr = np.concatenate([roc[s]["fpr"] for s in roc])
            tpr = np.concatenate([roc[s]["tpr"] for s in roc])
            order = np.argsort(fpr, kind="stable")
            ax.plot(fpr[order], tpr[order], label=KINDS[kind], lw=1)
        ax.set_title(res["target"])
        ax.set_xlabel("false positive rate (other sources)")
        ax.set_ylabel("true positive rate")
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(folder / "roc.png", dpi=90)
    plt.close(fig)
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    for ax, group in zip(axes, ("jpeg", "blur", "crop", "noise")):
        labels = [k for k, v in PERTURBATIONS.items() if v[0] == group]
        strengths = [PERTURBATIONS[k][1] for k in labels]
        for kind in KINDS:
            ax.plot(strengths, [summary["robustness"][f"{kind}|{k}"] for k in labels], marker="o", label=KINDS[kind])
        ax.set_title(group)
        ax.set_xlabel("strength")
        ax.set_ylabel("balanced accuracy vs real")
        ax.set_ylim(0.4, 1.02)
        ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "robustness.png", dpi=90)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 4))
    for solver in CONVERGENCE_BUDGETS:
        points = [p for p in convergence if p.solver == solver]
        ax.plot([p.seconds for p in points], [max(p.median_gap, 1e-9) for p in points], marker="o", label=solver)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("wall seconds")
    ax.set_ylabel("median relative objective gap (floor 1e-9)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "convergence.png", dpi=90)
    plt.close(fig)
    return ["roc.png", "robustness.png", "convergence.png"]


def render(figures: dict) -> str:
    size_name, meta, summary, rates = figures["size_name"], figures["meta"], figures["summary"], figures["rates"]
    size, results, speed, convergence = SuiteSize(**figures["size"]), figures["results"], figures["speed"], figures["convergence"]
    zoo, search = ZOO_SIZES[size.zoo], ReconstructionConfig()
    lines = [
        f"Size {size_name} ({meta['machine']}, {meta['threads']} threads, torch {meta['torch']}, numpy {meta['numpy']}); "
        f"{meta['seconds']:.0f} s, zoo training excluded ({meta['zoo_s']:.0f} s this run). "
        "Per target: " + ", ".join(f"{t} {sec:.0f} s" for t, sec in meta["target_s"].items()) + f"; speed and convergence {meta['speed_s']:.0f} s.",
        "",
        f"Zoo: {', '.join(FAMILIES)} x seeds {list(SEEDS)}, {zoo.image_size}x{zoo.image_size} grayscale, latent {zoo.latent_dim}, "
        f"width {zoo.width}, {zoo.train_steps} training steps. Detectors: {size.train} generator + {size.train} real training images "
        f"(real images are the only negatives), {size.val} validation images for the FNR {FNR} threshold, Deep SAD {size.epochs} "
        f"epochs, {size.repeats} seed(s); {size.test} test images per source.",
        "",
        "### Attribution: balanced accuracy at FNR 0.005 (mean ± std over Deep SAD seeds; AUC in brackets)",
        "",
        f"Reconstruction: the full-generator latent search of the Python API's defaults ({search.starts} starts, the best "
        f"of {search.candidates} random latents; {search.steps} Adam steps at lr {search.lr}; nothing trained), its "
        f"threshold from {size.reconstruction_val} validation images, {size.reconstruction_test} test images per source "
        "(a subset: it is slow).",
        "",
        "| target | other source | " + " | ".join(KINDS.values()) + " | Reconstruction |",
        "|---|---|" + "---|" * (len(KINDS) + 1),
    ]
    recon = summary["reconstruction"]
    rows: dict[tuple[str, str], dict[str, dict]] = {}
    for row in summary["table"]:
        rows.setdefault((row["target"], row["source"]), {})[row["kind"]] = row
    for (target, source), by_kind in rows.items():
        cells = [f"{by_kind[k]['acc_mean']:.3f} ± {by_kind[k]['acc_std']:.3f} ({by_kind[k]['auc_mean']:.3f})" for k in KINDS]
        cells.append(f"{recon[f'{target}|{source}']:.3f}" if f"{target}|{source}" in recon else "–")
        lines.append(f"| {target} | {source} | " + " | ".join(cells) + " |")
    recon_mean = f"**{np.mean(list(recon.values())):.3f}**" if recon else "–"
    lines.append("| **mean** | all | " + " | ".join(f"**{summary['overall'][k]:.3f}**" for k in KINDS) + f" | {recon_mean} |")
    lines += _robustness_table("Robustness, test-only (perturbed test images of the target vs perturbed real; mean over "
                               "targets and seeds)", PERTURBATIONS, summary["robustness"])
    if size.immunised:
        lines += _robustness_table("Robustness, immunised (training, validation and test images perturbed alike; one Deep "
                                   "SAD seed, mean over targets)", size.immunised, summary["immunised"])
    lines += [
        "",
        f"### Speed (inversion of {size.speed_samples} test images of {results[0]['target']}, alpha 5e-4, same run)",
        "",
        "| solver | median gap | p90 gap | median iterations | wall s | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for row in speed:
        lines.append(f"| {row['solver']} | {row['median_gap']:.2e} | {row['p90_gap']:.2e} | {row['median_iterations']:.0f} | "
                     f"{row['seconds']:.2f} | {row['speed_up']:.2f}x |")
    lines += [
        "",
        "Convergence (same images; each solver rerun with its cap at each budget and its stopping rule off; budgets in "
        "iterations, Newton steps for interior; median relative gap, wall seconds in brackets; 0 = the reference optimum):",
        "",
        "| solver | " + " | ".join(f"budget {i + 1}" for i in range(max(len(b) for b in CONVERGENCE_BUDGETS.values()))) + " |",
        "|---|" + "---|" * max(len(b) for b in CONVERGENCE_BUDGETS.values()),
    ]
    for solver in CONVERGENCE_BUDGETS:
        cells = [f"{p['budget']} it: {p['median_gap']:.1e} ({p['seconds']:.1f} s)" for p in convergence if p["solver"] == solver]
        lines.append(f"| {solver} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Detector features (FISTA, 600 iterations): {rates['inversion_per_s']:.1f} images/s; Deep SAD training "
        f"{rates['deep_sad_training_per_s']:.0f} samples/s; onboarding one target ({2 * size.train + size.val} images through "
        f"features and Deep SAD) {rates['onboarding_s']:.0f} s = {rates['onboarding_per_s']:.1f} images/s; attribution "
        f"{rates['attribution_per_s']:.1f} items/s.",
    ]
    if figures["plots"] == str(PLOTS):  # the plots beside the doc
        lines += ["", *[f"![{name}](benchmarks/{name})" for name in ("roc.png", "robustness.png", "convergence.png")]]
    return "\n".join(lines)


def headline(figures: dict) -> list[str]:
    overall = figures["summary"]["overall"]
    return [f"The paper's protocol on the zoo ({figures['size_name']} size): mean balanced accuracy at FNR {FNR} "
            + ", ".join(f"{KINDS[k]} {v:.3f}" for k, v in overall.items())]


def _robustness_table(title: str, labels, values: dict[str, float]) -> list[str]:
    lines = ["", f"### {title}", "", "| perturbation | " + " | ".join(KINDS.values()) + " |", "|---|" + "---|" * len(KINDS)]
    return lines + [f"| {label} | " + " | ".join(f"{values[f'{k}|{label}']:.3f}" for k in KINDS) + " |" for label in labels]


def zoo_run_parser(name: str, description: str) -> argparse.ArgumentParser:
    """The command-line options a run on the zoo shares: size, zoo cache, device, threads."""
    parser = argparse.ArgumentParser(prog=f"python -m bench {name}", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=tuple(SUITE_SIZES), default="cpu")
    parser.add_argument("--zoo-cache", type=Path, help="default: .flipad/zoo/<zoo size>")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    return parser


def run(argv: list[str]) -> dict:
    parser = zoo_run_parser("suite", __doc__)
    parser.add_argument("--plots", type=Path, default=PLOTS, help="where the figures' PNGs go")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    size = SUITE_SIZES[args.size]
    cache = args.zoo_cache or Path(".flipad/zoo") / size.zoo
    start = time.perf_counter()
    adapters, real_train, real_test = prepare(size, cache, args.device, zoo_split_sizes(size))
    zoo_s = time.perf_counter() - start
    start = time.perf_counter()
    targets = [generator_name(f, 0) for f in FAMILIES]
    results = []
    for name in targets:
        print(f"target {name}", flush=True)
        target_start = time.perf_counter()
        results.append(run_target(name, adapters[name], cache, size, real_train, real_test[: size.test], args.device))
        results[-1]["seconds"] = time.perf_counter() - target_start
    summary = summarise(results)
    speed_start = time.perf_counter()
    speed_images = load_split(cache, targets[0], "test", size.speed_samples)
    comparison = compare_solvers(adapters[targets[0]], speed_images)
    convergence = convergence_curves(adapters[targets[0]], speed_images, comparison.optimum)
    speed_s = time.perf_counter() - speed_start
    rates = throughput(results, size)
    seconds = time.perf_counter() - start
    write_plots(results, summary, convergence, args.plots)
    meta = {"machine": platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "numpy": np.__version__, "seconds": seconds, "zoo_s": zoo_s,
            "target_s": {r["target"]: r["seconds"] for r in results}, "speed_s": speed_s}
    print(f"mean balanced accuracy at FNR {FNR}: " + ", ".join(f"{KINDS[k]} {v:.3f}" for k, v in summary["overall"].items()))
    for res in results:  # the ROC points are for the plots, not the record
        for data in res["kinds"].values():
            for one in data["runs"]:
                one.pop("roc", None)
    return {"size_name": args.size, "size": asdict(size), "meta": meta, "summary": summary, "rates": rates,
            "results": [{"target": r["target"]} for r in results], "speed": [asdict(r) for r in comparison.rows],
            "convergence": [asdict(p) for p in convergence], "plots": str(args.plots)}


BENCHMARK = Benchmark("suite", __doc__, run, render, headline, quick=("--size", "smoke", "--plots", ".flipad/bench/plots"))
