"""Freed memory kept for reuse (`epure/allocator.py`) against glibc's defaults: sampling and training speed.

    python benchmarks/allocator.py [--config mmvaeplus_default] [--rounds 3] [--batch 128] [--train-steps 2]

glibc's thresholds are per process, so each setting runs in its own child process, the two alternating for
``--rounds`` rounds (a shared machine's load then falls on both alike). Each child times, on the same weights and
batch as `benchmarks/throughput.py`, unconditional generation and inpainting (every component from component 0)
on the fast path and the straightforward one, and a training step of the fast path; it reports the best of
``--repeats`` calls, the page faults and the system time per call. Printed: the medians over rounds and the
ratios kept / default.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

from rich.console import Console
from rich.table import Table

SETTINGS = ("glibc default", "kept for reuse")


def measure(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """In this (child) process: each task's best time, page faults and system seconds per call."""
    if args.setting == SETTINGS[1]:
        from epure.allocator import keep_freed_memory

        if not keep_freed_memory():
            raise SystemExit("mallopt refused the thresholds: not glibc?")
    import torch

    from epure.config import load_config
    from throughput import Bench  # benchmarks/throughput.py: the same model, batch and calls

    bench = Bench(load_config(args.config), args.batch, torch.device("cpu"))
    tasks: dict[str, Callable[[], None]] = {
        "generate, straightforward": lambda: bench.generate(False),
        "generate, fast": lambda: bench.generate(True),
        "inpaint, straightforward": lambda: bench.inpaint(False),
        "inpaint, fast": lambda: bench.inpaint(True),
        "train step, fast": lambda: bench.train_step("fast"),
    }
    results = {}
    for name, task in tasks.items():
        repeats = args.train_steps if name.startswith("train") else args.repeats
        task()  # warm-up
        best, faults, system = float("inf"), 0, 0.0
        for _ in range(repeats):
            before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            task()
            seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
            best = min(best, seconds)
            faults += after.ru_minflt - before.ru_minflt
            system += after.ru_stime - before.ru_stime
        results[name] = {"seconds": best, "faults": faults / repeats, "system_seconds": system / repeats}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="mmvaeplus_default")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5, help="timed sampling calls per task and child")
    parser.add_argument("--train-steps", type=int, default=2, help="timed training steps per child")
    parser.add_argument("--setting", choices=SETTINGS, help=argparse.SUPPRESS)  # a child's
    args = parser.parse_args()
    if args.setting:
        print(json.dumps(measure(args)))
        return
    console = Console(width=160)
    runs: dict[str, list[dict]] = {s: [] for s in SETTINGS}
    for round_ in range(args.rounds):
        for setting in SETTINGS:
            console.log(f"round {round_ + 1}/{args.rounds}: {setting}")
            child = subprocess.run([sys.executable, __file__, "--setting", setting, "--config", args.config,
                                    "--batch", str(args.batch), "--repeats", str(args.repeats),
                                    "--train-steps", str(args.train_steps)],
                                   capture_output=True, text=True, check=True)
            runs[setting].append(json.loads(child.stdout.strip().splitlines()[-1]))
    table = Table(title=f"{args.config}, batch {args.batch}: medians of {args.rounds} rounds (best call of each child)")
    for column in ("task", *(f"{s} s" for s in SETTINGS), "kept / default speed", *(f"{s} faults" for s in SETTINGS),
                   *(f"{s} sys s" for s in SETTINGS)):
        table.add_column(column, justify="left" if column == "task" else "right")
    for task in runs[SETTINGS[0]][0]:
        med = {s: {k: statistics.median(r[task][k] for r in runs[s]) for k in ("seconds", "faults", "system_seconds")}
               for s in SETTINGS}
        table.add_row(task, *(f"{med[s]['seconds']:.3f}" for s in SETTINGS),
                      f"{med[SETTINGS[0]]['seconds'] / med[SETTINGS[1]]['seconds']:.2f}x",
                      *(f"{med[s]['faults']:.0f}" for s in SETTINGS),
                      *(f"{med[s]['system_seconds']:.3f}" for s in SETTINGS))
    console.print(table)


if __name__ == "__main__":
    main()
