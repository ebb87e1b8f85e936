"""Multi-process training: two gloo processes on the CPU equal one process with the combined batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import yaml

from epure.model import MMVAEPlus
from epure.train import train

from factories import synthetic_dataset, tiny_config


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_combined_batch(tmp_path) -> None:
    data = synthetic_dataset(tmp_path / "data", n=80)
    per_process = tiny_config(data, tmp_path / "ddp", **{"train.batch_size": 8, "train.max_steps": 2,
                                                          "wandb.mode": "offline"})
    config_file = tmp_path / "ddp.yaml"
    config_file.write_text(yaml.safe_dump(per_process.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb"),
           "WANDB_SILENT": "true", "COLUMNS": "200"}
    (tmp_path / "wandb").mkdir()
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "epure", "train", "--config", str(config_file)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    single_cfg = tiny_config(data, tmp_path / "single", **{"train.batch_size": 16, "train.max_steps": 2})
    single = train(single_cfg)
    assert single.step == 2

    runs = list((tmp_path / "ddp" / "mmvaeplus").iterdir())
    assert len(runs) == 1, runs  # one checkpoint series, written by rank 0 only
    assert sorted(p.name for p in (runs[0] / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    assert len(list((tmp_path / "wandb" / "wandb").glob("offline-run-*"))) == 1  # one W&B run

    ddp_state = torch.load(runs[0] / "checkpoints" / "last.pt", weights_only=True)
    one_state = torch.load(single.run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert ddp_state["step"] == one_state["step"] == 2
    # Same data, same noise, gradients averaged over ranks: only the float summation order differs. Adam
    # normalises each element's step, so where a gradient is near zero that order can change the step itself:
    # 5e-5 absolute (2.5% of one step of lr 2e-3; 7.3e-6 seen on one element of 2,304 on an AVX-512 CPU).
    for key, value in one_state["model"].items():
        torch.testing.assert_close(ddp_state["model"][key], value, rtol=1e-4, atol=5e-5,
                                   msg=lambda detail, key=key: f"{key}: {detail}")
    # and training really moved the weights away from their (seeded) initial values
    torch.manual_seed(single_cfg.train.seed)
    initial = MMVAEPlus(single_cfg.model, single_cfg.data.components, single_cfg.data.image_size).state_dict()
    assert max((one_state["model"][k] - v).abs().max().item() for k, v in initial.items()) > 1e-4
