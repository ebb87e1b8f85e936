"""What `epure sample` leaves behind: ids that stay inside the folder, runs that never mix, and a record of what
made every folder (samples.csv, sample.json, and with W&B a table and a `samples` artifact)."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import wandb
from PIL import Image
from typer.testing import CliRunner

import epure
from epure.checkpoint import LoadedModel, load_model
from epure.cli import app
from epure.data import load_split
from epure.data.dimensions import measure_dimensions
from epure.metrics import design_masks
from epure.sample import (Destination, SamplingError, check_ids, complete, design_composites, record_table,
                          unconditional_requests, write_completions, write_unconditional)
from epure.train import train
from epure.viz import composite

from factories import synthetic_dataset, tiny_config
from wandb_records import OfflineRun, find_run_file

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COMPONENTS = ["group_nc", "group_km", "fpu"]
WIDE = {"COLUMNS": "400"}  # rich would wrap long paths


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(run directory, dataset root) of a tiny model trained for 2 steps."""
    base = tmp_path_factory.mktemp("sampler")
    with pytest.MonkeyPatch.context() as patch:  # module scope runs before the per-test cache fixture
        patch.setenv("EPURE_CACHE_DIR", str(base / "cache"))
        root = synthetic_dataset(base / "data", n=60)
        run = train(tiny_config(root, base / "out", COMPONENTS, **{"train.max_steps": 2}))
    return run.run_dir, root


def sample(*args: str) -> str:
    result = CliRunner().invoke(app, ["sample", *args], env=WIDE)
    assert result.exit_code == 0, result.output
    return result.output


def pngs(folder: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(folder)): np.asarray(Image.open(p)) for p in sorted(folder.rglob("*.png"))}


@pytest.mark.parametrize("bad,problem", [("../../escaped", "contains a path separator"),
                                         ("..", "contains '..'"), ("a\\b", "contains a path separator"),
                                         ("", "is empty"), ("  ", "is empty"),
                                         ("bell\x07", "contains a control character"),
                                         ("ok", "repeats the id of row 2")])
def test_ids_must_be_plain_unique_names_before_anything_is_written(trained, tmp_path, bad, problem) -> None:
    run_dir, _ = trained
    requests = tmp_path / "requests" / "c.csv"
    requests.parent.mkdir()
    pd.DataFrame({"matching": ["ok", bad], "width_px": [41, 43], "height_px": [50, 52]}).to_csv(requests, index=False)
    out = tmp_path / "requests" / "out"
    result = CliRunner().invoke(app, ["sample", "--checkpoint", str(run_dir), "--conditions", str(requests),
                                      "--out", str(out)], env=WIDE)
    assert result.exit_code == 2, result.output
    assert " ".join(f"c.csv: row 3: id {bad!r} {problem}".split()) in " ".join(result.output.split())
    assert not out.exists() and sorted(p.name for p in requests.parent.iterdir()) == ["c.csv"]  # nothing written
    assert not list(tmp_path.rglob("escaped*"))


def test_check_ids_names_the_design_without_rows() -> None:
    with pytest.raises(SamplingError, match=r"the designs: design 2: id 'x/y' contains a path separator"):
        check_ids(["a", "x/y"], "the designs")
    check_ids(["0042", "a.b", "sample-1_x"], "fine")  # dots, dashes and leading zeros are plain names


def test_default_out_is_a_new_folder_for_every_run(trained, tmp_path, monkeypatch) -> None:
    run_dir, _ = trained
    monkeypatch.chdir(tmp_path)
    sample("--checkpoint", str(run_dir), "--num-samples", "3", "--seed", "1")
    sample("--checkpoint", str(run_dir), "--num-samples", "2", "--seed", "2")
    runs = sorted((tmp_path / "samples" / "mmvaeplus" / run_dir.name).iterdir())
    assert len(runs) == 2  # one timestamped folder each: nothing mixed
    counts = [len(pd.read_csv(r / "unconditional" / "samples.csv")) for r in runs]
    assert sorted(counts) == [2, 3]
    assert [json.loads((r / "unconditional" / "sample.json").read_text())["seed"] for r in runs] != [1, 1]

    class Frozen(datetime):  # two runs in the same second: the second claims <timestamp>_1
        @classmethod
        def now(cls, tz=None):
            return datetime(2026, 1, 2, 3, 4, 5)

    monkeypatch.setattr("epure.sample.datetime", Frozen)
    parent = tmp_path / "claimed"
    first, second = Destination(None, parent).claim(["unconditional"]), Destination(None, parent).claim([])
    assert (first.name, second.name) == ("2026-01-02_03-04-05", "2026-01-02_03-04-05_1")


