"""Pretraining configuration: frozen dataclasses, presets, YAML/JSON loading with clear errors.

A config file (YAML or JSON) mirrors ``TrainConfig.to_dict()``; every key is optional::

    preset: small            # start from a training preset (paper | small | tiny), default paper
    model: tiny              # model preset name, or {preset: tiny, embed_dim: 64, ...} (preset + overrides),
                             # or a dict of ModelConfig fields without 'preset' (merged onto the base's model)
    seed: 0
    optim: {epochs: 300, batch_size: 4, lr: 5.0e-5, min_lr: 1.0e-6, warmup_epochs: 40, ...}
    masking: {strategy: alternating, lambda_start: 0.05, lambda_end: 0.95}
    data: {slab: 4, volumes: 15, crop: [64, 64], samples_per_subject: 1, ...}

The defaults are the paper's pretraining hyperparameters (Chau et al., Table 5). An unknown key raises
``ConfigError`` naming the key and the closest valid one.
"""

from __future__ import annotations

import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

CONFIG_FORMAT_VERSION = 1
MASKING_STRATEGIES = ("spatial", "diffusion", "alternating")


class ConfigError(ValueError):
    """Invalid training configuration; the message names the file/key and the fix."""


def _fail(message: str) -> None:
    raise ConfigError(message)


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and schedule hyperparameters (AdamW; schedules in ``DRoPE.training.schedules``).

    Attributes:
        epochs: training epochs.
        batch_size: samples per optimizer step and per process (global batch = batch_size x processes).
        lr: base learning rate, reached at the end of the linear warm-up.
        min_lr: learning rate at the end of the cosine decay.
        warmup_epochs: linear warm-up length in epochs (from 0 to ``lr``); may be fractional.
        weight_decay: AdamW weight decay at the start (cosine schedule) for weights (not biases/norms/tokens).
        weight_decay_end: weight decay at the end.
        betas: AdamW (beta1, beta2).
        eps: AdamW epsilon.
        grad_clip: maximum global gradient L2 norm; 0 disables clipping.
    """

    epochs: int = 300
    batch_size: int = 4
    lr: float = 5e-5
    min_lr: float = 1e-6
    warmup_epochs: float = 40.0
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            _fail(f"optim.epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            _fail(f"optim.batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            _fail(f"optim.lr must be > 0, got {self.lr}")
        if self.min_lr < 0 or self.min_lr > self.lr:
            _fail(f"optim.min_lr must be in [0, lr={self.lr:g}], got {self.min_lr:g}")
        if self.warmup_epochs < 0:
            _fail(f"optim.warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.warmup_epochs > self.epochs:
            _fail(
                f"optim.warmup_epochs ({self.warmup_epochs:g}) is longer than optim.epochs ({self.epochs}); "
                "lower warmup_epochs or raise epochs"
            )
        if self.weight_decay < 0 or self.weight_decay_end < 0:
            _fail("optim.weight_decay and optim.weight_decay_end must be >= 0")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            _fail(f"optim.betas must be two numbers in [0, 1), got {list(self.betas)}")
        if not self.eps > 0:
            _fail(f"optim.eps must be > 0, got {self.eps}")
        if self.grad_clip < 0:
            _fail(f"optim.grad_clip must be >= 0 (0 disables clipping), got {self.grad_clip}")


@dataclass(frozen=True)
class MaskingConfig:
    """Masking strategy and the loss weight ramp.

    Attributes:
        strategy: "spatial" (75% of patches hidden), "diffusion" (whole volumes hidden) or "alternating"
            (spatial and diffusion epoch by epoch); ratios are the model's.
        lambda_start: weight of the masked-patch MSE at the start (loss = lambda * masked + (1 - lambda) * visible).
        lambda_end: weight at the end (linear ramp over the run).
    """

    strategy: str = "alternating"
    lambda_start: float = 0.05
    lambda_end: float = 0.95

    def __post_init__(self) -> None:
        if self.strategy not in MASKING_STRATEGIES:
            close = difflib.get_close_matches(str(self.strategy), MASKING_STRATEGIES, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            _fail(f"masking.strategy '{self.strategy}' is unknown{hint}; choose one of {', '.join(MASKING_STRATEGIES)}")
        for name in ("lambda_start", "lambda_end"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                _fail(f"masking.{name} must be in [0, 1], got {value}")


@dataclass(frozen=True)
class DataConfig:
    """What one training sample is, drawn afresh each epoch from each subject's cached, preprocessed DWI.

    Attributes:
        slab: contiguous slices per sample along z (a multiple of the model's patch depth).
        volumes: diffusion volumes drawn per sample, without replacement (all if a subject has fewer; a batch
            keeps the smallest count among its samples).
        crop: (X, Y) in-plane crop in voxels (multiples of the patch size; zero padding where the field of view
            is smaller), or None for the whole (padded) field of view.
        samples_per_subject: samples drawn from each subject per epoch.
        min_brain_fraction: slabs are drawn among those with at least this share of brain-mask voxels (among the
            best slabs if none reaches it).
        augment_protocol: replace each sample's gradient table by a random protocol simulated from a DTI fit
            (``DRoPE.phantom``), so the model sees varied b-values and directions.
        augment_snr: SNR of the Rician noise added to simulated protocols (None: noiseless).
        spacing: resample to this isotropic voxel size in mm before patching (None: keep the acquired grid).
    """

    slab: int = 4
    volumes: int = 15
    crop: tuple[int, int] | None = None
    samples_per_subject: int = 1
    min_brain_fraction: float = 0.1
    augment_protocol: bool = False
    augment_snr: float | None = None
    spacing: float | None = None

    def __post_init__(self) -> None:
        if self.slab < 1:
            _fail(f"data.slab must be >= 1, got {self.slab}")
        if self.volumes < 1:
            _fail(f"data.volumes must be >= 1, got {self.volumes}")
        if self.crop is not None and (len(self.crop) != 2 or min(self.crop) < 1):
            _fail(f"data.crop must be null or two positive sizes [X, Y], got {self.crop}")
        if self.samples_per_subject < 1:
            _fail(f"data.samples_per_subject must be >= 1, got {self.samples_per_subject}")
        if not 0.0 <= self.min_brain_fraction <= 1.0:
            _fail(f"data.min_brain_fraction must be in [0, 1], got {self.min_brain_fraction}")
        if self.augment_snr is not None and not self.augment_snr > 0:
            _fail(f"data.augment_snr must be null or > 0, got {self.augment_snr}")
        if self.spacing is not None and not self.spacing > 0:
            _fail(f"data.spacing must be null or > 0 mm, got {self.spacing}")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a pretraining run (the command line adds only paths and runtime choices).

    Attributes:
        model: model preset name (``DRoPE.model.model_config``).
        model_overrides: ((field, value), ...) applied on top of the model preset, sorted by field.
        seed: seed of every random draw (initialisation, data, masks).
        optim / masking / data: see the section classes.
    """

    model: str = "paper"
    model_overrides: tuple[tuple[str, Any], ...] = ()
    seed: int = 0
    optim: OptimConfig = field(default_factory=OptimConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            _fail(f"model must be a model preset name, got {self.model!r}")
        object.__setattr__(self, "model_overrides", _freeze_overrides(self.model_overrides))

    @property
    def model_overrides_dict(self) -> dict[str, Any]:
        return {key: _thaw(value) for key, value in self.model_overrides}

    def with_epochs(self, epochs: int) -> "TrainConfig":
        """The same config with ``optim.epochs`` replaced.

        The warm-up is kept if it fits; if it is longer than ``epochs`` it is scaled to keep its share of the run
        (paper: 40 of 300 epochs, so ``with_epochs(30)`` warms up for 4).
        """
        optim = self.optim
        warmup = optim.warmup_epochs
        if warmup > epochs:
            warmup = warmup * epochs / optim.epochs
        return replace(self, optim=replace(optim, epochs=int(epochs), warmup_epochs=warmup))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict that ``config_from_dict`` turns back into an equal config."""
        return {
            "format_version": CONFIG_FORMAT_VERSION,
            "model": {"preset": self.model, **self.model_overrides_dict},
            "seed": self.seed,
            "optim": _section_to_dict(self.optim),
            "masking": _section_to_dict(self.masking),
            "data": _section_to_dict(self.data),
        }

    def differences(self, other: "TrainConfig") -> list[str]:
        """Dotted keys whose values differ between two configs (for resume checks)."""
        mine, theirs = _flatten(self.to_dict()), _flatten(other.to_dict())
        return sorted(key for key in set(mine) | set(theirs) if mine.get(key) != theirs.get(key))


def _section_to_dict(section) -> dict[str, Any]:
    out = {}
    for f in fields(section):
        value = getattr(section, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _freeze(value):
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    return value


def _thaw(value):
    return list(_thaw(v) for v in value) if isinstance(value, tuple) else value


def _freeze_overrides(overrides) -> tuple[tuple[str, Any], ...]:
    items = overrides.items() if isinstance(overrides, dict) else overrides
    return tuple(sorted((str(key), _freeze(value)) for key, value in items))


# ----------------------------------------------------------------------------------------------------------------
# presets

def _tiny() -> TrainConfig:
    """Trains in seconds on one small DWI (tests, smoke runs)."""
    return TrainConfig(
        model="tiny",
        optim=OptimConfig(epochs=4, batch_size=2, lr=1e-3, min_lr=1e-5, warmup_epochs=1.0),
        data=DataConfig(slab=4, volumes=7, crop=(32, 32), samples_per_subject=4),
    )


def _small() -> TrainConfig:
    """CPU-trainable config of the paper's design, used for the bundled model."""
    return TrainConfig(
        model="paper",
        model_overrides=(
            ("decoder_depth", 2), ("decoder_embed_dim", 192), ("decoder_num_heads", 3),
            ("depth", 4), ("embed_dim", 192), ("num_heads", 3),
        ),
        optim=OptimConfig(epochs=100, batch_size=4, lr=3e-4, min_lr=1e-6, warmup_epochs=5.0),
        data=DataConfig(slab=4, volumes=15, crop=(64, 64)),
    )


TRAIN_PRESETS = {"paper": TrainConfig, "small": _small, "tiny": _tiny}


def preset(name: str) -> TrainConfig:
    """The training preset ``name`` (paper | small | tiny)."""
    if name not in TRAIN_PRESETS:
        _fail(f"unknown training preset '{name}'{_did_you_mean(name, TRAIN_PRESETS)}; presets: {', '.join(TRAIN_PRESETS)}")
    return TRAIN_PRESETS[name]()


# ----------------------------------------------------------------------------------------------------------------
# loading

def _did_you_mean(key: str, valid, prefix: str = "") -> str:
    close = difflib.get_close_matches(str(key), list(valid), n=1, cutoff=0.5)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def _check_keys(data: dict, valid, where: str, prefix: str = "") -> None:
    for key in data:
        if key not in valid:
            _fail(
                f"{where}unknown key '{prefix}{key}'{_did_you_mean(key, valid, prefix)}; "
                f"valid keys{' in ' + prefix.rstrip('.') if prefix else ''}: {', '.join(sorted(valid))}"
            )


def _coerce(value, hint, key: str):
    """Convert a YAML/JSON value to the dataclass field type ``hint``; ConfigError naming ``key`` if impossible."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    try:
        if hint is bool:
            if not isinstance(value, bool):
                raise TypeError
            return value
        if hint is int:
            if isinstance(value, bool):
                raise TypeError
            number = float(value)
            if not number.is_integer():
                raise TypeError
            return int(number)
        if hint is float:
            if isinstance(value, bool):
                raise TypeError
            number = float(value)
            if not math.isfinite(number):
                raise TypeError
            return number
        if hint is str:
            if not isinstance(value, str):
                raise TypeError
            return value
        if origin is tuple:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = [value] * len(args)  # a square crop given as one number
            if not isinstance(value, (list, tuple)) or len(value) != len(args):
                raise TypeError
            return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    except (TypeError, ValueError):
        _fail(f"'{key}' must be {_describe(hint)}, got {value!r}")
    return value


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is tuple:
        plural = {int: "integers", float: "numbers"}.get(args[0], "values")
        return f"a list of {len(args)} {plural}"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _build_section(cls, base, data, where: str, name: str):
    if not isinstance(data, dict):
        _fail(f"{where}'{name}' must be a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in fields(cls)]
    _check_keys(data, valid, where, prefix=f"{name}.")
    values = {key: _coerce(value, hints[key], f"{name}.{key}") for key, value in data.items()}
    return replace(base, **values)


def config_from_dict(data: dict, *, source: str | None = None) -> TrainConfig:
    """Build a TrainConfig from a parsed config file (see the module docstring); ``source`` names the file."""
    where = f"{source}: " if source else ""
    if not isinstance(data, dict):
        _fail(f"{where}a config must be a mapping of keys to values, got {type(data).__name__}")
    data = dict(data)
    try:
        version = data.pop("format_version", CONFIG_FORMAT_VERSION)
        if version != CONFIG_FORMAT_VERSION:
            _fail(f"config format_version {version} is not supported (this DRoPE reads {CONFIG_FORMAT_VERSION})")
        valid = ["preset"] + [f.name for f in fields(TrainConfig) if f.name != "model_overrides"]
        _check_keys(data, valid, "")
        base = preset(str(data.pop("preset"))) if "preset" in data else TrainConfig()

        model, overrides = base.model, base.model_overrides_dict
        if "model" in data:
            spec = data.pop("model")
            if isinstance(spec, str):
                model, overrides = spec, {}
            elif isinstance(spec, dict):
                spec = dict(spec)
                if "preset" in spec:
                    model, overrides = str(spec.pop("preset")), {}
                overrides = {**overrides, **spec}
            else:
                _fail(f"'model' must be a model preset name or a mapping, got {spec!r}")
        values: dict[str, Any] = {"model": model, "model_overrides": overrides}
        if "seed" in data:
            values["seed"] = _coerce(data.pop("seed"), int, "seed")
        for name, cls in (("optim", OptimConfig), ("masking", MaskingConfig), ("data", DataConfig)):
            if name in data:
                values[name] = _build_section(cls, getattr(base, name), data.pop(name), "", name)
        return replace(base, **values)
    except ConfigError as error:
        if where and not str(error).startswith(where):
            raise ConfigError(f"{where}{error}") from None
        raise


def load_config(spec: str | Path | None) -> TrainConfig:
    """A training preset name (paper | small | tiny), a YAML/JSON file, or None (the paper's defaults)."""
    if spec is None:
        return TrainConfig()
    text = str(spec)
    if text in TRAIN_PRESETS:
        return preset(text)
    path = Path(text)
    if not path.is_file():
        _fail(
            f"config '{text}' is neither a training preset{_did_you_mean(text, TRAIN_PRESETS)} "
            f"({', '.join(TRAIN_PRESETS)}) nor an existing YAML/JSON file"
        )
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as error:
        _fail(f"{path}: cannot read the config file ({error.strerror or error})")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(raw)
        else:
            import yaml

            data = yaml.safe_load(raw)
    except Exception as error:  # json.JSONDecodeError, yaml.YAMLError
        _fail(f"{path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'} ({error})".replace("\n", " "))
    if data is None:
        data = {}
    return config_from_dict(data, source=str(path))


def resolve_model_config(config: TrainConfig):
    """The model's ``ModelConfig``: the preset ``config.model`` with ``config.model_overrides`` applied.

    Raises ConfigError for an unknown model preset or override key (naming the closest valid one), an invalid
    model setting, and data sizes that do not fit the model's patch size.
    """
    from DRoPE.model import PRESETS, ModelConfig, model_config

    if config.model not in PRESETS:
        _fail(f"unknown model preset '{config.model}'{_did_you_mean(config.model, PRESETS)}; presets: {', '.join(PRESETS)}")
    overrides = config.model_overrides_dict
    _check_keys(overrides, [f.name for f in fields(ModelConfig)], "", prefix="model.")
    try:
        model_cfg = model_config(config.model, **overrides)
    except (TypeError, ValueError) as error:
        _fail(f"model: {error}")
    check_data_fits_model(config.data, tuple(model_cfg.patch_size))
    return model_cfg


def check_data_fits_model(data: DataConfig, patch: tuple[int, int, int]) -> None:
    """ConfigError unless the slab and crop are multiples of the patch size (X, Y, Z)."""
    if data.slab % patch[2]:
        _fail(f"data.slab ({data.slab}) must be a multiple of the model's patch depth {patch[2]}")
    if data.crop is not None and (data.crop[0] % patch[0] or data.crop[1] % patch[1]):
        _fail(f"data.crop {list(data.crop)} must be multiples of the model's in-plane patch size {patch[:2]}")
