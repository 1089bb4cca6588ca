"""Latent-diffusion autoencoders: the autoencoder family's verdict, AEDR's ratio and their cost.

Trains the issue's small ``AutoencoderKL`` (about 1.25 M parameters, Stable Diffusion's layout) on
RGB photo patches at 64x64 (:mod:`flows.photos`), and from the same patches its look-alikes: an
autoencoder of the same configuration trained from another seed, and the owner's autoencoder with
its decoder fine-tuned. The ``autoencoder`` kind is fitted with its defaults (held-out own items:
decoded encodings of real patches, pristine and re-saved) and the ``aedr`` kind on the same items.
On held-out sets it reports each source's attributed share under the default verdict, the AUC
of the decoder family's residual, of the residual before any search step (one encode and decode,
a single reconstruction loss) and of AEDR's ratio against each other source, and the settled
verdict's cost on a half-own, half-other stream, per item: encoder passes, decoder-pass
equivalents (a vector-Jacobian or Jacobian-vector product counts as two), their total in
decoder-pass equivalents with an encoder pass at its cost measured in the same run (the issue's
bar, one encoder pass and ten decoder passes, in that unit), and seconds, also over a decoder
pass's seconds (what the counts leave out: smaller batches, the products' overhead). Then the
same cost for an autoencoder of Stable Diffusion's configuration (83.65 M parameters, built from
the config) at ``--sd-size`` pixels (the issue's 256) on the CPU: trained ``--sd-train-steps``
batches of 4 photo patches at 64x64 (its convolutions and attention take any size), so that its
encoder roughly inverts its decoder as a trained one's does (``--sd-train-steps 0``: random
weights, whose encoder inverts nothing and sends every own item to the Gauss-Newton steps).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from flipad import AedrDetector, AutoencoderDetector
from flipad.detectors.autoencoder import (
    OUTPUT_RANGE,
    AutoencoderGenerator,
    AutoencoderSettings,
    DecoderSearch,
    train_autoencoder,
)
from flipad.generators.loading import load_generator
from flipad.io.data import to_output_range
from flipad.io.perturb import perturb
from flows.photos import photo_patches

from .common import SD_AUTOENCODER, SMALL_AUTOENCODER, saved_autoencoder
from .report import Benchmark, markdown_table

SD_TRAIN_STEPS = 400  # batches of 4 at 64x64 for the Stable-Diffusion-config autoencoder (about 17 minutes)
SD_LR = 2e-4  # its learning rate (the small autoencoder's 1e-3 is for 1.25 M parameters)


def _finetuned(folder: Path, owner: Path, real: np.ndarray, steps: int) -> Path:
    """The owner's autoencoder with its decoder fine-tuned ``steps`` batches (lr 1e-4), saved in ``folder``."""
    if (folder / "config.json").is_file():
        return folder
    vae = load_generator(f"diffusers:{owner}").vae
    train_autoencoder(vae, real, steps, 8, seed=11, parameters=[*vae.decoder.parameters(),
                                                                *vae.post_quant_conv.parameters()], lr=1e-4)
    vae.save_pretrained(folder)
    return folder


def _auc(own: np.ndarray, other: np.ndarray) -> float:
    """AUC of telling ``other`` from ``own`` by an anomaly score (higher = less like own)."""
    labels = np.r_[np.zeros(len(own)), np.ones(len(other))]
    return float(roc_auc_score(labels, np.r_[own, other]))


@torch.no_grad()
def _pass_seconds(module: AutoencoderGenerator, items: np.ndarray, repeats: int = 3) -> tuple[float, float]:
    """Seconds per item of one encoder pass and of one decoder pass over ``items`` in the search's
    batches (the fastest of ``repeats``)."""
    x = to_output_range(items, *OUTPUT_RANGE)
    encoder, decoder = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        latents = torch.cat([module.encode(x[part]) for part in module.batches(len(x))])
        encoder.append(time.perf_counter() - start)
        start = time.perf_counter()
        for part in module.batches(len(x)):
            module(latents[part])
        decoder.append(time.perf_counter() - start)
    return min(encoder) / len(x), min(decoder) / len(x)


def _cost(scores: list, seconds: float, module: AutoencoderGenerator, items: np.ndarray) -> dict:
    """Per item of the stream scored as ``scores`` in ``seconds``: encoder passes, decoder-pass
    equivalents, their total with an encoder pass at its measured cost, and seconds, also in
    decoder passes."""
    encoder = np.concatenate([s.diagnostics["encoder_passes"] for s in scores])
    decoder = np.concatenate([s.diagnostics["decoder_passes"] for s in scores])
    encoder_s, decoder_s = _pass_seconds(module, items)
    ratio = encoder_s / decoder_s
    return {"stream": len(encoder), "encoder_passes": float(encoder.mean()), "decoder_passes": float(decoder.mean()),
            "encoder_pass_cost": ratio, "equivalents": float((decoder + ratio * encoder).mean()), "bar": 10 + ratio,
            "s_per_item": seconds / len(encoder), "decoder_pass_s": decoder_s,
            "time_equivalents": seconds / len(encoder) / decoder_s}