def test_an_explicit_out_never_mixes_two_runs(trained, tmp_path) -> None:
    run_dir, _ = trained
    out = tmp_path / "o2"
    sample("--checkpoint", str(run_dir), "--num-samples", "12", "--out", str(out), "--seed", "1")
    before = pngs(out)
    result = CliRunner().invoke(app, ["sample", "--checkpoint", str(run_dir), "--num-samples", "4", "--out", str(out),
                                      "--seed", "2"], env=WIDE)
    assert result.exit_code == 2 and "--overwrite" in result.output and "already holds samples" in result.output
    after = pngs(out)
    assert after.keys() == before.keys() and all(np.array_equal(after[k], before[k]) for k in before)

    sample("--checkpoint", str(run_dir), "--num-samples", "4", "--out", str(out), "--seed", "2", "--overwrite")
    assert len(list((out / "unconditional" / "composites").glob("*.png"))) == 4  # only the second run's
    assert len(pd.read_csv(out / "unconditional" / "samples.csv")) == 4
    # another mode (another folder) may share the --out; the same observed set again may not
    sample("--checkpoint", str(run_dir), "--mode", "inpainting", "--components", "fpu", "--limit", "2",
           "--out", str(out))
    assert len(pd.read_csv(out / "unconditional" / "samples.csv")) == 4
    result = CliRunner().invoke(app, ["sample", "--checkpoint", str(run_dir), "--mode", "inpainting", "--components",
                                      "group_nc", "fpu", "--limit", "2", "--out", str(out)], env=WIDE)
    assert result.exit_code == 2 and "fpu already holds samples" in result.output.replace("\n", "")
    assert not (out / "group_nc").exists()  # refused before writing any of the run


def test_the_record_says_what_was_asked_what_came_out_and_what_made_it(trained, tmp_path) -> None:
    run_dir, _ = trained
    out = tmp_path / "rec"
    sample("--checkpoint", str(run_dir), "--num-samples", "6", "--out", str(out), "--seed", "3",
           "--condition", "height_px=50")
    folder = out / "unconditional"
    table = pd.read_csv(folder / "samples.csv", dtype={"matching": str})
    assert list(table.columns) == ["matching", "width_px", "height_px", "measured_width_px", "measured_height_px",
                                   "mode", "observed"]
    assert (table["height_px"] == 50).all() and (table["mode"] == "unconditional").all()
    loaded = load_model(run_dir)
    assert set(table["width_px"]) <= set(loaded.train_conditions[:, 0].tolist())  # widths of training rows
    for row in table.itertuples():  # measured on the written PNGs, as the dataset defines width and height
        masks = np.stack([np.asarray(Image.open(folder / c / f"{row.matching}_{c}.png")) for c in COMPONENTS])
        width, height = measure_dimensions(masks.max(axis=0)[None])
        assert (row.measured_width_px, row.measured_height_px) == (width[0], height[0])
    record = json.loads((folder / "sample.json").read_text())
    assert record["seed"] == 3 and record["mode"] == "unconditional" and record["count"] == 6
    assert record["epure_version"] == epure.__version__
    assert record["checkpoint"] == record["model"]["checkpoint"] == str(loaded.path.resolve())
    assert record["data_fingerprint"] == loaded.meta["data_fingerprint"] and record["data_fingerprint"]
    assert record["options"]["condition"] == ["height_px=50"] and record["options"]["num_samples"] == 6
    newest_png = max(p.stat().st_mtime_ns for p in folder.rglob("*.png"))
    assert newest_png <= (folder / "samples.csv").stat().st_mtime_ns <= (folder / "sample.json").stat().st_mtime_ns

    sample("--checkpoint", str(run_dir), "--mode", "inpainting", "--components", "group_km", "--limit", "3",
           "--out", str(out))
    rows = pd.read_csv(out / "group_km" / "samples.csv", dtype={"matching": str})
    split = load_split(trained[1], "test", loaded.config.data)
    assert list(rows["matching"]) == list(split.ids[:3]) and (rows["observed"] == "group_km").all()
    np.testing.assert_array_equal(rows[["width_px", "height_px"]].to_numpy(), split.conditions[:3])
    assert json.loads((out / "group_km" / "sample.json").read_text())["observed"] == ["group_km"]


