"""Training-step time with denormals kept and flushed to zero, on trained and untrained weights, in one run.

    python benchmarks/denormals.py --run outputs/mmvaeplus/RUN [--steps 8] [--repeats 3] [--batch-size 32]

Why: on one machine (2026-12-03) an epoch of `epure train` grew from 48 s to 68 s as the run converged. A
trained model's decoders give extreme logits whose gradients fall below float32's smallest normal number,
and CPUs can compute on such denormals far slower than on normal numbers; the CLI therefore flushes them
to zero (`epure/numerics.py`). Flush-to-zero must be on before torch creates its worker threads, so each
measurement is its own process; the four settings run interleaved, ``--repeats`` times, and the table
shows each setting's median against "trained, denormals kept" of the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = [("trained", "kept"), ("trained", "flushed"), ("untrained", "kept"), ("untrained", "flushed")]


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a run directory of epure train (its last.pt)")
    parser.add_argument("--steps", type=int, default=8, help="timed optimiser steps per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements of each setting, interleaved")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the run's train.batch_size")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--measure", nargs=2, metavar=("WEIGHTS", "DENORMALS"), help=argparse.SUPPRESS)
    return parser.parse_args()


def measure(run: Path, weights: str, denormals: str, steps: int, batch_size: int | None) -> float:
    """Seconds per optimiser step in this process (flush-to-zero switched first, as the CLI does)."""
    if denormals == "flushed":
        from epure.numerics import flush_denormals_to_zero
        flush_denormals_to_zero()
    import torch

    from epure.checkpoint import read_run_checkpoint
    from epure.config import config_from_dict
    from epure.data import load_data
    from epure.model import MMVAEPlus
    from epure.model.backward import objective_backward
    from epure.model.objectives import draw_strata
    from epure.train import make_optimizer

    _, checkpoint = read_run_checkpoint(run, prefer="last")
    cfg = config_from_dict(checkpoint["config"])
    model = MMVAEPlus(cfg.model, cfg.data.components, cfg.data.image_size)
    optimizer = make_optimizer(model, cfg.train)
    if weights == "trained":
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
    data = load_data(cfg.data)
    torch.manual_seed(0)
    index = torch.randperm(len(data.train))[: batch_size or cfg.train.batch_size].numpy()
    x = torch.from_numpy(data.train.images[index]).float().div_(255)
    c = torch.from_numpy(data.normalizer.normalize(data.train.conditions[index]))
    available = torch.from_numpy(data.train.available[index])
    mc = cfg.model
    times = []
    for _ in range(steps + 1):  # the first step warms up allocator and kernels and is not timed
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        objective_backward(model, x, c, mc.objective, mc.beta, mc.K, available=available,
                           strata=draw_strata(available, mc.strata_per_design, None))
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    args = arguments()
    if args.measure:
        print(json.dumps(measure(args.run, *args.measure, args.steps, args.batch_size)))
        return
    from rich.console import Console
    from rich.table import Table

    from epure.io import atomic_write_json
    console = Console()
    seconds: dict[tuple[str, str], list[float]] = {setting: [] for setting in SETTINGS}
    for repeat in range(args.repeats):
        for setting in SETTINGS:
            command = [sys.executable, __file__, "--run", str(args.run), "--steps", str(args.steps),
                       "--measure", *setting] + (["--batch-size", str(args.batch_size)] if args.batch_size else [])
            out = subprocess.run(command, capture_output=True, text=True, check=True)
            seconds[setting].append(float(out.stdout.split()[-1]))
            console.log(f"repeat {repeat + 1}: {setting[0]} weights, denormals {setting[1]}: "
                        f"{seconds[setting][-1]:.3f} s/step")
    baseline = statistics.median(seconds[SETTINGS[0]])
    table = Table(title=f"training step, {args.run} ({args.steps} steps x {args.repeats} repeats)")
    for column in ("weights", "denormals", "median s/step", "all measurements", "speed vs trained, kept"):
        table.add_column(column)
    rows = []
    for setting in SETTINGS:
        median = statistics.median(seconds[setting])
        rows.append({"weights": setting[0], "denormals": setting[1], "median_seconds": median,
                     "seconds": seconds[setting], "speed_vs_trained_kept": baseline / median})
        table.add_row(*setting, f"{median:.3f}", " ".join(f"{s:.3f}" for s in seconds[setting]),
                      f"{baseline / median:.2f}x")
    console.print(table)
    if args.json:
        atomic_write_json(args.json, {"run": str(args.run), "steps": args.steps, "results": rows})


if __name__ == "__main__":
    main()
