"""train.precision and train.compile: what ``auto`` resolves to, what a CPU refuses, and that the bf16 path keeps
the objective in float32 and close to the fp32 step (run under CPU autocast: the code path is the one CUDA runs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from epure.acceleration import CUDA_AUTO, autocast, resolve_compile, resolve_precision
from epure.config import ConfigError, config_from_dict, load_config, parse_overrides
from epure.data import load_data
from epure.model import MMVAEPlus
from epure.model.backward import objective_backward
from epure.train import train

from conftest import write_tiny_dataset
from factories import tiny_config

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU


def test_auto_resolves_per_device() -> None:
    assert resolve_precision("auto", CPU) == "fp32" and resolve_compile("auto", CPU) is False
    assert resolve_precision("auto", CUDA) == CUDA_AUTO["precision"]
    assert resolve_compile("auto", CUDA) is CUDA_AUTO["compile"]
    assert resolve_precision("fp32", CUDA) == "fp32" and resolve_precision("bf16", CUDA) == "bf16"
    assert resolve_compile("on", CPU) is True and resolve_compile("off", CUDA) is False


def test_bf16_on_a_cpu_is_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError, match="train.precision bf16 needs a CUDA device"):
        resolve_precision("bf16", CPU)


def test_the_keys_take_their_words_also_where_yaml_reads_booleans(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("train:\n  compile: on\n  precision: fp32\n")
    assert load_config(tmp_path / "c.yaml").train.compile == "on"
    assert load_config("small").updated(parse_overrides(["train.compile=off"])).train.compile == "off"
    with pytest.raises(ConfigError, match="'train.precision' must be one of"):
        config_from_dict({"train": {"precision": "fp16"}})
    with pytest.raises(ConfigError, match="'train.compile' must be one of"):
        config_from_dict({"train": {"compile": "sometimes"}})


def test_a_bf16_run_on_a_cpu_stops_before_writing_a_run_directory(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "data", n=12, components=["c0", "c1"])
    cfg = tiny_config(root, tmp_path / "out", ["c0", "c1"], **{"train.precision": "bf16", "train.device": "cpu"})
    with pytest.raises(ConfigError, match="train.precision bf16"):
        train(cfg, data=load_data(cfg.data))
    assert not (tmp_path / "out").exists()


def test_the_bf16_step_keeps_the_objective_in_float32_and_close_to_fp32() -> None:
    components = ["c0", "c1", "c2"]
    cfg = tiny_config(None, ".", components)
    torch.manual_seed(0)
    model = MMVAEPlus(cfg.model, components, cfg.data.image_size)
    g = torch.Generator().manual_seed(3)
    x, c = (torch.rand(6, 3, 64, 32, generator=g) > 0.7).float(), torch.randn(6, 2, generator=g)
    results = []
    for precision in ("fp32", "bf16"):
        model.zero_grad()
        torch.manual_seed(7)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            outputs = model.encoder_outputs(x, model.cond(c))
            out = objective_backward(model, x, c, "elbo", 0.5, 1)
        assert all(t.dtype == torch.float32 for t in outputs), precision  # latents' densities in float32
        assert out.loss.dtype == torch.float32
        results.append((out.loss, torch.cat([p.grad.flatten() for p in model.parameters()])))
    (loss32, grad32), (loss16, grad16) = results
    assert abs(loss16 - loss32) / abs(loss32) < 1e-3
    assert torch.linalg.norm(grad16 - grad32) / torch.linalg.norm(grad32) < 0.03  # bf16 has 8 bits of mantissa
    assert torch.linalg.norm(grad16 - grad32) > 0  # the bf16 step did run in bf16


def test_autocast_is_a_no_op_for_fp32() -> None:
    with autocast(CPU, "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    with autocast(CPU, "bf16"):
        assert torch.is_autocast_enabled("cpu")