def test_a_run_cut_short_leaves_a_folder_without_its_record(trained, tmp_path, monkeypatch) -> None:
    """samples.csv and sample.json come last: a run that fails in its second batch has PNGs and no record."""
    import epure.sample as sampling

    loaded = load_model(trained[0])
    raw, ids = unconditional_requests(loaded, 4, {}, None, seed=0)
    real, calls = sampling._write_pngs, []

    def disk_full_on_the_second_batch(jobs):
        calls.append(len(jobs))
        if len(calls) == 2:
            raise OSError("No space left on device")
        real(jobs)

    monkeypatch.setattr(sampling, "_write_pngs", disk_full_on_the_second_batch)
    with pytest.raises(OSError, match="No space left"):
        write_unconditional(loaded, tmp_path / "cut", raw, ids, batch_size=2)
    folder = tmp_path / "cut" / "unconditional"
    assert len(list((folder / "composites").glob("*.png"))) == 2  # the first batch was written
    assert not (folder / "samples.csv").exists() and not (folder / "sample.json").exists()
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary left behind either


def test_samples_csv_regenerates_the_same_designs(trained, tmp_path) -> None:
    run_dir, _ = trained
    first, again = tmp_path / "first", tmp_path / "again"
    sample("--checkpoint", str(run_dir), "--num-samples", "5", "--out", str(first), "--seed", "7",
           "--condition", "width_px=45.5")
    sample("--checkpoint", str(run_dir), "--conditions", str(first / "unconditional" / "samples.csv"),
           "--out", str(again), "--seed", "7")
    a, b = pngs(first), pngs(again)
    assert a.keys() == b.keys() and len(a) == 5 * 4 + 1
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    pd.testing.assert_frame_equal(pd.read_csv(first / "unconditional" / "samples.csv"),
                                  pd.read_csv(again / "unconditional" / "samples.csv"))


def test_library_writer_refuses_a_used_folder(trained, tmp_path) -> None:
    loaded: LoadedModel = load_model(trained[0])
    raw, ids = unconditional_requests(loaded, 2, {}, None, seed=0)
    write_unconditional(loaded, tmp_path / "lib", raw, ids)
    with pytest.raises(SamplingError, match="--overwrite"):
        write_unconditional(loaded, tmp_path / "lib", raw, ids)
    write_unconditional(loaded, Destination(tmp_path / "lib", overwrite=True), raw, ids)


