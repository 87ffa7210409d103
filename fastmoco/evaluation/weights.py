"""Weights in and out of fastmoco: checkpoints of any ZeRO stage, timm, the official MoCo v3 layout.

    sd, info = load_weights(path)            # fastmoco checkpoint dir | official .pth.tar | safetensors
    backbone = build_backbone(info, sd, encoder="online")
    export(path, "vit_b.safetensors")        # + vit_b.moco_v3.pth.tar

What each source holds, and how it becomes one fp32 state dict of `MoCo`
(names: base_encoder.*, momentum_encoder.*, predictor.*; the backbone's names
are timm's, see fastmoco/models/vit.py):

- fastmoco checkpoint directory (`<out_dir>/checkpoints/step_*`): the resolved
  run config is in its COMPLETE file, and every file of its manifest must be
  there in full (as `--resume` checks: a run's folder gives its newest such
  checkpoint). DeepSpeed's files are read by fastmoco itself, each with
  `torch.load(weights_only=True)` and an allowlist of DeepSpeed's few record
  types (`fastmoco.checkpoint.load_file`), so no file can run code:
  ZeRO-0: the module state dict; under bf16 the trainable weights come from the
  bf16 optimizer's fp32 copy. ZeRO-1/2: the module state dict (every parameter
  whole, frozen ones included) with the trainable weights replaced by their fp32
  copies in the ranks' optimizer partitions. ZeRO-3: the trainable weights from
  the ranks' fp32 partitions, frozen ones from the ranks' frozen fragments,
  buffers from the module state dict. The momentum encoder comes from
  fastmoco's own fp32 EMA state, its ZeRO-3 shards concatenated in rank order.
  Whatever has no fp32 copy (the frozen patch projection under bf16) is read as
  stored. The result must hold every parameter and buffer of the run's model,
  in its shape, or the load fails naming what is missing.
- official MoCo v3 checkpoint (`main_moco.py`'s `checkpoint_%04d.pth.tar`):
  `{"state_dict": {"module.base_encoder....": ...}, "arch": ...}`; read with
  `torch.load(weights_only=True)`, so a downloaded file cannot run code.
- safetensors backbone (what `export` writes): a backbone only, no heads.

Errors name the file, the key and both shapes. `export` checks that the backbone
loads into the model before it writes anything, refuses to replace an existing
file unless `force`, and writes every file atomically.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from fastmoco import checkpoint
from fastmoco.checkpoint import MARKER, CheckpointError
from fastmoco.models.resnet import RESNET_ARCHS, ResNet
from fastmoco.models.vit import RECIPES, VIT_SIZES, VisionTransformer

OFFICIAL_PREFIX = "module."           # DistributedDataParallel's prefix in the official checkpoints
# Where each method's module keeps the two backbones (MoCo v3: the encoders, whose `head.*` is the
# projector; DINO: student and teacher, whose heads sit beside the backbone).
PREFIXES = {"moco_v3": {"online": "base_encoder.", "momentum": "momentum_encoder."},
            "dino": {"online": "student.backbone.", "momentum": "teacher.backbone."}}
ENCODERS = tuple(PREFIXES["moco_v3"])
HEAD_PREFIXES = ("head.", "fc.")      # the MoCo projector inside each encoder (ViT: head, ResNet: fc)


class WeightsError(ValueError):
    """Weights that cannot be used here; the message names the file and the key."""


@dataclass
class WeightsInfo:
    arch: str
    img_size: int
    source: str          # "fastmoco" | "official" | "safetensors"
    path: str
    step: int | None = None
    epoch: int = 0       # epochs completed (the official checkpoints' "epoch")
    config: dict | None = None
    method: str = "moco_v3"
    recipe: str = "moco"  # the ViT's (fastmoco.models.vit): position embedding and init
    num_heads: int = 0    # 0: the arch's
    patch_size: int = 0   # 0: the arch's
    mlp_norm: str = "ln"  # ViT-BN: "bn"

    def backbone(self) -> VisionTransformer | ResNet:
        if self.arch in RESNET_ARCHS:
            return ResNet(self.arch)
        return VisionTransformer(self.arch, img_size=self.img_size, frozen_patch_embed=False, recipe=self.recipe,
                                 num_heads=self.num_heads, patch_size=self.patch_size, mlp_norm=self.mlp_norm)


# -- reading -------------------------------------------------------------------------------------
def _is_fastmoco_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / MARKER).is_file()


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """A checkpoint directory from itself, a run's `checkpoints/` folder or its out_dir: the newest
    complete one whose manifest files are all there (`fastmoco.checkpoint.find_latest`, what --resume
    takes; a newer damaged one is skipped with a warning naming it)."""
    p = Path(path)
    if _is_fastmoco_checkpoint(p):
        bad = checkpoint.problems(p)
        if bad:
            raise WeightsError(f"checkpoint {p} is damaged: {'; '.join(bad[:3])}")
        return p
    for folder in (p, p / "checkpoints"):
        if checkpoint.complete_checkpoints(folder):
            found = checkpoint.find_latest(folder)
            if found is None:
                raise WeightsError(f"{folder}: every complete checkpoint in it is damaged (missing or short "
                                   "files of its manifest)")
            return found
    raise WeightsError(f"{p}: not a fastmoco checkpoint (no {MARKER} file in it, nor a complete "
                       "step_* checkpoint under it)")


def _load_fastmoco(ckpt: Path) -> tuple[dict, WeightsInfo]:
    try:
        meta = checkpoint.read_meta(ckpt)
    except CheckpointError as e:
        raise WeightsError(str(e)) from None
    cfg = meta.get("config") or {}
    model_cfg = cfg.get("model", {})
    arch, img_size = model_cfg.get("arch"), model_cfg.get("img_size")
    if arch is None or img_size is None:
        raise WeightsError(f"{ckpt / MARKER}: no model.arch / model.img_size in the saved config")
    stage = cfg.get("deepspeed", {}).get("zero_optimization", {}).get("stage", 0)
    model, method = _meta_model(cfg)
    if stage == 0:
        sd = _zero0_weights(ckpt, model, method)
    elif stage in (1, 2):
        sd = _zero12_weights(ckpt)
    elif stage == 3:
        sd = _zero3_weights(ckpt)
    else:
        raise WeightsError(f"{ckpt / MARKER}: ZeRO stage {stage!r} in the saved config (expected 0-3)")
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    momentum = _momentum_master(ckpt, model)
    if momentum is not None:
        sd.update(momentum)
    _check_complete(sd, model, ckpt, stage)
    epoch = int(meta.get("data", {}).get("epoch", 0))
    method = cfg.get("method", "moco_v3")
    return sd, WeightsInfo(arch, img_size, "fastmoco", str(ckpt), meta.get("step"), epoch, cfg, method,
                           "dino" if method == "dino" else "moco", model_cfg.get("num_heads", 0),
                           model_cfg.get("patch_size", 0), model_cfg.get("mlp_norm", "ln"))


def _check_complete(sd: dict, model: torch.nn.Module, ckpt: Path, stage: int) -> None:
    """Every parameter and buffer of the run's model is in `sd`, in its shape."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in want if k not in sd]
    bad = [f"{k}: {tuple(sd[k].shape)} read, {shape} in the model" for k, shape in want.items()
           if k in sd and tuple(sd[k].shape) != shape]
    if missing or bad:
        what = ([f"missing {', '.join(missing[:5])}" + (f" and {len(missing) - 5} more" if len(missing) > 5
                                                         else "")] if missing else []) + bad[:5]
        raise WeightsError(f"{ckpt} (ZeRO-{stage}): does not hold the run's model: {'; '.join(what)}")


