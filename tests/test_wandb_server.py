"""W&B online, against a real W&B-compatible server (openwandb on 127.0.0.1), read back through its own HTTP API.

What the server stores is checked: a training run's config, train/* and val/* history, pictures, summary, tags
and notes (its group, which openwandb drops, from the SDK's own record of the run), --resume continuing the same
run, --devices 2 making one run, sweep trials as runs of the sweep's group, an evaluation's summary, tables and
pictures. Where the server refuses (it serves no artifact, sweep, Registry or report call), the failure is its
own, and epure must lose nothing and say so clearly.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import wandb
import yaml
from PIL import Image
from typer.testing import CliRunner

from epure.cli import app
from epure.config import save_config
from epure.data.synth import write_synthetic_dataset
from epure.sweep import load_sweep, run_offline
from factories import sandbox_wandb, tiny_config
from wandb_records import OfflineRun
from wandb_server import Server, StoredRun, go_online, online_run_files

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROJECT = "tires"


def flat(text: str) -> str:
    """CLI output without whitespace: rich wraps long lines anywhere."""
    return "".join(text.split())


def tiny_tree(data_root: Path, output_dir: Path) -> dict:
    """A very small model, a loss and a picture at every step, checkpoints only at epoch ends and budget stops."""
    return {"data": {"root": str(data_root)},
            "model": {"nf": 4, "nf_max": 8, "latent_dim_w": 2, "latent_dim_z": 2, "latent_dim_u": 4},
            "train": {"batch_size": 8, "epochs": 2, "output_dir": str(output_dir), "device": "cpu",
                      "checkpoint_every_minutes": 0.0},
            "wandb": {"images_every_epochs": 1, "log_every_steps": 1}}


@dataclass
class OnlineRun:
    """A tiny training run made online with the CLI (3 steps, then resumed to 6), and what came with it."""

    run_dir: Path
    first: str  # the CLI output of the first part
    resumed: str  # ... and of the resumed part
    stored: StoredRun  # the run as the server stored it, after the resume
    record: OfflineRun  # the SDK's own record of the first part (its local run-<id>.wandb file)
    links: list[tuple[str, str, str]]  # (artifact name, type, target) of every link_artifact call


@pytest.fixture(scope="module")
def online_run(openwandb_server: Server, tmp_path_factory: pytest.TempPathFactory) -> OnlineRun:
    base = tmp_path_factory.mktemp("online")
    data = write_synthetic_dataset(base / "d", n=40, seed=0)
    config = base / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_tree(data, base / "outputs")))
    links: list[tuple[str, str, str]] = []
    real_link = wandb.Run.link_artifact

    def recording_link(self, artifact, target_path, aliases=None):  # records, then the real SDK call
        links.append((artifact.name.split(":")[0], artifact.type, target_path))
        return real_link(self, artifact, target_path, aliases)

    runner = CliRunner()
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("EPURE_CACHE_DIR", str(base / "cache"))
        monkeypatch.setenv("COLUMNS", "200")
        wandb_dir = sandbox_wandb(monkeypatch, base)
        go_online(monkeypatch, openwandb_server)
        monkeypatch.setattr(wandb.Run, "link_artifact", recording_link)
        first = runner.invoke(app, ["train", "--config", str(config), "--project", PROJECT, "--entity", "default",
                                    "--name", "first", "--tags", "a", "b", "--group", "g1", "--notes", "hello",
                                    "--max-steps", "3", "--register", "epure-test"])
        assert first.exit_code == 0, first.output
        (run_dir,) = (base / "outputs" / "mmvaeplus").iterdir()
        (record,) = [OfflineRun(f) for f in online_run_files(wandb_dir)]
        wandb.teardown()
        resumed = runner.invoke(app, ["train", "--resume", str(run_dir), "--max-steps", "6"])
        assert resumed.exit_code == 0, resumed.output
        wandb.teardown()
    run_id = json.loads((run_dir / "wandb_run.json").read_text())["id"]
    return OnlineRun(run_dir, first.output, resumed.output, openwandb_server.run(PROJECT, run_id), record, links)


def test_training_run_reaches_the_server_and_resume_continues_it(online_run: OnlineRun,
                                                                 openwandb_server: Server) -> None:
    stored, run_dir = online_run.stored, online_run.run_dir
    assert [r.id for r in openwandb_server.runs(PROJECT) if r.name == "first"] == [stored.id]  # one run, resumed
    assert (stored.name, stored.tags, stored.notes, stored.state) == ("first", ["a", "b"], "hello", "finished")
    config = stored.config
    assert config["model"]["nf"] == 4 and config["train"]["batch_size"] == 8 and config["wandb"]["group"] == "g1"
    assert online_run.record.run.group == "g1"  # what the SDK sent: openwandb does not store groups

    history = stored.history
    steps = [row["_step"] for row in history if "train/loss" in row]
    assert steps == [1, 2, 3, 4, 5, 6]  # 3 steps, then the resumed part continues the same run's history
    assert {"train/kl_z", "train/kl_w", "train/recon/group_nc", "train/lr", "train/samples_per_sec"} <= set(history[0])
    val = [row["val/loss"] for row in history if "val/loss" in row]
    metrics = [r for r in (run_dir / "metrics.csv").read_text().splitlines()[1:]]
    assert len(val) == len(metrics) >= 2  # a validation at the budget stop and at the end

    pictures = [name for name in stored.files if name.startswith("media/images/samples/")]
    assert {p.split("/")[3].rsplit("_", 2)[0] for p in pictures} == {"unconditional", "cross_matrix", "composites"}
    assert Image.open(io.BytesIO(stored.file(pictures[0]))).size[0] > 0  # a real PNG came back

    summary = stored.summary
    assert summary["status"] == "budget" and summary["best_val_loss"] == pytest.approx(min(val))
    assert summary["val/loss"] == {"min": pytest.approx(min(val))}  # define_metric: the best of the run

    models = [a for a in stored.artifacts if a["artifact_type"] == "model"]
    assert {a["name"] for a in models} == {f"model-{stored.id}"}
    assert all(a["metadata"]["run_id"] == stored.id and "data_fingerprint" in a["metadata"] for a in models)


def test_unconfirmed_model_upload_and_failed_lineage_warn_and_lose_nothing(online_run: OnlineRun,
                                                                           openwandb_server: Server) -> None:
    """openwandb answers "committed" without storing a file, then fails Artifact.wait: epure says so, names the
    artifact and the local checkpoint, and still finishes the run; a refused dataset lineage only warns."""
    out, run_dir, stored = flat(online_run.first), online_run.run_dir, online_run.stored
    assert f"W&Bdidnotconfirmthatitstoredthemodelartifactmodel-{stored.id}" in out
    assert flat(f"the model is safe in {run_dir}/checkpoints/best.pt") in out
    assert "W&Bcouldnotrecordthatthisrunusesthedatasetdataset-d" in out
    assert (run_dir / "checkpoints" / "best.pt").is_file() and stored.state == "finished"
    # the dataset did reach the server, created as an input (no run: openwandb lists only a run's outputs)
    assert "createArtifact: run=None, type=dataset, collection=dataset-d" in openwandb_server.log()


def test_register_links_the_best_version_and_a_refusal_only_warns(online_run: OnlineRun, wandb_online: Server,
                                                                  tmp_path: Path) -> None:
    stored, run_dir = online_run.stored, online_run.run_dir
    # the first part only: --register is the command's choice, and the resume did not give it
    assert online_run.links == [(f"model-{stored.id}", "model", "wandb-registry-model/epure-test")]
    assert flat(f"could not link model-{stored.id}:best to the W&B Registry collection "
                f"wandb-registry-model/epure-test") in flat(online_run.first)
    assert flat(f"epure register {run_dir} epure-test") in flat(online_run.first)

    result = CliRunner().invoke(app, ["register", str(run_dir), "epure-test", "--alias", "production"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert flat(f"the W&B server {wandb_online.url} failed wandb.Api().artifact('default/{PROJECT}/"
                f"model-{stored.id}:best')") in flat(result.output)
    result = CliRunner().invoke(app, ["sample", "--artifact", "wandb-registry-model/epure-test:production",
                                      "--out", str(tmp_path / "s")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "cannotgettheW&Bmodelartifactdefault/wandb-registry-model/epure-test:production" in flat(result.output)


def test_evaluate_online_logs_metrics_tables_and_pictures_before_lineage(online_run: OnlineRun,
                                                                         wandb_online: Server, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(online_run.run_dir), "--limit", "4",
                                      "--bootstrap", "0", "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    stored_metrics = json.loads(out.read_text())["metrics"]
    (evaluation,) = [r for r in wandb_online.runs(PROJECT) if r.name == "eval-first"]
    summary = evaluation.summary
    assert summary["eval/cross_iou"] == {"max": pytest.approx(stored_metrics["eval/cross_iou"])}
    assert summary["eval/dims/width_mae"] == {"min": pytest.approx(stored_metrics["eval/dims/width_mae"])}
    assert evaluation.config["eval"]["limit"] == 4 and evaluation.config["model"]["nf"] == 4
    table = json.loads(evaluation.file(summary["eval/completion"]["path"]))
    assert table["columns"] == ["run", "observed", "generated", "iou", "dice"] and len(table["data"]) == 25
    row = next(r for r in table["data"] if r[1:3] == ["group_nc", "fpu"])
    assert row[3] == pytest.approx(stored_metrics["eval/cross_iou/group_nc->fpu"])
    for key in ("eval/completions", "eval/samples"):
        assert Image.open(io.BytesIO(evaluation.file(summary[key]["path"]))).size == (summary[key]["width"],
                                                                                       summary[key]["height"])
    # the lineage call comes last, and the server refusing it is a warning
    assert flat(f"W&B could not record that this evaluation used the model model-{online_run.stored.id}:best") \
        in flat(result.output)
    # reading a W&B run back is a read the server refuses: a clear error, exit 2, no traceback
    result = CliRunner().invoke(app, ["compare", str(out), f"default/{PROJECT}/{online_run.stored.id}"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert flat(f"cannot read the W&B run default/{PROJECT}/{online_run.stored.id}") in flat(result.output)


def test_sample_online_logs_the_table_and_a_samples_artifact_of_the_model(online_run: OnlineRun,
                                                                        wandb_online: Server, tmp_path: Path) -> None:
    """A model trained with W&B is sampled with W&B: samples.csv reaches the server as a table with the
    composites as pictures, the folder as an artifact of type samples naming the model; lineage comes last."""
    out = tmp_path / "s"
    result = CliRunner().invoke(app, ["sample", "--checkpoint", str(online_run.run_dir), "--num-samples", "3",
                                      "--out", str(out), "--seed", "4"])
    assert result.exit_code == 0, result.output
    (sampling,) = [r for r in wandb_online.runs(PROJECT) if r.name == "sample-first"]
    assert sampling.state == "finished"
    assert sampling.config["options"]["num_samples"] == 3 and sampling.config["options"]["seed"] == 4
    assert sampling.config["model"]["checkpoint"].endswith("best.pt")
    entry = sampling.summary["samples/unconditional"]
    table = json.loads(sampling.file(entry["path"]))
    local = (out / "unconditional" / "samples.csv").read_text().splitlines()
    assert table["columns"] == [*local[0].split(","), "composite"] and len(table["data"]) == 3
    assert [str(row[0]) for row in table["data"]] == [line.split(",")[0] for line in local[1:]]
    # openwandb keeps the rows; the pictures live in the table's run_table artifact, whose files it never asks
    # for (the offline test in test_sample_outputs.py checks them)
    assert [r[-1] for r in table["data"]] == ["Image"] * 3
    assert [a["name"] for a in sampling.artifacts if a["artifact_type"] == "run_table"] != []
    (record,) = [OfflineRun(f) for f in online_run_files(os.environ["WANDB_DIR"]) if sampling.id in f.name]
    assert record.run.job_type == "sample"  # what the SDK sent: openwandb drops job types
    (samples,) = [a for a in sampling.artifacts if a["artifact_type"] == "samples"]
    assert samples["name"] == f"samples-{online_run.run_dir.name}"
    assert samples["metadata"]["model_artifact"] == f"model-{online_run.stored.id}:best"
    # then the run uses the model artifact; openwandb serves no artifact query, so that is a warning only
    assert flat(f"W&B could not record that these samples came from the model model-{online_run.stored.id}:best") \
        in flat(result.output)


def test_report_is_built_from_the_runs_and_a_refused_save_is_a_clear_error(wandb_online: Server,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb_workspaces.reports.v2 as wr

    saved: list = []
    real_save = wr.Report.save

    def recording_save(self, *args, **kwargs):  # records the report, then the real save (which openwandb refuses)
        saved.append(self)
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(wr.Report, "save", recording_save)
    result = CliRunner().invoke(app, ["report", "--project", PROJECT, "--group", "g1"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert flat(f"the W&B server {wandb_online.url} failed Report.save (saving the report)") in flat(result.output)
    (report,) = saved
    assert (report.project, report.entity) == (PROJECT, "default")
    grids = [b for b in report.blocks if isinstance(b, wr.PanelGrid)]
    assert {grid.runsets[0].filters for grid in grids} == {"Metric(\"Group\") == 'g1'"}
    panels = [p for grid in grids for p in grid.panels]
    assert [p.y for p in panels if isinstance(p, wr.LinePlot)][:2] == [["train/loss"], ["val/loss"]]
    (bars,) = [p for p in panels if isinstance(p, wr.BarPlot)]
    assert [m.name for m in bars.metrics] == ["eval/cross_iou.max", "eval/self_iou.max", "eval/cross_dice.max",
                                              "eval/self_dice.max"]
    (media,) = [p for p in panels if isinstance(p, wr.MediaBrowser)]
    assert "samples/unconditional" in media.media_keys and "eval/completions" in media.media_keys

    result = CliRunner().invoke(app, ["report", "--project", PROJECT, "--sweep", "abc123"])
    assert result.exit_code == 2 and len(saved) == 1  # the sweep's parameters come from W&B, which refuses
    assert flat(f"failed wandb.Api().sweep('default/{PROJECT}/abc123')") in flat(result.output)


def test_sweep_trials_are_online_runs_of_the_sweep_group(wandb_online: Server, tmp_path: Path) -> None:
    """The local engine proposes (the server has no sweep API); each trial is an online run in the sweep's group."""
    cfg = tiny_config(write_synthetic_dataset(tmp_path / "d", n=40, seed=0), tmp_path / "outputs")
    save_config(cfg, tmp_path / "tiny.yaml")
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "online", "method": "grid",
                                    "metric": {"name": "val/cross_iou", "goal": "maximize"},
                                    "parameters": {"model.beta": {"values": [1.0, 2.0]},
                                                   "train.max_steps": {"value": 1}},
                                    "epure": {"config": "tiny.yaml", "eval_limit": 4}}))
    outcome = run_offline(load_sweep(path), count=None, mode="online", project="sweeps", entity="default")
    assert [t.status for t in outcome.trials] == ["finished", "finished"]
    stored = {r.id: r for r in wandb_online.runs("sweeps")}
    assert sorted(stored) == sorted(t.wandb_run for t in outcome.trials)
    for trial in outcome.trials:
        run = stored[trial.wandb_run]
        assert run.config["wandb"]["group"] == outcome.label and "sweep" in run.tags
        assert run.config["model"]["beta"] == trial.params["model.beta"]
        assert run.summary["val/cross_iou"] == pytest.approx(trial.value("val/cross_iou"))
        assert run.summary["sweep/status"] == "finished"
    records = [OfflineRun(f) for f in online_run_files(os.environ["WANDB_DIR"])]
    assert {r.run.group for r in records} == {outcome.label}  # the group the SDK sent for every trial