def test_composites_show_the_design_as_binary_writes_it_whatever_the_masks(trained, tmp_path) -> None:
    """Grey masks keep the decoder's probabilities; the composite is the design itself, so it is the same
    picture with or without --binary (drawn from probabilities, shared boundaries came out as pale seams)."""
    run_dir, _ = trained
    grey, binary = tmp_path / "grey", tmp_path / "binary"
    sample("--checkpoint", str(run_dir), "--num-samples", "4", "--out", str(grey), "--seed", "3")
    sample("--checkpoint", str(run_dir), "--num-samples", "4", "--out", str(binary), "--seed", "3", "--binary")
    a, b = pngs(grey / "unconditional"), pngs(binary / "unconditional")
    masks = [name for name in a if not name.startswith("composites") and name != "grid.png"]
    assert any(not np.isin(a[name], [0, 255]).all() for name in masks)  # grey levels: the test means something
    assert all(np.isin(b[name], [0, 255]).all() for name in masks)
    composites = [name for name in a if name.startswith("composites")]
    assert len(composites) == 4
    for name in composites:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
        stack = np.stack([b[f"{c}/{Path(name).stem}_{c}.png"] for c in COMPONENTS])
        np.testing.assert_array_equal(a[name], composite(stack), err_msg=name)
    # completions too: the grid's generated composite is the same picture with or without --binary
    for out, extra in ((grey, []), (binary, ["--binary"])):
        sample("--checkpoint", str(run_dir), "--mode", "inpainting", "--components", "fpu", "--limit", "2", "--out",
               str(out), "--seed", "3", *extra)
    soft, hard = (np.asarray(Image.open(out / "fpu" / "grid.png")) for out in (grey, binary))
    last = slice(soft.shape[1] - (64 + 2) * 3, soft.shape[1])  # the last tile column (x3 scale): 64 px + padding
    np.testing.assert_array_equal(soft[:, last], hard[:, last])
    assert not np.array_equal(soft, hard)  # while the generated masks beside them differ


def test_binary_completions_decide_shared_pixels_as_unconditional_designs_do(trained, tmp_path) -> None:
    """A completion is a whole design too: --binary writes its masks through metrics.design_masks (pixels two
    unsure components share go to one of them, enclosed pixels are filled), not each component alone."""
    loaded = load_model(trained[0])
    assert loaded.exclusive_components  # synthetic designs: one material per pixel
    split = load_split(trained[1], "test", loaded.config.data)
    ids = [str(i) for i in split.ids[:6]]
    write_completions(loaded, tmp_path / "c", split.images[:6], split.conditions[:6], ids, [["fpu"]], binary=True,
                      seed=5)
    (probs,) = complete(loaded, split.images[:6], split.conditions[:6], [COMPONENTS.index("fpu")], seed=5)
    expected = design_masks(probs, True, loaded.threshold)
    written = np.stack([np.stack([np.asarray(Image.open(tmp_path / "c" / "fpu" / c / f"{i}_{c}.png")) > 127
                                  for c in COMPONENTS]) for i in ids])
    np.testing.assert_array_equal(written, expected)
    assert json.loads((tmp_path / "c" / "fpu" / "sample.json").read_text())["exclusive_components"] is True


def test_design_composites_close_the_seam_two_unsure_components_share() -> None:
    probs = np.zeros((1, 2, 4, 4), dtype=np.float32)
    probs[0, 0, :, :2], probs[0, 1, :, 3:] = 0.9, 0.9
    probs[0, :, :, 2] = 0.4  # the boundary column: each decoder 0.4 sure it is its own
    (exclusive,) = design_composites(probs, threshold=0.5, exclusive=True)
    (separate,) = design_composites(probs, threshold=0.5)
    white = np.array([255, 255, 255])
    assert not (exclusive[:, 2] == white).all(axis=-1).any()  # each boundary pixel goes to one of them
    assert (separate[:, 2] == white).all()  # thresholded apart (components that may overlap), neither owns it
    assert not (composite(probs[0])[:, 2] == white).all(axis=-1).any() and \
        (composite(probs[0])[:, 2] != exclusive[:, 2]).any()  # from probabilities: a pale mix, the old seam