def _load(path: Path, *, mmap: bool = False, deepspeed_types: bool = True):
    """One file, weights only (fastmoco.checkpoint.load_file), its refusal as a WeightsError."""
    try:
        return checkpoint.load_file(path, mmap=mmap, deepspeed_types=deepspeed_types)
    except CheckpointError as e:
        raise WeightsError(str(e)) from None


def _rank_files(ckpt: Path, kind: str) -> list[Path]:
    """DeepSpeed's per-rank files of `kind` (optim_states | model_states) in rank order, every rank there."""
    pattern = re.compile(rf"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_{kind}\.pt")
    found = sorted((int(m.group(1)), f) for f in ckpt.iterdir() if (m := pattern.fullmatch(f.name)))
    ranks = [r for r, _ in found]
    if not found or ranks != list(range(len(found))):
        raise WeightsError(f"{ckpt}: DeepSpeed's per-rank {kind} files are incomplete (ranks found: "
                           f"{ranks or 'none'})")
    return [f for _, f in found]


def _optimizer_states(ckpt: Path, key: str) -> list[dict]:
    """Each rank's ZeRO optimizer state (memory-mapped), in rank order; `key`: its fp32 partitions."""
    states = []
    for f in _rank_files(ckpt, "optim_states"):
        state = _load(f, mmap=True).get("optimizer_state_dict")
        if not isinstance(state, dict) or not isinstance(state.get(key), list):
            raise WeightsError(f"{f}: no {key!r} in its optimizer_state_dict (a ZeRO optimizer state of "
                               "another stage?)")
        states.append(state)
    return states


