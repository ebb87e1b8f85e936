"""Train variants of one config with the same budget and compare their evaluations side by side.

    python benchmarks/ablation.py --config small --max-steps 150 \\
        --variant bernoulli model.likelihood=bernoulli \\
        --variant normal model.likelihood=normal \\
        --variant laplace model.likelihood=laplace

Each ``--variant NAME KEY=VALUE ...`` trains with those config overrides (values parsed as YAML), then is
evaluated on the test split; a table and a JSON (``--out``) hold the headline metrics of every variant.
Unconditional designs are drawn with every sampler of ``--samplers`` (default: the priors p(z) p(w) and the
fitted prior), one row each, from the same trained model; ``--fit-components 1 8`` also refits the fitted
prior with that many Gaussians to the same model's training latents (one row each), and ``--fit LABEL
KEY=VALUE ...`` with other ``model.fitted_prior_*`` settings, and ``--candidates 1 4`` scores designs chosen
from that many draws each (``epure.sample.best_of``), so samplers are compared on one set of weights:

    python benchmarks/ablation.py --run shipped RUN --samplers fitted \\
        --fit best model.fitted_prior_z=best --fit own model.fitted_prior_z=own
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from epure.checkpoint import load_model
from epure.config import load_config, parse_overrides
from epure.data import load_data
from epure.evaluate import EvaluationOptions, diversity_scores, evaluate, training_split
from epure.io import atomic_write_json
from epure.metrics import binarize
from epure.model.fitted_prior import design_latents, fit_prior
from epure.model.generation import latent_probabilities
from epure.allocator import keep_freed_memory
from epure.numerics import flush_denormals_to_zero
from epure.train import train

HEADLINE = ["cross_iou", "self_iou", "uncond/union_one_piece", "uncond/all_one_piece", "uncond/union_solid",
            "dims/width_mae", "dims/height_mae", "diversity/precision", "diversity/recall", "diversity/density",
            "diversity/coverage", "diversity/pairwise_iou"]


def parse_variants(raw: list[list[str]], flag: str = "--variant") -> dict[str, dict]:
    variants = {}
    for name, *pairs in raw:
        variants[name] = parse_overrides(pairs, option=f"{flag} {name}")
    return variants


def samplers(loaded, designs, names: list[str], fit_components: list[int], fits: dict[str, dict]):
    """(label, sampler, fitted prior) for each way of drawing unconditional latents from one trained model."""
    refits = {f"fitted x{count}": {"model.fitted_prior_components": count} for count in fit_components}
    refits.update({f"fitted {label}": overrides for label, overrides in fits.items()})
    for name in names:
        if name == "prior":
            yield "prior", "prior", loaded.fitted_prior
        elif not refits:
            yield "fitted", "fitted", loaded.fitted_prior
    if "fitted" in names and refits:
        x = torch.from_numpy(designs.images)
        c = torch.from_numpy(loaded.normalizer.normalize(designs.conditions))
        for label, overrides in refits.items():
            m = loaded.config.updated(overrides).model
            yield label, "fitted", fit_prior(loaded.model, x, c, m.fitted_prior_components, loaded.config.train.seed,
                                             z_from=m.fitted_prior_z, kept_variance=m.fitted_prior_kept_variance)


def reconstruction_scores(loaded, test, limit: int, seed: int = 0) -> dict[str, float]:
    """Diversity of the test designs' own reconstructions (decoded from their posterior locations, z from the
    fitted prior's expert or each component's own, with their own conditions): the most a sampler of such
    latents can reach."""
    test = test.subset(np.arange(min(limit, len(test))))
    c = torch.from_numpy(loaded.normalizer.normalize(test.conditions))
    with torch.inference_mode():
        fit = loaded.fitted_prior
        latents = design_latents(loaded.model, torch.from_numpy(test.images), c, expert=fit and fit.expert,
                                 own_z=bool(fit and fit.own_z)).float()
        made = np.concatenate([binarize(latent_probabilities(loaded.model, latents[i: i + 256], c[i: i + 256]).numpy())
                               for i in range(0, len(test), 256)])
    scores, _ = diversity_scores(made, binarize(test.images), None, seed)
    return {f"diversity/{k}": v for k, v in scores.items()}


def main() -> None:
    flush_denormals_to_zero()  # as the CLI does, before any torch work
    keep_freed_memory()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="small")
    parser.add_argument("--max-steps", type=int, default=0)
    parser.add_argument("--max-minutes", type=float, default=0.0)
    parser.add_argument("--eval-limit", type=int, default=1000)
    parser.add_argument("--draws", type=int, default=0,
                        help="completions per design for the completion diversity (default 0: not measured, it is "
                             "no headline column; epure evaluate measures it)")
    parser.add_argument("--variant", nargs="+", action="append", default=[], metavar="NAME KEY=VALUE")
    parser.add_argument("--run", nargs=2, action="append", default=[], metavar=("NAME", "RUN_DIR"),
                        help="evaluate a finished run (no training) under NAME, e.g. to compare more samplers")
    parser.add_argument("--samplers", nargs="+", default=["prior", "fitted"], choices=["prior", "fitted"])
    parser.add_argument("--fit-components", nargs="+", type=int, default=[],
                        help="refit the fitted prior with these numbers of Gaussians (default: the checkpoint's fit)")
    parser.add_argument("--fit", nargs="+", action="append", default=[], metavar="LABEL KEY=VALUE",
                        help="refit the fitted prior with these model.fitted_prior_* overrides, one row each")
    parser.add_argument("--candidates", nargs="+", type=int, default=[],
                        help="score unconditional designs as the best of N draws for each N given, one row each "
                             "(default: the model's model.sample_candidates)")
    parser.add_argument("--reconstructions", action="store_true",
                        help="also a row of the test designs' own reconstructions: the ceiling of any sampler")
    parser.add_argument("--output-dir", default="outputs/ablation")
    parser.add_argument("--out", default="outputs/ablation/results.json")
    args = parser.parse_args()
    console = Console()
    base = load_config(args.config).updated({"train.max_steps": args.max_steps, "train.max_minutes": args.max_minutes,
                                             "train.epochs": 10_000, "train.output_dir": args.output_dir,
                                             "wandb.mode": "off"})
    if not args.variant and not args.run:
        parser.error("give at least one --variant or --run")
    results = {}
    # every variant's config is built (and validated) before the first one trains
    variants = parse_variants(args.variant)
    fits = parse_variants(args.fit, "--fit")
    jobs = [(name, overrides, base.updated(overrides), None) for name, overrides in variants.items()]
    jobs += [(name, {}, None, Path(run_dir)) for name, run_dir in args.run]
    for name, overrides, cfg, run_dir in jobs:
        minutes = None
        if run_dir is None:
            start = time.perf_counter()
            run_dir = train(cfg, data=load_data(cfg.data)).run_dir
            minutes = round((time.perf_counter() - start) / 60, 2)
        loaded = load_model(run_dir, prefer="last")
        data = load_data(loaded.config.data)
        designs = training_split(loaded)
        for label, sampler, fitted in samplers(loaded, designs, args.samplers, args.fit_components, fits):
            loaded.fitted_prior = fitted
            for candidates in args.candidates or [None]:
                options = EvaluationOptions(limit=args.eval_limit, bootstrap=0, latent_sampler=sampler,
                                            draws=args.draws, candidates=candidates)
                metrics = evaluate(loaded, data.test, options, designs).flat()
                key = f"{name} / {label}" + (f" / best of {candidates}" if candidates else "")
                results[key] = {"overrides": overrides, "sampler": label, "candidates": candidates,
                                "steps": loaded.meta.get("step"), "minutes": minutes, "run_dir": str(run_dir),
                                **{k: metrics[f"eval/{k}"] for k in HEADLINE}}
                console.print(f"{key}: {results[key]}")
        if args.reconstructions:
            key = f"{name} / reconstructions"
            results[key] = {"overrides": overrides, "sampler": "reconstructions", "steps": loaded.meta.get("step"),
                            "minutes": minutes, "run_dir": str(run_dir), **dict.fromkeys(HEADLINE, float("nan")),
                            **reconstruction_scores(loaded, data.test, args.eval_limit)}
            console.print(f"{key}: {results[key]}")
    table = Table(title=f"{args.config}: same budget ({args.max_steps or '-'} steps, {args.max_minutes or '-'} min)")
    for column in ["variant", "steps", "minutes", *HEADLINE]:
        table.add_column(column, justify="right")
    for name, r in results.items():
        minutes = "-" if r["minutes"] is None else f"{r['minutes']:.1f}"
        table.add_row(name, str(r["steps"]), minutes, *[f"{r[k]:.3f}" for k in HEADLINE])
    console.print(table)
    atomic_write_json(Path(args.out), results)


if __name__ == "__main__":
    main()