def test_the_table_of_a_completion_folder_shows_its_design_without_the_seam(trained, tmp_path) -> None:
    """A completion folder has no composites/: its W&B table draws each design from the written masks, deciding
    shared pixels as its grid does, not thresholding each component alone."""
    run_dir, _ = trained
    out = tmp_path / "grey"
    sample("--checkpoint", str(run_dir), "--mode", "inpainting", "--components", "fpu", "--limit", "1", "--out",
           str(out))
    loaded = load_model(run_dir)
    assert loaded.exclusive_components and not (out / "fpu" / "composites").exists()
    ((sample_id, *_),) = pd.read_csv(out / "fpu" / "samples.csv", dtype=str).itertuples(index=False)
    masks = np.zeros((len(COMPONENTS), 64, 32), dtype=np.uint8)  # two components sharing an unsure column
    masks[0, 10:50, 4:15], masks[1, 10:50, 16:28] = 230, 230
    masks[:2, 10:50, 15] = 102  # each decoder 0.4 sure the column is its own
    for mask, c in zip(masks, COMPONENTS):
        Image.fromarray(mask).save(out / "fpu" / c / f"{sample_id}_{c}.png")
    _, rows = record_table(loaded, out / "fpu")
    picture = rows[0][-1]
    (expected,) = design_composites(masks[None] / 255.0, loaded.threshold, True)
    np.testing.assert_array_equal(picture, expected)
    white = np.array([255, 255, 255])
    assert not (picture[10:50, 15] == white).all(axis=-1).any()  # the column belongs to one of them
    assert (composite(masks > loaded.threshold * 255)[10:50, 15] == white).all()  # thresholded apart: a seam


def test_with_wandb_the_run_logs_a_table_and_a_samples_artifact(trained, tmp_path, wandb_sandbox) -> None:
    run_dir, _ = trained
    out = tmp_path / "logged"
    sample("--checkpoint", str(run_dir), "--mode", "inpainting", "--components", "fpu", "--limit", "1", "--out",
           str(out))  # an earlier run's folder under the same --out, not part of this run's artifact
    try:
        output = sample("--checkpoint", str(run_dir), "--num-samples", "3", "--out", str(out), "--wandb", "offline")
    finally:
        wandb.teardown()  # flushes the offline run file
    assert "wandb sync" in output
    run = OfflineRun(find_run_file(wandb_sandbox))
    assert run.run.job_type == "sample"
    assert run.config["model"]["checkpoint"] == str(load_model(run_dir).path)
    assert run.config["options"]["num_samples"] == 3
    assert "samples/unconditional" in run.tables
    entry = run.summary["samples/unconditional"]
    assert entry["nrows"] == 3
    table = json.loads((run.path.parent / "files" / entry["path"]).read_text())
    assert table["columns"] == ["matching", "width_px", "height_px", "measured_width_px", "measured_height_px",
                                "mode", "observed", "composite"]
    assert len(table["data"]) == 3 and [row[0] for row in table["data"]] == ["sample_00000", "sample_00001",
                                                                            "sample_00002"]
    (table_artifact,) = [a for a in run.artifacts if a.type == "run_table"]
    distinct = {a.tobytes() for a in pngs(out / "unconditional" / "composites").values()}
    # one image per distinct composite (W&B stores identical pictures once)
    assert len([p for p in table_artifact.manifest_paths if p.startswith("media/images/")]) == len(distinct)
    (logged,) = [a for a in run.artifacts if a.type == "samples"]
    assert logged.name == f"samples-{run_dir.name}"
    assert {"unconditional/samples.csv", "unconditional/sample.json", "unconditional/grid.png"} <= set(
        logged.manifest_paths)
    assert {p.split("/")[0] for p in logged.manifest_paths} == {"unconditional"}
    assert logged.metadata["model_artifact"] is None  # trained without W&B: no model artifact to use

    # a model trained without W&B is sampled without it unless asked
    before = sorted(wandb_sandbox.rglob("run-*.wandb"))
    sample("--checkpoint", str(run_dir), "--num-samples", "2", "--out", str(tmp_path / "quiet"))
    assert sorted(wandb_sandbox.rglob("run-*.wandb")) == before


def test_wandb_trouble_only_warns(trained, tmp_path, wandb_sandbox, monkeypatch) -> None:
    """A real SDK method that fails (here adding the folder to the artifact) costs the W&B record only."""
    def broken(self, *args, **kwargs):
        raise OSError("disk quota exceeded")

    monkeypatch.setattr(wandb.Artifact, "add_dir", broken)
    run_dir, _ = trained
    out = tmp_path / "kept"
    try:
        output = sample("--checkpoint", str(run_dir), "--num-samples", "2", "--out", str(out), "--wandb", "offline")
    finally:
        wandb.teardown()
    assert "could not log the samples to W&B (OSError: disk quota exceeded)" in " ".join(output.split())
    assert OfflineRun(find_run_file(wandb_sandbox)).exit_code == 1  # the W&B run is closed, marked failed
    assert len(pd.read_csv(out / "unconditional" / "samples.csv")) == 2
    assert (out / "unconditional" / "sample.json").is_file()