def _model_states(f: Path) -> dict:
    """DeepSpeed's model states (any stage): tensors, numbers and containers only; of DeepSpeed's record
    types only its ZeRO optimizer states hold any."""
    states = _load(f, deepspeed_types=False)
    if not isinstance(states, dict) or not isinstance(states.get("module"), dict):
        raise WeightsError(f"{f}: no 'module' state dict in it: not a DeepSpeed model states file")
    return states


def _zero0_weights(ckpt: Path, model, method) -> dict:
    """ZeRO-0: the module state dict; under bf16 the trainable weights from the bf16 optimizer's fp32 copy."""
    files = sorted(ckpt.glob("*mp_rank_00_model_states.pt"))
    if not files:
        raise WeightsError(f"{ckpt}: no DeepSpeed model states file (*mp_rank_00_model_states.pt)")
    states = _model_states(files[0])
    sd = dict(states["module"])
    sd.update(_bf16_masters(states.get("optimizer"), model, method, files[0]))
    return sd


def _zero12_weights(ckpt: Path) -> dict:
    """ZeRO-1/2: the module state dict holds every parameter whole (frozen ones too); the trainable ones
    are replaced by their fp32 copies, which lie in order in the concatenation of the ranks' partitions
    of each group, each followed by its alignment padding."""
    f = ckpt / "mp_rank_00_model_states.pt"
    states = _model_states(f)
    sd = dict(states["module"])
    optim = _optimizer_states(ckpt, "single_partition_of_fp32_groups")
    paddings = optim[0].get("param_alignment_paddings")
    for g, names in enumerate(states.get("param_shapes") or []):
        flat = torch.cat([rank["single_partition_of_fp32_groups"][g].reshape(-1) for rank in optim])
        offset = 0
        for i, (name, shape) in enumerate(names.items()):
            n = math.prod(shape)
            if offset + n > flat.numel():
                raise WeightsError(f"{ckpt}: the optimizer partitions of group {g} end before {name}")
            sd[name] = flat[offset:offset + n].view(tuple(shape)).clone()
            offset += n + (paddings[g][i] if paddings else 0)
    return sd


def _zero3_weights(ckpt: Path) -> dict:
    """ZeRO-3: parameter i of n elements is split into pieces of ceil(n / world) elements, rank r's piece
    at the same offset of its flat fp32 partition (trainable) or in its frozen fragments (frozen); the
    pieces in rank order, cut to n, are the parameter. Buffers are whole in the module state dict."""
    ranks = [_model_states(f) for f in _rank_files(ckpt, "model_states")]
    world = len(ranks)
    first = ranks[0]
    sd = {k: first["module"][k] for k in first.get("buffer_names") or [] if k in first["module"]}
    flats = [torch.cat([t.reshape(-1) for t in rank["fp32_flat_groups"]])
             for rank in _optimizer_states(ckpt, "fp32_flat_groups")]
    if len(flats) != world:
        raise WeightsError(f"{ckpt}: {len(flats)} optimizer states files for {world} model states files")
    offset = 0
    for names in first.get("param_shapes") or []:
        for name, shape in names.items():
            n = math.prod(shape)
            piece = math.ceil(n / world)
            sd[name] = torch.cat([flat[offset:offset + piece] for flat in flats])[:n].view(tuple(shape))
            offset += piece
    if offset != flats[0].numel():
        raise WeightsError(f"{ckpt}: the parameters take {offset} elements of each rank's fp32 partition, "
                           f"which has {flats[0].numel()}")
    for name, shape in (first.get("frozen_param_shapes") or {}).items():
        n = math.prod(shape)
        sd[name] = torch.cat([r["frozen_param_fragments"][name].reshape(-1) for r in ranks])[:n].view(tuple(shape))
    return sd


