"""Lineage, summaries, the Registry and reports, offline with the real wandb SDK (runs read back from their files).

The online side of each is in test_wandb_server.py; here: what an offline run records, and the clear errors of
what needs W&B online.
"""

from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from epure.cli import app
from epure.config import config_from_dict
from epure.data import load_data
from epure.data.dataset import cache_path
from epure.data.synth import write_synthetic_dataset
from epure.tracking import (WandbTracker, build_report, parse_artifact_spec, summary_goal, summary_value,
                            training_run_info)
from epure.train import train
from wandb_records import OfflineRun, find_run_file, find_run_files

pytestmark = pytest.mark.usefixtures("one_torch_thread", "wandb_sandbox")


def tiny_tree(data_root: Path, output_dir: Path, **wandb: object) -> dict:
    return {"data": {"root": str(data_root)},
            "model": {"nf": 4, "nf_max": 8, "latent_dim_w": 2, "latent_dim_z": 2, "latent_dim_u": 4},
            "train": {"batch_size": 8, "epochs": 1, "max_steps": 2, "output_dir": str(output_dir), "device": "cpu"},
            "wandb": {"images_every_epochs": 0, "log_every_steps": 1, **wandb}}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("synth") / "tires-a", n=40, seed=0)


def flat(text: str) -> str:
    return "".join(text.split())


def test_training_run_uses_its_dataset_by_reference(dataset: Path, tmp_path: Path, wandb_sandbox: Path) -> None:
    cfg = config_from_dict(tiny_tree(dataset, tmp_path / "outputs"))
    tracker = WandbTracker(cfg.wandb, "offline")
    result = train(cfg, tracker=tracker)
    tracker.finish(0)
    run = OfflineRun(find_run_file(wandb_sandbox))

    (used,) = [a for a in run.artifacts if a.type == "dataset"]
    assert used.name == "dataset-tires-a" and used.record.use_after_commit  # an input of the run, not an output
    meta = used.metadata
    stored = torch.load(result.run_dir / "checkpoints" / "last.pt", weights_only=False)
    assert meta["fingerprint"] == stored["data_fingerprint"]
    components = cfg.data.components
    assert meta["files"] == {"train": {c: 32 for c in components}, "test": {c: 8 for c in components}}
    assert meta["designs"] == {"train": 30, "val": 2, "test": 8}
    assert meta["csv_sha256"] == hashlib.sha256((dataset / "dimensions.csv").read_bytes()).hexdigest()
    entries = {e.path: e for e in used.record.manifest.contents}
    assert sorted(entries) == ["dataset.json", "dimensions.csv"]  # no PNG in it
    assert meta["root"] == str(dataset.resolve())
    assert entries["dimensions.csv"].ref == (dataset / "dimensions.csv").resolve().as_uri()
    assert json.loads(Path(entries["dataset.json"].local_path).read_text()) == meta

    goals = {m.name: [f for f in ("min", "max") if getattr(m.summary, f)] for m in run.records_of("metric")}
    assert goals["val/loss"] == ["min"] and not any(k.startswith("train/") for k in goals)
    assert run.summary["val/loss/min"] == pytest.approx(result.best_val_loss)


def test_log_dataset_upload_adds_the_decoded_images_and_off_declares_nothing(dataset: Path, tmp_path: Path,
                                                                             wandb_sandbox: Path) -> None:
    for mode in ("upload", "off"):
        cfg = config_from_dict(tiny_tree(dataset, tmp_path / mode, log_dataset=mode))
        data = load_data(cfg.data)
        run_dir = tmp_path / mode / "run"
        run_dir.mkdir(parents=True)
        tracker = WandbTracker(cfg.wandb, "offline")
        tracker.start(run_dir, cfg)
        tracker.use_dataset(data, cfg.data)
        tracker.finish(0)
    runs = {r.config["wandb"]["log_dataset"]: r for r in map(OfflineRun, find_run_files(wandb_sandbox))}
    upload, off = runs["upload"], runs["off"]  # (two runs started in the same second sort by their random id)
    (used,) = upload.artifacts
    sizes = {e.path: e.size for e in used.record.manifest.contents}
    assert sizes["decoded/train.npz"] == cache_path("train", data.train.fingerprint).stat().st_size
    assert sizes["decoded/test.npz"] == cache_path("test", data.test.fingerprint).stat().st_size
    assert off.artifacts == []


@pytest.mark.parametrize("key, goal", [
    ("val/loss", "min"), ("val/cross_iou", "max"), ("eval/self_dice", "max"), ("eval/cross_iou/bt->fpu", "max"),
    ("eval/dims/width_mae", "min"), ("eval/dims_ood/height_mae", "min"), ("eval/uncond/w_overlap_iou/bt+fpu", "min"),
    ("val/uncond/w_com_y/tpc", "min"), ("eval/uncond/union_one_piece", None), ("eval/uncond_std/w_com_x/bt", None),
    ("train/loss", None), ("best_val_loss", None), ("eval/diversity/recall", "max"),
    ("eval/diversity/coverage", "max"), ("eval/diversity/pairwise_iou", None), ("eval/diversity/memorised", None),
    ("eval/diversity/completion_iou/bt", None), ("eval/real/precision", None), ("eval/real/pairwise_iou", None)])