def test_ids_keep_their_spelling_through_files_record_and_table(trained, tmp_path) -> None:
    run_dir, _ = trained
    requests = tmp_path / "ids.csv"
    requests.write_text("matching,width_px,height_px\n0042,45,50\n7.0,47,52\n")
    out = tmp_path / "spelled"
    sample("--checkpoint", str(run_dir), "--conditions", str(requests), "--out", str(out))
    folder = out / "unconditional"
    assert (folder / "composites" / "0042.png").is_file() and (folder / "composites" / "7.0.png").is_file()
    assert pd.read_csv(folder / "samples.csv", dtype={"matching": str})["matching"].tolist() == ["0042", "7.0"]
    columns, rows = record_table(load_model(run_dir), folder, images=1)
    assert columns[-1] == "composite" and [row[0] for row in rows] == ["0042", "7.0"]
    assert rows[0][-1].shape == (64, 64, 3) and rows[1][-1] is None  # pictures for the first `images` rows only


def _design(height: int, pieces: int = 1, left: int = 12) -> np.ndarray:
    """Probabilities [2, 64, 32] of a two-component design whose union measures ``height`` px (rows 10 to
    10 + height - 2) and width 2 * (32 - left) + 1, in one piece or, with ``pieces=2``, with its second component
    detached."""
    design = np.zeros((2, 64, 32), dtype=np.float32)
    bottom = 10 + height - 2
    design[0, 10: bottom - 3, left:] = 0.9
    design[1, bottom - 3 if pieces == 1 else bottom - 1: bottom + 1, left:] = 0.8
    return design


def test_best_of_prefers_one_piece_then_the_requested_dimensions() -> None:
    from epure.sample import best_of

    columns = ["width_px", "height_px"]
    requested = np.array([[41.0, 30.0]] * 3)
    whole_exact, whole_off, broken_exact = _design(30), _design(33), _design(30, pieces=2)
    for design in (whole_exact, broken_exact):  # the constructed sizes hold
        assert [int(v[0]) for v in measure_dimensions(design.max(axis=0)[None] > 0.5)] == [41, 30]
    # row 0: a broken design of the right size loses to a whole one 3 px too tall; row 1: the exact whole
    # design wins; row 2: two equal candidates, the earlier draw is kept
    first = np.stack([broken_exact, whole_off, whole_off])
    second = np.stack([whole_off, whole_exact, whole_off * 0.99])
    chosen = best_of([first, second], requested, columns, exclusive=False, threshold=0.5)
    np.testing.assert_array_equal(chosen, np.stack([whole_off, whole_exact, whole_off]))
    # without a height column only the width and the pieces count; every candidate broken: the nearest one
    narrow = _design(30, pieces=2, left=14)
    chosen = best_of([narrow[None], broken_exact[None]], requested[:1, :1], ["width_px"], False, 0.5)
    np.testing.assert_array_equal(chosen[0], broken_exact)


def test_best_of_counts_pieces_only_in_components_whole_in_training() -> None:
    """A design of the requested size whose union is whole but whose components are each in two pieces (rows
    20 to 22 of the first taken by the second) loses to a whole one 3 px off when training never split those
    components, and wins when it did (``whole`` False: real designs split it, so may a generated one)."""
    from epure.sample import best_of

    requested = np.array([[41.0, 30.0]])
    split_exact, whole_off = _design(30), _design(33)
    split_exact[0, 20:23], split_exact[1, 20:23, 12:] = 0.0, 0.8
    assert [int(v[0]) for v in measure_dimensions(split_exact.max(axis=0)[None] > 0.5)] == [41, 30]
    for whole, expected in (([True, True], whole_off), ([True, False], whole_off), ([False, False], split_exact),
                            (None, split_exact)):
        mask = None if whole is None else np.array(whole)
        chosen = best_of([split_exact[None], whole_off[None]], requested, ["width_px", "height_px"], False, 0.5, mask)
        np.testing.assert_array_equal(chosen[0], expected)


