"""Training-step time of config variants, measured interleaved in one process (the ratios are what counts).

    python benchmarks/step_time.py --config small --steps 20 \\
        --variant shipped \\
        --variant narrow_encoders model.nf=4 model.nf_max=16

Each variant is a model built from ``--config`` with its overrides; every round times one training step of
each variant in turn (``objective_backward`` with the config's objective, K and strata per design, then the
fused Adam step: what ``epure train`` does per batch), on the same random mask-like batch. The median over
rounds is printed beside the first variant's, so a variant's cost is read as a ratio taken under the same
machine load (these machines vary by more than 2x from day to day).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from epure.config import load_config, parse_overrides
from epure.model import MMVAEPlus
from epure.model.backward import objective_backward
from epure.model.objectives import draw_strata
from epure.allocator import keep_freed_memory
from epure.numerics import flush_denormals_to_zero
from epure.train import make_optimizer


class Variant:
    def __init__(self, name: str, cfg, batch: int):
        torch.manual_seed(0)
        self.name, self.cfg = name, cfg
        self.model = MMVAEPlus(cfg.model, cfg.data.components, cfg.data.image_size)
        self.optimizer = make_optimizer(self.model, cfg.train)
        g = torch.Generator().manual_seed(0)
        m, (h, w) = len(cfg.data.components), cfg.data.image_size
        self.x = (torch.rand(batch, m, h, w, generator=g) > 0.8).float()
        self.x[:, :, h // 6: h // 2, w // 6: w // 2] = 1.0
        self.c = torch.randn(batch, cfg.model.cond_dim, generator=g)
        self.seconds: list[float] = []

    def step(self) -> float:
        mc = self.cfg.model
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        available = torch.ones(self.x.shape[:2], dtype=torch.bool)
        objective_backward(self.model, self.x, self.c, mc.objective, mc.beta, mc.K, available=available,
                           strata=draw_strata(available, mc.strata_per_design))
        self.optimizer.step()
        return time.perf_counter() - start


def main() -> None:
    flush_denormals_to_zero()
    keep_freed_memory()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="small")
    parser.add_argument("--batch-size", type=int, default=0, help="default: the config's train.batch_size")
    parser.add_argument("--steps", type=int, default=20, help="timed rounds (each variant one step per round)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--variant", nargs="+", action="append", required=True, metavar="NAME KEY=VALUE")
    args = parser.parse_args()
    base = load_config(args.config)
    batch = args.batch_size or base.train.batch_size
    variants = [Variant(name, base.updated(parse_overrides(pairs, option=f"--variant {name}")), batch)
                for name, *pairs in args.variant]
    for _ in range(args.warmup):
        for v in variants:
            v.step()
    for _ in range(args.steps):
        for v in variants:
            v.seconds.append(v.step())
    first = statistics.median(variants[0].seconds)
    table = Table(title=f"{args.config}: training step, batch {batch}, {torch.get_num_threads()} threads, "
                        f"median of {args.steps} interleaved rounds")
    for column in ("variant", "ms / step", "x first", "examples / s", "parameters"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for v in variants:
        median = statistics.median(v.seconds)
        table.add_row(v.name, f"{1000 * median:.0f}", f"{median / first:.2f}", f"{batch / median:.0f}",
                      f"{sum(p.numel() for p in v.model.parameters()):,}")
    Console().print(table)


if __name__ == "__main__":
    main()
