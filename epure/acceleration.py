"""How a training step uses its device: the precision its networks compute in, and whether they are compiled.

    >>> import torch
    >>> from epure.acceleration import resolve_precision, resolve_compile
    >>> resolve_precision("auto", torch.device("cpu")), resolve_compile("auto", torch.device("cpu"))
    ('fp32', False)

``train.precision`` (auto | fp32 | bf16) and ``train.compile`` (auto | on | off) say it in a config; ``auto``
picks per device (README "Speed", docs/performance.md):

- CPU: fp32 and eager. These CPUs have no native bf16 (autocast would emulate it, slower than fp32), and
  compiling the networks took 104 s on 2 cores before the first step of `small` (2026-12-04, torch 2.13),
  a third of the embedded default's whole training budget.
- CUDA: fp32 and eager, what epure did before these keys existed, until a GPU measurement says otherwise
  (``CUDA_AUTO``). No GPU has been lent to this project yet; ``benchmarks/gpu_session.sh`` is the prepared
  measurement (the GPU throughput table of both paths, fp32 and bf16, eager and compiled, and an end-to-end
  ``epure train`` with each key), and its table is what ``CUDA_AUTO`` is to be set from.

bf16 runs the networks' convolutions and matrix products under ``torch.autocast``; the encoders' outputs and
the decoders' logits are taken back to float32 before the objective (``MMVAEPlus``), so the latents' densities,
the likelihoods and every sum of the bound stay in float32, as do the weights and Adam's moments.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from epure.config import ConfigError

log = logging.getLogger(__name__)

# What ``auto`` means on CUDA: not measured yet (no GPU lent), so the behaviour from before the keys existed.
CUDA_AUTO = {"precision": "fp32", "compile": False}


def resolve_precision(choice: str, device: torch.device) -> str:
    """``train.precision`` on ``device``: "fp32" or "bf16". bf16 is refused on a CPU (no native bf16 here)."""
    if choice == "auto":
        return CUDA_AUTO["precision"] if device.type == "cuda" else "fp32"
    if choice == "bf16" and device.type != "cuda":
        raise ConfigError(f"train.precision bf16 needs a CUDA device (this run's device is {device.type}: "
                          "its CPU has no native bf16, so bf16 would run slower than fp32); use fp32 or auto")
    return choice


def resolve_compile(choice: str, device: torch.device) -> bool:
    """``train.compile`` on ``device``: whether the encoders and decoders are compiled."""
    if choice == "auto":
        return device.type == "cuda" and bool(CUDA_AUTO["compile"])
    return choice == "on"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The context a training step's forward runs in: bf16 autocast, or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compile_networks(networks: list[nn.Module]) -> None:
    """``torch.compile`` each network in place (``nn.Module.compile``: the parameters and the state dict keep
    their names, so checkpoints do not depend on it). Compiling happens at each network's first call."""
    # Every network's forward is Module._call_impl: one code object whose compiled versions (per network class,
    # input shape and autocast state) must not exceed dynamo's recompile limit, or the rest would run eager.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for network in networks:
        network.compile()
    log.info("compiling %d networks at their first call (train.compile)", len(networks))
