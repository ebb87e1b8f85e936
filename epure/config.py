"""One typed configuration for everything epure does, loaded from YAML and validated once at the edge.

    >>> from epure.config import load_config, parse_overrides
    >>> load_config("small").updated(parse_overrides(["model.beta=0.5"])).model.beta
    0.5

A config file has four sections, ``data``, ``model``, ``train`` and ``wandb``; any key left out keeps the
default below. Dotted paths (``model.beta``) address single keys, from the CLI, from sweeps and in errors.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

EPURE_COMPONENTS = ["group_nc", "group_km", "bt", "fpu", "tpc"]
# A W&B Registry collection: NAME (in the model registry) or wandb-registry-REGISTRY/NAME.
REGISTRY_COLLECTION = re.compile(r"(wandb-registry-[\w.-]+/)?[\w.-]+")


class ConfigError(ValueError):
    """A configuration file or override that cannot be used, with the key and the reason."""


@dataclass
class DataConfig:
    """Where the designs are and how the dataset is laid out (the users' own format)."""

    root: str | None = None  # None: the built-in synthetic dataset, generated once into the cache
    components: list[str] = field(default_factory=lambda: list(EPURE_COMPONENTS))
    filename_pattern: str = "{prefix}_{component}.png"
    csv: str = "dimensions.csv"  # relative to root unless absolute
    id_column: str = "matching"
    condition_columns: list[str] = field(default_factory=lambda: ["width_px", "height_px"])
    split_column: str = "train"
    image_size: list[int] = field(default_factory=lambda: [64, 32])  # rows, columns
    val_fraction: float = 0.05  # share of the train split held out for validation
    val_seed: int = 0  # which designs are held out: fixed apart from train.seed, so every seed validates alike
    synthetic_n: int = 2000  # size of the built-in synthetic dataset
    synthetic_seed: int = 0
    missing: str = "error"  # error: every design needs every component's PNG | allow: incomplete designs train too


@dataclass
class ModelConfig:
    """MMVAE+ architecture and objective."""

    latent_dim_w: int = 16
    latent_dim_z: int = 16
    latent_dim_u: int = 32
    nf: int = 40
    nf_max: int = 128
    decoder_nf: int = 0  # the decoders' widths (0: nf, nf_max): they decide each pixel, the encoders only summarise
    decoder_nf_max: int = 0
    decoder_output: str = "upsample"  # upsample | pixel_shuffle: how the decoders reach the mask's resolution
    encoder_input: str = "full"  # full | pixel_unshuffle: the encoders' first convolution at 64x32, or at 32x16
    encoder_moments: bool = False  # the encoders also see each mask's shape moments (networks.mask_moments)
    cond_dim: int = 2
    cond_hidden: list[int] = field(default_factory=lambda: [128, 256])
    priorposterior: str = "Laplace"  # a latent family of epure.model.latents: Laplace | Normal
    likelihood: str = "bernoulli"  # of epure.model.likelihoods: bernoulli | continuous_bernoulli | normal | laplace
    likelihood_scale: float = 0.75  # fixed scale of the normal / laplace likelihoods
    foreground_weight: float = 1.0  # weight of occupied pixels in the bernoulli likelihood (1: the plain one)
    objective: str = "elbo"  # of epure.model.objectives: elbo | dreg (both the stratified bound for K > 1)
    beta: float = 2.5
    K: int = 1
    # sources whose stratum each design's bound is estimated from per step: 0 = every available one (the paper's
    # stratified estimator); s > 0: s of them drawn at random each step, an unbiased estimate of the same bound
    # that decodes s of the M sources (a departure from the paper: docs/model.md)
    strata_per_design: int = 0
    cross_prior: str = "prior"  # completion: unobserved components' private latents from p(w) (paper) or r_m(w) (aux)
    latent_sampler: str = "prior"  # unconditional designs' latents from the priors (paper) or the fitted prior
    fitted_prior_components: int = 1  # Gaussians in the fitted prior (fitted at the run's end; fitted_prior.py)
    fitted_prior_z: str = "best"  # best: one expert's z decodes every component; own: each component its own expert's
    fitted_prior_kept_variance: float = 1.0  # < 1: fit only the principal directions of the latents holding this share
    # unconditional designs: each the best of this many draws (in one piece first, its components as whole as in
    # every training design, then nearest the requested width and height; epure.sample.best_of); 1: every draw
    # as it comes (the paper)
    sample_candidates: int = 1
    calibrate_threshold: bool = False  # masks above the threshold validation calls for, not 0.5 (best_threshold)


@dataclass
class TrainConfig:
    """Optimisation, budget and bookkeeping."""

    epochs: int = 250
    batch_size: int = 128
    lr: float = 1e-3
    lr_schedule: str = "constant"  # constant | cosine (decays over the budget: steps, epochs or minutes)
    lr_final_fraction: float = 0.05  # cosine: the last learning rate, as a fraction of lr
    amsgrad: bool = True
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | mps
    precision: str = "auto"  # auto | fp32 | bf16 (CUDA only); auto: what measured fastest (epure.acceleration)
    compile: str = "auto"  # auto | on | off: torch.compile the networks; auto: as measured (epure.acceleration)
    val_every: int = 1  # epochs between validations
    checkpoint_every_steps: int = 0  # 0: only at epoch ends
    checkpoint_every_minutes: float = 10.0
    max_steps: int = 0  # 0: no limit
    max_minutes: float = 0.0  # 0: no limit
    max_nonfinite_steps: int = 20  # consecutive NaN/Inf losses or gradients before training stops
    grad_clip: float = 0.0  # clip the total gradient norm to this (0: off)
    output_dir: str = "outputs"


@dataclass
class WandbConfig:
    """Weights & Biases tracking. ``mode``: auto (online when logged in, else offline), online, offline, off."""

    mode: str = "auto"
    project: str = "epure"
    entity: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)
    group: str | None = None
    notes: str | None = None
    log_every_steps: int = 10
    images_every_epochs: int = 5
    log_dataset: str = "reference"  # reference | upload (also the decoded images) | off: the dataset artifact
    register: str | None = None  # W&B Registry collection the best model is linked to at the end (online)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def updated(self, overrides: dict[str, Any]) -> "Config":
        """A validated copy with dotted-key overrides applied (``{"model.beta": 1.0}``)."""
        tree = self.to_dict()
        for dotted, value in overrides.items():
            key_type(dotted)  # an unknown key names the closest one
            section, _, key = dotted.partition(".")
            tree[section][key] = value
        return config_from_dict(tree)


