"""Run configuration: nested dataclasses loaded from one JSON file per run.

    cfg = load_config("configs/vit_b.json", overrides=["--optim.base_lr", "1e-4"])

Unknown keys are rejected with their dotted path named (a top-level "_comment"
string is allowed for notes); command-line overrides
use the same dotted paths; `to_dict(cfg)` gives back plain JSON that
`from_dict` reads again (it is saved with every checkpoint).
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key."""


@dataclass
class ModelConfig:
    arch: str = "vit_small"          # vit_test | vit_tiny | vit_small | vit_base | vit_large | vit_huge
    img_size: int = 224
    frozen_patch_embed: bool = True  # MoCo v3's stability trick: random patch projection, not trained
    grad_checkpointing: bool = False  # activation checkpointing of transformer blocks


@dataclass
class MoCoConfig:
    dim: int = 256                   # output of projector and predictor
    mlp_dim: int = 4096              # hidden width of both MLPs
    tau: float = 0.2                 # softmax temperature
    momentum: float = 0.99           # m0; cosine-increased to 1 when momentum_cosine
    momentum_cosine: bool = True


@dataclass
class DataConfig:
    source: str = "folder"           # folder | synthetic
    path: str = ""                   # ImageFolder-style root (labels are the class folders)
    file_list: str = ""              # optional text file: "<relative path> <label>" per line
    backend: str = "dali"            # dali | torchvision (fallback) ; synthetic ignores it
    image_size: int = 224
    crop_min: float = 0.08           # RandomResizedCrop scale=(crop_min, 1)
    jitter_prob: float = 0.8         # ColorJitter(0.4, 0.4, 0.2, 0.1) applied with this probability
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_prob: float = 0.2
    blur_prob: list = field(default_factory=lambda: [1.0, 0.1])       # view 1, view 2
    solarize_prob: list = field(default_factory=lambda: [0.0, 0.2])   # view 1, view 2
    flip_prob: float = 0.5
    num_threads: int = 8             # DALI CPU threads / torchvision workers
    synthetic_size: int = 256        # samples per epoch of the synthetic source
    seed: int = 0


@dataclass
class OptimConfig:
    name: str = "adamw"
    base_lr: float = 1.5e-4          # lr = base_lr * global_batch / 256
    weight_decay: float = 0.1
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8


@dataclass
class ScheduleConfig:
    epochs: int = 300
    warmup_epochs: float = 40
    max_steps: int = 0               # > 0: stop after this many steps (smoke runs); schedules still span `epochs`


@dataclass
class LoggingConfig:
    out_dir: str = "runs/default"
    log_every: int = 20              # reduce metrics on the device and log every N steps
    check_finite_every: int = 20     # detect a non-finite loss every N steps (one host sync per N)
    tensorboard: bool = True
    progress: bool = True


@dataclass
class CheckpointConfig:
    every_steps: int = 0             # 0: only at the end of each epoch
    every_epochs: int = 1
    keep: int = 2                    # complete checkpoints kept on disk


def _default_deepspeed() -> dict:
    return {
        "train_micro_batch_size_per_gpu": 64,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "bf16": {"enabled": "auto"},
        "zero_optimization": {"stage": 0},
    }


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    moco: MoCoConfig = field(default_factory=MoCoConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    deepspeed: dict = field(default_factory=_default_deepspeed)  # passed to deepspeed.initialize as is
    seed: int = 0


def _check_type(value: Any, tp: Any, path: str) -> Any:
    """Return `value` converted to `tp` where that is lossless, else raise naming `path`."""
    origin = typing.get_origin(tp)
    if tp is Any or tp is dict or origin is dict:
        if tp is not Any and not isinstance(value, dict):
            raise ConfigError(f"{path}: expected an object, got {type(value).__name__}")
        return value
    if tp is list or origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__}")
        return list(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


def from_dict(d: dict, cls: type = Config, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict; unknown keys raise ConfigError."""
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix or '<root>'}: expected an object, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        where = prefix + "." if prefix else ""
        raise ConfigError(f"unknown config key {where}{unknown[0]!s} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in d.items():
        path = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(value, tp, path)
        else:
            kwargs[name] = _check_type(value, tp, path)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a bare string such as a path


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """Apply `--a.b value` / `--a.b=value` pairs to nested dict `d` (in place)."""
    i = 0
    while i < len(overrides):
        arg = overrides[i]
        if not arg.startswith("--"):
            raise ConfigError(f"override {arg!r}: expected --section.key value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(overrides):
                raise ConfigError(f"override --{key}: missing value")
            value = overrides[i + 1]
            i += 1
        i += 1
        node = d
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override --{key}: {part} is not a section")
        node[parts[-1]] = _parse_value(value)
    return d


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    d: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
    d = {k: v for k, v in d.items() if k != "_comment"}  # JSON has no comments: one documented key
    base = to_dict(Config())
    _deep_merge(base, d, "")
    apply_overrides(base, overrides or [])
    return from_dict(base)


def _deep_merge(base: dict, new: dict, prefix: str) -> None:
    """Merge `new` into the defaults `base`; the `deepspeed` section replaces, not merges."""
    for k, v in new.items():
        path = f"{prefix}.{k}" if prefix else k
        if k not in base and prefix != "deepspeed":
            base[k] = v  # from_dict names it as unknown
        elif isinstance(v, dict) and isinstance(base.get(k), dict) and path != "deepspeed":
            _deep_merge(base[k], v, path)
        else:
            base[k] = v
