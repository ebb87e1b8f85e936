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


COLLECTIVES = """
import os
import torch
from epure import distributed

def threads():
    return len(os.listdir("/proc/self/task"))

before = threads()
ctx, _ = distributed.start("cpu")
assert ctx.world_size == 2 and ctx.owns_group
layer = torch.nn.Linear(2, 2)
torch.optim.Adam(layer.parameters(), fused=True)  # imports torch._dynamo, as training's optimiser does
layer.weight.grad = torch.full((2, 2), float(ctx.rank + 1))  # rank 0: ones, rank 1: twos
distributed.average_gradients(ctx, layer.parameters())
assert torch.equal(layer.weight.grad, torch.full((2, 2), 1.5)), f"not the ranks' mean: {layer.weight.grad}"
assert torch.equal(layer.bias.grad, torch.zeros(2)), f"no gradient on any rank, yet {layer.bias.grad}"
assert distributed.sum_across(ctx, [1.0, float(ctx.rank)]) == [2.0, 1.0]
assert distributed.broadcast_object(ctx, f"rank {ctx.rank}") == "rank 0"
distributed.stop(ctx)
after = threads()
assert after == before, f"rank {ctx.rank}: {after - before} thread(s) still running after stop ({before} before start)"
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc/self/task (Linux)")
def test_collectives_average_sum_broadcast_and_leave_no_thread_behind(tmp_path) -> None:
    """Gradients are the ranks' mean (a sum would pass the weight comparison above: Adam's step is
    scale-invariant), and no gloo worker thread outlives stop (one alive while Python shut down aborted a
    2-process run now and then: SIGABRT, 3 runs in 60 of benchmarks/ddp_exit.py)."""
    script = tmp_path / "collectives.py"
    script.write_text(COLLECTIVES)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
