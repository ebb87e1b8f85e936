"""How long `epure evaluate` takes on the public toy test split (4,000 designs, 3 components).

Untrained weights of the toy config cost exactly what trained ones do, so no training is needed; the
diversity metrics are included, memorisation against the 15,200 designs the toy config trains on. The machine's
load average is printed beside the time because a shared machine slows the convolutions down a lot.

    EPURE_CACHE_DIR=/tmp/epcache python benchmarks/evaluate_speed.py [--subsets] [--ood] [--limit N] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from epure.checkpoint import LoadedModel
from epure.config import load_config
from epure.data import load_data
from epure.evaluate import EvaluationOptions, evaluate
from epure.model import MMVAEPlus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N test designs")
    parser.add_argument("--subsets", action="store_true", help="also observed subsets of size >= 2")
    parser.add_argument("--ood", action="store_true", help="also the out-of-range dimension requests")
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default torch's); 1 can win on a CPU busy with other work")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console()

    cfg = load_config("toy")
    data = load_data(cfg.data)  # unpacks ../shared/data/toy_epure.tar.gz into the cache on first use
    torch.manual_seed(0)
    model = MMVAEPlus(cfg.model, cfg.data.components, cfg.data.image_size).eval()
    loaded = LoadedModel(model, cfg, data.normalizer, list(cfg.data.components), Path("untrained-toy"))
    options = EvaluationOptions(limit=args.limit, subsets=args.subsets, ood=args.ood, bootstrap=args.bootstrap)

    load_before = os.getloadavg()
    start, cpu_start = time.perf_counter(), time.process_time()
    result = evaluate(loaded, data.test, options, train=data.train)  # the training designs: memorisation
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    load_after = os.getloadavg()

    table = Table(title=f"evaluate: {result.info['examples']} toy test designs, {len(result.components)} components")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for stage, value in result.info["seconds"].items():
        table.add_row(stage, f"{value:.1f}")
    console.print(table)
    console.print(f"total {seconds:.1f} s wall, {cpu_seconds:.1f} s CPU; {os.cpu_count()} CPUs, torch threads "
                  f"{torch.get_num_threads()}; 1-min load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")


if __name__ == "__main__":
    main()
