"""Training and sampling throughput of the fast path against the straightforward reference, in one run.

    python benchmarks/throughput.py [--configs mmvaeplus_default toy] [--batch-sizes 128 max] [--steps 2]
                                    [--device cpu|cuda] [--compile] [--bf16] [--scan-components]
                                    [--json throughput.json]

Quick check: --configs toy --batch-sizes 32 --steps 1. The GPU table:
--device cuda --bf16 --compile --batch-sizes 128 max --steps 5.

Both paths run interleaved in the same process on the same weights and batch, so the speed-up is a ratio
measured under the same machine load; absolute numbers on a shared machine are noisy, ratios much less so.
FLOPs are counted with torch.utils.flop_counter on a small batch and scaled per example (every operation is
per example); a mode's bf16 and compiled variants do the same arithmetic as it does in fp32 eager. The matmul
rate (2048x2048 fp32) is measured in the same run and is the yardstick for "share of the arithmetic limit":
reference GFLOP per example / (matmul GFLOP/s) is the time no implementation of the reference arithmetic can
beat; the fast path does less arithmetic, so it may exceed 100%.

Modes: ``straightforward`` (the reference networks, one graph), ``one graph`` (the fast networks, one graph),
``fast`` (what ``epure train`` runs: backpropagated chunk by chunk), each also ``+bf16`` (autocast, CUDA only)
and ``+compile`` (the fast path's networks compiled, or the reference's whole loss). ``max`` as a batch size:
for each mode on its own, the largest batch of 128 x 2^k (up to --max-batch) whose training step fits in
the device's memory, timed at that batch. The JSON is rewritten after each (config, batch size), so an
interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import ctypes
import math
import os
import platform
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

from epure.allocator import keep_freed_memory
from epure.config import Config, load_config, parse_overrides
from epure.io import atomic_write_json
from epure.model import MMVAEPlus, forward_objective
from epure.model.backward import objective_backward
from epure.model.generation import completion_probabilities, unconditional_probabilities
from epure.model.mmvae import chunk_rows
from epure.model.objectives import draw_strata
from epure.model.reference import StraightforwardModel
from epure.train import make_optimizer

FLOP_BATCH = 4  # batch on which FLOPs are counted (exactly linear in the batch)
PATHS = ["straightforward", "one graph", "fast, encoders kept", "fast"]


@dataclass
class ModeResult:
    """One (config, mode) row of the table."""

    config: str
    mode: str
    components: int
    batch_size: int
    train_examples_per_s: float = math.nan
    train_gflop_per_example: float = math.nan
    train_gflop_per_s: float = math.nan
    share_of_matmul: float = math.nan  # own FLOPs per second / matmul rate
    share_of_reference_limit: float = math.nan  # examples/s / (matmul rate / reference GFLOP per example)
    speedup_vs_straightforward: float = math.nan
    peak_memory_mib: float = math.nan
    generate_examples_per_s: float = math.nan
    generate_gflop_per_example: float = math.nan
    inpaint_examples_per_s: float = math.nan
    inpaint_gflop_per_example: float = math.nan
    compile_seconds: float = math.nan  # compiled modes: the first step and sampling calls, compiling included
    step_seconds: list[float] = field(default_factory=list)


class PeakMemory(AbstractContextManager):
    """Peak memory inside the block: max_memory_allocated on CUDA, resident set size polled on the CPU."""

    def __init__(self, device: torch.device):
        self.device, self.peak_bytes, self._stop = device, 0, threading.Event()

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            release_freed_memory()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, resident_bytes())
            self._stop.wait(0.01)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()


def release_freed_memory() -> None:
    """Hand memory freed by an earlier mode back to the OS, so the next mode's resident peak is its own."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: peaks may then include an earlier mode's freed memory
        pass


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(device: torch.device, dtype: torch.dtype = torch.float32, repeats: int = 10) -> float:
    """Measured rate of a 2048x2048 matmul (fp32 unless told): the machine's arithmetic yardstick."""
    a = torch.randn(2048, 2048, device=device, dtype=dtype)
    b = torch.randn(2048, 2048, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return repeats * 2 * 2048**3 / (time.perf_counter() - start) / 1e9


def counted_gflop(fn: Callable[[], object]) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def make_batch(cfg: Config, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random binary masks with a shared block (mask-like density) and random normalised conditions."""
    g = torch.Generator().manual_seed(0)
    m, (h, w) = len(cfg.data.components), cfg.data.image_size
    x = (torch.rand(batch, m, h, w, generator=g) > 0.8).float()
    x[:, :, h // 6: h // 2, w // 6: w // 2] = 1.0
    return x.to(device), torch.randn(batch, cfg.model.cond_dim, generator=g).to(device)


class Bench:
    """The model, optimiser and batch of one config, shared by every mode so they see the same work."""

    def __init__(self, cfg: Config, batch: int, device: torch.device):
        torch.manual_seed(0)
        self.cfg, self.device = cfg, device
        self.model = MMVAEPlus(cfg.model, cfg.data.components, cfg.data.image_size).to(device)
        self.optimizer = make_optimizer(self.model, cfg.train)
        self.x, self.c = make_batch(cfg, batch, device)
        self.amp = self.compiled = False
        self._compiled_impls: dict[int, Callable] = {}
        self._compiled_reference_loss: Callable | None = None

    def set_batch(self, batch: int) -> None:
        self.x, self.c = make_batch(self.cfg, batch, self.device)

    def set_mode(self, mode: str) -> None:
        """bf16 autocast and compiled networks belong to the modes named so; the weights are shared."""
        self.amp, self.compiled = "bf16" in mode, "compile" in mode
        for module in [*self.model.encoders, *self.model.decoders]:
            if self.compiled and base_mode(mode) != "straightforward":
                if id(module) not in self._compiled_impls:  # compiled once; its compiled code is kept
                    module.compile()
                    self._compiled_impls[id(module)] = module._compiled_call_impl
                module._compiled_call_impl = self._compiled_impls[id(module)]
            else:
                module._compiled_call_impl = None  # back to eager: what nn.Module.compile() set

    def path(self, fast: bool) -> MMVAEPlus | StraightforwardModel:
        """The model on its one forward path (fast), or its straightforward view (the reference)."""
        return self.model if fast else StraightforwardModel(self.model)

    def autocast(self) -> AbstractContextManager:
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else nullcontext()

    def reference_loss(self, x: torch.Tensor, c: torch.Tensor, strata: torch.Tensor) -> torch.Tensor:
        return forward_objective(StraightforwardModel(self.model), x, c, "elbo", self.cfg.model.beta, 1,
                                 strata=strata).loss

    def train_step(self, mode: str, x: torch.Tensor | None = None, c: torch.Tensor | None = None) -> None:
        """Forward, backward and optimiser step of the exact ``elbo`` objective. ``fast`` modes backpropagate
        chunk by chunk as ``epure train`` does (``encoders kept``: without running the encoders twice);
        ``straightforward`` and ``one graph`` build the whole step's graph and call ``loss.backward()`` once (on
        the reference, or on the fast networks); ``straightforward+compile`` compiles that whole loss."""
        x, c = (self.x, self.c) if x is None else (x, c)
        beta, base = self.cfg.model.beta, base_mode(mode)
        # the strata of the config's training step (``small``: one per design; the one-graph paths still decode
        # every pair, the fast path only the strata's)
        strata = draw_strata(torch.ones(x.shape[:2], dtype=torch.bool, device=x.device),
                             self.cfg.model.strata_per_design)
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            if base.startswith("fast"):  # the encoders run twice as at this bench's batch (also when counting)
                recompute = base != "fast, encoders kept" and len(self.x) > chunk_rows(self.device)[0]
                objective_backward(self.model, x, c, "elbo", beta, 1, strata=strata, recompute_encoders=recompute)
            elif base == "straightforward" and self.compiled:
                if self._compiled_reference_loss is None:
                    # static shapes: with a symbolic batch, the latents' noise (torch.rand) fails to trace
                    self._compiled_reference_loss = torch.compile(self.reference_loss, dynamic=False)
                self._compiled_reference_loss(x, c, strata).backward()
            else:
                forward_objective(self.path(base == "one graph"), x, c, "elbo", beta, 1, strata=strata).loss.backward()
        self.optimizer.step()

    @torch.no_grad()
    def generate(self, fast: bool, c: torch.Tensor | None = None) -> None:
        with self.autocast():
            c = self.c if c is None else c
            unconditional_probabilities(self.path(fast), c)

    @torch.no_grad()
    def inpaint(self, fast: bool, x: torch.Tensor | None = None, c: torch.Tensor | None = None) -> None:
        """Every component from component 0 alone."""
        x, c = (self.x, self.c) if x is None else (x, c)
        with self.autocast():
            completion_probabilities(self.path(fast), x, c, [0])


def base_mode(mode: str) -> str:
    """``fast+bf16+compile`` -> ``fast``: the path, without its precision and compilation."""
    return mode.split("+")[0]


def modes_to_run(args: argparse.Namespace, device: torch.device, console: Console) -> list[str]:
    """straightforward, one graph, (encoders kept,) fast, and their bf16 and compiled variants when asked."""
    bases = [b for b in PATHS if b in args.paths]
    if device.type == "cuda" and "fast, encoders kept" in bases:  # the encoders are only recomputed above a
        bases.remove("fast, encoders kept")  # 4,096-example batch on a GPU: there it is ``fast``
    precisions = [""]
    if args.bf16:
        if device.type != "cuda":
            console.print("[yellow]--bf16 is for CUDA only (this CPU has no native bf16); skipped")
        else:
            precisions.append("+bf16")
    modes = [base + p for p in precisions for base in bases]
    if args.compile is not None:
        modes += [base + p + "+compile" for p in precisions for base in args.compile or ("straightforward", "fast")]
    return modes


def timed(fn: Callable[[], None], device: torch.device, repeats: int) -> list[float]:
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def run_config(name: str, args: argparse.Namespace, device: torch.device, matmul: float,
               console: Console, batch: int | str) -> list[ModeResult]:
    """Every mode of one config at one batch size (``"max"``: each mode at its own largest batch)."""
    cfg = load_config(name).updated(args.overrides)
    modes = modes_to_run(args, device, console)
    bench = Bench(cfg, 128 if batch == "max" else batch, device)
    state = {k: v.clone() for k, v in bench.model.state_dict().items()}
    compile_seconds = {}
    for mode in [m for m in modes if "compile" in m]:  # compiling happens on the first call: a failure drops the mode
        compile_seconds[mode] = compiles(bench, mode, name, console)
        if compile_seconds[mode] is None:
            modes.remove(mode)
    gflop = counted_gflops(bench, modes)
    bench.model.load_state_dict(state)  # the FLOP-counting steps moved the weights; every mode starts alike
    if batch == "max":
        groups = [([mode], largest_batch(bench, mode, args.max_batch, console)) for mode in modes]
    else:
        groups = [(modes, batch)]
    results: dict[str, ModeResult] = {}
    for group, size in groups:
        if size == 0:  # not even 128 fits
            continue
        bench.set_batch(size)
        for mode in group:
            results[mode] = ModeResult(name, mode, len(cfg.data.components), size, **gflop[base_mode(mode)],
                                       compile_seconds=compile_seconds.get(mode, math.nan))
        time_modes(bench, group, results, args, console, name)
    reference = results.get("straightforward")
    for r in results.values():
        r.train_examples_per_s = r.batch_size / min(r.step_seconds)  # the least disturbed step on a shared machine
        r.train_gflop_per_s = r.train_gflop_per_example * r.train_examples_per_s
        r.share_of_matmul = r.train_gflop_per_s / matmul
        if reference is not None:
            r.share_of_reference_limit = r.train_examples_per_s * reference.train_gflop_per_example / matmul
            r.speedup_vs_straightforward = r.train_examples_per_s / reference.train_examples_per_s
    return list(results.values())


def compiles(bench: Bench, mode: str, name: str, console: Console) -> float | None:
    """Compile ``mode`` (its first training step and sampling calls): the seconds it took, or None, with the
    reason, if it failed."""
    fast = base_mode(mode) != "straightforward"
    bench.set_mode(mode)
    console.log(f"{name}: compiling {mode}")
    try:
        start = time.perf_counter()
        bench.train_step(mode)
        bench.generate(fast)
        bench.inpaint(fast)
        synchronize(bench.device)
    except Exception as err:  # noqa: BLE001 - any compiler failure means: this mode is not measured
        console.print(f"[yellow]torch.compile failed, mode {mode} dropped: {type(err).__name__}: {err}")
        return None
    seconds = time.perf_counter() - start
    console.log(f"{name}: {mode} compiled in {seconds:.0f} s")
    return seconds


def counted_gflops(bench: Bench, modes: list[str]) -> dict[str, dict[str, float]]:
    """GFLOP per example of each path, counted in fp32 eager (its bf16 and compiled variants do the same work)."""
    fx, fc = bench.x[:FLOP_BATCH], bench.c[:FLOP_BATCH]
    counts = {}
    for base in dict.fromkeys(base_mode(m) for m in modes):
        fast = base != "straightforward"
        bench.set_mode(base)
        counts[base] = {
            "train_gflop_per_example": counted_gflop(lambda: bench.train_step(base, fx, fc)) / FLOP_BATCH,
            "generate_gflop_per_example": counted_gflop(lambda: bench.generate(fast, fc)) / FLOP_BATCH,
            "inpaint_gflop_per_example": counted_gflop(lambda: bench.inpaint(fast, fx, fc)) / FLOP_BATCH}
    return counts


def largest_batch(bench: Bench, mode: str, cap: int, console: Console) -> int:
    """The largest batch of 128 x 2^k up to ``cap`` (or ``cap`` itself, under 128) whose training step (and
    sampling) fits; 0 if none does."""
    fits, size = 0, min(128, cap)
    bench.set_mode(mode)
    while size <= cap:
        bench.set_batch(size)
        try:
            bench.train_step(mode)
            bench.generate(base_mode(mode) != "straightforward")
            synchronize(bench.device)
        except torch.OutOfMemoryError:
            break
        finally:
            bench.x = bench.c = None
            bench.optimizer.zero_grad(set_to_none=True)
            if bench.device.type == "cuda":
                torch.cuda.empty_cache()
        fits, size = size, size * 2
    console.log(f"{mode}: largest batch that fits {fits}" + (f" (the cap, --max-batch {cap})" if fits == cap else ""))
    return fits


def time_modes(bench: Bench, modes: list[str], results: dict[str, ModeResult], args: argparse.Namespace,
               console: Console, name: str) -> None:
    """Warm every mode up, then interleave the timed training steps and sampling calls so that all modes see
    the same machine load."""
    device, batch = bench.device, len(bench.x)
    for mode in modes:
        bench.set_mode(mode)
        console.log(f"{name}: warming up {mode} at batch {batch}")
        timed(lambda: bench.train_step(mode), device, args.warmup)
    for _ in range(args.steps):
        for mode in modes:
            bench.set_mode(mode)
            with PeakMemory(device) as peak:
                results[mode].step_seconds += timed(lambda: bench.train_step(mode), device, 1)
            results[mode].peak_memory_mib = max(nan_to_zero(results[mode].peak_memory_mib), peak.peak_bytes / 2**20)
    sampled = [m for m in modes if base_mode(m) not in ("one graph", "fast, encoders kept")]  # they sample as fast
    seconds: dict[str, dict[str, list[float]]] = {mode: {"generate": [], "inpaint": []} for mode in sampled}
    for repeat in range(args.sample_repeats + 1):  # interleaved like training; the first round warms up
        for mode in sampled:
            fast = base_mode(mode) != "straightforward"
            bench.set_mode(mode)
            gen, inp = timed(lambda: bench.generate(fast), device, 1), timed(lambda: bench.inpaint(fast), device, 1)
            if repeat:
                seconds[mode]["generate"] += gen
                seconds[mode]["inpaint"] += inp
    for mode in sampled:
        results[mode].generate_examples_per_s = batch / min(seconds[mode]["generate"])
        results[mode].inpaint_examples_per_s = batch / min(seconds[mode]["inpaint"])


@dataclass
class ComponentsRow:
    """Training-step memory and arithmetic of a config cut to its first ``components`` components."""

    components: int
    train_gflop_per_example: float
    step_memory_mib: dict[str, float]  # per mode: peak resident memory during the step, above the idle process


def scan_components(name: str, args: argparse.Namespace, device: torch.device, console: Console) -> list[ComponentsRow]:
    """How a step's memory grows with M, beside how its arithmetic does (one step per mode and M)."""
    full = load_config(name).updated(args.overrides)
    rows = []
    for m in range(2, len(full.data.components) + 1):
        cfg = full.updated({"data.components": full.data.components[:m]})
        bench = Bench(cfg, next((b for b in args.batch_sizes if b != "max"), 128), device)
        gflop = counted_gflop(lambda: bench.train_step("fast", bench.x[:FLOP_BATCH], bench.c[:FLOP_BATCH])) / FLOP_BATCH
        memory = {}
        for mode in ("one graph", "fast"):
            console.log(f"{name}: {m} components, {mode}")
            bench.train_step(mode)  # the optimiser's state exists from here on
            release_freed_memory()
            idle = resident_bytes()
            with PeakMemory(device) as peak:
                bench.train_step(mode)
            memory[mode] = (peak.peak_bytes - (0 if device.type == "cuda" else idle)) / 2**20
        rows.append(ComponentsRow(m, gflop, memory))
    return rows


def resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def print_components_table(console: Console, name: str, rows: list[ComponentsRow]) -> None:
    table = Table(title=f"{name} cut to its first M components: a training step's memory against its arithmetic "
                        "(each relative to M = 2)")
    for column in ("M", "GFLOP/ex", "x", "one graph MiB", "x", "fast MiB", "x"):
        table.add_column(column, justify="right")
    first = rows[0]
    for r in rows:
        table.add_row(str(r.components), f"{r.train_gflop_per_example:.2f}",
                      f"{r.train_gflop_per_example / first.train_gflop_per_example:.2f}",
                      *(f for mode in ("one graph", "fast") for f in
                        (f"{r.step_memory_mib[mode]:.0f}", f"{r.step_memory_mib[mode] / first.step_memory_mib[mode]:.2f}")))
    console.print(table)


def nan_to_zero(value: float) -> float:
    return 0.0 if math.isnan(value) else value


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    load = os.getloadavg()[0]
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} "
            f"torch threads, load average {load:.1f}")


