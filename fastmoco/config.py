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
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key."""


@dataclass
class ModelConfig:
    arch: str = "vit_small"          # vit_test | vit_tiny | vit_small | vit_base | vit_large | vit_huge
                                     # | vit_conv_small | vit_conv_base (MoCo v3's conv stem: frozen_patch_embed false)
    img_size: int = 224
    init_from: str = ""              # initial weights: a fastmoco checkpoint, an official MoCo v3 .pth.tar
                                     # or an exported backbone (.safetensors)
    frozen_patch_embed: bool = True  # MoCo v3's stability trick: random patch projection, not trained
    grad_checkpointing: bool = False  # activation checkpointing of transformer blocks
    patch_size: int = 0              # 0: the arch's (16; ViT-H 14); DINO also trains /8
    num_heads: int = 0               # 0: the arch's (MoCo v3's ViT-S: 12; DINO's ViT-S: 6)
    drop_path: float = 0.0           # stochastic depth of the online encoder / student (DINO: 0.1)
    mlp_norm: str = "ln"             # the norm before each MLP: ln | bn (ViT-BN: BatchNorm over the global batch)


@dataclass
class MoCoConfig:
    dim: int = 256                   # output of projector and predictor
    mlp_dim: int = 4096              # hidden width of both MLPs
    tau: float = 0.2                 # softmax temperature
    momentum: float = 0.99           # m0; cosine-increased to 1 when momentum_cosine
    momentum_cosine: bool = True


@dataclass
class DINOConfig:
    """DINO (method "dino"): head, temperatures, center and teacher schedules, as main_dino.py."""
    out_dim: int = 65536             # prototypes K
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    norm_last_layer: bool = True     # weight_g of the last layer fixed to 1
    student_temp: float = 0.1
    teacher_temp: float = 0.07       # after the warmup
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 30
    center_momentum: float = 0.9
    momentum_teacher: float = 0.996  # cosine-increased to 1
    freeze_last_layer: int = 1       # epochs in which the last layer's gradients are dropped (AdamW skips it)
    clip_grad: float = 3.0           # each parameter's gradient clipped to this norm on its own (0: off);
                                     # deepspeed.gradient_clipping (the global norm) must then be 0
    weight_decay_end: float = 0.4    # cosine from optim.weight_decay to this
    min_lr: float = 1e-6             # the lr cosine ends here
    global_crops: int = 2


@dataclass
class DataConfig:
    source: str = "folder"           # folder | shards | synthetic
    path: str = ""                   # ImageFolder-style root (labels are the class folders); shards: the
                                     # manifest or folder of fastmoco-make-shards (pipelines/shards.py)
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
    local_crops: int = 0             # DINO's multi-crop: this many local crops after the two global ones
    local_size: int = 96
    local_scale: list = field(default_factory=lambda: [0.05, 0.4])   # RandomResizedCrop scale of a local crop
    local_blur_prob: float = 0.5
    local_solarize_prob: float = 0.0
    interpolation: str = "linear"    # crop resize: linear (MoCo v3) | cubic (DINO)
    num_threads: int = 8             # DALI CPU threads / torchvision workers
    synthetic_size: int = 256        # samples per epoch of the synthetic source
    seed: int = 0
    shuffle_buffer: int = 1024       # shards: samples in each rank's shuffle buffer (after the shard order)
    max_bad_fraction: float = 0.01   # refuse the run when more of the files than this are unusable
    verify_images: bool = True       # decode every file once with PIL (results cached per dataset,
                                     # pipelines/folder.py): names and skips JPEGs damaged inside,
                                     # which DALI's decoder would train on
    read_timeout: float = 300.0      # seconds a file read may block (a hung filesystem) before the run
                                     # stops naming the file


@dataclass
class OptimConfig:
    name: str = "adamw"              # adamw | lars (fastmoco/optim.py)
    base_lr: float = 1.5e-4          # lr = base_lr * global_batch / 256
    weight_decay: float = 0.1
    betas: list = field(default_factory=lambda: [0.9, 0.999])   # AdamW
    eps: float = 1e-8                # AdamW
    momentum: float = 0.9            # LARS: SGD momentum of its fp32 buffer
    trust_coefficient: float = 0.001  # LARS: q = trust * ||w|| / ||update||


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


@dataclass
class EvalConfig:
    """The kNN monitor during pretraining (fastmoco/evaluation/monitor.py); off while train_path is ""."""
    train_path: str = ""             # labelled ImageFolder: the kNN memory bank
    val_path: str = ""               # labelled ImageFolder: the queries (classes a subset of train's)
    train_list: str = ""             # optional file lists "<relative path> <label>" (as data.file_list)
    val_list: str = ""
    every_epochs: int = 0            # evaluate after every N epochs (0: only at the end)
    at_start: bool = False           # also before the first step: the backbone at initialisation
    encoder: str = ""                # online | momentum; "": the method's (MoCo v3: online, DINO: teacher)
    k: list = field(default_factory=lambda: [20, 200])
    temperature: float = 0.07
    batch_size: int = 0              # per process; 0: the training micro batch
    backend: str = ""                # dali | torchvision; "": data.backend


def _default_deepspeed() -> dict:
    return {
        "train_micro_batch_size_per_gpu": 64,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "bf16": {"enabled": "auto"},
        "zero_optimization": {"stage": 0},
    }


@dataclass
class MemoryConfig:
    # Images per backbone call (fastmoco/chunked.py): the backbone runs over the micro batch in chunks
    # without autograd and again per chunk in the backward; gradients are the whole batch's. 0: off;
    # "auto": on a GPU the largest chunk that fits, measured at start and logged (the CPU: off).
    backbone_chunk: int | str = 0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: str = "moco_v3"          # moco_v3 | dino (fastmoco/methods.py)
    moco: MoCoConfig = field(default_factory=MoCoConfig)
    dino: DINOConfig = field(default_factory=DINOConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    deepspeed: dict = field(default_factory=_default_deepspeed)  # passed to deepspeed.initialize as is
    seed: int = 0


# Per field type: (accepts the JSON value, its conversion, what the error says was expected).
# bool is a subclass of int in Python, so numbers exclude it explicitly.
_TYPE_RULES = {
    dict: (lambda v: isinstance(v, dict), lambda v: v, "an object"),
    list: (lambda v: isinstance(v, (list, tuple)), list, "a list"),
    bool: (lambda v: isinstance(v, bool), lambda v: v, "true/false"),
    int: (lambda v: not isinstance(v, bool) and (isinstance(v, int) or isinstance(v, float) and v.is_integer()),
          int, "an integer"),
    float: (lambda v: not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v), float,
            "a finite number"),
    str: (lambda v: isinstance(v, str), lambda v: v, "a string"),
}


def _check_type(value: Any, tp: Any, path: str) -> Any:
    """Return `value` converted to `tp` where that is lossless, else raise naming `path`."""
    rule = _TYPE_RULES.get(typing.get_origin(tp) or tp)
    if rule is None:   # Any
        return value
    accepts, convert, expected = rule
    if not accepts(value):
        got = type(value).__name__ if tp in (dict, list) or typing.get_origin(tp) else repr(value)
        raise ConfigError(f"{path}: expected {expected}, got {got}")
    return convert(value)


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
        if not isinstance(d, dict):
            raise ConfigError(f"config file {path}: the root must be an object {{...}}, got {type(d).__name__}")
    d = {k: v for k, v in d.items() if k != "_comment"}  # JSON has no comments: one documented key
    base = to_dict(Config())
    _deep_merge(base, d, "")
    apply_overrides(base, overrides or [])
    cfg = from_dict(base)
    validate(cfg)
    return cfg


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


def _require(ok: bool, key: str, value: Any, what: str) -> None:
    if not ok:
        raise ConfigError(f"{key} must be {what}, got {value!r}")


def validate(cfg: Config) -> None:
    """Range checks of every value whose type alone does not make it usable; the key is named.

    (Choices that a module owns, such as data.source or optim.name, are checked there.)"""
    m, mo, d, o, s, lg, ck = cfg.model, cfg.moco, cfg.data, cfg.optim, cfg.schedule, cfg.logging, cfg.checkpoint
    _require(m.img_size >= 1, "model.img_size", m.img_size, ">= 1")
    _require(mo.dim >= 1, "moco.dim", mo.dim, ">= 1")
    _require(mo.mlp_dim >= 1, "moco.mlp_dim", mo.mlp_dim, ">= 1")
    _require(mo.tau > 0, "moco.tau", mo.tau, "> 0")
    _require(0 <= mo.momentum <= 1, "moco.momentum", mo.momentum, "in [0, 1]")
    _require(d.image_size >= 1, "data.image_size", d.image_size, ">= 1")
    _require(d.num_threads >= (0 if d.backend == "torchvision" else 1), "data.num_threads", d.num_threads,
             ">= 1 (DALI threads; 0 only with data.backend torchvision: load in the main process)")
    _require(d.synthetic_size >= 1, "data.synthetic_size", d.synthetic_size, ">= 1")
    _require(0 <= d.max_bad_fraction <= 1, "data.max_bad_fraction", d.max_bad_fraction, "in [0, 1]")
    _require(d.read_timeout > 0, "data.read_timeout", d.read_timeout, "> 0 (seconds)")
    _require(o.base_lr > 0, "optim.base_lr", o.base_lr, "> 0")
    _require(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, ">= 0")
    _require(len(o.betas) == 2 and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                                       for b in o.betas), "optim.betas", o.betas, "two numbers in [0, 1)")
    _require(o.eps > 0, "optim.eps", o.eps, "> 0")
    _require(0 <= o.momentum < 1, "optim.momentum", o.momentum, "in [0, 1)")
    _require(o.trust_coefficient > 0, "optim.trust_coefficient", o.trust_coefficient, "> 0")
    chunk = cfg.memory.backbone_chunk
    _require(chunk == "auto" or isinstance(chunk, int) and not isinstance(chunk, bool) and chunk >= 0,
             "memory.backbone_chunk", chunk, "an integer >= 0 (images per backbone chunk; 0: the whole micro "
             "batch at once) or \"auto\" (the largest chunk that fits the GPU)")
    _require(s.epochs >= 1, "schedule.epochs", s.epochs, ">= 1")
    _require(0 <= s.warmup_epochs <= s.epochs, "schedule.warmup_epochs", s.warmup_epochs,
             f"in [0, schedule.epochs = {s.epochs}]")
    _require(s.max_steps >= 0, "schedule.max_steps", s.max_steps, ">= 0 (0: the whole schedule)")
    _require(lg.out_dir.strip() != "", "logging.out_dir", lg.out_dir, "a non-empty path")
    _require(lg.log_every >= 1, "logging.log_every", lg.log_every, ">= 1")
    _require(lg.check_finite_every >= 1, "logging.check_finite_every", lg.check_finite_every, ">= 1")
    _require(ck.every_steps >= 0, "checkpoint.every_steps", ck.every_steps, ">= 0 (0: only at epoch ends)")
    _require(ck.every_epochs >= 0, "checkpoint.every_epochs", ck.every_epochs, ">= 0 (0: never at epoch ends)")
    _require(ck.keep >= 1, "checkpoint.keep", ck.keep, ">= 1")


# -- what a resume may change -------------------------------------------------------------------------
# Every key of the config (and the run's shape, `run.*`, which the Trainer derives: global batch, steps
# per epoch, processes, ZeRO stage, precision, the dataset's file list) is in one of four classes.
# tests/test_config.py walks every dataclass field, so a new key cannot stay unclassified.
FIXED = "fixed"            # the checkpoint's state cannot load with another value: refused, even when allowed
MUST_MATCH = "must match"  # changes what the run means: refused unless --allow-change KEY (then printed)
MAY_CHANGE = "may change"  # accepted, and printed as a change at resume
FREE = "free"              # where or how the run goes, not what it computes: not compared

_WEIGHTS = "the checkpoint's weights have other shapes or names; start a new run from them with --model.init_from"
_OPTIMIZER = "the checkpoint's optimizer state belongs to another optimizer or parameter set; start a new run " \
             "from its weights with --model.init_from"
# Why each FIXED key cannot change (by key, else by section).
FIXED_WHY = {
    "model": _WEIGHTS, "moco": _WEIGHTS, "dino": _WEIGHTS, "data.image_size": _WEIGHTS, "method": _WEIGHTS,
    "model.frozen_patch_embed": _OPTIMIZER, "dino.norm_last_layer": _OPTIMIZER, "optim.name": _OPTIMIZER,
    "run.zero_stage": "DeepSpeed's files of one ZeRO stage do not load at another",
    "run.world_size": "every process saved its own state (ZeRO partitions, data position, RNG)",
    "run.bf16": "DeepSpeed keeps the optimizer state of bf16 and fp32 training in different files",
}

RESUME_RULES: dict[str, str] = {
    "method": FIXED, "seed": MUST_MATCH,
    **{f"model.{k}": FIXED for k in ("arch", "img_size", "frozen_patch_embed", "patch_size", "mlp_norm")},
    "model.num_heads": MUST_MATCH, "model.drop_path": MUST_MATCH,
    "model.init_from": FREE,              # weights at a fresh start; a resume loads the checkpoint's
    "model.grad_checkpointing": MAY_CHANGE,   # the same math, less memory
    "memory.backbone_chunk": MAY_CHANGE,      # the same gradients, less memory
    **{f"moco.{k}": FIXED for k in ("dim", "mlp_dim")},
    **{f"moco.{k}": MUST_MATCH for k in ("tau", "momentum", "momentum_cosine")},
    **{f"dino.{k}": FIXED for k in ("out_dim", "hidden_dim", "bottleneck_dim", "norm_last_layer")},
    **{f"dino.{k}": MUST_MATCH for k in ("student_temp", "teacher_temp", "warmup_teacher_temp",
                                         "warmup_teacher_temp_epochs", "center_momentum", "momentum_teacher",
                                         "freeze_last_layer", "weight_decay_end", "min_lr", "global_crops",
                                         "clip_grad")},
    "data.image_size": FIXED,
    # The files themselves are compared as run.dataset: a moved copy of the same dataset may resume.
    "data.source": MUST_MATCH, "data.path": MAY_CHANGE, "data.file_list": MAY_CHANGE,
    "data.backend": MAY_CHANGE,           # another implementation of the same augmentations
    **{f"data.{k}": MUST_MATCH for k in ("crop_min", "jitter_prob", "brightness", "contrast", "saturation", "hue",
                                         "grayscale_prob", "blur_prob", "solarize_prob", "flip_prob",
                                         "local_crops", "local_size", "local_scale", "local_blur_prob",
                                         "local_solarize_prob", "interpolation", "synthetic_size", "seed",
                                         "shuffle_buffer")},   # shards: the order a resumed cursor replays
    "data.max_bad_fraction": MAY_CHANGE, "data.verify_images": MAY_CHANGE,
    "data.num_threads": FREE, "data.read_timeout": FREE,
    "optim.name": FIXED,
    **{f"optim.{k}": MUST_MATCH for k in ("base_lr", "weight_decay", "betas", "eps", "momentum",
                                          "trust_coefficient")},
    "schedule.epochs": MUST_MATCH, "schedule.warmup_epochs": MUST_MATCH,
    "schedule.max_steps": FREE,           # where this invocation stops; the schedules span schedule.epochs
    **{f"logging.{k}": FREE for k in ("out_dir", "log_every", "check_finite_every", "tensorboard", "progress")},
    **{f"checkpoint.{k}": FREE for k in ("every_steps", "every_epochs", "keep")},
    **{f"eval.{k}": FREE for k in ("train_path", "val_path", "train_list", "val_list", "every_epochs", "at_start",
                                   "encoder", "k", "temperature", "batch_size", "backend")},
    # The free-form deepspeed section: by the longest listed prefix (every key has "deepspeed").
    "deepspeed": MAY_CHANGE,              # communication and memory settings
    "deepspeed.gradient_clipping": MUST_MATCH,
    **{f"deepspeed.{k}": FREE for k in ("train_batch_size", "train_micro_batch_size_per_gpu",
                                        "gradient_accumulation_steps", "bf16", "zero_optimization.stage")},
    # The run's shape as resolved (batch sizes, bf16 "auto", the stage), and the dataset's files.
    "run.global_batch": MUST_MATCH, "run.steps_per_epoch": MUST_MATCH, "run.dataset": MUST_MATCH,
    "run.world_size": FIXED, "run.zero_stage": FIXED, "run.bf16": FIXED,
}


def resume_rule(key: str) -> str:
    """The class of dotted `key`; deepspeed keys by their longest listed prefix. An unlisted key
    (only possible in the deepspeed section, or a checkpoint of another version) must match."""
    if key in RESUME_RULES:
        return RESUME_RULES[key]
    if key.startswith("deepspeed."):
        parts = key.split(".")
        for n in range(len(parts) - 1, 0, -1):
            if ".".join(parts[:n]) in RESUME_RULES:
                return RESUME_RULES[".".join(parts[:n])]
    return MUST_MATCH


def _fixed_why(key: str) -> str:
    return FIXED_WHY.get(key) or FIXED_WHY[key.split(".")[0]]


def _flatten(d: dict, prefix: str = "") -> dict:
    """{dotted key: value} of the leaves of nested dict `d` (an empty section has none)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def _covers(pattern: str, key: str) -> bool:
    return key == pattern or key.startswith(pattern + ".")


