"""Peak memory of `epure sample` for growing numbers of samples: it should not grow with the count.

    python benchmarks/sampling_memory.py [--counts 1000 20000 100000] [--batch-size 256]

Each count runs the real command, ``python -m epure sample --checkpoint CKPT --num_samples N``, in its own
process, on an untrained model of the ``small`` preset (memory does not depend on the weights), writing
into a temporary folder that is deleted afterwards (100,000 samples are 600,000 small PNGs, a few GB of disk
blocks). The peak resident set size of each process comes from ``os.wait4`` (Linux and macOS).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table


def write_untrained_checkpoint(path: Path) -> None:
    """A checkpoint of the small preset with a plausible condition range, as training would write it."""
    import torch

    from epure.checkpoint import save_checkpoint
    from epure.config import load_config
    from epure.data.dataset import ConditionNormalizer
    from epure.model import MMVAEPlus

    cfg = load_config("small")
    torch.manual_seed(0)
    model = MMVAEPlus(cfg.model, cfg.data.components, cfg.data.image_size)
    conditions = np.random.default_rng(0).uniform([40, 20], [120, 60], size=(500, 2)).round().astype(np.float32)
    normalizer = ConditionNormalizer(list(cfg.data.condition_columns), *(stat(0).tolist() for stat in (
        conditions.mean, conditions.std, conditions.min, conditions.max)))
    save_checkpoint(path, {"model": model.state_dict(), "config": cfg.to_dict(), "components": cfg.data.components,
                           "normalizer": normalizer.to_dict()})


def peak_rss_mib(count: int, checkpoint: Path, out: Path, batch_size: int) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of one `epure sample` process for ``count`` samples."""
    command = [sys.executable, "-m", "epure", "sample", "--checkpoint", str(checkpoint), "--num_samples",
               str(count), "--batch-size", str(batch_size), "--out", str(out), "--binary"]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{process.stderr.read().decode()}")
    process.stderr.close()
    scale = 2**20 if sys.platform == "darwin" else 2**10  # ru_maxrss: bytes on macOS, KiB on Linux
    return usage.ru_maxrss / scale, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[1000, 20000])
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    table = Table(title=f"epure sample: peak memory by number of samples (batch size {args.batch_size}, "
                        f"{os.cpu_count()} CPUs)")
    for column in ("samples", "designs written", "peak RSS (MiB)", "seconds"):
        table.add_column(column, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "untrained.pt"
        write_untrained_checkpoint(checkpoint)
        for count in args.counts:
            out = Path(tmp) / f"samples-{count}"
            rss, seconds = peak_rss_mib(count, checkpoint, out, args.batch_size)
            written = sum(1 for _ in os.scandir(out / "unconditional" / "composites"))
            table.add_row(f"{count:,}", f"{written:,}", f"{rss:.0f}", f"{seconds:.0f}")
        Console().print(table)  # before the (slow) removal of the temporary PNGs


if __name__ == "__main__":
    main()