def test_sweep_on_a_server_without_sweeps_exits_2_naming_the_server_and_the_call(wandb_online: Server,
                                                                                 tmp_path: Path) -> None:
    cfg = tiny_config(None, tmp_path / "outputs")
    save_config(cfg, tmp_path / "tiny.yaml")
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"method": "grid", "parameters": {"model.beta": {"values": [1.0]}},
                                    "epure": {"config": "tiny.yaml"}}))
    def wandb_env() -> dict[str, str]:  # WANDB_SERVICE: the SDK's own service process, set on first use
        return {k: v for k, v in os.environ.items() if k.startswith("WANDB_") and k != "WANDB_SERVICE"}

    before = wandb_env()
    for extra, call in (([], "wandb.sweep (creating the sweep)"),
                        (["--sweep-id", "abc123"], "wandb.agent (asking sweep abc123 for trials)")):
        result = CliRunner().invoke(app, ["sweep", str(path), "--count", "1", "--project", "p", "--entity",
                                          "default", *extra])
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert flat(f"error: the W&B server {wandb_online.url} failed {call}") in flat(result.output)
        assert flat(f"epure sweep {path} --offline") in flat(result.output)
    assert not (tmp_path / "outputs" / "mmvaeplus").exists()  # nothing trained
    # the SDK's agent exports WANDB_PROJECT=p etc.; later artifact lookups in this process must not see them
    assert wandb_env() == before


@pytest.mark.slow
def test_two_processes_make_one_online_run(wandb_online: Server, tmp_path: Path) -> None:
    cfg = tiny_config(write_synthetic_dataset(tmp_path / "d", n=40, seed=0), tmp_path / "outputs",
                      **{"train.batch_size": 8, "train.epochs": 2, "train.max_steps": 2, "wandb.mode": "online",
                         "wandb.log_every_steps": 1})
    save_config(cfg, tmp_path / "ddp.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    done = subprocess.run([sys.executable, "-m", "epure", "train", "--config", str(tmp_path / "ddp.yaml"),
                           "--devices", "2", "--project", "ddp", "--entity", "default"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (run,) = wandb_online.runs("ddp")  # rank 0 alone talks to W&B
    assert [row["_step"] for row in run.history if "train/loss" in row] == [1, 2]
    assert run.summary["status"] == "budget" and run.config["train"]["batch_size"] == 8