def check_allow_change(keys: list[str] | tuple[str, ...], cfg: Config) -> None:
    """`--allow-change` keys: each a config key, a section or run.<shape>, and none whose change cannot
    load (FIXED). Checked at start, before anything slow."""
    known = set(RESUME_RULES) | set(_flatten(to_dict(cfg)))
    for key in keys:
        if not any(_covers(key, k) for k in known):
            sections = sorted({k.split(".")[0] for k in known})
            raise ConfigError(f"--allow-change {key}: no such config key (a dotted key such as optim.base_lr, "
                              f"a section ({', '.join(sections)}), or run.global_batch / run.steps_per_epoch / "
                              "run.dataset)")
        if resume_rule(key) == FIXED and key in RESUME_RULES:
            raise ConfigError(f"--allow-change {key}: {key} cannot change at resume ({_fixed_why(key)})")


def resume_changes(saved: dict, now: dict, allow: tuple[str, ...] = ()) -> tuple[list[str], list[str], list[str]]:
    """Compare a checkpoint's {"config": ..., "run": ...} (`saved`) with this run's (`now`).
    Returns (cannot, refused, accepted), one "key: saved -> now" line each: FIXED changes (with
    the reason), MUST_MATCH changes not covered by `allow` (keys or sections), and the allowed
    MUST_MATCH and every MAY_CHANGE change. A run-shape value the checkpoint does not record (an
    older version) is not compared."""
    old = _flatten({"run": saved.get("run", {}), **saved.get("config", {})})
    new = _flatten({"run": now.get("run", {}), **now.get("config", {})})
    cannot, refused, accepted = [], [], []
    for key in sorted(set(old) | set(new)):
        if key.startswith("run.") and key not in old:
            continue
        a, b = old.get(key), new.get(key)
        rule = resume_rule(key)
        if a == b or rule == FREE:
            continue
        line = f"{key}: {a!r} -> {b!r}"
        if rule == FIXED:
            cannot.append(f"{line} (cannot change: {_fixed_why(key)})")
        elif rule == MUST_MATCH and not any(_covers(p, key) for p in allow):
            refused.append(line)
        else:
            accepted.append(line + (" (--allow-change)" if rule == MUST_MATCH else ""))
    return cannot, refused, accepted


