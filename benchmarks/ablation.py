"""Train variants of one config with the same budget and compare their evaluations side by side.

    python benchmarks/ablation.py --config small --max-steps 150 \\
        --variant bernoulli model.likelihood=bernoulli \\
        --variant normal model.likelihood=normal \\
        --variant laplace model.likelihood=laplace

Each ``--variant NAME KEY=VALUE ...`` trains with those config overrides (values parsed as YAML), then is
evaluated on the test split; a table and a JSON (``--out``) hold the headline metrics of every variant.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from epure.checkpoint import load_model
from epure.config import load_config
from epure.data import load_data
from epure.evaluate import EvaluationOptions, evaluate, training_split
from epure.io import atomic_write_json
from epure.train import train

HEADLINE = ["cross_iou", "self_iou", "uncond/union_one_piece", "uncond/all_one_piece", "dims/width_mae",
            "dims/height_mae", "diversity/precision", "diversity/recall", "diversity/pairwise_iou"]


def parse_variants(raw: list[list[str]]) -> dict[str, dict]:
    variants = {}
    for name, *pairs in raw:
        overrides = {}
        for pair in pairs:
            key, _, value = pair.partition("=")
            overrides[key] = yaml.safe_load(value)
        variants[name] = overrides
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="small")
    parser.add_argument("--max-steps", type=int, default=0)
    parser.add_argument("--max-minutes", type=float, default=0.0)
    parser.add_argument("--eval-limit", type=int, default=1000)
    parser.add_argument("--variant", nargs="+", action="append", required=True, metavar="NAME KEY=VALUE")
    parser.add_argument("--output-dir", default="outputs/ablation")
    parser.add_argument("--out", default="outputs/ablation/results.json")
    args = parser.parse_args()
    console = Console()
    base = load_config(args.config).updated({"train.max_steps": args.max_steps, "train.max_minutes": args.max_minutes,
                                             "train.epochs": 10_000, "train.output_dir": args.output_dir,
                                             "wandb.mode": "off"})
    results = {}
    for name, overrides in parse_variants(args.variant).items():
        cfg = base.updated(overrides)
        data = load_data(cfg.data)
        start = time.perf_counter()
        run = train(cfg, data=data)
        minutes = (time.perf_counter() - start) / 60
        loaded = load_model(run.run_dir, prefer="last")
        options = EvaluationOptions(limit=args.eval_limit, bootstrap=0)
        metrics = evaluate(loaded, data.test, options, training_split(loaded)).flat()
        results[name] = {"overrides": overrides, "steps": run.step, "minutes": round(minutes, 2),
                         "run_dir": str(run.run_dir), **{k: metrics[f"eval/{k}"] for k in HEADLINE}}
        console.print(f"{name}: {results[name]}")
    table = Table(title=f"{args.config}: same budget ({args.max_steps or '-'} steps, {args.max_minutes or '-'} min)")
    for column in ["variant", "steps", "minutes", *HEADLINE]:
        table.add_column(column, justify="right")
    for name, r in results.items():
        table.add_row(name, str(r["steps"]), f"{r['minutes']:.1f}", *[f"{r[k]:.3f}" for k in HEADLINE])
    console.print(table)
    atomic_write_json(Path(args.out), results)


if __name__ == "__main__":
    main()