def _meta_model(cfg: dict):
    """(module, method) of a run's saved config, built on the meta device (names and shapes only)."""
    from fastmoco.config import ConfigError, from_dict
    from fastmoco.methods import get_method

    try:
        config = from_dict(cfg)
    except ConfigError as e:
        raise WeightsError(f"the checkpoint's saved config does not load: {e}") from None
    method = get_method(config)
    with torch.device("meta"):
        return method.build(config), method


def _bf16_masters(optimizer_state, model, method, path: Path) -> dict:
    """ZeRO-0 under bf16: DeepSpeed's bf16 optimizer keeps the fp32 weights of the trainable parameters
    in `fp32_groups`, in the order of the method's optimizer groups. {} when there are none (fp32)."""
    groups = (optimizer_state or {}).get("fp32_groups") if isinstance(optimizer_state, dict) else None
    if not groups:
        return {}
    tensors = [t for group in groups for t in group]
    name_of = {id(p): n for n, p in model.named_parameters()}
    trainable = [(name_of[id(p)], tuple(p.shape)) for g in method.param_groups(model, None) for p in g["params"]]
    if [tuple(t.shape) for t in tensors] != [shape for _, shape in trainable]:
        raise WeightsError(f"{path}: the optimizer's fp32 weights ({len(tensors)} tensors) do not line up with "
                           f"the model's {len(trainable)} trainable parameters")
    return {name: t for (name, _), t in zip(trainable, tensors)}


def _momentum_master(ckpt: Path, model) -> dict | None:
    """The momentum encoder's (teacher's) fp32 EMA state from fastmoco's per-rank files, as full tensors
    by name (`fastmoco.momentum.assemble` puts every rank's pieces together; the state says its layout)."""
    from fastmoco.momentum import assemble

    files = sorted(ckpt.glob("fastmoco_rank*.pt"))
    if not files:
        return None
    states = []
    for f in files:
        state = _load(f)
        if not isinstance(state, dict) or "momentum" not in state:
            raise WeightsError(f"{f}: no 'momentum' state in it")
        states.append(state["momentum"])
    full = assemble(states)
    named = [(f"{model.MOMENTUM_MODULE}.{n}", tuple(p.shape))
             for n, p in getattr(model, model.MOMENTUM_MODULE).named_parameters()]
    out = {}
    for i, t in full.items():
        if i >= len(named) or tuple(t.shape) != named[i][1]:
            raise WeightsError(f"{ckpt}: the momentum state's tensor {i} of shape {tuple(t.shape)} does not fit "
                               f"the model's {model.MOMENTUM_MODULE}")
        out[named[i][0]] = t
    return out


def _arch_from_backbone(sd: dict, prefix: str, path) -> tuple[str, int, int, str]:
    """(arch, img_size, patch_size, mlp_norm) of a backbone state dict, from its names and shapes: a conv
    stem has `patch_embed.proj.0.weight` (patch 16), ViT-BN running statistics in `norm2`."""
    if prefix + "conv1.weight" in sd and prefix + "layer1.0.conv1.weight" in sd:
        return _resnet_arch(sd, prefix, path), 224, 0, "ln"  # a ResNet runs at any resolution
    stem = "conv" if prefix + "patch_embed.proj.0.weight" in sd else "patch"
    try:
        width = sd[prefix + "cls_token"].shape[-1]
        patch = 16 if stem == "conv" else sd[prefix + "patch_embed.proj.weight"].shape[-1]
        tokens = sd[prefix + "pos_embed"].shape[1]
    except KeyError as e:
        raise WeightsError(f"{path}: no {e.args[0]!r}: not a ViT backbone state dict") from None
    except IndexError:
        raise WeightsError(f"{path}: {prefix}cls_token / pos_embed / patch_embed.proj.weight of shapes "
                           f"{[tuple(sd[prefix + k].shape) for k in ('cls_token', 'pos_embed')]}: not a ViT's") \
            from None
    depth = len({k[len(prefix):].split(".")[1] for k in sd if k.startswith(prefix + "blocks.")})
    mlp_norm = "bn" if prefix + "blocks.0.norm2.running_mean" in sd else "ln"
    for arch, size in VIT_SIZES.items():
        if (size.embed_dim, size.depth, size.stem) == (width, depth, stem):
            grid = round((tokens - 1) ** 0.5)
            return arch, grid * patch, patch, mlp_norm
    raise WeightsError(f"{path}: a ViT of width {width}, depth {depth}, {stem} stem matches no known arch "
                       f"({', '.join(VIT_SIZES)})")


