"""Evaluation end to end on a tiny trained model, the metric plumbing on known data, and the CLI commands."""

from __future__ import annotations

import json
import math
from itertools import combinations

import numpy as np
import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from epure.checkpoint import load_model
from epure.cli import app
from epure.data import ConditionNormalizer, load_split
from epure.data.dimensions import achievable_dimensions
from epure.evaluate import (KNN, EvaluationError, EvaluationOptions, _inference_copy,
                            comparison_table, completion_diversity, dimension_errors, distribution_scores,
                            diversity_scores, evaluate, halves, load_evaluation, ood_conditions, render_tables,
                            training_split, write_evaluation)
from epure.metrics import binarize, dice, holes, iou
from epure.sample import complete
from epure.train import train

from factories import TOY_COMPONENTS, sandbox_wandb, synthetic_dataset, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_MODEL = {"model.nf": 4, "model.nf_max": 8, "model.latent_dim_w": 2, "model.latent_dim_z": 2,
              "model.latent_dim_u": 4, "train.max_steps": 3}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(run directory, test split) of a tiny model trained for 3 steps on 70 synthetic designs (14 of them
    test: two halves of 7, enough for k-NN manifolds of k = 5), 3 components."""
    base = tmp_path_factory.mktemp("evaluate")
    with pytest.MonkeyPatch.context() as patch:  # module scope runs before the per-test cache fixture
        patch.setenv("EPURE_CACHE_DIR", str(base / "cache"))
        root = synthetic_dataset(base / "data", n=70)
        cfg = tiny_config(root, base / "out", TOY_COMPONENTS, **TINY_MODEL)
        torch.manual_seed(0)
        run_dir = train(cfg).run_dir
        split = load_split(root, "test", cfg.data)
    return run_dir, split


def test_evaluate_end_to_end(trained) -> None:
    run_dir, split = trained
    loaded = load_model(run_dir)
    train_split = training_split(loaded)
    result = evaluate(loaded, split, EvaluationOptions(subsets=True, ood=True, bootstrap=20, draws=3), train_split)
    m = len(TOY_COMPONENTS)
    assert result.observed == [*TOY_COMPONENTS, "group_nc+group_km", "group_nc+fpu", "group_km+fpu",
                               "group_nc+group_km+fpu"]
    assert result.iou.shape == result.dice.shape == (len(result.observed), m)
    assert ((0 <= result.iou) & (result.iou <= result.dice + 1e-12) & (result.dice <= 1)).all()  # Dice >= IoU

    flat = result.flat()
    pairs = [f"{a}+{b}" for a, b in combinations(TOY_COMPONENTS, 2)]
    expected = {"eval/cross_iou", "eval/self_iou", "eval/cross_dice", "eval/self_dice",
                "eval/cross_iou/group_nc->fpu", "eval/dice/group_nc+fpu->group_km", "eval/uncond/union_one_piece",
                "eval/uncond/all_one_piece", "eval/uncond/union_solid", "eval/real/union_solid",
                "eval/uncond/w_union_pieces", "eval/real/union_one_piece",
                "eval/real/all_one_piece", "eval/real/width_mae", "eval/dims/width_mae", "eval/dims/height_mae",
                *(f"eval/uncond/w_overlap_iou/{p}" for p in pairs),
                *(f"eval/uncond/w_com_{axis}/{c}" for axis in "yx" for c in TOY_COMPONENTS)}
    assert expected <= set(flat)
    assert sum(k.startswith("eval/cross_iou/") for k in flat) == len(result.observed) * m
    assert {k.removeprefix("eval/uncond_std/") for k in flat if k.startswith("eval/uncond_std/")} == set(result.uncond)
    assert flat["eval/cross_iou"] == pytest.approx(result.iou[:m][~np.eye(m, dtype=bool)].mean())
    assert flat["eval/self_iou"] == pytest.approx(np.diag(result.iou[:m]).mean())
    for name in ("union_one_piece", "all_one_piece"):
        assert 0 <= flat[f"eval/uncond/{name}"] <= 1
    assert loaded.exclusive_components and flat["eval/uncond/union_solid"] == 1.0  # design_masks fills holes
    real_union = binarize(split.images).any(axis=1)
    assert flat["eval/real/union_solid"] == pytest.approx(1 - holes(real_union).any(axis=(1, 2)).mean())
    assert flat["eval/real/union_one_piece"] == 1.0 and flat["eval/real/all_one_piece"] == 1.0  # synth guarantees
    assert all(v >= 0 for k, v in result.uncond.items() if k.startswith("w_") and math.isfinite(v))
    assert 0 <= flat["eval/dims/width_mae"] <= 64 and 0 <= flat["eval/dims/height_mae"] <= 65
    requested = {column.removesuffix("_px") for column in result.info["ood_values"]}
    assert requested == {name.removesuffix("_mae") for name in result.dims_ood}
    assert result.dims_ood and all(v >= 0 for v in result.dims_ood.values())
    assert result.info["examples"] == len(split)
    assert result.info["seconds"]["total"] > 0

    assert result.info["train_designs"] == len(train_split) == 56
    shares = ["precision", "recall", "coverage", "pairwise_iou", "nearest_train_iou", "memorised",
              *(f"completion_iou/{c}" for c in TOY_COMPONENTS), "completion_iou"]
    for name in shares:  # the model's values and, under eval/real/, the real designs' own
        assert 0 <= flat[f"eval/diversity/{name}"] <= 1 and 0 <= flat[f"eval/real/{name}"] <= 1, name
    assert flat["eval/diversity/density"] >= 0 and flat["eval/real/density"] >= 0
    assert flat["eval/real/memorised"] == 0.0  # synthetic test designs are no copies of training ones
    assert flat["eval/diversity/completion_iou"] == pytest.approx(
        np.mean([flat[f"eval/diversity/completion_iou/{c}"] for c in TOY_COMPONENTS]))


def test_batches_add_up_to_the_whole(trained) -> None:
    """The reconstruction IoU (deterministic with posterior means) is the same in uneven batches and by hand."""
    run_dir, split = trained
    loaded = load_model(run_dir)
    small = evaluate(loaded, split, EvaluationOptions(use_mean=True, batch_size=3, bootstrap=0))
    whole = evaluate(loaded, split, EvaluationOptions(use_mean=True, batch_size=len(split), bootstrap=0))
    np.testing.assert_allclose(np.diag(small.iou), np.diag(whole.iou), atol=1e-9)
    truth = binarize(split.images)
    for m in range(len(TOY_COMPONENTS)):
        (probs,) = complete(loaded, split.images, split.conditions, [m], use_mean=True, batch_size=len(split))
        made = probs[:, m] > loaded.threshold  # the threshold training calibrated
        assert whole.iou[m, m] == pytest.approx(iou(made, truth[:, m]).mean(), abs=1e-6)
        assert whole.dice[m, m] == pytest.approx(dice(made, truth[:, m]).mean(), abs=1e-6)


def test_inference_copy_matches_and_leaves_the_model_alone(trained) -> None:
    run_dir, split = trained
    loaded = load_model(run_dir)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    fast = _inference_copy(loaded)
    assert fast.model is not loaded.model
    (a,) = complete(loaded, split.images, split.conditions, [0], seed=5, batch_size=len(split))
    (b,) = complete(fast, split.images, split.conditions, [0], seed=5, batch_size=len(split))
    np.testing.assert_allclose(a, b, atol=1e-5)
    for key, value in loaded.model.state_dict().items():
        assert value.is_contiguous() and torch.equal(value, before[key])


def test_ground_truth_against_itself_is_perfect(trained) -> None:
    _, split = trained
    real = binarize(split.images)
    assert (iou(real, real) == 1).all() and (dice(real, real) == 1).all()
    metrics, stds, real_rates = distribution_scores(real, real, TOY_COMPONENTS, n_boot=10, seed=0)
    distances = {k: v for k, v in metrics.items() if k.startswith("w_")}
    assert len(distances) == 3 + 2 * 3 + 1 and all(v == 0 for v in distances.values())
    assert all(stds[k] == 0 for k in distances)  # resampled in pairs, so every resample matches too
    assert {k: metrics[k] for k in real_rates} == real_rates


def test_halves_are_disjoint_and_equal() -> None:
    reference, query = halves(15, seed=3)
    assert len(reference) == len(query) == 7 and not set(reference) & set(query)
    assert (np.diff(reference) > 0).all() and (np.diff(query) > 0).all()
    assert [a.tolist() for a in halves(15, seed=3)] == [reference.tolist(), query.tolist()]


def test_diversity_of_perfect_copies_repeats_and_training_designs(tmp_path) -> None:
    """Known answers: generated = real reaches exactly the real-vs-real values; one repeated design has
    recall near 0 and pairwise IoU 1; designs copied from the training set are all memorised."""
    root = synthetic_dataset(tmp_path / "data", n=120)
    cfg = tiny_config(root, tmp_path / "out", TOY_COMPONENTS)
    train_masks = binarize(load_split(root, "train", cfg.data).images)
    real = binarize(load_split(root, "test", cfg.data).images)
    assert len(real) == 24 and len(train_masks) == 96
    model, ceiling = diversity_scores(real.copy(), real, train_masks, seed=0)
    assert model == ceiling
    assert ceiling["memorised"] == 0.0 and 0 < ceiling["nearest_train_iou"] < 0.95
    assert 0 < ceiling["pairwise_iou"] < 0.6  # real designs differ from one another
    repeated, _ = diversity_scores(np.repeat(real[:1], len(real), axis=0), real, None, seed=0)
    assert repeated["recall"] <= 1 / 12 and repeated["coverage"] <= 0.5 and repeated["pairwise_iou"] == 1.0
    assert "memorised" not in repeated  # no training designs given
    copied, _ = diversity_scores(train_masks[: len(real)], real, train_masks, seed=0)
    assert copied["memorised"] == 1.0 and copied["nearest_train_iou"] == 1.0
    few, few_real = diversity_scores(real[: 2 * KNN], real[: 2 * KNN], None, seed=0)
    assert math.isnan(few["precision"]) and math.isnan(few_real["recall"])  # halves of 5: k = 5 impossible
    assert few["pairwise_iou"] == few_real["pairwise_iou"]


def test_completion_diversity_of_a_model_and_of_real_neighbours(trained) -> None:
    run_dir, split = trained
    loaded = load_model(run_dir)
    train_split = training_split(loaded)
    options = EvaluationOptions(draws=4, diversity_designs=5)
    model, real = completion_diversity(loaded, split, train_split, options)
    assert set(model) == set(real) == {*(f"completion_iou/{c}" for c in TOY_COMPONENTS), "completion_iou"}
    assert all(0 <= v <= 1 for v in (*model.values(), *real.values()))
    # the real spread is the pairwise IoU among the unobserved parts of the 4 nearest training designs
    from epure.metrics import mean_pairwise_iou_within
    from epure.neighbours import nearest_designs
    index = nearest_designs(train_split.images, train_split.conditions, split.images[:5], split.conditions[:5],
                            [0], 4)
    assert real["completion_iou/group_nc"] == pytest.approx(
        mean_pairwise_iou_within(binarize(train_split.images[index][:, :, 1:])))
    assert completion_diversity(loaded, split, train_split, EvaluationOptions(draws=0)) == ({}, {})
    model_only, nothing = completion_diversity(loaded, split, None, options)
    assert model_only == model and nothing == {}  # same seed, same draws; no training designs, no real spread


def test_dimension_errors_follow_the_column_names() -> None:
    masks = np.zeros((2, 2, 64, 32), dtype=bool)
    masks[0, 0, 10:20, 20:] = True  # 10 rows -> height 11; leftmost column 20 -> width 2 * 12 + 1 = 25
    masks[1, 1, 0:64, 0:] = True  # the whole grid: height 65, width 64
    columns = ["height_px", "width_px"]
    exact = np.array([[11, 25], [65, 64]], dtype=np.float32)
    assert dimension_errors(masks, exact, columns) == {"width_mae": 0.0, "height_mae": 0.0}
    assert dimension_errors(masks, exact + [[0, 2], [0, 4]], columns) == {"width_mae": 3.0, "height_mae": 0.0}
    assert dimension_errors(masks, exact[:, :1], ["height_px"]) == {"height_mae": 0.0}


def test_a_shifted_design_moves_only_its_vertical_centre(trained) -> None:
    _, split = trained
    real = binarize(split.images)
    assert not real[..., -1, :].any()  # synthetic sections keep a margin, so a one-row shift loses nothing
    shifted = np.zeros_like(real)
    shifted[..., 1:, :] = real[..., :-1, :]
    metrics, _, _ = distribution_scores(shifted, real, TOY_COMPONENTS, n_boot=0, seed=0)
    for c in TOY_COMPONENTS:
        assert metrics[f"w_com_y/{c}"] == pytest.approx(1.0) and metrics[f"w_com_x/{c}"] == pytest.approx(0.0)
    assert metrics["w_union_pieces"] == 0.0
    # a vertical shift keeps the measured size
    assert dimension_errors(shifted, split.conditions, split.condition_columns) == \
        dimension_errors(real, split.conditions, split.condition_columns)


def test_achievable_dimensions_and_ood_requests() -> None:
    dims = achievable_dimensions((64, 32))
    np.testing.assert_array_equal(dims["width_px"], [*range(3, 64, 2), 64])
    np.testing.assert_array_equal(dims["height_px"], np.arange(2, 66))
    norm = ConditionNormalizer(["width_px", "height_px"], [40, 40], [5, 5], [21.0, 30.0], [64.0, 60.0])
    raw = np.array([[41, 45], [51, 50], [31, 33]], dtype=np.float32)
    requests = ood_conditions(norm, raw, (64, 32), margin=6)
    assert set(requests) == {"width_px", "height_px"}
    np.testing.assert_array_equal(requests["width_px"][:, 0], [15, 17, 19])  # odd widths below 21; none above 64
    np.testing.assert_array_equal(requests["width_px"][:, 1], raw[:, 1])
    heights = requests["height_px"][:, 1]
    assert set(heights) <= {24, 25, 26, 27, 28, 29, 61, 62, 63, 64, 65}
    full = ConditionNormalizer(["width_px", "height_px"], [40, 40], [5, 5], [3.0, 30.0], [64.0, 60.0])
    assert set(ood_conditions(full, raw, (64, 32), margin=6)) == {"height_px"}  # no width fits outside [3, 64]


def test_options_and_components_are_checked(trained) -> None:
    run_dir, split = trained
    loaded = load_model(run_dir)
    with pytest.raises(EvaluationError, match="--joint-rule"):
        evaluate(loaded, split, EvaluationOptions(joint="sum"))
    with pytest.raises(EvaluationError, match="--limit"):
        evaluate(loaded, split, EvaluationOptions(limit=0))
    with pytest.raises(EvaluationError, match="--draws"):
        evaluate(loaded, split, EvaluationOptions(draws=1))
    with pytest.raises(EvaluationError, match="--candidates must be at least 1"):
        evaluate(loaded, split, EvaluationOptions(candidates=0))
    loaded.components = ["group_nc", "fpu", "group_km"]
    with pytest.raises(EvaluationError, match="components"):
        evaluate(loaded, split, EvaluationOptions())


def test_one_model_scored_with_either_completion_rule(trained, tmp_path) -> None:
    """--cross-prior scores the same trained model with p(w) or r(w) for the unobserved private latents, as if
    its config said so; the rule used is recorded. Completions differ between the rules, nothing else."""
    run_dir, split = trained
    loaded = load_model(run_dir)
    assert loaded.config.model.cross_prior == "prior"
    with torch.no_grad():  # r(w) far from p(w): scales 2 and ~0 (softmax x 2)
        loaded.model.aux_raw_scale.copy_(torch.tensor([[8.0, -8.0]]).expand_as(loaded.model.aux_raw_scale))
    (by_prior,) = complete(loaded, split.images, split.conditions, [0], batch_size=len(split))
    (by_aux,) = complete(loaded, split.images, split.conditions, [0], batch_size=len(split), cross_prior="aux")
    assert np.abs(by_prior[:, 1:] - by_aux[:, 1:]).max() > 1e-4
    np.testing.assert_array_equal(by_prior[:, 0], by_aux[:, 0])  # the observed one's reconstruction: same draws
    options = EvaluationOptions(limit=6, bootstrap=0)
    scored = evaluate(loaded, split, EvaluationOptions(limit=6, bootstrap=0, cross_prior="aux"))
    loaded.config.model.cross_prior = "aux"  # the model's own config says aux
    stored = evaluate(loaded, split, options)
    assert scored.info["cross_prior"] == stored.info["cross_prior"] == "aux"
    np.testing.assert_array_equal(scored.iou, stored.iou)
    np.testing.assert_equal(scored.uncond, stored.uncond)  # NaN (an empty component's centre) equals NaN
    np.testing.assert_equal(scored.diversity, stored.diversity)
    # completion diversity draws its completions under the rule asked for too
    first = split.subset(np.arange(6))
    spread = {rule: completion_diversity(loaded, first, None, EvaluationOptions(cross_prior=rule))[0]
              for rule in ("prior", "aux")}
    assert spread["prior"]["completion_iou"] != spread["aux"]["completion_iou"]
    assert spread["aux"]["completion_iou"] == scored.diversity["completion_iou"]
    with pytest.raises(EvaluationError, match="--cross-prior"):
        evaluate(loaded, split, EvaluationOptions(cross_prior="r"))

    res = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(run_dir), "--limit", "4", "--bootstrap", "0",
                                   "--cross-prior", "aux", "--out", str(tmp_path / "aux.json"), "--device", "cpu"],
                             env={"COLUMNS": "300"})
    assert res.exit_code == 0, res.output
    info = json.loads((tmp_path / "aux.json").read_text())["info"]
    assert info["cross_prior"] == "aux" and info["options"]["cross_prior"] == "aux"
    assert "unobserved private latents from r(w)" in res.output


def test_json_and_tables(trained, tmp_path) -> None:
    run_dir, split = trained
    loaded = load_model(run_dir)
    result = evaluate(loaded, split, EvaluationOptions(limit=4, bootstrap=5))
    result.uncond["w_undefined"] = float("nan")
    written = write_evaluation(result, loaded, split, tmp_path / "e" / "metrics.json")
    assert [p.name for p in written] == ["metrics.json", "metrics_completions.png", "metrics_samples.png"]
    data = json.loads(written[0].read_text())  # strict JSON: NaN became null
    assert data["metrics"]["eval/uncond/w_undefined"] is None
    assert len(data["iou"]) == 3 and all(len(row) == 3 for row in data["iou"])
    assert data["info"]["examples"] == 4 and data["run"] == loaded.run_name
    label, metrics = load_evaluation(written[0])
    assert label == loaded.run_name and metrics["eval/cross_iou"] == pytest.approx(result.flat()["eval/cross_iou"])
    console = Console(record=True, width=200)
    render_tables(result, console)
    text = console.export_text()
    assert "eval/cross_iou" in text and "eval/uncond/w_com_y/fpu" in text and "eval/diversity/recall" in text
    assert "group_nc+group_km+fpu" not in text  # no subset rows without --subsets


def test_comparison_table_layout() -> None:
    a = {"eval/cross_iou": 0.5, "eval/cross_iou/a->b": 0.4, "eval/uncond/w_com_y/a": 1.25,
         "eval/uncond_std/w_com_y/a": 0.125}
    b = {"eval/cross_iou": 0.75, "eval/uncond/w_com_y/a": None}
    console = Console(record=True, width=200)
    console.print(comparison_table([("run", a), ("run", b)]))
    text = console.export_text()
    assert "run [1]" in text and "run [2]" in text
    assert "1.250 ± 0.125" in text and "0.750" in text and "–" in text
    assert "a->b" not in text and "uncond_std" not in text
    console = Console(record=True, width=200)
    console.print(comparison_table([("x", a)], show_all=True))
    assert "eval/cross_iou/a->b" in console.export_text()


def test_cli_evaluate_and_compare(trained, tmp_path) -> None:
    run_dir, _ = trained
    runner = CliRunner()
    res = runner.invoke(app, ["evaluate", "--checkpoint", str(run_dir), "--limit", "10", "--bootstrap", "10",
                              "--device", "cpu"])
    assert res.exit_code == 0, res.output
    default = run_dir / "eval" / "metrics.json"
    assert json.loads(default.read_text())["info"]["examples"] == 10  # --limit 10 of the 14 test designs
    assert (run_dir / "eval" / "metrics_completions.png").is_file()
    assert "eval/cross_iou" in res.output

    other = tmp_path / "seed1.json"
    res = runner.invoke(app, ["evaluate", "--checkpoint", str(run_dir), "--limit", "5", "--seed", "1",
                              "--bootstrap", "0", "--out", str(other), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["compare", str(run_dir), str(other)])
    assert res.exit_code == 0, res.output
    assert "eval/cross_iou" in res.output and "[2]" in res.output

    res = runner.invoke(app, ["compare", str(tmp_path)])
    assert res.exit_code == 2 and "evaluation file not found" in res.output
    res = runner.invoke(app, ["evaluate", "--checkpoint", str(run_dir), "--joint-rule", "sum"])
    assert res.exit_code == 2 and "--joint-rule" in res.output
    res = runner.invoke(app, ["evaluate"])
    assert res.exit_code == 2 and "--checkpoint" in res.output


def test_cli_evaluate_logs_an_evaluation_run_to_wandb(trained, tmp_path, monkeypatch) -> None:
    """Offline: a job_type=evaluate run with the training config, eval/* summary, matrix tables and pictures;
    a model trained without W&B logs nothing unless asked."""
    import wandb

    from wandb_records import OfflineRun, find_run_files

    wandb_dir = sandbox_wandb(monkeypatch, tmp_path / "wb")
    run_dir, _ = trained
    runner = CliRunner()
    try:
        res = runner.invoke(app, ["evaluate", "--checkpoint", str(run_dir), "--limit", "6", "--bootstrap", "0",
                                  "--out", str(tmp_path / "quiet.json"), "--device", "cpu"])
        assert res.exit_code == 0, res.output
        assert find_run_files(wandb_dir) == []  # trained without W&B, and --wandb not given

        out = tmp_path / "logged.json"
        res = runner.invoke(app, ["evaluate", "--checkpoint", str(run_dir), "--limit", "6", "--bootstrap", "0",
                                  "--out", str(out), "--device", "cpu", "--wandb", "offline"])
        assert res.exit_code == 0, res.output
        assert "wandb sync" in res.output
    finally:
        wandb.teardown()
    run = OfflineRun.from_wandb_dir(wandb_dir)
    assert run.run.job_type == "evaluate" and run.finished and run.exit_code == 0
    assert run.config["model"]["nf"] == 4 and run.config["eval"]["limit"] == 6
    stored = json.loads(out.read_text())["metrics"]
    summary = run.summary
    # define_metric: the best over the run (here one value) for IoU/Dice (max) and errors/distances (min)
    assert summary["eval/cross_iou/max"] == pytest.approx(stored["eval/cross_iou"])
    assert summary["eval/cross_iou/group_nc->fpu/max"] == pytest.approx(stored["eval/cross_iou/group_nc->fpu"])
    assert summary["eval/dims/width_mae/min"] == pytest.approx(stored["eval/dims/width_mae"])
    assert summary["eval/uncond/union_one_piece"] == pytest.approx(stored["eval/uncond/union_one_piece"])
    goals = {m.name: [f for f in ("min", "max") if getattr(m.summary, f)] for m in run.records_of("metric")}
    assert goals["eval/cross_dice"] == ["max"] and goals["eval/dims/height_mae"] == ["min"]
    assert "eval/uncond/union_one_piece" not in goals  # a share: neither end is better
    assert {"eval/iou_matrix", "eval/dice_matrix", "eval/completion"} <= set(run.tables)
    for name in ("eval/diversity/pairwise_iou", "eval/real/memorised", "eval/diversity/completion_iou"):
        assert summary[name] == pytest.approx(stored[name])  # spreads and shares: the plain last value
    # 6 designs are too few for k-NN recall: null in the JSON, and left out of W&B rather than logged as 0
    assert stored["eval/diversity/recall"] is None and not any("diversity/recall" in k for k in summary)
    assert {"eval/completions", "eval/samples"} <= set(run.images)
