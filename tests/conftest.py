"""Shared test fixtures: an isolated cache and offline W&B for every test, and a tiny dataset factory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import wandb
from PIL import Image

from epure.config import DataConfig
from epure.data.dimensions import measure_dimensions

from factories import sandbox_wandb
from wandb_server import Server, find_openwandb, go_online


@pytest.fixture(autouse=True)
def isolated_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Point epure's cache and W&B at per-test temporary folders: tests never touch the user's files."""
    base = tmp_path_factory.mktemp("env")
    monkeypatch.setenv("EPURE_CACHE_DIR", str(base / "cache"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(base / "wandb"))
    (base / "wandb").mkdir()
    yield base
    # a CLI call in this process flushes denormals on this thread (epure/numerics.py); the next test gets
    # IEEE floats back (hypothesis refuses to draw floats without subnormals)
    torch.set_flush_denormal(False)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One thread for a module of tiny models: on a shared 2-core machine it trains them several times faster
    than two (the thread pool's spin-waits cost more than the work), and keeps results bitwise equal."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def wandb_sandbox(isolated_env: Path, monkeypatch: pytest.MonkeyPatch):
    """Every wandb folder under the test's own directory, no login; yields WANDB_DIR."""
    yield sandbox_wandb(monkeypatch, isolated_env)
    wandb.teardown()


@pytest.fixture(scope="session")
def openwandb_server(tmp_path_factory: pytest.TempPathFactory):
    """A real W&B-compatible server (openwandb) on 127.0.0.1, started once for the session's online tests."""
    binary = find_openwandb()
    if binary is None:
        pytest.skip("openwandb is not installed: pip install -e '.[server-tests]' (or set EPURE_OPENWANDB_BIN)")
    server = Server(binary, tmp_path_factory.mktemp("openwandb"))
    yield server
    server.stop()


@pytest.fixture
def wandb_online(openwandb_server: Server, wandb_sandbox: Path, monkeypatch: pytest.MonkeyPatch) -> Server:
    """This test talks to the openwandb server; yields it."""
    go_online(monkeypatch, openwandb_server)
    yield openwandb_server
    wandb.teardown()


def write_tiny_dataset(root: Path, n: int = 10, components: list[str] | None = None, mode: str = "L",
                       n_test: int | None = None, image_size: tuple[int, int] = (64, 32), seed: int = 0) -> Path:
    """Write ``n`` designs in the users' format (random-rectangle masks, 0/255) under ``root``; return ``root``.

    The first ``n - n_test`` designs are train, the rest test (default: a fifth, at least one).
    ``mode`` is the PNG mode: "L", "RGB" or "RGBA" (opaque, the gray value in every colour channel).
    """
    components = list(DataConfig().components if components is None else components)
    n_test = max(1, n // 5) if n_test is None else n_test
    rows, cols = image_size
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, len(components), rows, cols), dtype=np.uint8)
    for i in range(n):
        for m in range(len(components)):
            r0, r1 = sorted(rng.choice(rows + 1, size=2, replace=False))
            c0, c1 = sorted(rng.choice(cols + 1, size=2, replace=False))
            masks[i, m, r0:r1, c0:c1] = 255
    width, height = measure_dimensions(masks.max(axis=1))
    ids = [f"d{i:04d}" for i in range(n)]
    is_train = [i < n - n_test for i in range(n)]
    for i, prefix in enumerate(ids):
        split = "train" if is_train[i] else "test"
        for m, component in enumerate(components):
            folder = root / split / component
            folder.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(masks[i, m], mode="L")
            if mode != "L":
                image = image.convert(mode)
            image.save(folder / f"{prefix}_{component}.png")
    pd.DataFrame({"matching": ids, "width_px": width, "height_px": height, "train": is_train}).to_csv(
        root / "dimensions.csv", index=False)
    return root


@pytest.fixture
def tiny_dataset(tmp_path: Path):
    """Factory: ``tiny_dataset(n=10, components=None, mode="L", n_test=None, name="data")`` -> dataset root."""
    made: set[str] = set()

    def make(n: int = 10, components: list[str] | None = None, mode: str = "L", n_test: int | None = None,
             name: str | None = None, seed: int = 0) -> Path:
        name = name or f"data{len(made)}"
        made.add(name)
        return write_tiny_dataset(tmp_path / name, n=n, components=components, mode=mode, n_test=n_test, seed=seed)

    return make
