"""Real processes started at the same moment (a barrier releases them together): run directories, the dataset
cache, artifact downloads and sweep agents never collide; and a signal while the data loads leaves nothing behind.

Workers that only touch files are forked (fast); those that import and run torch are spawned, since a forked
copy of a process whose torch thread pool already ran can hang.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import yaml

from epure.config import DataConfig, save_config
from epure.data.cache import cache_root
from factories import TOY_COMPONENTS, synthetic_dataset, tiny_config

WAIT_S = 240  # for a group of workers on a busy 2-core machine


class FrozenClock(datetime):
    """Every process asks for its folder name in the same second."""

    @classmethod
    def now(cls, tz=None):
        return cls(2026, 1, 2, 3, 4, 5)


def run_together(method: str, target, argument_lists: list[tuple]) -> list[int]:
    """Start one process per argument tuple; each waits at a shared barrier, then runs; their exit codes."""
    context = multiprocessing.get_context(method)
    barrier = context.Barrier(len(argument_lists))
    processes = [context.Process(target=target, args=(barrier, *args)) for args in argument_lists]
    for process in processes:
        process.start()
    deadline = time.monotonic() + WAIT_S
    for process in processes:
        process.join(max(1.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.kill()
    return [process.exitcode for process in processes]


def no_network(*args, **kwargs):
    import wandb

    raise wandb.errors.CommError("tests never reach W&B")


# ------------------------------------------------------------------------------------------ run directories


def claim_run_dir(barrier, output: str, result: str) -> None:
    import pathlib

    import epure.train as training

    def slow_exists(self, *args, **kwargs) -> bool:  # a slow (network) file system: any check-then-mkdir races
        found = real_exists(self, *args, **kwargs)
        time.sleep(0.05)
        return found

    real_exists = pathlib.Path.exists
    pathlib.Path.exists = slow_exists
    training.datetime = FrozenClock
    barrier.wait()
    Path(result).write_text(str(training.new_run_dir(output)))


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path: Path) -> None:
    results = [tmp_path / f"result-{i}" for i in range(6)]
    codes = run_together("fork", claim_run_dir, [(str(tmp_path / "outputs"), str(r)) for r in results])
    assert codes == [0] * 6
    claimed = sorted(Path(r.read_text()).name for r in results)
    base = "2026-01-02_03-04-05"
    assert claimed == sorted([base] + [f"{base}_{n}" for n in range(1, 6)])
    assert sorted(p.name for p in (tmp_path / "outputs" / "mmvaeplus").iterdir()) == claimed


# --------------------------------------------------------------------------------------------- dataset cache


def load_builtin(barrier, n: int, result: str) -> None:
    from epure.data import load_data

    barrier.wait()
    data = load_data(DataConfig(root="builtin:synthetic", synthetic_n=n))
    Path(result).write_text(json.dumps({"fingerprint": data.fingerprint, "train": int(data.train.images.sum()),
                                        "test": int(data.test.images.sum())}))


def test_processes_building_one_dataset_cache_end_with_one_valid_copy(tmp_path: Path) -> None:
    from epure.data import load_data, load_split

    results = [tmp_path / f"result-{i}" for i in range(3)]
    codes = run_together("fork", load_builtin, [(300, str(r)) for r in results])
    assert codes == [0, 0, 0]
    seen = [json.loads(r.read_text()) for r in results]
    assert seen[0] == seen[1] == seen[2]
    # the generated folder and the decoded arrays: one copy each, and no temporaries beside them
    assert [p.name for p in (cache_root() / "builtin").iterdir()] == ["synthetic-n300-seed0"]
    cached = sorted(p.name for p in (cache_root() / "datasets").iterdir())
    assert len(cached) == 2 and cached[0].startswith("test-") and cached[1].startswith("train-"), cached
    cfg = DataConfig(root="builtin:synthetic", synthetic_n=300)
    for name in cached:
        decoded = load_split(cache_root() / "builtin" / "synthetic-n300-seed0", name.split("-")[0], cfg,
                             use_cache=False)
        with np.load(cache_root() / "datasets" / name, allow_pickle=False) as arrays:
            np.testing.assert_array_equal(arrays["images"], decoded.images)
    again = load_data(cfg)  # from the cache
    assert again.fingerprint == seen[0]["fingerprint"]
    assert [int(again.train.images.sum()), int(again.test.images.sum())] == [seen[0]["train"], seen[0]["test"]]


# ---------------------------------------------------------------------------------------- artifact downloads


class SlowArtifact:
    """What ``wandb.Api().artifact`` returns: ``download`` takes a second, then copies the served folder."""

    entity, project, name, version, digest, metadata = "team", "epure", "model-abc:v0", "v0", "d1g35t", {}
    qualified_name = "team/epure/model-abc:v0"

    def __init__(self, served: str, counter: str):
        self.served, self.counter = served, counter

    def download(self, root: str, skip_cache: bool | None = None) -> str:
        with open(self.counter, "a") as handle:
            handle.write(f"{os.getpid()}\n")
        time.sleep(1.0)
        shutil.copytree(self.served, root, dirs_exist_ok=True)
        return root


class SlowApi:
    def __init__(self, served: str, counter: str):
        self.served, self.counter = served, counter

    def artifact(self, path: str, type: str | None = None) -> SlowArtifact:
        return SlowArtifact(self.served, self.counter)


def sample_artifact(barrier, served: str, counter: str, out: str, result: str) -> None:
    import wandb
    from typer.testing import CliRunner

    from epure.cli import app

    wandb.Api = lambda: SlowApi(served, counter)
    wandb.init = no_network  # lineage after sampling is W&B's only other call
    barrier.wait()
    outcome = CliRunner().invoke(app, ["sample", "--artifact", "team/epure/model-abc:best", "--num-samples", "2",
                                       "--out", out, "--device", "cpu"], env={"COLUMNS": "400"})
    Path(result).write_text(json.dumps({"exit_code": outcome.exit_code, "output": outcome.output}))


def test_two_downloads_of_one_artifact_leave_one_complete_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from epure.checkpoint import load_model
    from epure.train import train

    data = synthetic_dataset(tmp_path / "data", n=40)
    run_dir = train(tiny_config(data, tmp_path / "outputs", TOY_COMPONENTS,
                                **{"train.max_steps": 2, "train.device": "cpu"})).run_dir
    served = tmp_path / "served"
    (served / "checkpoints").mkdir(parents=True)
    for name in ("config.yaml", "normalization.json", "components.json"):
        shutil.copy(run_dir / name, served / name)
    shutil.copy(run_dir / "checkpoints" / "best.pt", served / "checkpoints" / "last.pt")
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    counter = tmp_path / "downloads"
    results = [tmp_path / f"result-{i}" for i in range(2)]
    codes = run_together("spawn", sample_artifact, [(str(served), str(counter), str(tmp_path / f"out{i}"), str(r))
                                                    for i, r in enumerate(results)])
    outcomes = [json.loads(r.read_text()) for r in results]
    assert codes == [0, 0] and [o["exit_code"] for o in outcomes] == [0, 0], outcomes
    assert len(counter.read_text().split()) == 2  # both downloaded at once: the race really happened
    collection = cache_root() / "artifacts" / "team" / "epure" / "model-abc"
    assert [p.name for p in collection.iterdir()] == ["v0"]  # the loser's partial copy is gone
    assert (collection / "v0" / "artifact.json").is_file() and load_model(collection / "v0").meta["step"] == 2
    first, second = (sorted((tmp_path / f"out{i}").rglob("*.png")) for i in range(2))
    assert len(first) == len(second) > 0
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes()


# ------------------------------------------------------------------------------------------------ sweeps


def sweep_agent(barrier, sweep_file: str, result: str) -> None:
    import torch

    import epure.sweep as sweeping

    torch.set_num_threads(1)
    sweeping.datetime = FrozenClock  # both agents' sweeps get the same label, as two agents of one sweep do
    spec = sweeping.load_sweep(sweep_file)
    barrier.wait()
    outcome = sweeping.run_offline(spec, count=1, mode="off")
    (trial,) = outcome.trials
    Path(result).write_text(json.dumps({"folder": str(outcome.folder), "label": outcome.label,
                                        "run_dir": str(trial.run_dir), "status": trial.status}))


def test_two_sweep_agents_on_one_machine_keep_separate_trial_folders(tmp_path: Path) -> None:
    data = synthetic_dataset(tmp_path / "data", n=40)
    save_config(tiny_config(data, tmp_path / "outputs", TOY_COMPONENTS), tmp_path / "tiny.yaml")
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "name": "agents", "method": "grid", "metric": {"name": "val/cross_iou", "goal": "maximize"},
        "parameters": {"model.beta": {"values": [1.0, 2.0]}, "train.max_steps": {"value": 2}},
        "epure": {"config": "tiny.yaml", "eval_limit": 4}}))
    results = [tmp_path / f"result-{i}" for i in range(2)]
    codes = run_together("spawn", sweep_agent, [(str(sweep_file), str(r)) for r in results])
    assert codes == [0, 0]
    agents = [json.loads(r.read_text()) for r in results]
    assert agents[0]["label"] == agents[1]["label"] == "agents-20260102-030405"
    folders = sorted(Path(a["folder"]).name for a in agents)
    assert folders == ["agents-20260102-030405", "agents-20260102-030405_1"]
    for agent in agents:
        folder = Path(agent["folder"])
        assert agent["status"] == "finished" and Path(agent["run_dir"]).parent.parent == folder
        rows = (folder / "trials.csv").read_text().splitlines()
        assert len(rows) == 2 and agent["run_dir"] in rows[1]  # this agent's trial only


# ------------------------------------------------------------------------------------ signals while loading


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_signal_while_the_data_loads_stops_cleanly(tmp_path: Path, signum: int, code: int) -> None:
    data = synthetic_dataset(tmp_path / "data", n=40)
    config = tmp_path / "tiny.yaml"
    save_config(tiny_config(data, tmp_path / "outputs", TOY_COMPONENTS), config)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "400",
           "EPURE_TEST_PAUSE_CACHE_WRITE": "120"}  # holds the half-written cache file until the signal comes
    log_path = tmp_path / "train.log"
    with open(log_path, "w") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "epure", "train", "--config", str(config), "--wandb", "off"],
                                   stdout=log_file, stderr=subprocess.STDOUT, env=env)
    datasets = cache_root() / "datasets"
    deadline = time.monotonic() + WAIT_S
    while not (datasets.is_dir() and list(datasets.glob(".*.tmp"))):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no half-written cache file to interrupt:\n{log_path.read_text()}")
        time.sleep(0.02)
    process.send_signal(signum)
    assert process.wait(WAIT_S) == code, log_path.read_text()
    output = " ".join(log_path.read_text().split())
    name = signal.Signals(signum).name
    assert f"{name} received while loading the data: stopped; nothing was trained yet" in output, output
    assert "no run directory was made" in output
    assert not list(datasets.iterdir())  # the half-written cache file is gone, and nothing else was written
    assert not (tmp_path / "outputs" / "mmvaeplus").exists()
