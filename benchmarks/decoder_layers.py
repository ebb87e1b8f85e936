"""Where a sampling call's time goes, layer by layer, and the fastest generation these layers allow.

    python benchmarks/decoder_layers.py [--config mmvaeplus_default] [--rows 80] [--repeats 20]

Times each convolution of one decoder of the fast path alone (no graph, on ``--rows`` rows: the chunk sampling
runs on), as the CLI runs it (denormals flushed, freed memory kept), and counts its arithmetic with
torch.utils.flop_counter. Then a bound: every layer of a kind (the up blocks' stride-2 transposed convolutions;
everything else: 3x3 convolutions, 1x1 skips, the first linear layer, the last convolution) given the best
rate measured for any layer of that kind, and the elementwise work free. Divided into the straightforward
path's generation rate measured in the same run (`benchmarks/throughput.py`'s model and batch of 128), it is the
most the fast path's generation could gain at its arithmetic on this machine.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from rich.console import Console
from rich.table import Table
from torch.nn import functional as F

from epure.allocator import keep_freed_memory
from epure.config import load_config
from epure.model.convolutions import UpsampleConv2d, channels_last
from epure.numerics import flush_denormals_to_zero
from throughput import Bench, counted_gflop, timed  # benchmarks/throughput.py: the same model, batch and clocks

UPSAMPLING, OTHER = "upsampling (transposed) conv", "other layers"


def seconds(fn: Callable[[], None], repeats: int) -> float:
    """The best of ``repeats`` calls after two warm-up calls."""
    fn(), fn()
    return min(timed(fn, torch.device("cpu"), repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="mmvaeplus_default")
    parser.add_argument("--rows", type=int, default=80, help="rows per decoder call (sampling's chunk: 80)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    flush_denormals_to_zero()
    keep_freed_memory()
    console = Console(width=140)
    torch.manual_seed(0)
    bench = Bench(load_config(args.config), 128, torch.device("cpu"))
    model = bench.model.eval()
    decoder, rows = model.decoders[0], args.rows
    table = Table(title=f"{args.config}: one decoder's layers alone, {rows} rows, no graph")
    for column in ("layer", "input", "ms", "GFLOP", "GFLOP/s"):
        table.add_column(column, justify="left" if column in ("layer", "input") else "right")
    best_rate = {UPSAMPLING: 0.0, OTHER: 0.0}
    per_row = {UPSAMPLING: 0.0, OTHER: 0.0}  # GFLOP per decoder row
    with torch.no_grad():
        u = torch.randn(rows, model.cfg.latent_dim_u)
        cond = model.cond(torch.randn(rows, model.cfg.cond_dim))
        layers: list[tuple[str, torch.nn.Module, torch.Tensor]] = []
        h = channels_last(decoder.fc(torch.cat([u, cond], dim=1)).reshape(rows, *decoder.base_shape))
        for i, block in enumerate(decoder.blocks):
            x1 = F.silu(h)
            layers.append((f"block {i} conv1", block.conv1, x1))
            layers.append((f"block {i} conv2", block.conv2, F.silu(block.conv1(x1))))
            if not isinstance(block.skip, torch.nn.Identity):
                layers.append((f"block {i} skip", block.skip, h))
            h = block(h)
        layers.append(("out", decoder.out, F.silu(h)))
        fc_flop = counted_gflop(lambda: decoder.fc(torch.cat([u, cond], dim=1)))
        per_row[OTHER] += fc_flop / rows
        for name, layer, x in layers:
            kind = UPSAMPLING if isinstance(layer, UpsampleConv2d) else OTHER
            s, g = seconds(lambda: layer(x), args.repeats), counted_gflop(lambda: layer(x))
            best_rate[kind] = max(best_rate[kind], g / s)
            per_row[kind] += g / rows
            table.add_row(name, str(tuple(x.shape)), f"{s * 1e3:.2f}", f"{g:.3f}", f"{g / s:.0f}")
        whole = seconds(lambda: decoder(u, cond), args.repeats)
        whole_gflop = counted_gflop(lambda: decoder(u, cond))
        table.add_row("whole decoder call", f"u {tuple(u.shape)}", f"{whole * 1e3:.2f}", f"{whole_gflop:.3f}",
                      f"{whole_gflop / whole:.0f}")
    console.print(table)
    m = model.num_components
    bound_ms = sum(m * per_row[kind] / best_rate[kind] for kind in per_row) * 1e3
    straightforward = 128 / seconds(lambda: bench.generate(False), 5)
    fast = 128 / seconds(lambda: bench.generate(True), 5)
    console.print(f"per design ({m} decoders): {m * per_row[UPSAMPLING]:.3f} GFLOP of {UPSAMPLING} (best "
                  f"{best_rate[UPSAMPLING]:.0f} GFLOP/s), {m * per_row[OTHER]:.3f} GFLOP of {OTHER} (best "
                  f"{best_rate[OTHER]:.0f} GFLOP/s)")
    console.print(f"bound: {bound_ms:.2f} ms per design = {1e3 / bound_ms:.0f} designs/s; generation measured now, "
                  f"batch 128: straightforward {straightforward:.0f}/s, fast {fast:.0f}/s "
                  f"({fast / straightforward:.2f}x); the bound is [bold]{1e3 / bound_ms / straightforward:.2f}x[/] the "
                  "straightforward path")


if __name__ == "__main__":
    main()