def _resnet_arch(sd: dict, prefix: str, path) -> str:
    """The ResNet arch of a trunk state dict (torchvision names), from its blocks per stage."""
    layers = [len({k[len(prefix):].split(".")[1] for k in sd if k.startswith(f"{prefix}layer{i}.")})
              for i in range(1, 5)]
    for arch, (block, counts) in RESNET_ARCHS.items():
        bottleneck = prefix + "layer1.0.conv3.weight" in sd
        if counts == layers and (block.expansion == 4) == bottleneck:
            return arch
    raise WeightsError(f"{path}: a ResNet with {layers} blocks per stage matches no known arch "
                       f"({', '.join(RESNET_ARCHS)})")


def load_official(path: str | os.PathLike) -> tuple[dict, WeightsInfo]:
    """An official MoCo v3 checkpoint ({"state_dict": {"module.<name>": ...}}) as fastmoco names."""
    ckpt = _load(Path(path), deepspeed_types=False)   # tensors, numbers and containers only
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise WeightsError(f"{path}: no 'state_dict' in it: not an official MoCo v3 checkpoint")
    odd = [k for k, v in ckpt["state_dict"].items() if not isinstance(v, torch.Tensor)]
    if odd:
        raise WeightsError(f"{path}: state_dict entries that are not tensors: {', '.join(map(str, odd[:5]))}")
    sd = {k[len(OFFICIAL_PREFIX):] if k.startswith(OFFICIAL_PREFIX) else k: v
          for k, v in ckpt["state_dict"].items()}
    arch, img_size, patch, mlp_norm = _arch_from_backbone(sd, PREFIXES["moco_v3"]["online"], path)
    arch_key = ckpt.get("arch")
    if isinstance(arch_key, str) and arch_key in VIT_SIZES and arch_key != arch:
        raise WeightsError(f"{path}: its arch {arch_key!r} does not match its weights' shapes ({arch})")
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    epoch = ckpt.get("epoch", 0)
    return sd, WeightsInfo(arch, img_size, "official", str(path), None, epoch if isinstance(epoch, int) else 0,
                           patch_size=patch, mlp_norm=mlp_norm)


