"""The command line's shared parts: ``--set KEY=VALUE`` for training and sweeps, the "which model" options of
``sample`` and ``evaluate`` resolved by one function, and the one place that maps error types to exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from epure import cli, sweep as sweeping
from epure.cli import app
from epure.config import ConfigError, load_config, parse_overrides, save_config

from factories import synthetic_dataset, tiny_config

WIDE = {"COLUMNS": "300"}


def test_overrides_are_typed_like_config_files() -> None:
    assert parse_overrides(["model.beta=0.5", "train.lr=3e-4", "model.cond_hidden=[16, 8]", "wandb.group=null",
                            "train.amsgrad=false", "train.epochs=1e2", "wandb.name=1e3"]) == {
        "model.beta": 0.5, "train.lr": 3e-4, "model.cond_hidden": [16, 8], "wandb.group": None,
        "train.amsgrad": False, "train.epochs": 100.0, "wandb.name": "1e3"}  # a string key keeps its text
    assert load_config("small").updated(parse_overrides(["train.epochs=1e2"])).train.epochs == 100


@pytest.mark.parametrize("pair, message", [
    ("model.betta=0.5", "--set 'model.betta=0.5': unknown config key 'model.betta' (did you mean 'model.beta'?)"),
    ("model.beta", "--set 'model.beta': expected KEY=VALUE, e.g. model.beta=0.5"),
    ("=1", "expected KEY=VALUE"),
    ("model.cond_hidden=[1, 2", "--set 'model.cond_hidden=[1, 2': the value is not valid YAML"),
])
def test_a_bad_override_names_itself(pair: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_overrides([pair])
    assert message in str(caught.value)


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    cfg = tiny_config(synthetic_dataset(tmp_path / "data", n=40), tmp_path / "outputs")
    save_config(cfg, tmp_path / "tiny.yaml")
    return tmp_path / "tiny.yaml"


def test_train_sets_config_keys_from_the_command_line(config_file: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["train", "--config", str(config_file), "--set", "model.beta=0.5",
                                      "train.lr=3e-4", "--max-steps", "1"], env=WIDE)
    assert result.exit_code == 0, result.output
    (run_config,) = (tmp_path / "outputs" / "mmvaeplus").glob("*/config.yaml")
    trained = yaml.safe_load(run_config.read_text())
    assert trained["model"]["beta"] == 0.5 and trained["train"]["lr"] == 3e-4 and trained["train"]["max_steps"] == 1


@pytest.mark.parametrize("args, message", [
    (["--set", "model.betta=0.5"], "did you mean 'model.beta'?"),
    (["--set", "model.beta=high"], "config key 'model.beta' must be a number, got str 'high'"),
    (["--set", "model.beta=-1"], "model.beta must be >= 0"),
    (["--set", "train.epochs=2", "--epochs", "3"], "train.epochs is given twice"),
])
def test_a_bad_setting_stops_before_training(config_file: Path, tmp_path: Path, args: list[str], message: str):
    result = CliRunner().invoke(app, ["train", "--config", str(config_file), *args], env=WIDE)
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "outputs").exists()  # no run directory was made


def write_sweep(folder: Path, **definition) -> Path:
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(definition, sort_keys=False))
    return path


def test_sweep_takes_data_and_settings_like_train(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = synthetic_dataset(tmp_path / "data", n=40)
    path = write_sweep(tmp_path, method="grid", parameters={"model.beta": {"values": [0.5, 1.0]}})
    seen = []

    def run_sweep(spec, *args):
        seen.append(spec)
        raise sweeping.SweepError("stopped by the test")

    monkeypatch.setattr(sweeping, "run_sweep", run_sweep)
    result = CliRunner().invoke(app, ["sweep", "--set", "model.nf=4", "train.max_steps=2", str(path),
                                      "--data", str(data), "--offline"], env=WIDE)
    assert result.exit_code == 2 and "stopped by the test" in result.output, result.output
    (spec,) = seen
    assert spec.base.data.root == str(data) and spec.base.model.nf == 4 and spec.base.train.max_steps == 2
    result = CliRunner().invoke(app, ["sweep", str(path), "--set", "model.beta=2.0", "--offline"], env=WIDE)
    assert result.exit_code == 2 and "model.beta is searched by the sweep" in result.output, result.output
    result = CliRunner().invoke(app, ["sweep", str(path), "--set", "model.bta=2.0", "--offline"], env=WIDE)
    assert result.exit_code == 2 and "did you mean 'model.beta'?" in result.output, result.output
    assert len(seen) == 1


@pytest.mark.parametrize("command", ["sample", "evaluate"])
def test_sample_and_evaluate_choose_the_model_the_same_way(command: str, tmp_path: Path) -> None:
    runner = CliRunner()
    help_text = runner.invoke(app, [command, "--help"], env=WIDE).output
    assert "Which model" in help_text and all(option in help_text for option in
                                              ("--checkpoint", "--artifact", "--project", "--entity"))
    for args in ([], ["--checkpoint", str(tmp_path), "--artifact", "a/b/c:best"]):
        result = runner.invoke(app, [command, *args], env=WIDE)
        assert result.exit_code == 2 and "give either --checkpoint RUN_DIR_OR_FILE or --artifact" in result.output
    result = runner.invoke(app, [command, "--checkpoint", str(tmp_path / "missing")], env=WIDE)
    assert result.exit_code == 2 and "error:" in result.output and str(tmp_path / "missing") in result.output
    assert "Traceback" not in result.output


def test_several_settings_follow_one_flag_up_to_the_first_argument() -> None:
    assert cli.expand_multi_value_options(["sweep", "--set", "a.b=1", "c.d=[1, 2]", "file.yaml", "--offline"]) == [
        "sweep", "--set", "a.b=1", "--set", "c.d=[1, 2]", "file.yaml", "--offline"]


def test_errors_map_to_exit_codes_in_one_place() -> None:
    from epure.checkpoint import CheckpointError
    from epure.evaluate import EvaluationError
    from epure.sample import SamplingError
    from epure.tracking import ArtifactError, TrackingError
    from epure.train import TrainingError

    for error in (ConfigError, CheckpointError, EvaluationError, SamplingError, ArtifactError, TrackingError,
                  TrainingError, sweeping.SweepError):
        with pytest.raises(typer.Exit) as caught, cli.reported_errors():
            raise error("what is wrong")
        assert caught.value.exit_code == 2
    with pytest.raises(ZeroDivisionError), cli.reported_errors():  # a bug keeps its traceback
        raise ZeroDivisionError
    assert cli.signal_exit_code("SIGINT") == 130 and cli.signal_exit_code("SIGTERM") == 143