def dotted_keys() -> list[str]:
    """Every addressable key, e.g. ``model.beta``."""
    return [f"{name}.{f.name}" for name, cls in _SECTIONS.items() for f in dataclasses.fields(cls)]


_SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "wandb": WandbConfig}
_EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")  # 3e-4: a string to YAML 1.1
# Keys whose choices YAML 1.1 reads as booleans (``compile: on`` is True): the words they stand for.
_BOOLEAN_WORDS = {"train.compile": {True: "on", False: "off"}}


def key_type(dotted: str) -> Any:
    """The type annotation of a dotted config key; an unknown key is a ConfigError naming the closest one."""
    section, _, key = dotted.partition(".")
    hints = typing.get_type_hints(_SECTIONS[section]) if section in _SECTIONS else {}
    if key not in hints:
        raise ConfigError(f"unknown config key '{dotted}'{_suggest(dotted, dotted_keys())}")
    return hints[key]


def parse_overrides(pairs: list[str] | tuple[str, ...], option: str = "--set") -> dict[str, Any]:
    """``KEY=VALUE`` strings -> overrides for ``Config.updated``, with the dotted keys of config files and sweeps.

    A value is YAML, as in a config file (``[32, 64]``, ``null``, ``true``), and is type-checked and validated
    by ``Config.updated`` as a config file's is; a number in exponent notation (``3e-4``) is a number where the
    key takes one. A misspelt key names the closest one.

        >>> parse_overrides(["model.beta=0.5", "train.lr=3e-4"])
        {'model.beta': 0.5, 'train.lr': 0.0003}
    """
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"{option} {pair!r}: expected KEY=VALUE, e.g. model.beta=0.5")
        try:
            annotation = key_type(key)
            value = yaml.safe_load(text)
        except ConfigError as err:
            raise ConfigError(f"{option} {pair!r}: {err}") from err
        except yaml.YAMLError as err:
            raise ConfigError(f"{option} {pair!r}: the value is not valid YAML: {err}") from err
        if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()) and (
                annotation in (int, float) or float in typing.get_args(annotation)):
            value = float(value)  # an integer key takes a whole number too
        overrides[key] = value
    return overrides