def _sd_cost(folder: Path, size: int, items: int, search: AutoencoderSettings) -> dict:
    """The settled verdict's cost (:func:`_cost`) for the Stable-Diffusion-config autoencoder saved in
    ``folder``, at ``size`` pixels, half own items, half random photo patches."""
    from diffusers import AutoencoderKL

    module = AutoencoderGenerator(AutoencoderKL.from_pretrained(folder, sample_size=size))
    real = photo_patches(size, 3 * items, seed=5, scale=max(2 * size, 256))
    detector = AutoencoderDetector(module, n_validation=items, settings=replace(
        search, perturbations=("jpeg q90",), n_perturbed=max(items, 20)), progress=False)
    start = time.perf_counter()
    detector.fit(real=real[:items])
    fit_s = time.perf_counter() - start
    stream = np.concatenate([detector.own_samples(items, seed=1, real=real[items:2 * items]), real[2 * items:]])
    start = time.perf_counter()
    scores = detector.score(stream)
    seconds = time.perf_counter() - start
    return {"size": size, "parameters_m": sum(p.numel() for p in module.parameters()) / 1e6, "items": len(stream),
            "fit_s": fit_s, **_cost([scores], seconds, module, stream)}


def run(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench autoencoder", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-steps", type=int, default=600, help="batches of 8 patches per autoencoder")
    parser.add_argument("--finetune-steps", type=int, default=200, help="batches of the fine-tuned decoder")
    parser.add_argument("--validation", type=int, default=300, help="held-out own items that set the thresholds")
    parser.add_argument("--items", type=int, default=100, help="held-out items per source")
    parser.add_argument("--sd-size", type=int, default=256, help="image size of the Stable-Diffusion-config cost run")
    parser.add_argument("--sd-items", type=int, default=2, help="own and other items of that run")
    parser.add_argument("--sd-train-steps", type=int, default=SD_TRAIN_STEPS,
                        help="batches of 4 patches at 64x64 that train that autoencoder (0: random weights)")
    parser.add_argument("--cache", type=Path, default=Path(".flipad/bench"))
    parser.add_argument("--corrector-steps", type=int, default=AutoencoderSettings.corrector_steps,
                        help="the search's linear-corrector steps (the default's)")
    parser.add_argument("--encoder-steps", type=int, default=AutoencoderSettings.encoder_steps,
                        help="its encoder steps (0 corrector and 8 encoder steps, --gn-steps 2, --switch: stop 53's search)")
    parser.add_argument("--gn-steps", type=int, default=AutoencoderSettings.steps, help="its Gauss-Newton steps")
    parser.add_argument("--switch", action=argparse.BooleanOptionalAction, default=AutoencoderSettings.switch,
                        help="each item leaves the encoder steps at its first failed one")
    parser.add_argument("--anderson", action=argparse.BooleanOptionalAction, default=AutoencoderSettings.anderson,
                        help="the encoder steps after an item's first are Anderson-accelerated")
    args = parser.parse_args(argv)
    if args.sd_items < 2:
        parser.error("--sd-items: at least 2 (the thresholds need two own items)")
    torch.set_num_threads(2)
    train = photo_patches(64, 4000, seed=0)
    test = photo_patches(64, 4 * args.items + args.validation, seed=1, split="test")
    tag = f"ae{args.train_steps}"
    owner = saved_autoencoder(args.cache / f"{tag}-owner", SMALL_AUTOENCODER, train, args.train_steps, seed=0)
    other = saved_autoencoder(args.cache / f"{tag}-other-seed", SMALL_AUTOENCODER, train, args.train_steps, seed=1)
    tuned = _finetuned(args.cache / f"{tag}-finetuned-{args.finetune_steps}", owner, train, args.finetune_steps)
    module = load_generator(f"diffusers:{owner}")

    settings = AutoencoderSettings(corrector_steps=args.corrector_steps, encoder_steps=args.encoder_steps,
                                   steps=args.gn_steps, switch=args.switch, anderson=args.anderson)
    detector = AutoencoderDetector(module, n_validation=args.validation, settings=settings, progress=False)
    validation = detector.own_samples(args.validation, seed=2, real=test[4 * args.items:])
    start = time.perf_counter()
    detector.fit(validation=validation)
    fit_s = time.perf_counter() - start
    cut = detector.fit_summary()["autoencoder_screens_cut_held_out"]
    aedr = AedrDetector(module, n_validation=args.validation, settings=settings, progress=False).fit(validation=validation)

    n = args.items
    own = detector.own_samples(n, seed=3, real=test[:n])
    sets = {"own": own, "own jpeg q90": perturb(own, "jpeg q90"), "own jpeg q80": perturb(own, "jpeg q80"),
            "own jpeg q70": perturb(own, "jpeg q70"), "real": test[n:2 * n],
            "other-seed autoencoder": load_generator(f"diffusers:{other}").reconstruct(test[2 * n:3 * n]),
            "fine-tuned decoder": load_generator(f"diffusers:{tuned}").reconstruct(test[3 * n:4 * n])}
    # what arrives as a lossless file with no trace of a JPEG is scored as such (score_items does the same)
    lossless = {name for name in sets if "jpeg" not in name}

    def scored(det, name: str, x: np.ndarray, **options):
        return (det.score_lossless if name in lossless else det.score)(x, **options)

    exhaustive = {name: scored(detector, name, x, exhaustive=True) for name, x in sets.items()}
    first = {name: DecoderSearch(module, 0, 1).run(x)[:, 0].numpy() for name, x in sets.items()}
    ratio = {name: -aedr.score(x).score for name, x in sets.items()}
    rows = []
    for name, scores in exhaustive.items():
        loss = scores.diagnostics["decoder_loss"]
        aedr_scores = scored(aedr, name, sets[name])
        row = {"source": name, "attributed": float(scores.attributed.is_generated().mean()),
               "undecided": float(scores.attributed.is_undecided().mean()),
               "aedr attributed": float(aedr_scores.is_generated().mean()),
               "aedr undecided": float(aedr_scores.is_undecided().mean()),
               "median residual": float(np.median(loss))}
        if not name.startswith("own"):
            row |= {"AUC decoder family": _auc(exhaustive["own"].diagnostics["decoder_loss"], loss),
                    "AUC one reconstruction": _auc(first["own"], first[name]),
                    "AUC AEDR ratio": _auc(ratio["own"], ratio[name])}
        rows.append(row)

    # half own (half of them lossless, half JPEG q90), half other sources (lossless)
    resaved = sets["own jpeg q90"][n // 2:]
    clean = np.concatenate([own[: n // 2], sets["real"][: n // 3], sets["other-seed autoencoder"][: n // 3],
                            sets["fine-tuned decoder"][: n - 2 * (n // 3)]])
    start = time.perf_counter()
    stream = [detector.score_lossless(clean), detector.score(resaved)]
    seconds = time.perf_counter() - start
    cost = _cost(stream, seconds, module, np.concatenate([clean, resaved]))
    equivalents = np.concatenate([s.diagnostics["decoder_passes"] + cost["encoder_pass_cost"] * s.diagnostics["encoder_passes"]
                                  for s in stream])
    cost |= {"own_equivalents": float(np.r_[equivalents[: n // 2], equivalents[len(clean):]].mean()),
             "other_equivalents": float(equivalents[n // 2 : len(clean)].mean())}
    start = time.perf_counter()
    aedr.score_lossless(clean)
    aedr.score(resaved)
    cost["aedr_s_per_item"] = (time.perf_counter() - start) / cost["stream"]
    sd_folder = saved_autoencoder(args.cache / f"sd-{args.sd_train_steps}", {**SD_AUTOENCODER, "sample_size": 64},
                                  train, args.sd_train_steps, batch=4, lr=SD_LR)
    sd = _sd_cost(sd_folder, args.sd_size, args.sd_items, settings) | {"train_steps": args.sd_train_steps}

    print(f"small autoencoder ({args.train_steps} batches), fit {fit_s:.0f} s on {args.validation} own items "
          f"(+ re-saves); threshold residual {-detector.threshold():.3g}; screens set on half of them cut {cut:.3f} "
          f"of the other half")
    for row in rows:
        print("  " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    print(f"settled verdict on a half-own stream of {cost['stream']}: {_cost_line(cost)} (own "
          f"{cost['own_equivalents']:.1f}, other {cost['other_equivalents']:.1f}); AEDR "
          f"{cost['aedr_s_per_item'] * 1000:.0f} ms/item (2 encoder + 2 decoder passes)")
    print(f"Stable Diffusion's VAE config ({sd['parameters_m']:.1f} M) at {sd['size']}px, {_sd_weights(sd)}: "
          f"{_cost_line(sd)} (fit {sd['fit_s']:.0f} s)")
    return {"train_steps": args.train_steps, "finetune_steps": args.finetune_steps, "validation": args.validation,
            "items": n, "fit_s": fit_s, "screens_cut_held_out": cut, "settings": {"corrector_steps": settings.corrector_steps,
                                                    "encoder_steps": settings.encoder_steps, "steps": settings.steps,
                                                    "cg_steps": settings.cg_steps, "switch": settings.switch,
                                                    "anderson": settings.anderson},
            "rows": rows, "cost": cost, "sd": sd}


def _sd_weights(sd: dict) -> str:
    steps = sd.get("train_steps", 0)  # records before the option have random weights
    return f"trained {steps} batches of 4 at 64x64" if steps else "random weights"


def _cost_line(cost: dict) -> str:
    letter = cost["encoder_passes"] <= 1 and cost["decoder_passes"] <= 10
    return (f"{cost['encoder_passes']:.2f} encoder passes + {cost['decoder_passes']:.1f} decoder-pass equivalents "
            f"per item (bar: at most 1 encoder pass and 10 decoder-pass equivalents: {'met' if letter else 'NOT met'}) "
            f"= {cost['equivalents']:.1f} decoder-pass equivalents with an encoder pass at "
            f"{cost['encoder_pass_cost']:.2f} (the bar in that unit: {cost['bar']:.1f}); "
            f"{cost['s_per_item'] * 1000:.0f} ms per item, {cost['time_equivalents']:.1f} decoder passes' time")


def _cut_line(figures: dict) -> str:
    """The screens' two-fold check of a record (records before stop 54 did not keep it)."""
    cut = figures.get("screens_cut_held_out")
    return "" if cut is None else f"; screens set on half of those items cut {cut:.3f} of the other half's attributed ones"


def _search_line(settings: dict) -> str:
    """The search of a record's settings (records before the corrector had none)."""
    phases = [(settings.get("corrector_steps", 0), "linear-corrector steps"),
              (settings.get("encoder_steps", 0), "encoder steps"),
              (settings["steps"], f"Gauss-Newton steps of {settings['cg_steps']} conjugate gradients")]
    named = ", then ".join(f"{n} {what}" for n, what in phases if n)
    fixed_point = [what for n, what in phases[:2] if n]
    return (f"{named}{'; the ' + ' and '.join(fixed_point) + ' Anderson-accelerated' if fixed_point and settings.get('anderson') else ''}"
            f"{', each item leaving them at its first failed one' if fixed_point and settings.get('switch') else ''}")


def render(figures: dict) -> str:
    cost, sd = figures["cost"], figures["sd"]
    return (f"Small autoencoder trained {figures['train_steps']} batches (look-alikes: another seed, the same "
            f"batches; the decoder fine-tuned {figures['finetune_steps']} batches); thresholds on "
            f"{figures['validation']} held-out own items and their re-saves (fit {figures['fit_s']:.0f} s)"
            f"{_cut_line(figures)}; "
            f"{figures['items']} items per source. Search: {_search_line(figures['settings'])}.\n\n"
            + markdown_table(figures["rows"], ["source", "attributed", "undecided", "aedr attributed", "aedr undecided",
                                               "median residual",
                                               "AUC decoder family", "AUC one reconstruction", "AUC AEDR ratio"],
                             {"median residual": ".3g"})
            + f"\n\nSettled verdict on a half-own stream of {cost['stream']} items: {_cost_line(cost)} (own items "
            f"{cost['own_equivalents']:.1f}, others {cost['other_equivalents']:.1f} decoder-pass equivalents); AEDR "
            f"{cost['aedr_s_per_item'] * 1000:.0f} ms per item (2 encoder + 2 decoder passes).\n\n"
            f"Stable Diffusion's VAE configuration ({sd['parameters_m']:.1f} M parameters, {_sd_weights(sd)}) at "
            f"{sd['size']}x{sd['size']} on the CPU, over {sd['items']} items: {_cost_line(sd)} (fit on "
            f"{sd['items'] // 2} own items {sd['fit_s']:.0f} s).")


def headline(figures: dict) -> list[str]:
    by = {row["source"]: row for row in figures["rows"]}
    return [f"Autoencoder family (small VAE): own attributed {by['own']['attributed']:.3f}, q80 "
            f"{by['own jpeg q80']['attributed']:.3f}; real {by['real']['attributed']:.3f}, other-seed VAE "
            f"{by['other-seed autoencoder']['attributed']:.3f}, fine-tuned decoder "
            f"{by['fine-tuned decoder']['attributed']:.3f}; per item {_passes(figures['cost'])}; Stable Diffusion's "
            f"configuration at {figures['sd']['size']} px, {_sd_weights(figures['sd'])}: {_passes(figures['sd'])}"]


def _passes(cost: dict) -> str:
    return (f"{cost['encoder_passes']:.2f} encoder passes + {cost['decoder_passes']:.1f} decoder-pass equivalents "
            f"(bar 1 + 10)")


BENCHMARK = Benchmark("autoencoder", __doc__, run, render, headline,
                      quick=("--train-steps", "10", "--finetune-steps", "2", "--validation", "20", "--items", "6",
                             "--sd-size", "32", "--sd-items", "2", "--sd-train-steps", "2"))
