"""What keeping incomplete designs is worth: the public toy train split with half its designs missing one random
component, trained for the same number of steps (a) keeping those designs (data.missing: allow, the masked
objective) and (b) discarding them, each scored on the complete toy test split.

    EPURE_CACHE_DIR=/tmp/epcache python benchmarks/missing_benchmark.py --max-steps 925     # config toy
    python benchmarks/missing_benchmark.py --max-steps 200 --eval-limit 500                # a quicker look
    python benchmarks/missing_benchmark.py --max-steps 500 --arms b                        # one arm (another process)
    python benchmarks/missing_benchmark.py --max-steps 500 --run a RUN_A --run b RUN_B     # score finished runs

"The same budget" is the same number of optimiser steps of the same batch size: (b) goes over its half of the
designs twice as often. The validation split (held out of train by data.val_seed) stays complete in both arms;
the last checkpoint is scored, with posterior means as in the toy benchmark. The title line prints the steps,
the wall clock of each arm and the load average: times measured on a shared machine say little.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from epure.checkpoint import load_model
from epure.config import load_config, parse_overrides
from epure.data import ConditionNormalizer, DataBundle, Split, load_data
from epure.evaluate import EvaluationOptions, evaluate
from epure.io import atomic_write_text
from epure.allocator import keep_freed_memory
from epure.numerics import flush_denormals_to_zero
from epure.train import train
from toy_benchmark import LOWER_IS_BETTER, our_row

ARMS = {"a": "(a) keep incomplete", "b": "(b) discard them"}
DIVERSITY_ROWS = {"unconditional: precision": "eval/diversity/precision", "unconditional: recall": "eval/diversity/recall",
                  "unconditional: coverage": "eval/diversity/coverage"}


def drop_one_component(split: Split, share: float, seed: int) -> Split:
    """A copy of ``split`` where ``share`` of the designs (chosen at random) each lose one random component:
    its image becomes zeros and its availability False, as the loader gives a missing PNG."""
    rng = np.random.default_rng(seed)
    picked = rng.permutation(len(split))[: int(round(share * len(split)))]
    lost = rng.integers(0, len(split.components), len(picked))
    images, available = split.images.copy(), split.available.copy()
    images[picked, lost] = 0
    available[picked, lost] = False
    return dataclasses.replace(split, images=images, available=available)


def arm_bundle(data: DataBundle, train_split: Split) -> DataBundle:
    return dataclasses.replace(data, train=train_split, normalizer=ConditionNormalizer.fit(train_split))


def main() -> None:
    flush_denormals_to_zero()  # as the CLI does, before any torch work
    keep_freed_memory()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="toy", help="builtin config name or YAML file (default: toy)")
    parser.add_argument("--max-steps", type=int, required=True, help="optimiser steps of each arm")
    parser.add_argument("--share", type=float, default=0.5, help="share of train designs that lose a component")
    parser.add_argument("--seed", type=int, default=0, help="which designs lose which component")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--eval-limit", type=int, default=1000)
    parser.add_argument("--arms", nargs="+", choices=sorted(ARMS), default=sorted(ARMS),
                        help="which arms to train (default both; two processes can train one each)")
    parser.add_argument("--run", nargs=2, action="append", default=[], metavar=("ARM", "RUN_DIR"),
                        help="score this finished run for ARM instead of training it")
    parser.add_argument("--output-dir", default="outputs/missing_benchmark")
    parser.add_argument("--out", type=Path, default=Path("outputs/missing_benchmark/results.json"))
    args = parser.parse_args()
    if not 0.0 < args.share <= 1.0 or args.max_steps <= 0:
        raise SystemExit("--share must be in (0, 1] and --max-steps positive")
    console = Console(width=max(Console().width, 120))

    cfg = load_config(args.config).updated({
        "data.missing": "allow", "train.max_steps": args.max_steps, "train.max_minutes": 0.0,
        "train.epochs": 100_000, "train.output_dir": args.output_dir, "wandb.mode": "off",
        **parse_overrides(args.set)})
    data = load_data(cfg.data)
    incomplete = drop_one_component(data.train, args.share, args.seed)
    arms = {"a": arm_bundle(data, incomplete),
            "b": arm_bundle(data, incomplete.subset(np.flatnonzero(incomplete.complete)))}
    options = EvaluationOptions(limit=args.eval_limit, bootstrap=0, use_mean=True, draws=0)
    finished = {arm: Path(run_dir) for arm, run_dir in args.run}
    if set(finished) - set(ARMS):
        raise SystemExit(f"--run ARM RUN_DIR: ARM is a or b, got {sorted(set(finished) - set(ARMS))}")
    results = {}
    for name, bundle in arms.items():
        if name not in finished and name not in args.arms:
            continue
        console.print(f"{ARMS[name]}: {len(bundle.train):,} train designs, {int(bundle.train.complete.sum()):,} "
                      f"complete; {args.max_steps} steps of {cfg.train.batch_size}")
        start = time.perf_counter()
        run_dir = finished[name] if name in finished else train(cfg, data=bundle).run_dir
        minutes = (time.perf_counter() - start) / 60 if name not in finished else float("nan")
        loaded = load_model(run_dir, prefer="last")
        if loaded.meta.get("data_fingerprint") != bundle.fingerprint or loaded.meta.get("step") != args.max_steps:
            console.print(f"[yellow]warning: {run_dir} was trained on other data or for {loaded.meta.get('step')} "
                          f"steps, not this arm's {args.max_steps}[/]")
        metrics = evaluate(loaded, data.test, options).flat()
        row = {**our_row(metrics), **{label: metrics[key] for label, key in DIVERSITY_ROWS.items() if key in metrics}}
        results[name] = {"run_dir": str(run_dir), "steps": loaded.meta.get("step"), "minutes": minutes,
                         "train": bundle.train.availability(), "row": row, "metrics": metrics}

    atomic_write_text(args.out, json.dumps({"config": cfg.to_dict(), "share": args.share, "seed": args.seed,
                                            "options": vars(options), "load_average": os.getloadavg(),
                                            "arms": results}, indent=2, default=str))
    if set(results) != set(ARMS):
        console.print(f"{', '.join(ARMS[a] for a in results)} written to {args.out}; the table needs both arms: "
                      f"--run a RUN_A --run b RUN_B scores finished runs")
        return
    console.print(table(results, args, len(data.test)))


def table(results: dict, args: argparse.Namespace, test_designs: int) -> Table:
    """Both arms side by side, with their difference; the better arm's value in green."""
    gpu = f"{torch.cuda.get_device_name()}, " if torch.cuda.is_available() else ""
    spent = " and ".join("a finished run" if math.isnan(results[arm]["minutes"]) else f"{results[arm]['minutes']:.1f} min"
                         for arm in ("a", "b"))
    title = (f"{args.config}: {args.max_steps} steps each ({spent}), {gpu}{len(os.sched_getaffinity(0))} CPUs, load average "
             f"{os.getloadavg()[0]:.1f}; {args.share:.0%} of the train designs lack one component; scored on "
             f"{min(args.eval_limit, test_designs):,} complete test sections")
    out = Table(title=title)
    for column in ("metric", ARMS["a"], ARMS["b"], "(a) - (b)"):
        out.add_column(column, justify="left" if column == "metric" else "right")
    for row in ("train designs", "complete train designs"):
        key = "designs" if row == "train designs" else "complete"
        a, b = results["a"]["train"][key], results["b"]["train"][key]
        out.add_row(row, f"{a:,}", f"{b:,}", f"{a - b:+,}")
    for metric, a in results["a"]["row"].items():
        b = results["b"]["row"][metric]
        better = (a < b) if metric in LOWER_IS_BETTER else (a > b)
        out.add_row(metric, f"[{'green' if better else 'default'}]{a:.3f}[/]", f"{b:.3f}", f"{a - b:+.3f}")
    return out


if __name__ == "__main__":
    main()
