"""Which design quantities a trained model gets wrong: the precision/recall descriptors, one by one.

    python benchmarks/descriptor_fidelity.py --run outputs/mmvaeplus/RUN [--limit 900] [--mean]

Precision, recall, density and coverage (docs/metrics.md, section 4) measure designs in a space of eight
descriptors per component (area, centre of mass, extent, thickness). When recall is low, this says which of
them the model's designs do not spread over as the real ones do. For every component and descriptor, on the
test designs:

- real: the test designs' mean and standard deviation (a descriptor that is constant in the real designs, such
  as the rightmost column at the axis, has its bias in pixels instead);
- reconstruction: each component decoded from its own posterior (z and its w from that component, as
  ``eval/self_iou`` scores it), its bias against the truth in real standard deviations, the ratio of its
  spread to the real spread, and its correlation with the truth (1: the model tracks that quantity design by
  design);
- unconditional: designs drawn with the test conditions (the model's ``latent_sampler``), their bias and
  spread ratio.

Generated masks are cut at the model's calibrated threshold (``LoadedModel.threshold``), the unconditional
designs as whole designs (``metrics.design_masks``), as ``epure evaluate`` cuts them.

A spread ratio well under 1 is a quantity the model collapses toward its mean: the reason real designs fall
outside the model's k-NN balls.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from epure.checkpoint import load_model
from epure.data import load_data
from epure.io import atomic_write_json
from epure.metrics import DESCRIPTORS, binarize, component_descriptors, design_masks
from epure.allocator import keep_freed_memory
from epure.numerics import flush_denormals_to_zero
from epure.sample import complete, generate


def reconstructions(loaded, images: np.ndarray, conditions: np.ndarray, use_mean: bool) -> np.ndarray:
    """Each component decoded from its own posterior alone: [N, M, H, W] probabilities."""
    out = np.zeros(images.shape, dtype=np.float32)
    for m in range(len(loaded.components)):
        out[:, m] = np.concatenate([batch[:, m] for batch in complete(loaded, images, conditions, [m],
                                                                       use_mean=use_mean)])
    return out


def fidelity(real: np.ndarray, recon: np.ndarray, uncond: np.ndarray, components: list[str]) -> list[dict]:
    """One row per (component, descriptor) of the three descriptor matrices [N, M * 8]."""
    rows = []
    for m, component in enumerate(components):
        for d, name in enumerate(DESCRIPTORS):
            col = m * len(DESCRIPTORS) + d
            r, c, u = real[:, col], recon[:, col], uncond[:, col]
            std = r.std() if r.std() > 1e-9 else 1.0  # a constant real descriptor: bias in pixels
            corr = float(np.corrcoef(r, c)[0, 1]) if min(r.std(), c.std()) > 1e-9 else float("nan")
            rows.append({"component": component, "descriptor": name, "real_mean": float(r.mean()),
                         "real_std": float(r.std()), "recon_bias": float((c - r).mean() / std),
                         "recon_spread": float(c.std() / std), "recon_corr": corr,
                         "uncond_bias": float((u.mean() - r.mean()) / std), "uncond_spread": float(u.std() / std)})
    return rows


def print_rows(console: Console, rows: list[dict], title: str) -> None:
    table = Table(title=title)
    for column in ("component", "descriptor", "real mean", "real std", "recon bias", "recon spread", "recon corr",
                   "uncond bias", "uncond spread"):
        table.add_column(column, justify="left" if column in ("component", "descriptor") else "right")

    def flag(value: float, bad: bool) -> str:
        return f"[red]{value:.2f}[/red]" if bad else f"{value:.2f}"

    for r in rows:
        table.add_row(r["component"], r["descriptor"], f"{r['real_mean']:.1f}", f"{r['real_std']:.2f}",
                      flag(r["recon_bias"], abs(r["recon_bias"]) > 0.3),
                      flag(r["recon_spread"], r["recon_spread"] < 0.7), flag(r["recon_corr"], r["recon_corr"] < 0.8),
                      flag(r["uncond_bias"], abs(r["uncond_bias"]) > 0.3),
                      flag(r["uncond_spread"], r["uncond_spread"] < 0.7))
    console.print(table)


def main() -> None:
    flush_denormals_to_zero()
    keep_freed_memory()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run directory or checkpoint")
    parser.add_argument("--limit", type=int, default=900, help="test designs (the first N)")
    parser.add_argument("--mean", action="store_true", help="reconstruct from posterior means instead of draws")
    parser.add_argument("--out", type=Path, default=None, help="JSON of the rows (default: RUN/descriptors.json)")
    args = parser.parse_args()
    console = Console(width=160)
    loaded = load_model(args.run, prefer="last")
    test = load_data(loaded.config.data).test
    test = test.subset(np.flatnonzero(test.complete)[: args.limit])
    real = component_descriptors(binarize(test.images))
    made = reconstructions(loaded, test.images, test.conditions, args.mean)
    recon = component_descriptors(binarize(made, loaded.threshold))  # the model's calibrated threshold
    uncond = component_descriptors(design_masks(np.concatenate(list(generate(loaded, test.conditions))),
                                                loaded.exclusive_components, loaded.threshold))
    rows = fidelity(real, recon, uncond, list(loaded.components))
    print_rows(console, rows, f"{loaded.run_name}: descriptors of {len(test)} test designs (bias in real standard "
                              f"deviations; spread: model std / real std)")
    out = args.out or (Path(args.run) if Path(args.run).is_dir() else Path(args.run).parent) / "descriptors.json"
    atomic_write_json(out, {"run": str(args.run), "designs": len(test), "mean": args.mean, "rows": rows})
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