def load_safetensors_backbone(path: str | os.PathLike) -> tuple[dict, WeightsInfo]:
    """A backbone exported by `export` (timm names), as the online encoder's weights. A damaged or
    hostile file (bad header, offsets past its end, unknown metadata) is refused naming the file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            sd = {}
            for k in f.keys():
                t = f.get_tensor(k)
                sd[k] = t.float() if t.is_floating_point() else t
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ...: whatever the file is, name it
        first = (str(e).splitlines() or [""])[0][:200]
        raise WeightsError(f"{path}: not a readable safetensors file ({type(e).__name__}: {first})") from None
    method, recipe, heads = meta.get("method", "moco_v3"), meta.get("recipe", "moco"), meta.get("num_heads", "0")
    if method not in PREFIXES:
        raise WeightsError(f"{path}: metadata method {method!r} unknown (known: {', '.join(PREFIXES)})")
    if recipe not in RECIPES:
        raise WeightsError(f"{path}: metadata recipe {recipe!r} unknown (known: {', '.join(RECIPES)})")
    if not (heads or "0").isdigit():
        raise WeightsError(f"{path}: metadata num_heads {heads!r} is not a whole number")
    arch, img_size, patch, mlp_norm = _arch_from_backbone(sd, "", path)
    width = VIT_SIZES[arch].embed_dim if arch in VIT_SIZES else 0
    if width and int(heads or 0) and width % int(heads):
        raise WeightsError(f"{path}: metadata num_heads {heads} does not divide the width {width} of {arch}")
    info = WeightsInfo(arch, img_size, "safetensors", str(path), method=method, recipe=recipe,
                       num_heads=int(heads or 0), patch_size=patch, mlp_norm=mlp_norm)
    return {PREFIXES[method]["online"] + k: v for k, v in sd.items()}, info


def load_weights(path: str | os.PathLike) -> tuple[dict, WeightsInfo]:
    """fp32 state dict (MoCo names) and what it is, from any source this module reads."""
    p = Path(path)
    if not p.exists():
        raise WeightsError(f"checkpoint {str(path)!r} does not exist")
    if p.is_dir():
        return _load_fastmoco(resolve_checkpoint_dir(p))
    if p.suffix == ".safetensors":
        return load_safetensors_backbone(p)
    return load_official(p)


def backbone_state(sd: dict, encoder: str = "online", path: str = "", method: str = "moco_v3") -> dict:
    """The encoder's backbone (timm names, no head) out of a method's state dict."""
    if encoder not in ENCODERS:
        raise WeightsError(f"encoder {encoder!r}: expected one of {', '.join(ENCODERS)}")
    prefix = PREFIXES[method][encoder]
    out = {k[len(prefix):]: v for k, v in sd.items()
           if k.startswith(prefix) and not k[len(prefix):].startswith(HEAD_PREFIXES)}
    if not out:
        raise WeightsError(f"{path}: holds no {encoder} encoder (no {prefix}* keys)")
    return out


def load_into(module: torch.nn.Module, sd: dict, path: str, *, strict: bool = True) -> None:
    """Copy `sd` into `module`, naming every missing/unexpected key and shape mismatch."""
    own = module.state_dict()
    bad = [f"{k}: {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} in the model"
           for k, v in sd.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    missing = sorted(set(own) - set(sd)) if strict else []
    unexpected = sorted(set(sd) - set(own))
    if bad or missing or unexpected:
        lines = bad[:5] + [f"missing: {', '.join(missing[:5])}"] * bool(missing) + \
            [f"unexpected: {', '.join(unexpected[:5])}"] * bool(unexpected)
        raise WeightsError(f"{path}: does not fit the model ({'; '.join(lines)})")
    module.load_state_dict(sd, strict=strict)


def default_encoder(info: WeightsInfo) -> str:
    """The encoder evaluation and export take unless told: the method's (MoCo v3: online, DINO: the
    teacher) from a whole model; a backbone file holds one encoder, read as the online one."""
    from fastmoco.methods import METHODS

    return METHODS[info.method].default_encoder if info.source == "fastmoco" else "online"


def build_backbone(info: WeightsInfo, sd: dict, encoder: str = "online") -> VisionTransformer:
    """An fp32 fastmoco ViT backbone holding the chosen encoder's weights."""
    model = info.backbone()
    load_into(model, backbone_state(sd, encoder, info.path, info.method), info.path)
    return model.eval()


def load_backbone(path: str | os.PathLike, encoder: str = "") -> VisionTransformer | ResNet:
    """The backbone of any source this module reads ("": its default encoder), in eval mode."""
    sd, info = load_weights(path)
    return build_backbone(info, sd, encoder or default_encoder(info))


def init_from(model: torch.nn.Module, path: str | os.PathLike) -> WeightsInfo:
    """Initial weights of a run (`model.init_from`): every key of the source must fit `model` (a MoCo);
    a backbone-only source (safetensors) initialises both encoders' backbones."""
    sd, info = load_weights(path)
    if info.source == "safetensors":
        backbone = backbone_state(sd, "online", info.path, info.method)
        prefixes = PREFIXES[model.METHOD]
        sd = {prefixes[enc] + k: v for enc in ENCODERS for k, v in backbone.items()}
        load_into(model, sd, info.path, strict=False)
    else:
        load_into(model, sd, info.path)
    return info


# -- writing -------------------------------------------------------------------------------------
def official_path_for(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.name[: -len(out.suffix)] + ".moco_v3.pth.tar" if out.suffix else out.name +
                         ".moco_v3.pth.tar")


