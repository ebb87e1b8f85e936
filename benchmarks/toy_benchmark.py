"""Reproduce the toy-benchmark table: train on the public toy train split for a fixed budget, evaluate on the
first 1,000 toy test sections, and print the result beside the three references measured by the users.

    EPURE_CACHE_DIR=/tmp/epcache python benchmarks/toy_benchmark.py                 # 40 minutes, config toy
    python benchmarks/toy_benchmark.py --minutes 10 --set model.beta=1.0             # a variant
    python benchmarks/toy_benchmark.py --run outputs/toy_benchmark/mmvaeplus/RUN     # evaluate a finished run
    python benchmarks/toy_benchmark.py --cross-prior prior                           # score one completion rule

The references (seed MMVAE+, masked VAE, 16-NN) were measured with 40 minutes on a 2-core CPU; the budget
here is wall-clock time too, so a busy machine trains fewer steps: the script prints the steps reached and
the load average, and writes everything to a JSON (``--out``). Completions use posterior means for the
shared latent and the observed component's private latent (the targets' private latents are redrawn, as the
references' definition asks); ``--sample-latents`` draws them instead. The targets' private latents come from
the prior p(w) (``model.cross_prior: prior``, the paper's rule) or from the auxiliary r(w) (``aux``): by default
the one trained model is scored with both rules, one column each (only completions differ between them). The
last column measures the real test sections themselves: a model that copied the data exactly would score that;
on the diversity rows it is the real-vs-real value (a second half of the test sections measured like the model's
designs, see docs/metrics.md). "16-NN (ours)" is this repository's training-free reference
(``epure.neighbours``, the one ``synth_benchmark.py`` uses), beside the users' own 16-NN numbers. A step budget:
``--set train.max_steps=N`` (then no time limit unless ``--minutes`` is given too).
"""

from __future__ import annotations

import json

from rich.console import Console

from epure.data import load_data
from epure.io import atomic_write_text
from epure.allocator import keep_freed_memory
from epure.numerics import flush_denormals_to_zero

from quality import (Row, arguments, budget_config, diversity_rows, knn_reference, render, rules, title,
                     train_and_evaluate)

SHORT = {"group_nc": "nc", "group_km": "km", "fpu": "fpu"}
PAIRS = [("group_nc", "group_km"), ("group_nc", "fpu"), ("group_km", "group_nc"), ("group_km", "fpu"),
         ("fpu", "group_nc"), ("fpu", "group_km")]
REFERENCE_COLUMNS = ("seed MMVAE+", "masked VAE", "16-NN")
# metric -> (seed MMVAE+, masked VAE, 16-NN, goal), from the issue "Generation quality ..." (1,000 sections)
REFERENCES = {
    "cross IoU (mean of 6)": (0.761, 0.744, 0.739, 0.78),
    "nc->km": (0.890, 0.899, 0.908, 0.898), "nc->fpu": (0.779, 0.790, 0.780, 0.780),
    "km->nc": (0.685, 0.689, 0.691, 0.681), "km->fpu": (0.499, 0.498, 0.500, 0.490),
    "fpu->nc": (0.829, 0.769, 0.759, 0.819), "fpu->km": (0.886, 0.817, 0.799, 0.876),
    "self IoU (mean of 3)": (0.873, 0.882, None, 0.95),
    "union one piece": (0.952, 0.996, None, 0.99), "every component one piece": (0.962, 0.985, None, 0.99),
    "width error, px": (1.64, 1.64, None, 0.82), "height error, px": (1.10, 0.92, None, 0.46),
}
LOWER_IS_BETTER = {"width error, px", "height error, px"}


def our_row(metrics: dict[str, float]) -> dict[str, float]:
    """The evaluation's flat metrics under the table's row names."""
    row = {"cross IoU (mean of 6)": metrics["eval/cross_iou"], "self IoU (mean of 3)": metrics["eval/self_iou"],
           "union one piece": metrics["eval/uncond/union_one_piece"],
           "every component one piece": metrics["eval/uncond/all_one_piece"],
           "width error, px": metrics["eval/dims/width_mae"], "height error, px": metrics["eval/dims/height_mae"]}
    for a, b in PAIRS:
        row[f"{SHORT[a]}->{SHORT[b]}"] = metrics[f"eval/cross_iou/{a}->{b}"]
    return row


def real_row(metrics: dict[str, float]) -> dict[str, float]:
    """The same measurements on the real test sections themselves, where they apply."""
    return {"union one piece": metrics["eval/real/union_one_piece"],
            "every component one piece": metrics["eval/real/all_one_piece"],
            "width error, px": metrics["eval/real/width_mae"], "height error, px": metrics["eval/real/height_mae"]}


def ours_knn(reference, components: list[str]) -> dict[str, float]:
    """This repository's 16-NN reference (``epure.neighbours``) under the table's row names."""
    index = {c: i for i, c in enumerate(components)}
    pairs = {f"{SHORT[a]}->{SHORT[b]}": float(reference[index[a], index[b]]) for a, b in PAIRS}
    return {"cross IoU (mean of 6)": sum(pairs.values()) / len(pairs), **pairs}


def rows(metrics: dict[str, float], knn: dict[str, float]) -> list[Row]:
    ours, real = our_row(metrics), real_row(metrics)
    table = []
    for name, (*references, goal) in REFERENCES.items():
        columns = dict(zip(REFERENCE_COLUMNS, references))
        table.append(Row(name, ours[name], goal, name in LOWER_IS_BETTER,
                         {**columns, "16-NN (ours)": knn.get(name), "real": real.get(name)}))
    for row in diversity_rows(metrics):
        row.references = {"real": row.references["real vs real"]}
        table.append(row)
    return table


def main() -> None:
    flush_denormals_to_zero()  # as the CLI does, before any torch work
    keep_freed_memory()
    args = arguments(__doc__, config="toy", output_dir="outputs/toy_benchmark", eval_limit=1000).parse_args()
    console = Console(width=max(Console().width, 140))
    cfg = budget_config(args)
    data = load_data(cfg.data)
    use_mean = not args.sample_latents
    outcome = train_and_evaluate(cfg, data, args.run, args.eval_limit, use_mean, rules(args.cross_prior),
                                 args.threshold)
    knn = ours_knn(knn_reference(outcome.train, outcome.test), list(cfg.data.components))
    tables = {rule: rows(metrics, knn) for rule, metrics in outcome.metrics.items()}
    first = f"metric ({len(outcome.test):,} toy test sections)"
    console.print(render(tables, [*REFERENCE_COLUMNS, "16-NN (ours)", "real"], title(args.config, outcome, use_mean),
                         first))
    atomic_write_text(args.out, json.dumps({"run_dir": str(outcome.run_dir), "steps": outcome.steps,
                                            "minutes": outcome.minutes, "threshold": outcome.threshold,
                                            "config": cfg.to_dict(),
                                            "tables": {rule: {r.name: r.value for r in table}
                                                       for rule, table in tables.items()},
                                            "knn_ours": knn, "metrics": outcome.metrics}, indent=2, default=str))


if __name__ == "__main__":
    main()
