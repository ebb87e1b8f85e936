"""Behaviour lock: refactoring must not change what training and sampling compute, to the last bit.

A few `epure.train.train` steps from a fixed seed on a tiny deterministic dataset (one thread, CPU), then
sampling from the result; the per-step losses, bounds and gradient norms, the validation losses, a SHA-256
digest of the trained weights (names, shapes and bytes: it also locks the checkpoint layout) and digests of
generated and completed designs are compared with the values in ``behaviour_lock.json``, recorded from the
code before a change. A change that is meant to alter the numbers (e.g. another float summation order)
re-records them in a commit of its own that says why:

    python tests/test_behaviour_lock.py --record

Bitwise equality is asserted where the recording was made (same torch version, CPU instruction set and CPU
model: oneDNN picks its kernels by them); elsewhere the losses and weight norms must agree to 1e-4 relative.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from epure.checkpoint import load_model
from epure.data import load_data
from epure.sample import complete, generate
from epure.tracking import NullTracker
from epure.train import train

from conftest import write_tiny_dataset
from factories import tiny_config

RECORD = Path(__file__).with_name("behaviour_lock.json")
STEPS = 8  # 2 batches of 16 per epoch: 4 epochs, each validated
VARIANTS: dict[str, dict[str, Any]] = {
    "elbo": {},
    "dreg_k3_normal_cosine": {"model.objective": "dreg", "model.K": 3, "model.beta": 0.5,
                              "model.priorposterior": "Normal", "train.lr_schedule": "cosine"},
    "elbo_k2_foreground_aux": {"model.K": 2, "model.foreground_weight": 3.0, "model.cross_prior": "aux"},
}
LOGGED = ("train/loss", "train/bound", "train/grad_norm")


class StepRecorder(NullTracker):
    """Keeps every logged training and validation figure, in order."""

    def __init__(self) -> None:
        self.rows: dict[str, list[float]] = {key: [] for key in (*LOGGED, "val/loss")}

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for key, value in metrics.items():
            if key in self.rows:
                self.rows[key].append(float(value))


def digest(arrays: list[tuple[str, np.ndarray]]) -> str:
    sha = hashlib.sha256()
    for name, array in arrays:
        sha.update(f"{name}:{array.dtype}:{array.shape}".encode())
        sha.update(np.ascontiguousarray(array).tobytes())
    return sha.hexdigest()


def cpu_model() -> str:
    """Vendor, family, model and stepping of the CPU: machines with the same torch and instruction set (e.g. two
    AVX512 Xeons) still round differently, as oneDNN also picks kernels by the model."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return platform.processor()
    fields = {}
    for line in cpuinfo.read_text().splitlines():
        key, _, value = line.partition(":")
        if not key.strip() and fields:  # the end of the first processor's block
            break
        fields.setdefault(key.strip(), value.strip())
    return " ".join(fields.get(key, "?") for key in ("vendor_id", "cpu family", "model", "stepping"))


def environment() -> dict[str, str]:
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_model": cpu_model()}


def run_variant(name: str, folder: Path) -> dict[str, Any]:
    """Train STEPS steps of one variant from seed 0 and sample from it; every figure the lock compares."""
    root = folder / "data"
    if not root.is_dir():
        write_tiny_dataset(root, n=40, components=["c0", "c1", "c2"], seed=3)
    cfg = tiny_config(root, folder / name, ["c0", "c1", "c2"], **{"train.epochs": STEPS // 2,
                                                                  "wandb.log_every_steps": 1, **VARIANTS[name]})
    data = load_data(cfg.data)
    recorder = StepRecorder()
    result = train(cfg, data=data, tracker=recorder)
    assert result.step == STEPS
    loaded = load_model(result.run_dir, prefer="last")
    state = loaded.model.state_dict()
    weights = [(key, state[key].numpy()) for key in sorted(state)]
    test = data.test
    (generated,) = generate(loaded, test.conditions, batch_size=len(test), seed=1)
    (mixture,) = complete(loaded, test.images, test.conditions, [0], batch_size=len(test), seed=2)
    (product,) = complete(loaded, test.images, test.conditions, [0, 2], joint="product", use_mean=True,
                          batch_size=len(test), seed=3)
    return {**recorder.rows, "weights_sha256": digest(weights),
            "weights_abs_sum": float(sum(np.abs(a).astype(np.float64).sum() for _, a in weights)),
            "samples_sha256": digest([("generate", generated), ("mixture", mixture), ("product", product)])}


def recorded() -> dict[str, Any]:
    return json.loads(RECORD.read_text())


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("name", list(VARIANTS))
def test_training_and_sampling_are_unchanged(name: str, tmp_path: Path) -> None:
    lock = recorded()
    want, got = lock["variants"][name], run_variant(name, tmp_path)
    assert len(got["train/loss"]) == STEPS and len(got["val/loss"]) == STEPS // 2
    if lock["environment"] == environment():
        assert got == want  # bit for bit: every loss, gradient norm and weight
    else:  # another CPU or torch: other kernels, other rounding; the same training nonetheless
        for key in (*LOGGED, "val/loss"):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-4, err_msg=key)
        assert got["weights_abs_sum"] == pytest.approx(want["weights_abs_sum"], rel=1e-4)


def record() -> None:
    """Re-record behaviour_lock.json from the code as it is (one thread, like the test)."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        variants = {name: run_variant(name, Path(folder)) for name in VARIANTS}
    RECORD.write_text(json.dumps({"environment": environment(), "steps": STEPS, "variants": variants}, indent=1) + "\n")


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        raise SystemExit("usage: python tests/test_behaviour_lock.py --record")
    record()