def _suggest(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else f"; valid keys: {', '.join(valid)}"


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check ``value`` against a dataclass field annotation; ints are accepted for floats."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, where)
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{where}' must be a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{where}' must be a number, got {type(value).__name__} {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{where}' must be an integer, got {type(value).__name__} {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{where}' must be true or false, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{where}' must be a string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"unsupported annotation {annotation} for {where}")


def config_from_dict(tree: dict[str, Any] | None) -> Config:
    """Build and validate a Config from a nested dict; unknown keys and wrong types name the key."""
    tree = tree or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(tree).__name__}")
    sections = {}
    for name, values in tree.items():
        if name not in _SECTIONS:
            raise ConfigError(f"unknown config section '{name}'{_suggest(name, list(_SECTIONS))}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"config section '{name}' must be a mapping, got {type(values).__name__}")
        cls = _SECTIONS[name]
        hints = typing.get_type_hints(cls)
        valid = [f.name for f in dataclasses.fields(cls)]
        kwargs = {}
        for key, value in values.items():
            if key not in hints:
                raise ConfigError(
                    f"unknown config key '{name}.{key}'{_suggest(f'{name}.{key}', [f'{name}.{v}' for v in valid])}"
                )
            if isinstance(value, bool) and f"{name}.{key}" in _BOOLEAN_WORDS:
                value = _BOOLEAN_WORDS[f"{name}.{key}"][value]
            kwargs[key] = _coerce(value, hints[key], f"{name}.{key}")
        sections[name] = cls(**kwargs)
    config = Config(**sections)
    validate(config)
    return config


def model_registries() -> tuple[dict, dict, dict, tuple[str, ...], tuple[str, ...]]:
    """The registered latent families, likelihoods and objectives (name -> definition), the completion
    rules and the unconditional latent samplers, which the model keys choose from. Imported on use: the model
    package imports this module."""
    from epure.model.generation import CROSS_PRIORS, LATENT_SAMPLERS
    from epure.model.latents import FAMILIES
    from epure.model.likelihoods import LIKELIHOODS
    from epure.model.objectives import OBJECTIVES

    return FAMILIES, LIKELIHOODS, OBJECTIVES, CROSS_PRIORS, LATENT_SAMPLERS


def validate(config: Config) -> None:
    """Cross-field checks, once, before anything runs."""
    validate_data(config.data)
    validate_model(config.model, config.data)
    validate_choices(config)
    validate_train(config.train)


def validate_data(d: DataConfig) -> None:
    """The data section on its own: components, mask size, file names, split."""
    if len(d.components) < 2:
        raise ConfigError(f"data.components needs at least 2 components, got {d.components}")
    if len(set(d.components)) != len(d.components):
        raise ConfigError(f"data.components has duplicates: {d.components}")
    if len(d.image_size) != 2 or any(s <= 0 or s % 8 for s in d.image_size):
        raise ConfigError(f"data.image_size must be [rows, columns], each a positive multiple of 8, got {d.image_size}")
    if "{prefix}" not in d.filename_pattern or "{component}" not in d.filename_pattern:
        raise ConfigError(f"data.filename_pattern must contain {{prefix}} and {{component}}, got {d.filename_pattern!r}")
    if not 0.0 < d.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in (0, 1): validation needs designs of its own, "
                          f"got {d.val_fraction}")


def validate_model(m: ModelConfig, d: DataConfig) -> None:
    """Latent sizes, counts and weights of the model section, against the data it will see."""
    if m.latent_dim_u != m.latent_dim_w + m.latent_dim_z:
        raise ConfigError(
            f"model.latent_dim_u ({m.latent_dim_u}) must equal model.latent_dim_w + model.latent_dim_z "
            f"({m.latent_dim_w} + {m.latent_dim_z} = {m.latent_dim_w + m.latent_dim_z})"
        )
    if m.cond_dim != len(d.condition_columns):
        raise ConfigError(
            f"model.cond_dim ({m.cond_dim}) must equal the number of data.condition_columns {d.condition_columns}"
        )
    for key, value in [("model.latent_dim_w", m.latent_dim_w), ("model.latent_dim_z", m.latent_dim_z),
                       ("model.nf", m.nf), ("model.nf_max", m.nf_max), ("model.K", m.K),
                       ("model.fitted_prior_components", m.fitted_prior_components)]:
        if value <= 0:
            raise ConfigError(f"config key '{key}' must be positive, got {value}")
    for key, value in [("model.decoder_nf", m.decoder_nf), ("model.decoder_nf_max", m.decoder_nf_max)]:
        if value < 0:
            raise ConfigError(f"config key '{key}' must be positive, or 0 for the encoders' width, got {value}")
    if not 0 <= m.strata_per_design <= len(d.components):
        raise ConfigError(f"config key 'model.strata_per_design' must be between 0 (every component) and the "
                          f"number of components ({len(d.components)}), got {m.strata_per_design}")
    if m.foreground_weight <= 0:
        raise ConfigError(f"model.foreground_weight must be positive, got {m.foreground_weight}")
    if m.beta < 0:
        raise ConfigError(f"model.beta must be >= 0, got {m.beta}")
    if m.sample_candidates < 1:
        raise ConfigError(f"model.sample_candidates must be at least 1 (1: every draw as it comes), got "
                          f"{m.sample_candidates}")
    if not 0 < m.fitted_prior_kept_variance <= 1:
        raise ConfigError(f"model.fitted_prior_kept_variance must be in (0, 1] (1: every direction), got "
                          f"{m.fitted_prior_kept_variance}")


def validate_choices(config: Config) -> None:
    """Every key that names one of a fixed set of choices, and what depends on the choice."""
    d, m, t, w = config.data, config.model, config.train, config.wandb
    families, likelihoods, objectives, cross_priors, latent_samplers = model_registries()
    from epure.model.fitted_prior import Z_FROM  # on use, as model_registries: the model package imports this module

    choices = {
        "model.priorposterior": (m.priorposterior, list(families)),
        "model.likelihood": (m.likelihood, list(likelihoods)),
        "data.missing": (d.missing, ["error", "allow"]),
        "model.objective": (m.objective, list(objectives)),
        "model.cross_prior": (m.cross_prior, list(cross_priors)),
        "model.latent_sampler": (m.latent_sampler, list(latent_samplers)),
        "model.fitted_prior_z": (m.fitted_prior_z, list(Z_FROM)),
        "model.decoder_output": (m.decoder_output, ["upsample", "pixel_shuffle"]),
        "model.encoder_input": (m.encoder_input, ["full", "pixel_unshuffle"]),
        "train.device": (t.device, ["auto", "cpu", "cuda", "mps"]),
        "train.precision": (t.precision, ["auto", "fp32", "bf16"]),
        "train.compile": (t.compile, ["auto", "on", "off"]),
        "train.lr_schedule": (t.lr_schedule, ["constant", "cosine"]),
        "wandb.mode": (w.mode, ["auto", "online", "offline", "off"]),
        "wandb.log_dataset": (w.log_dataset, ["reference", "upload", "off"]),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"config key '{key}' must be one of {allowed}, got {value!r}")
    if w.register is not None and not REGISTRY_COLLECTION.fullmatch(w.register):
        raise ConfigError(f"wandb.register must be a W&B Registry collection name (letters, digits, '-', '_', '.'), "
                          f"or wandb-registry-REGISTRY/NAME, got {w.register!r}")
    if m.foreground_weight != 1.0 and not likelihoods[m.likelihood].foreground_weight:
        weighted = [name for name, likelihood in likelihoods.items() if likelihood.foreground_weight]
        raise ConfigError(f"model.foreground_weight applies to the {' and '.join(weighted)} likelihood only; it is "
                          f"{m.foreground_weight} with model.likelihood {m.likelihood!r}")


def validate_train(t: TrainConfig) -> None:
    """Step counts, learning rate and its schedule, clipping."""
    for key, value in [("train.batch_size", t.batch_size), ("train.epochs", t.epochs), ("train.val_every", t.val_every)]:
        if value <= 0:
            raise ConfigError(f"config key '{key}' must be positive, got {value}")
    if t.lr <= 0:
        raise ConfigError(f"train.lr must be > 0, got {t.lr}")
    if t.grad_clip < 0:
        raise ConfigError(f"train.grad_clip must be >= 0 (0: no clipping), got {t.grad_clip}")
    if not 0.0 <= t.lr_final_fraction <= 1.0:
        raise ConfigError(f"train.lr_final_fraction must be in [0, 1], got {t.lr_final_fraction}")


def builtin_config_path(name: str) -> Path:
    """Path of a config shipped with the package (``small``, ``toy``, ``mmvaeplus_default``)."""
    path = Path(str(resources.files("epure") / "configs" / f"{name}.yaml"))
    if not path.exists():
        shipped = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError(f"no built-in config '{name}'; shipped configs: {', '.join(shipped)}")
    return path


def load_config(source: str | Path | None = None) -> Config:
    """Load a YAML file, or a built-in config by name; ``None`` gives the small preset."""
    if source is None:
        source = "small"
    path = Path(source)
    if not path.is_file() and path.suffix == "" and "/" not in str(source):
        path = builtin_config_path(str(source))
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    try:
        return config_from_dict(tree)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err


def save_config(config: Config, path: Path) -> None:
    """Write the resolved config as YAML, atomically."""
    from epure.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