def test_summary_goal(key: str, goal: str | None) -> None:
    assert summary_goal(key) == goal


def test_summary_value_unwraps_define_metric_summaries() -> None:
    assert summary_value({"max": 0.5}) == 0.5 and summary_value(0.25) == 0.25
    assert summary_value({"min": 1, "max": 2}) == {"min": 1, "max": 2}


def test_register_and_report_need_wandb_online_and_say_so(dataset: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_tree(dataset, tmp_path / "outputs")))
    result = runner.invoke(app, ["train", "--config", str(config), "--register", "tires", "--wandb", "offline"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert flat("links the model in the W&B Registry, which needs W&B online") in flat(result.output)
    assert flat("epure register RUN_DIR tires") in flat(result.output)
    assert not (tmp_path / "outputs").exists()  # refused before training

    result = runner.invoke(app, ["train", "--config", str(config), "--register", "bad name!"])
    assert result.exit_code == 2 and flat("wandb.register must be a W&B Registry collection name") \
        in flat(result.output)

    trained = runner.invoke(app, ["train", "--config", str(config), "--wandb", "off"])
    assert trained.exit_code == 0, trained.output
    (run_dir,) = (tmp_path / "outputs" / "mmvaeplus").iterdir()
    stored = yaml.safe_load((run_dir / "config.yaml").read_text())
    stored["wandb"]["register"] = "tires"  # as a run trained online with --register keeps it
    (run_dir / "config.yaml").write_text(yaml.safe_dump(stored))
    result = runner.invoke(app, ["train", "--resume", str(run_dir), "--max-steps", "3", "--wandb", "off"])
    assert result.exit_code == 0, result.output  # a resume registers only when asked again: no W&B is fine
    result = runner.invoke(app, ["register", str(run_dir), "tires"])
    assert result.exit_code == 2 and flat(f"{run_dir}: no wandb_run.json") in flat(result.output)
    result = runner.invoke(app, ["register", "team/tires/model-ab12cd34:best", "tires", "--alias", "production"])
    assert result.exit_code == 2 and flat("the W&B Registry needs W&B online, but WANDB_MODE=offline") \
        in flat(result.output)
    result = runner.invoke(app, ["sample", "--artifact", "wandb-registry-model/tires:production"])
    assert result.exit_code == 2 and flat("--artifact wandb-registry-model/tires:production needs W&B online") \
        in flat(result.output)
    result = runner.invoke(app, ["report", "--project", "tires", "--group", "g"])
    assert result.exit_code == 2 and flat("a W&B report lives on the W&B server, which needs W&B online") \
        in flat(result.output)


def test_registry_paths_resolve_like_run_artifacts() -> None:
    assert parse_artifact_spec("wandb-registry-model/tires:production", entity="team") == (
        "team", "wandb-registry-model", "tires", "production")


def test_a_registry_model_knows_the_run_that_trained_it(tmp_path: Path) -> None:
    folder = tmp_path / "v3"
    folder.mkdir()
    (folder / "artifact.json").write_text(json.dumps({
        "qualified_name": "org/wandb-registry-model/tires:v3", "entity": "org", "project": "wandb-registry-model",
        "name": "tires", "version": "v3", "metadata": {"run_id": "ab12cd34", "project": "p", "entity": "team",
                                                        "run_dir": "/x/outputs/mmvaeplus/2026-01-01_00-00-00"}}))
    assert training_run_info(folder / "checkpoints" / "last.pt") == {
        "id": "ab12cd34", "project": "p", "entity": "team", "name": "2026-01-01_00-00-00",
        "artifact": "org/wandb-registry-model/tires:v3"}


def test_sweep_report_has_a_parallel_coordinates_panel_of_the_swept_parameters() -> None:
    import wandb_workspaces.reports.v2 as wr

    report = build_report("tires", "team", sweep="abc123", parameters=["model.beta", "train.lr"],
                          metric="val/cross_iou")
    grids = [b for b in report.blocks if isinstance(b, wr.PanelGrid)]
    assert {g.runsets[0].filters for g in grids} == {"Metric(\"Sweep\") == 'abc123'"}
    panels = [p for g in grids for p in g.panels]
    (bars,) = [p for p in panels if isinstance(p, wr.BarPlot)]
    assert [m.name for m in bars.metrics] == ["val/cross_iou", "val/self_iou", "val/cross_dice", "val/self_dice"]
    (coordinates,) = [p for p in panels if isinstance(p, wr.ParallelCoordinatesPlot)]
    columns = [c.metric for c in coordinates.columns]
    assert [type(c).__name__ for c in columns] == ["Config", "Config", "SummaryMetric"]
    assert [c.name for c in columns] == ["model.beta", "train.lr", "val/cross_iou"]
    with pytest.raises(Exception, match="exactly one of --group, --sweep or run ids"):
        build_report("tires", "team", group="g", runs=["a"])


def test_only_tracking_talks_to_wandb() -> None:
    """Every W&B call lives in epure/tracking.py: no other module imports wandb (or W&B's report package)."""
    package = Path(__file__).resolve().parents[1] / "epure"
    importers = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n.split(".")[0] in ("wandb", "wandb_workspaces") for n in names):
                importers.append(path.relative_to(package).as_posix())
    assert sorted(set(importers)) == ["tracking.py"]
