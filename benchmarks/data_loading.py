"""First (decoding) and cached load times of the public toy train split.

    python benchmarks/data_loading.py [--repeats 3]

Uses a fresh temporary cache, so the first load decodes every PNG; later loads read the cached array.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from rich.console import Console
from rich.table import Table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    console = Console()
    with tempfile.TemporaryDirectory() as cache:
        os.environ["EPURE_CACHE_DIR"] = cache
        from epure.config import load_config
        from epure.data import load_split
        from epure.data.sources import toy_root

        root = toy_root()
        cfg = load_config("toy").data
        table = Table(title=f"toy train split load times ({os.cpu_count()} CPUs)")
        for column in ("load", "designs", "seconds"):
            table.add_column(column)
        start = time.perf_counter()
        split = load_split(root, "train", cfg)
        table.add_row("first (decode + write cache)", str(len(split)), f"{time.perf_counter() - start:.2f}")
        for i in range(args.repeats):
            start = time.perf_counter()
            split = load_split(root, "train", cfg)
            table.add_row(f"cached #{i + 1}", str(len(split)), f"{time.perf_counter() - start:.2f}")
        console.print(table)


if __name__ == "__main__":
    main()