def load_code(info: WeightsInfo, out: str | os.PathLike) -> tuple[str, str]:
    """(library, one line of Python that loads the exported backbone `out` as `model`) for `info`'s
    backbone: timm for a ViT whose layout timm has (every size argument given, so vit_test loads too),
    torchvision for a ResNet, fastmoco itself for the conv stem and ViT-BN (no timm equivalent)."""
    out = str(out)
    if info.arch in RESNET_ARCHS:
        return "torchvision", (f"import safetensors.torch, torchvision; model = torchvision.models.{info.arch}(); "
                               f"model.load_state_dict(safetensors.torch.load_file({out!r}), strict=False)"
                               "  # only fc is missing")
    size = info.backbone().size
    if not size.timm_name or info.mlp_norm != "ln":
        return "fastmoco", (f"from fastmoco.evaluation.weights import load_backbone; "
                            f"model = load_backbone({out!r})")
    return "timm", (f"import timm; model = timm.create_model({size.timm_name!r}, num_classes=0, "
                    f"img_size={info.img_size}, patch_size={size.patch_size}, embed_dim={size.embed_dim}, "
                    f"depth={size.depth}, num_heads={size.num_heads}, pretrained=True, "
                    f"pretrained_cfg_overlay=dict(file={out!r}))")


def check_output(path: Path, force: bool) -> None:
    """An output file `export` may write: not a directory, not an existing file unless `force`."""
    if path.is_dir():
        raise WeightsError(f"{path} is a directory: name the file to write")
    if path.exists() and not force:
        raise WeightsError(f"{path} exists: pass --force to replace it")


def export(path: str | os.PathLike, out: str | os.PathLike, *, encoder: str = "",
           official: str | os.PathLike | None = None, force: bool = False) -> tuple[Path, Path | None]:
    """Write the chosen encoder's backbone ("": `default_encoder`) as safetensors (timm names) to `out`,
    and a MoCo v3 model in the official layout to `official` (default: <out stem>.moco_v3.pth.tar; "" to
    skip). Nothing is written unless the backbone loads into its model; an existing file is replaced only
    with `force`; both files are complete before either is renamed into place."""
    check_output(Path(out), force)   # before the slow part
    sd, info = load_weights(path)
    return export_weights(sd, info, out, encoder=encoder, official=official, force=force)


def _file_mode() -> int:
    """The mode a plain open() would give a new file here: 0666 less the umask."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def export_weights(sd: dict, info: WeightsInfo, out: str | os.PathLike, *, encoder: str = "",
                   official: str | os.PathLike | None = None, force: bool = False) -> tuple[Path, Path | None]:
    """`export` of weights already read (`load_weights`)."""
    from safetensors.torch import save_file

    encoder = encoder or default_encoder(info)
    backbone = {k: v.contiguous() for k, v in backbone_state(sd, encoder, info.path, info.method).items()}
    model = info.backbone()
    load_into(model, backbone, info.path)   # every key in its shape, or nothing is written
    if info.arch in RESNET_ARCHS:  # torchvision's names: torchvision.models.<arch>() loads it, fc missing
        loads_as = {"torchvision_name": info.arch}
    else:
        size = model.size
        loads_as = {"timm_name": size.timm_name, "num_heads": str(size.num_heads),
                    "patch_size": str(size.patch_size), "embed_dim": str(size.embed_dim), "depth": str(size.depth)}
    meta = {"format": "pt", "arch": info.arch, **loads_as, "img_size": str(info.img_size), "encoder": encoder,
            "method": info.method, "recipe": info.recipe, "source": info.path,
            "step": str(info.step if info.step is not None else "")}
    out = Path(out)
    if official is None:  # by default only what the official layout can hold
        off = official_path_for(out) if info.method == "moco_v3" and info.source != "safetensors" else None
    else:
        off = Path(official) if official else None
    if off is not None and (info.source == "safetensors" or info.method != "moco_v3"):
        raise WeightsError(f"{info.path}: the official MoCo v3 layout needs a MoCo v3 model with its heads "
                           f"(this is a {info.method} {'backbone' if info.source == 'safetensors' else 'model'}); "
                           "pass official='' to skip it")
    for final in (out, off):
        if final is not None:
            check_output(final, force)
    staged = []   # (tmp, final): both files complete before either is renamed into place
    try:
        for final in (out, off):
            if final is None:
                continue
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.with_name(f".{final.name}.tmp")
            staged.append((tmp, final))
            if final is out:
                save_file(backbone, str(tmp), metadata=meta)
            else:
                torch.save({"state_dict": {OFFICIAL_PREFIX + k: v for k, v in sd.items()}, "arch": info.arch,
                            "epoch": info.epoch}, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
                os.fchmod(f.fileno(), _file_mode())   # safetensors creates its file 0600
        for tmp, final in staged:
            os.replace(tmp, final)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    return out, off