class _ReadKeys(dict):
    """A dict that records which keys are looked up in it (get, [], in, keys() membership)."""

    def __init__(self, *args, seen: set | None = None):
        super().__init__(*args)
        self.seen = set() if seen is None else seen

    def get(self, key, default=None):
        self.seen.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.seen.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.seen.add(key)
        return super().__contains__(key)

    def keys(self):
        return _ReadKeysView(self)

    def __copy__(self):
        return _ReadKeys(self, seen=self.seen)


class _ReadKeysView:
    def __init__(self, d: _ReadKeys):
        self.d = d

    def __contains__(self, key):
        return key in self.d

    def __iter__(self):
        return iter(dict.keys(self.d))

    def __len__(self):
        return len(self.d)


# Keys of the deepspeed section that fastmoco itself reads or refuses with its own message
# (fastmoco.train.resolve_deepspeed_config) before DeepSpeed sees the section.
_FASTMOCO_DEEPSPEED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                            "optimizer", "scheduler")


def validate_deepspeed(section: dict) -> None:
    """Check the `deepspeed` section against DeepSpeed's own config parser.

    DeepSpeed ignores keys it does not know, so a typo would silently change nothing: the
    section is parsed by `deepspeed.runtime.config.DeepSpeedConfig` through a dict that
    records every key DeepSpeed looks up, and a top-level key it never looked up is
    refused. Nested sections that DeepSpeed models with pydantic (zero_optimization, bf16,
    ...) reject their own unknown keys and bad values; those errors are reported with the
    dotted key. Imports DeepSpeed (a few seconds), so it runs at training start, not in
    `load_config`.
    """
    from fastmoco.quiet import library_logs
    with library_logs():   # DeepSpeed's first import announces the accelerator it picked
        from deepspeed.runtime.config import DeepSpeedConfig
    from pydantic import ValidationError

    probe = {k: v for k, v in section.items() if k not in _FASTMOCO_DEEPSPEED_KEYS}
    micro = section.get("train_micro_batch_size_per_gpu", 2)
    probe.update(train_micro_batch_size_per_gpu=micro, train_batch_size=micro, gradient_accumulation_steps=1)
    if isinstance(probe.get("bf16"), dict) and probe["bf16"].get("enabled") == "auto":  # fastmoco resolves it
        probe["bf16"] = {**probe["bf16"], "enabled": False}
    tracked = _ReadKeys(probe)
    try:
        DeepSpeedConfig(tracked)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        title = e.title.replace("DeepSpeed", "").replace("Config", "").lower()
        section_name = {"zero": "zero_optimization", "bf16": "bf16", "fp16": "fp16"}.get(title, title)
        raise ConfigError(f"deepspeed.{section_name}.{where}: {err['msg']} (value {err.get('input')!r})") from None
    except (ValueError, AssertionError, TypeError, KeyError) as e:
        raise ConfigError(f"deepspeed: DeepSpeed rejects the section: {e}") from None
    unknown = sorted(set(probe) - tracked.seen)
    if unknown:
        raise ConfigError(f"unknown config key deepspeed.{unknown[0]}: DeepSpeed {_deepspeed_version()} does not "
                          "read it (a typo?)")


def _deepspeed_version() -> str:
    from fastmoco.quiet import import_deepspeed

    return import_deepspeed().__version__
