"""The suite's detectors with the other generators known: their train PNGs join the real negatives.

Not the paper's protocol, whose only negatives are real images (:mod:`bench.suite` follows it).
Deep SAD is semi-supervised and its loss takes any labelled anomalies, so this measures how much
of the paper-faithful detectors' gap against other generators comes from the choice of negatives.
For each target of the suite (each family's seed-0 generator of its zoo, trained or reused from the
cache), one Deep SAD seed per feature kind is trained on the target's train PNGs against the suite
size's real images plus ``--per-source`` train PNGs of every other generator in the suite's table
(the other families' seed 0 and the same family's seed 1), thresholded at FNR 0.005 on the
target's val PNGs and evaluated on test PNGs that no detector saw.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from flipad import GeneratorAdapter
from flipad.detectors.evaluation import evaluate_scores

from .common import FAMILIES, generator_name
from .report import Benchmark
from .suite import (
    FNR,
    KINDS,
    SUITE_SIZES,
    SuiteSize,
    _fit,
    features_of,
    load_split,
    other_generators,
    prepare,
    zoo_run_parser,
)


def run_target(name: str, adapter: GeneratorAdapter, cache: Path, size: SuiteSize, per_source: int, real_train: np.ndarray,
               real_test: np.ndarray, device: str) -> dict:
    """Pairs of one target for every feature kind, its detectors trained with the other generators known."""
    generators = other_generators(name)
    sources = {"real": real_test, **{label: load_split(cache, g, "test", size.test) for label, g in generators.items()}}
    sets = {"train": load_split(cache, name, "train", size.train), "real_train": real_train,
            "val": load_split(cache, name, "val", size.val), "own": load_split(cache, name, "test", size.test), **sources}
    known = {f"known|{label}": load_split(cache, g, "train", per_source) for label, g in generators.items()}
    kinds = {}
    for kind in KINDS:
        feats, _ = features_of(adapter, kind, {**sets, **known})
        negatives = torch.cat([feats["real_train"], *(feats[k] for k in known)])
        det, fit_s = _fit(adapter, kind, 0, size, device, feats["train"], negatives, feats["val"])
        scores = {k: det.score_features(feats[k]) for k in ("own", *sources)}
        pairs = evaluate_scores(det.thresholds, scores["own"], {s: scores[s] for s in sources})
        kinds[kind] = {"deep_sad_s": fit_s, "pairs": [p.to_dict() for p in pairs]}
    return {"target": name, "kinds": kinds}


def render(figures: dict) -> str:
    size = SuiteSize(**figures["size"])
    by_row: dict[tuple[str, str], dict[str, float]] = {}
    for res in figures["results"]:
        for kind, data in res["kinds"].items():
            for pair in data["pairs"]:
                by_row.setdefault((res["target"], pair["source"]), {})[kind] = pair["balanced_accuracy"]
    means = {k: float(np.mean([row[k] for row in by_row.values()])) for k in KINDS}
    lines = [
        f"Size {figures['size_name']}: the suite's zoo, targets, sizes and test images; one Deep SAD seed; the "
        f"negatives are the {size.train} real images plus {figures['per_source']} train images of each other generator "
        f"in the table (Deep SAD's labelled anomalies), whose test images stay unseen. Balanced accuracy at FNR {FNR}:",
        "",
        "| target | other source | " + " | ".join(KINDS.values()) + " |",
        "|---|---|" + "---|" * len(KINDS),
    ]
    for (target, source), row in by_row.items():
        lines.append(f"| {target} | {source} | " + " | ".join(f"{row[k]:.3f}" for k in KINDS) + " |")
    lines.append("| **mean** | all | " + " | ".join(f"**{means[k]:.3f}**" for k in KINDS) + " |")
    return "\n".join(lines)


def run(argv: list[str]) -> dict:
    parser = zoo_run_parser("known_sources", __doc__)
    parser.add_argument("--per-source", type=int, default=500, help="train PNGs of each other generator among the negatives")
    args = parser.parse_args(argv)
    if args.per_source < 1:
        parser.error("--per-source must be at least 1")
    torch.set_num_threads(args.threads)
    size = SUITE_SIZES[args.size]
    cache = args.zoo_cache or Path(".flipad/zoo") / size.zoo
    counts = {"train": max(size.train, args.per_source), "val": size.val, "test": size.test}
    adapters, real_train, real_test = prepare(size, cache, args.device, counts)
    results = []
    for name in (generator_name(f, 0) for f in FAMILIES):
        print(f"target {name}", flush=True)
        results.append(run_target(name, adapters[name], cache, size, args.per_source, real_train, real_test[: size.test],
                                  args.device))
    figures = {"size_name": args.size, "size": asdict(size), "per_source": args.per_source, "results": results}
    print(render(figures))
    return figures


BENCHMARK = Benchmark("known_sources", __doc__, run, render, quick=("--size", "smoke", "--per-source", "8"))
