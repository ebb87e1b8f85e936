"""Incomplete designs: loading with data.missing: allow, the masked objective, synthetic data with missing PNGs."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import wandb
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

import epure.data.dataset as dataset_module
import epure.model.objectives as objectives
from epure.checkpoint import load_model
from epure.cli import app
from epure.config import ConfigError, DataConfig, config_from_dict
from epure.data import DatasetError, load_data, load_split
from epure.data.cache import cache_root
from epure.data.dimensions import measure_dimensions
from epure.data.synth import COMPONENTS as SYNTH_COMPONENTS
from epure.data.synth import dropped_components, write_synthetic_dataset
from epure.evaluate import EvaluationOptions, evaluate, render_tables
from epure.metrics import binarize, iou
from epure.model import MMVAEPlus, forward_objective, reference
from epure.model.likelihoods import log_likelihood
from epure.model.objectives import draw_latents
from epure.model.reference import StraightforwardModel
from epure.sample import complete, to_png_array
from epure.tracking import WandbTracker
from epure.train import train

from conftest import write_tiny_dataset
from factories import sandbox_wandb, tiny_config
from wandb_records import OfflineRun, find_run_file

COMPONENTS = ["group_nc", "group_km", "fpu"]
ALLOW = DataConfig(components=COMPONENTS, missing="allow")


def png(root: Path, split: str, component: str, prefix: str) -> Path:
    return root / split / component / f"{prefix}_{component}.png"


def cache_files() -> list[Path]:
    folder = cache_root() / "datasets"
    return sorted(folder.iterdir()) if folder.exists() else []


def load_error(root: Path, split: str, cfg: DataConfig) -> str:
    with pytest.raises(DatasetError) as info:
        load_split(root, split, cfg)
    assert cache_files() == [], "a failed load left a cache behind"
    return str(info.value)


@pytest.fixture
def cli(monkeypatch):
    monkeypatch.setenv("COLUMNS", "4000")  # rich would wrap long paths at 80 columns
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


# ------------------------------------------------------------------------------------------------ data


def test_missing_files_are_zeros_and_unavailable_with_allow(tiny_dataset, monkeypatch):
    root = tiny_dataset(n=12, components=COMPONENTS, n_test=2)  # train d0000..d0009
    complete = load_split(root, "train", DataConfig(components=COMPONENTS), use_cache=False)
    gone = {("d0001", "group_km"), ("d0004", "fpu"), ("d0004", "group_nc"), ("d0007", "fpu")}
    for prefix, component in gone:
        png(root, "train", component, prefix).unlink()
    message = load_error(root, "train", DataConfig(components=COMPONENTS))  # the default stays strict
    assert "image(s) missing" in message and "data.missing: allow" in message

    split = load_split(root, "train", ALLOW)
    expected = np.ones((10, 3), dtype=bool)
    for prefix, component in gone:
        expected[list(split.ids).index(prefix), COMPONENTS.index(component)] = False
    np.testing.assert_array_equal(split.available, expected)
    assert (split.images[~expected] == 0).all()
    np.testing.assert_array_equal(split.images[expected], complete.images[expected])
    np.testing.assert_array_equal(split.conditions, complete.conditions)  # conditions of the whole design
    assert split.availability() == {"designs": 10, "complete": 7,
                                    "components": {"group_nc": 9, "group_km": 9, "fpu": 8}}
    np.testing.assert_array_equal(split.subset(np.array([4, 1])).available, expected[[4, 1]])

    # the cache holds the mask beside the images, and a second load uses it without decoding
    (cache,) = cache_files()
    with np.load(cache) as stored:
        np.testing.assert_array_equal(stored["available"], expected)
    with monkeypatch.context() as patch:
        patch.setattr(dataset_module, "_decode", lambda *a: pytest.fail("decoded although the cache is valid"))
        again = load_split(root, "train", ALLOW)
    np.testing.assert_array_equal(again.available, expected)
    assert again.fingerprint == split.fingerprint

    # one more file gone: a new fingerprint (the listing is hashed), a new availability
    png(root, "train", "group_km", "d0009").unlink()
    third = load_split(root, "train", ALLOW)
    assert third.fingerprint != split.fingerprint
    assert not third.available[list(third.ids).index("d0009"), 1] and third.available.sum() == expected.sum() - 1


def test_a_design_with_no_file_at_all_is_an_error_naming_its_row(tiny_dataset):
    root = tiny_dataset(n=12, components=COMPONENTS, n_test=2)
    for component in COMPONENTS:
        png(root, "train", component, "d0005").unlink()
    png(root, "train", "fpu", "d0002").unlink()  # merely incomplete: fine
    message = load_error(root, "train", ALLOW)
    assert str(root / "dimensions.csv") in message
    assert "1 design(s) of split 'train' have no image for any component" in message
    assert "row 7 (id 'd0005')" in message  # data row 5 is line 7
    assert "d0002" not in message


def test_a_component_that_no_design_of_a_split_has_is_an_error_naming_it(tiny_dataset):
    root = tiny_dataset(n=12, components=COMPONENTS, n_test=3)
    for prefix in ("d0009", "d0010", "d0011"):  # every test design loses fpu; the folder stays
        png(root, "test", "fpu", prefix).unlink()
    message = load_error(root, "test", ALLOW)
    assert str(root / "test" / "fpu") in message
    assert "component 'fpu' has no image for any of the 3 designs of split 'test'" in message
    assert len(load_split(root, "train", ALLOW)) == 9  # the train split has fpu


@pytest.mark.parametrize("damage", [b"", b"not a png at all"])
def test_a_damaged_png_stays_an_error_with_allow(tiny_dataset, damage):
    root = tiny_dataset(n=12, components=COMPONENTS, n_test=2)
    png(root, "train", "group_km", "d0003").unlink()  # missing: allowed
    bad = png(root, "train", "fpu", "d0006")
    bad.write_bytes(damage)  # there but unreadable (an empty file too): never taken for a missing one
    message = load_error(root, "train", ALLOW)
    assert str(bad) in message and "unreadable or truncated image" in message


def test_missing_setting_is_validated():
    with pytest.raises(ConfigError, match=r"data.missing.*\['error', 'allow'\].*'sometimes'"):
        config_from_dict({"data": {"missing": "sometimes"}})
    assert DataConfig().missing == "error"


def test_cli_data_check_prints_availability_per_split(tiny_dataset, cli):
    root = tiny_dataset(n=14, components=COMPONENTS, n_test=4)  # 10 train, 4 test
    for prefix in ("d0000", "d0001", "d0002"):
        png(root, "train", "fpu", prefix).unlink()
    png(root, "test", "group_km", "d0012").unlink()
    strict = cli("data", "check", root, "--components", *COMPONENTS)
    assert strict.exit_code == 2 and "image(s) missing" in strict.output
    result = cli("data", "check", root, "--components", *COMPONENTS, "--missing", "allow")
    assert result.exit_code == 0, result.output
    rows = {line.split()[1]: line for line in result.stdout.splitlines() if line.startswith("│")}
    assert re.search(r"fpu\s+│\s+7 \(70\.0%\)\s+│\s+4 \(100\.0%\)", rows["fpu"]), result.stdout
    assert re.search(r"group_km\s+│\s+10 \(100\.0%\)\s+│\s+3 \(75\.0%\)", rows["group_km"]), result.stdout
    assert re.search(r"complete designs\s+│\s+7 \(70\.0%\)\s+│\s+3 \(75\.0%\)", rows["complete"]), result.stdout
    assert "dataset OK" in result.stdout


# ------------------------------------------------------------------------------------------- synthetic


def test_synth_missing_drops_files_but_keeps_one_component_per_design(tmp_path):
    whole = write_synthetic_dataset(tmp_path / "whole", n=120, seed=1)
    root = write_synthetic_dataset(tmp_path / "holes", n=120, seed=1, missing=0.5)
    table = pd.read_csv(root / "dimensions.csv", dtype={"matching": str})
    pd.testing.assert_frame_equal(table, pd.read_csv(whole / "dimensions.csv", dtype={"matching": str}))
    present = np.array([[png(root, "train" if t else "test", c, i).is_file() for c in SYNTH_COMPONENTS]
                        for i, t in zip(table["matching"], table["train"])])
    np.testing.assert_array_equal(~present, dropped_components(120, 5, 0.5, seed=1))
    assert present.any(axis=1).all()  # one component is always kept
    share = 1 - present.mean()  # expected 0.5 * 4/5 = 0.4
    assert 0.33 < share < 0.47, share
    assert 0 < present.all(axis=1).sum() < 120
    for i, t in list(zip(table["matching"], table["train"]))[:10]:  # the designs themselves are unchanged
        for c in SYNTH_COMPONENTS:
            kept = png(root, "train" if t else "test", c, i)
            if kept.is_file():
                with Image.open(kept) as a, Image.open(png(whole, "train" if t else "test", c, i)) as b:
                    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    only_one = dropped_components(50, 5, 1.0, seed=0)
    assert ((~only_one).sum(axis=1) == 1).all()
    assert not dropped_components(50, 5, 0.0, seed=0).any()


def test_cli_data_synth_missing(tmp_path, cli):
    out = tmp_path / "data"
    result = cli("data", "synth", "--out", out, "--n", 60, "--missing", 0.3)
    assert result.exit_code == 0, result.output
    assert "--missing allow" in result.output
    split = load_split(out, "train", DataConfig(missing="allow"))
    assert not split.available.all() and split.available.any(axis=1).all()
    bad = cli("data", "synth", "--out", tmp_path / "other", "--missing", 1.5)
    assert bad.exit_code == 2 and "--missing must be a probability in [0, 1]" in bad.output


# ------------------------------------------------------------------------------------------- objective


def make_model(components: list[str], seed: int = 0):
    cfg = tiny_config(None, ".", components, **{"model.latent_dim_w": 3, "model.latent_dim_z": 2,
                                                "model.latent_dim_u": 5})
    torch.manual_seed(seed)
    return MMVAEPlus(cfg.model, components, cfg.data.image_size).double()


def batch(b: int, m: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, m, 64, 32, generator=g) > 0.6).double(), torch.randn(b, 2, generator=g).double()


def brute_force_bound(model, x, c, available, beta: float, k: int, seed: int) -> torch.Tensor:
    """The mean over designs of each design's stratified bound (log-mean-exp over the K draws of each stratum,
    mean over strata), written out one design, stratum, draw and target at a time over that design's available
    components only, from the draws forward_objective makes with ``seed``."""
    fam, cfg = model.family, model.cfg
    emb = model.cond(c)
    post = StraightforwardModel(model).encode(x, emb)
    torch.manual_seed(seed)
    draws = draw_latents(model, post, k)
    bounds = []
    for b in range(len(x)):
        have = [j for j in range(model.num_components) if available[b, j]]
        strata = []
        for m in have:
            lws = []
            for s in range(k):
                z, w = draws.z[s, b, m], draws.w[s, b, m]
                lpx = 0.0
                for n in have:
                    u = torch.cat([w if n == m else draws.w_aux[s, b, m, n], z])[None]
                    logits = reference.decoder(model.decoders[n], u, emb[b: b + 1])[0]
                    lpx = lpx + log_likelihood(logits, x[b, n], cfg.likelihood, cfg.likelihood_scale,
                                               cfg.foreground_weight)
                experts = torch.stack([fam.log_density(z, post.z_loc[b, j], post.z_scale[b, j]).sum()
                                       for j in have])
                lqz = torch.logsumexp(experts, 0) - math.log(len(have))
                lqw = fam.log_density(w, post.w_loc[b, m], post.w_scale[b, m]).sum()
                lpz = fam.log_density(z, model.prior_loc, model.prior_scale).sum()
                lpw = fam.log_density(w, model.prior_loc, model.prior_scale).sum()
                lws.append(lpx + beta * (lpz + lpw - lqz - lqw))
            lws = torch.stack(lws)
            strata.append(torch.logsumexp(lws, 0) - math.log(k))
        bounds.append(torch.stack(strata).mean())
    return torch.stack(bounds).mean()


# both objectives' loss is minus the bound (they differ in their gradients)
CASES = [("elbo", 1), ("elbo", 3), ("dreg", 3)]


def objective_value(model, x, c, available, objective: str, k: int, seed: int, beta: float = 2.5) -> torch.Tensor:
    torch.manual_seed(seed)
    return -forward_objective(StraightforwardModel(model), x, c, objective, beta, k, available=available).loss


@pytest.mark.parametrize("objective,k", CASES)
def test_on_complete_data_the_masked_objective_is_the_plain_one(objective, k, one_torch_thread):
    model = make_model(["a", "b", "c"])
    x, c = batch(3, 3)
    every = torch.ones(3, 3, dtype=torch.bool)
    plain = objective_value(model, x, c, None, objective, k, seed=5)
    masked = objective_value(model, x, c, every, objective, k, seed=5)
    reference = brute_force_bound(model, x, c, every, 2.5, k, seed=5)
    assert abs(masked - plain) <= 1e-6 * abs(plain)
    assert abs(plain - reference) <= 1e-6 * abs(reference)
    torch.manual_seed(5)
    default = forward_objective(model.float(), x.float(), c.float(), objective, 2.5, k).loss
    torch.manual_seed(5)
    all_true = forward_objective(model, x.float(), c.float(), objective, 2.5, k, available=every).loss
    assert abs(all_true - default) <= 1e-6 * abs(default)  # the fast float32 path of training, too


@pytest.mark.parametrize("objective,k", CASES)
def test_with_missing_components_the_objective_is_restricted_to_the_available_ones(objective, k, one_torch_thread):
    model = make_model(["a", "b", "c"])
    x, c = batch(4, 3, seed=1)
    available = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 1, 0], [0, 1, 1]], dtype=torch.bool)
    x = torch.where(available[:, :, None, None], x, 0)  # what the loader gives for a missing image
    value = objective_value(model, x, c, available, objective, k, seed=9)
    reference = brute_force_bound(model, x, c, available, 2.5, k, seed=9)
    assert abs(value - reference) <= 1e-6 * abs(reference)
    assert abs(value - objective_value(model, x, c, None, objective, k, seed=9)) > 1e-3 * abs(value)

    # a missing image never reaches the loss: other content there changes neither the loss nor any gradient
    filled = torch.where(available[:, :, None, None], x, torch.rand_like(x).round()).requires_grad_()
    torch.manual_seed(9)
    forward_objective(model, filled, c, objective, 2.5, k, available=available).loss.backward()
    assert filled.grad[~available].abs().max() == 0
    assert filled.grad[available].abs().max() > 0
    assert abs(objective_value(model, filled.detach(), c, available, objective, k, seed=9) - value) <= 1e-9 * abs(value)


@pytest.mark.parametrize("objective,k", [("elbo", 1), ("elbo", 2), ("dreg", 2)])
def test_a_batch_missing_one_component_trains_like_a_model_without_it(objective, k, monkeypatch, one_torch_thread):
    """The full model on designs that all lack "b" gives the loss and gradients of a model of "a" and "c" alone
    with the same weights and the same draws (the MultiVae way: leave the modality out)."""
    full = make_model(["a", "b", "c"], seed=2)
    kept = [0, 2]
    small = make_model(["a", "c"], seed=3)
    small.cond.load_state_dict(full.cond.state_dict())
    for i, j in enumerate(kept):
        small.encoders[i].load_state_dict(full.encoders[j].state_dict())
        small.decoders[i].load_state_dict(full.decoders[j].state_dict())
    with torch.no_grad():
        small.aux_raw_scale.copy_(full.aux_raw_scale[kept])
    x, c = batch(3, 3, seed=4)
    available = torch.tensor([[1, 0, 1]] * 3, dtype=torch.bool)

    torch.manual_seed(11)
    out_full = forward_objective(full, x, c, objective, 2.5, k, available=available)
    out_full.loss.backward()
    with torch.no_grad():  # the noise behind those draws, to give the small model the very same
        torch.manual_seed(11)
        post = full.encode(x, full.cond(c))
        drawn = draw_latents(full, post, k)
        noise_w = ((drawn.w - post.w_loc) / post.w_scale)[:, :, kept]
        noise_z = ((drawn.z - post.z_loc) / post.z_scale)[:, :, kept]
        noise_aux = (drawn.w_aux / full.aux_scale())[:, :, kept][:, :, :, kept]

    def same_draws(model, post, k_, share=None):
        return objectives.LatentDraws(post.w_loc + post.w_scale * noise_w, post.z_loc + post.z_scale * noise_z,
                                      noise_aux * model.aux_scale())

    monkeypatch.setattr(objectives, "draw_latents", same_draws)
    out_small = forward_objective(small, x[:, kept], c, objective, 2.5, k)
    out_small.loss.backward()
    assert abs(out_full.loss - out_small.loss) <= 1e-9 * abs(out_small.loss)
    pairs = [(full.cond, small.cond)] + [(full.encoders[j], small.encoders[i]) for i, j in enumerate(kept)] + \
            [(full.decoders[j], small.decoders[i]) for i, j in enumerate(kept)]
    for big, little in pairs:
        for p, q in zip(big.parameters(), little.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(full.aux_raw_scale.grad[kept], small.aux_raw_scale.grad, rtol=1e-7, atol=1e-10)
    for unused in (full.decoders[1], full.encoders[1]):  # "b" is in no design: its networks learn nothing
        assert all(p.grad is None or p.grad.abs().max() == 0 for p in unused.parameters())


# ------------------------------------------------------------------------ training, sampling, evaluation

TINY_MODEL = {"model.nf": 4, "model.nf_max": 8, "model.latent_dim_w": 2, "model.latent_dim_z": 2,
              "model.latent_dim_u": 4, "train.max_steps": 3, "train.batch_size": 8}
# test designs d0028..d0039 and the components each lacks
TEST_GAPS = {"d0032": ["group_km"], "d0033": ["fpu"], "d0034": ["group_nc", "fpu"], "d0035": ["group_km", "fpu"],
             **{f"d{i:04d}": ["group_nc"] for i in range(36, 40)}}


@pytest.fixture(scope="module")
def incomplete(tmp_path_factory):
    """A tiny model trained (offline W&B) on 28 train designs of which half lack one component; its run and
    the incomplete test split (4 complete designs of 12)."""
    base = tmp_path_factory.mktemp("incomplete")
    root = write_tiny_dataset(base / "data", n=40, components=COMPONENTS, n_test=12)
    for i in range(0, 28, 2):
        png(root, "train", COMPONENTS[(i // 2) % 3], f"d{i:04d}").unlink()
    for prefix, gaps in TEST_GAPS.items():
        for component in gaps:
            png(root, "test", component, prefix).unlink()
    with pytest.MonkeyPatch.context() as patch:  # module scope runs before the per-test cache fixture
        patch.setenv("EPURE_CACHE_DIR", str(base / "cache"))
        wandb_dir = sandbox_wandb(patch, base)
        cfg = tiny_config(root, base / "out", COMPONENTS, **TINY_MODEL, **{"data.missing": "allow"})
        tracker = WandbTracker(cfg.wandb, "offline")
        torch.manual_seed(0)
        result = train(cfg, tracker=tracker)
        tracker.finish(0)
        wandb.teardown()
        run = OfflineRun(find_run_file(wandb_dir))
        split = load_split(root, "test", cfg.data)
        strict = tiny_config(root, base / "strict", COMPONENTS, **TINY_MODEL)
        with pytest.raises(DatasetError, match="data.missing: allow"):
            train(strict)
    return result, split, run, root


def availability_of(split) -> dict[str, list[str]]:
    return {i: [c for c, a in zip(COMPONENTS, row) if not a] for i, row in zip(split.ids, split.available)}


def test_training_keeps_incomplete_designs_and_records_their_availability_in_wandb(incomplete):
    result, split, run, root = incomplete
    assert result.status == "budget" and result.step == 3 and math.isfinite(result.last_val_loss)
    assert {k: v for k, v in availability_of(split).items() if v} == TEST_GAPS
    bundle = load_data(DataConfig(root=str(root), components=COMPONENTS, missing="allow", val_fraction=0.1))
    recorded = run.config["data_availability"]
    assert recorded == {name: getattr(bundle, name).availability() for name in ("train", "val", "test")}
    assert recorded["train"]["designs"] + recorded["val"]["designs"] == 28
    assert recorded["train"]["complete"] + recorded["val"]["complete"] == 14  # half the train designs lack one
    assert recorded["test"] == {"designs": 12, "complete": 4, "components": {"group_nc": 7, "group_km": 10, "fpu": 9}}


def test_sample_components_available_completes_each_design_from_what_it_has(incomplete, tmp_path, cli):
    result, split, _, _ = incomplete
    out = tmp_path / "samples"
    res = cli("sample", "--checkpoint", result.run_dir, "--mode", "inpainting", "--components", "available",
              "--out", out)
    assert res.exit_code == 0, res.output
    folder = out / "available"
    for component in COMPONENTS:  # one file per design and component: a reconstruction or a completion
        assert sorted(p.name for p in (folder / component).glob("*.png")) == [f"{i}_{component}.png" for i in split.ids]
    observed = pd.read_csv(folder / "observed.csv", dtype={"id": str})
    assert list(observed["id"]) == list(split.ids)
    np.testing.assert_array_equal(observed[COMPONENTS].to_numpy().astype(bool), split.available)
    assert (folder / "grid.png").is_file()
    # the folder's record: each design's own components, measured as written; the folder is this run's only
    record = pd.read_csv(folder / "samples.csv", dtype={"matching": str, "observed": str})
    assert list(record["matching"]) == list(split.ids) and (record["mode"] == "inpainting").all()
    assert list(record["observed"]) == ["+".join(c for c, a in zip(COMPONENTS, row) if a) for row in split.available]
    for row in record.itertuples():
        masks = np.stack([np.asarray(Image.open(folder / c / f"{row.matching}_{c}.png")) for c in COMPONENTS])
        assert (row.measured_width_px, row.measured_height_px) == tuple(
            int(v[0]) for v in measure_dimensions(masks.max(axis=0)[None]))
    assert json.loads((folder / "sample.json").read_text())["observed"] == "available"
    again = cli("sample", "--checkpoint", result.run_dir, "--mode", "inpainting", "--components", "available",
                "--out", out)
    assert again.exit_code == 2 and "--overwrite" in again.output
    # d0034 has only group_km: all three files come from group_km alone
    loaded = load_model(result.run_dir, torch.device("cpu"))
    i = list(split.ids).index("d0034")
    (expected,) = complete(loaded, split.images[[i]], split.conditions[[i]], [1])
    for m, component in enumerate(COMPONENTS):
        with Image.open(folder / component / f"d0034_{component}.png") as image:
            np.testing.assert_array_equal(np.asarray(image), to_png_array(expected, False)[0, m])


def test_sample_named_components_on_incomplete_data_uses_the_designs_that_have_them(incomplete, tmp_path, cli):
    result, split, _, root = incomplete
    out = tmp_path / "samples"
    res = cli("sample", "--checkpoint", result.run_dir, "--mode", "inpainting", "--components", "group_nc",
              "fpu", "--out", out)
    assert res.exit_code == 0, res.output
    gaps = availability_of(split)
    for observed in ("group_nc", "fpu"):
        having = [i for i in split.ids if observed not in gaps[i]]
        for target in COMPONENTS:
            assert sorted(p.name for p in (out / observed / target).glob("*.png")) == \
                [f"{i}_{target}.png" for i in having]
        listed = pd.read_csv(out / observed / "samples.csv", dtype={"matching": str})
        assert list(listed["matching"]) == having and (listed["observed"] == observed).all()
    res = cli("sample", "--checkpoint", result.run_dir, "--mode", "inpainting", "--components", "group_km", "fpu",
              "--joint", "--out", out)
    assert res.exit_code == 0, res.output
    both = [i for i in split.ids if not {"group_km", "fpu"} & set(gaps[i])]
    assert sorted(p.stem for p in (out / "group_km+fpu" / "group_nc").glob("*.png")) == \
        [f"{i}_group_nc" for i in both]
    # no design of this data has both group_nc and group_km
    for prefix in ("d0028", "d0029", "d0030", "d0031", "d0033"):
        png(root, "test", "group_km", prefix).unlink()
    res = cli("sample", "--checkpoint", result.run_dir, "--mode", "inpainting", "--components", "group_nc",
              "group_km", "--joint", "--out", tmp_path / "none")
    assert res.exit_code == 2
    assert "no design of the data has group_nc and group_km" in " ".join(res.output.split())


def test_evaluate_scores_only_the_targets_that_exist_and_counts_them(incomplete):
    result, split, _, _ = incomplete
    loaded = load_model(result.run_dir, torch.device("cpu"))
    scores = evaluate(loaded, split, EvaluationOptions(use_mean=True, subsets=True, bootstrap=0))
    a = split.available
    for r, label in enumerate(scores.observed):
        observed = [COMPONENTS.index(c) for c in label.split("+")]
        having = a[:, observed].all(axis=1)
        np.testing.assert_array_equal(scores.scored[r], a[having].sum(axis=0), err_msg=label)
        assert scores.flat()[f"eval/scored/{label}->fpu"] == a[having, 2].sum()
    truth = binarize(split.images)
    for m in range(3):  # by hand: complete the designs that have m, score each target where it exists
        rows = np.flatnonzero(a[:, m])
        (probs,) = complete(loaded, split.images[rows], split.conditions[rows], [m], use_mean=True,
                            batch_size=len(rows))
        for t in range(3):
            there = a[rows, t]
            expected = iou(probs[there, t] > loaded.threshold, truth[rows][there, t]).mean()
            assert scores.iou[m, t] == pytest.approx(expected, abs=1e-9), (m, t)
    # whole-design metrics compare generated designs with the 4 complete ones only (a missing component
    # would count as a section that is not in one piece)
    assert scores.info["examples"] == 12 and scores.info["complete_examples"] == 4
    assert scores.real["all_one_piece"] == 1.0
    console = Console(record=True, width=250)
    render_tables(scores, console)
    text = " ".join(console.export_text().split())
    assert "n: designs scored" in text and f"n={scores.scored[0, 1]}" in text
    assert scores.to_json()["scored"] == scores.scored.tolist()