def print_table(console: Console, results: list[ModeResult], matmul: float, where: str) -> None:
    table = Table(title=f"epure throughput: {where}; fp32 matmul {matmul:.0f} GFLOP/s")
    columns = ["config", "M", "mode", "batch", "train ex/s", "speed-up", "GFLOP/ex", "GFLOP/s", "% matmul",
               "% ref. limit", "peak MiB", "generate ex/s", "inpaint ex/s"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("config", "mode") else "right")
    for r in results:
        table.add_row(r.config, str(r.components), r.mode, str(r.batch_size), f"{r.train_examples_per_s:.2f}",
                      f"{r.speedup_vs_straightforward:.2f}x", f"{r.train_gflop_per_example:.2f}",
                      f"{r.train_gflop_per_s:.1f}", f"{100 * r.share_of_matmul:.0f}%",
                      f"{100 * r.share_of_reference_limit:.0f}%", f"{r.peak_memory_mib:.0f}",
                      f"{r.generate_examples_per_s:.0f}", f"{r.inpaint_examples_per_s:.0f}")
    console.print(table)


def batch_size(text: str) -> int | str:
    if text == "max":
        return text
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"a batch size must be positive or 'max', got {text}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["mmvaeplus_default", "toy"],
                        help="built-in config names or YAML files")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--batch-sizes", nargs="+", type=batch_size, default=[128],
                        help="batch sizes; 'max': each mode at the largest batch that fits (up to --max-batch)")
    parser.add_argument("--max-batch", type=int, default=8192, help="the largest batch 'max' tries")
    parser.add_argument("--steps", type=int, default=2, help="timed training steps per mode (the fastest counts)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed training steps per mode first")
    parser.add_argument("--sample-repeats", type=int, default=3, help="timed sampling calls per mode")
    parser.add_argument("--bf16", action="store_true", help="also every path under bf16 autocast (CUDA only)")
    parser.add_argument("--paths", nargs="+", default=PATHS, choices=PATHS, metavar="PATH",
                        help=f"the paths to measure (default: all of {', '.join(PATHS)})")
    parser.add_argument("--compile", nargs="*", choices=["straightforward", "fast"], default=None, metavar="PATH",
                        help="also these paths compiled with torch.compile (no PATH: straightforward and fast): the "
                             "fast path's networks, the reference's whole loss (compiling takes minutes on a CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--scan-components", action="store_true",
                        help="also: the first config cut to 2..M components, a step's memory against its arithmetic")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config keys set on every config, as `epure train --set` (e.g. model.nf=16)")
    parser.add_argument("--glibc-defaults", action="store_true",
                        help="leave glibc's malloc thresholds as they are instead of keeping freed memory as the CLI "
                             "does (epure/allocator.py)")
    parser.add_argument("--json", type=Path, default=Path("throughput.json"))
    args = parser.parse_args()
    args.overrides = parse_overrides(args.set)
    if not args.glibc_defaults:
        keep_freed_memory()  # as the CLI does, for both paths alike (benchmarks/allocator.py: with and without)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    console = Console(width=180)
    where = machine(device)
    matmul_before = matmul_gflops(device)
    bf16_matmul = matmul_gflops(device, torch.bfloat16) if args.bf16 and device.type == "cuda" else math.nan
    results: list[ModeResult] = []

    def write(matmul: float, scan: list[ComponentsRow]) -> None:
        atomic_write_json(args.json, {"machine": where, "torch": torch.__version__, "matmul_gflop_per_s": matmul,
                                      "matmul_gflop_per_s_start_end": [matmul_before, 2 * matmul - matmul_before],
                                      "bf16_matmul_gflop_per_s": bf16_matmul,
                                      "args": {k: str(v) for k, v in vars(args).items()},
                                      "results": [asdict(r) for r in results],
                                      "components_scan": [asdict(r) for r in scan]})

    for name in args.configs:
        for batch in args.batch_sizes:
            results += run_config(name, args, device, matmul_before, console, batch)
            write(matmul_before, [])  # what is measured so far, should the run be stopped
    matmul = (matmul_before + matmul_gflops(device)) / 2  # the load may change during the run
    for r in results:  # shares against the run's average matmul rate
        r.share_of_matmul *= matmul_before / matmul
        r.share_of_reference_limit *= matmul_before / matmul
    print_table(console, results, matmul, where + (f"; bf16 matmul {bf16_matmul:.0f} GFLOP/s" if bf16_matmul ==
                                                    bf16_matmul else ""))
    scan = scan_components(args.configs[0], args, device, console) if args.scan_components else []
    if scan:
        print_components_table(console, args.configs[0], scan)
    write(matmul, scan)
    console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