def test_generate_keeps_the_best_of_its_draws(trained, monkeypatch) -> None:
    """generate draws ``candidates`` batches in turn from one generator and keeps, row by row, best_of's choice
    (the draws here are constructed designs of known sizes, so the right choice is known)."""
    import torch

    import epure.sample as sampling

    loaded: LoadedModel = load_model(trained[0])
    assert loaded.normalizer.columns[:2] == ["width_px", "height_px"]
    raw = np.array([[41.0, 30.0], [41.0, 33.0], [41.0, 36.0]])
    heights = iter([[33, 30, 30], [30, 33, 36], [36, 36, 33], [30, 30, 30]])  # draw k: each row's height
    calls = []

    def drawn(model, cond, generator, fitted):
        calls.append(generator)
        return torch.from_numpy(np.stack([np.concatenate([_design(h), np.zeros((1, 64, 32), np.float32)])
                                          for h in next(heights)]))

    monkeypatch.setattr(sampling, "unconditional_probabilities", drawn)
    (four,) = sampling.generate(loaded, raw, batch_size=3, candidates=4, threshold=0.5)
    expected = [_design(h) for h in (30, 33, 36)]  # rows 0 and 1 from the second draw, row 2 from the first
    np.testing.assert_array_equal(four[:, :2], np.stack(expected))
    assert len(calls) == 4 and len(set(map(id, calls))) == 1  # four draws, one random stream
    heights = iter([[33, 30, 30]])
    (one,) = sampling.generate(loaded, raw, batch_size=3, candidates=1)
    np.testing.assert_array_equal(one[:, :2], np.stack([_design(33), _design(30), _design(30)]))


def test_candidates_are_recorded_and_checked(trained, tmp_path) -> None:
    run_dir, _ = trained
    sample("--checkpoint", str(run_dir), "--num-samples", "3", "--out", str(tmp_path / "s"), "--candidates", "3")
    record = json.loads((tmp_path / "s" / "unconditional" / "sample.json").read_text())
    assert record["candidates"] == 3 and record["options"]["candidates"] == 3
    assert record["whole_components"] == load_model(run_dir).whole_components == COMPONENTS  # what best_of judged
    result = CliRunner().invoke(app, ["sample", "--checkpoint", str(run_dir), "--candidates", "0", "--out",
                                      str(tmp_path / "bad")], env=WIDE)
    assert result.exit_code == 2 and "--candidates must be at least 1" in result.output, result.output
    assert not (tmp_path / "bad").exists()


def test_sample_candidates_config_is_checked() -> None:
    from epure.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match="model.sample_candidates must be at least 1"):
        config_from_dict({"model": {"sample_candidates": 0}})
    assert config_from_dict({"model": {"sample_candidates": 4}}).model.sample_candidates == 4


def test_an_unmeasurable_width_is_named_with_the_nearest_ones(caplog) -> None:
    from epure.sample import warn_unmeasurable

    with caplog.at_level("WARNING", logger="epure.sample"):
        warn_unmeasurable({"width_px": 58.0, "height_px": 52.0}, (64, 32))
    assert [r.getMessage() for r in caplog.records] == [
        "width_px=58 cannot be measured on a 64x32 section (see epure.data.dimensions); the designs will measure "
        "the nearest: 57 or 59"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="epure.sample"):
        warn_unmeasurable({"width_px": 57.0, "height_px": 52.0}, (64, 32))  # both measurable: silent
        warn_unmeasurable({"width_px": 64.0}, (64, 32))  # a section filling the image measures 2 x 32
        warn_unmeasurable({"height_px": 80.0}, (64, 32))
    assert [r.getMessage() for r in caplog.records] == [
        "height_px=80 cannot be measured on a 64x32 section (see epure.data.dimensions); the designs will measure "
        "the nearest: 65"]
