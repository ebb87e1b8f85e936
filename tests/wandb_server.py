"""A real W&B-compatible server on loopback for the online tests, and a reader of what it stored.

The server is ``openwandb`` (0.5.25, the ``server-tests`` extra): ``openwandb serve --host 127.0.0.1 --port P
--data-dir D``, with ``WANDB_BASE_URL=http://127.0.0.1:P``, ``WANDB_API_KEY=local`` + 40 zeros and entity
``default``. It stores what a run writes (runs, config, history, summary, files, the artifacts a run creates)
and answers reads through its own HTTP API, which :class:`Server` uses; it serves no W&B read query
(artifacts, ``wandb.Api``, sweeps). What it does with what the SDK sends, as seen with wandb 0.31:

* ``/api/v2/runs/{id}``: display name, state, tags, notes and the config (values wrapped ``{"value": v}``);
  it drops the run's group and job type (``upsertBucket`` reads ``groupName`` and ignores it), so tests read
  the group from the SDK's own record of the run (its local ``run-<id>.wandb`` file) and from the config;
* ``/files/{entity}/{project}/{id}/wandb-history.jsonl`` and ``wandb-summary.json``: the history rows and the
  full summary as the SDK streamed them; ``/files/.../media/...``: the logged pictures and tables;
* ``/api/v2/runs/{id}/artifacts``: name, type and metadata of each artifact the run logged (an artifact a
  run only *uses* is created without a run and is not listed); ``createArtifact`` answers "committed" at
  once, so the SDK uploads no file, and ``Artifact.wait`` then fails: the server did not store the model.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import wandb

API_KEY = "local" + "0" * 40
ENTITY = "default"


def find_openwandb() -> str | None:
    """``$EPURE_OPENWANDB_BIN``, else ``openwandb`` on PATH or beside this Python."""
    if os.environ.get("EPURE_OPENWANDB_BIN"):
        return os.environ["EPURE_OPENWANDB_BIN"]
    beside = Path(sys.executable).parent / "openwandb"
    return shutil.which("openwandb") or (str(beside) if beside.is_file() else None)


def go_online(monkeypatch: pytest.MonkeyPatch, server: "Server") -> None:
    """W&B online against ``server`` (after ``factories.sandbox_wandb``): its URL, its local key, entity default."""
    for name, value in {"WANDB_BASE_URL": server.url, "WANDB_API_KEY": API_KEY, "WANDB_ENTITY": ENTITY,
                        "WANDB_MODE": "online"}.items():
        monkeypatch.setenv(name, value)
    wandb.teardown()


def online_run_files(wandb_dir: str | Path) -> list[Path]:
    """The SDK's local record of every online run under ``wandb_dir`` (``wandb/run-*/run-<id>.wandb``), sorted."""
    return sorted(Path(wandb_dir).glob("wandb/run-*/run-*.wandb"))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _unwrap(config: dict) -> dict:
    return {k: v["value"] if isinstance(v, dict) and set(v) == {"value"} else v
            for k, v in config.items() if k != "_wandb"}


@dataclass
class StoredRun:
    """One run as the server stored it."""

    server: "Server"
    project: str
    record: dict[str, Any]

    @property
    def id(self) -> str:
        return self.record["run_id"]

    @property
    def name(self) -> str:
        return self.record["display_name"]

    @property
    def tags(self) -> list[str]:
        return self.record["tags"]

    @property
    def notes(self) -> str:
        return self.record["notes"]

    @property
    def state(self) -> str:
        return self.record["state"]

    @property
    def config(self) -> dict[str, Any]:
        return _unwrap(self.server.get(f"/api/v2/runs/{self.id}/config")["config"])

    def file(self, name: str) -> bytes:
        return self.server.get_bytes(f"/files/{ENTITY}/{self.project}/{self.id}/{name}")

    @property
    def history(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.file("wandb-history.jsonl").decode().splitlines() if line.strip()]

    @property
    def summary(self) -> dict[str, Any]:
        return json.loads(self.file("wandb-summary.json"))

    @property
    def files(self) -> list[str]:
        return sorted(f["name"] for f in self.server.get(f"/api/v1/runs/{self.id}/files")["files"])

    @property
    def artifacts(self) -> list[dict[str, Any]]:
        return self.server.get(f"/api/v2/runs/{self.id}/artifacts")["artifacts"]


class Server:
    """``openwandb serve`` on 127.0.0.1 and a free port, with its data in ``data_dir``."""

    def __init__(self, binary: str, data_dir: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = data_dir
        self.log_path = data_dir / "server.log"
        env = {**os.environ, "OPENWANDB_LOG_LEVEL": "info"}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen([binary, "serve", "--host", "127.0.0.1", "--port", str(self.port),
                                             "--data-dir", str(data_dir / "data")],
                                            stdout=log, stderr=subprocess.STDOUT, env=env)
        self._wait_until_up()

    def _wait_until_up(self, seconds: float = 60.0) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"openwandb exited with {self.process.returncode}: {self.log()[-2000:]}")
            try:
                self.get("/api/v1/viewer")
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"openwandb did not answer on {self.url} within {seconds:.0f} s: {self.log()[-2000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def get_bytes(self, path: str) -> bytes:
        request = urllib.request.Request(self.url + path, headers={"x-wandb-api-key": API_KEY})
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.read()

    def get(self, path: str) -> Any:
        return json.loads(self.get_bytes(path))

    def runs(self, project: str) -> list[StoredRun]:
        """Every run of ``default/project``, oldest first."""
        records = self.get(f"/api/v2/projects/{ENTITY}/{project}/runs")["runs"]
        return [StoredRun(self, project, r) for r in sorted(records, key=lambda r: r["id"])]

    def run(self, project: str, run_id: str) -> StoredRun:
        (match,) = [r for r in self.runs(project) if r.id == run_id]
        return match
