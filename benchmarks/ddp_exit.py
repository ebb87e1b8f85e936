"""How often a finished 2-process CPU training run still exits non-zero: `epure train --devices 2`, repeated.

    python benchmarks/ddp_exit.py --runs 30

Each run trains a tiny model for 2 steps on 40 built-in synthetic designs under torchrun (gloo, W&B offline,
one thread per process) and must exit 0. Until 2026-12-06 one process in about 25 runs was killed by SIGABRT
while Python shut down (gloo's worker threads outlived the process group, epure/distributed.py `start`); this
counts such runs and prints the last lines of each failure's output.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from epure.config import config_from_dict, save_config
from epure.data.synth import write_synthetic_dataset

TINY = {"model": {"latent_dim_w": 4, "latent_dim_z": 4, "latent_dim_u": 8, "nf": 8, "nf_max": 16,
                  "cond_hidden": [32, 32]},
        "train": {"epochs": 2, "batch_size": 8, "max_steps": 2, "lr": 2e-3, "checkpoint_every_minutes": 0.0},
        "wandb": {"mode": "offline", "images_every_epochs": 0, "log_every_steps": 1}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    console = Console()
    base = Path(tempfile.mkdtemp(prefix="epure-ddp-exit-"))
    data = write_synthetic_dataset(base / "data", n=40, seed=0)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "WANDB_DIR": str(base), "EPURE_CACHE_DIR": str(base / "cache"), "COLUMNS": "200"}
    failures, started = [], time.perf_counter()
    for run in range(args.runs):
        tree = {**TINY, "data": {"root": str(data), "components": ["group_nc", "group_km", "fpu"],
                                 "val_fraction": 0.1},
                "train": {**TINY["train"], "output_dir": str(base / f"run{run}")}}
        config = base / f"run{run}.yaml"
        save_config(config_from_dict(tree), config)
        done = subprocess.run([sys.executable, "-m", "epure", "train", "--config", str(config), "--devices", "2"],
                              env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            failures.append((run, done.returncode, done.stderr))
        console.print(f"run {run + 1}/{args.runs}: exit {done.returncode}")
    table = Table(title=f"epure train --devices 2, {args.runs} runs of 2 steps ({time.perf_counter() - started:.0f} s)")
    for column in ("runs", "non-zero exits", "with SIGABRT"):
        table.add_column(column, justify="right")
    aborted = sum("SIGABRT" in stderr for _, _, stderr in failures)
    table.add_row(str(args.runs), str(len(failures)), str(aborted))
    console.print(table)
    for run, code, stderr in failures:
        console.print(f"[bold red]run {run + 1} exited {code}[/]; its stderr ends:", soft_wrap=True)
        console.print("\n".join(stderr.strip().splitlines()[-15:]), soft_wrap=True, markup=False)


if __name__ == "__main__":
    main()
