"""Weights in and out of fastmoco: checkpoints of any ZeRO stage, timm, the official MoCo v3 layout.

    sd, info = load_weights(path)            # fastmoco checkpoint dir | official .pth.tar | safetensors
    backbone = build_backbone(info, sd, encoder="online")
    export(path, "vit_b.safetensors")        # + vit_b.moco_v3.pth.tar

What each source holds, and how it becomes one fp32 state dict of `MoCo`
(names: base_encoder.*, momentum_encoder.*, predictor.*; the backbone's names
are timm's, see fastmoco/models/vit.py):

- fastmoco checkpoint directory (`<out_dir>/checkpoints/step_*`): the resolved
  run config is in its COMPLETE file. ZeRO-0: DeepSpeed's module state dict.
  Under bf16 its trainable weights come from the bf16 optimizer's fp32 copy.
  ZeRO-1/2/3: the trainable weights are rebuilt in fp32 from the optimizer's
  partitions (DeepSpeed's `zero_to_fp32`), frozen ones from DeepSpeed's frozen
  fragments. The momentum encoder comes from fastmoco's own fp32 EMA state,
  its ZeRO-3 shards concatenated in rank order. Whatever has no fp32 copy
  (the frozen patch projection under bf16) is read as stored.
- official MoCo v3 checkpoint (`main_moco.py`'s `checkpoint_%04d.pth.tar`):
  `{"state_dict": {"module.base_encoder....": ...}, "arch": ...}`; read with
  `torch.load(weights_only=True)`, so a downloaded file cannot run code.
- safetensors backbone (what `export` writes): a backbone only, no heads.

Errors name the file, the key and both shapes; every file is written atomically.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from fastmoco.models.resnet import RESNET_ARCHS, ResNet
from fastmoco.models.vit import VIT_SIZES, VisionTransformer

MARKER = "COMPLETE"                   # fastmoco.checkpoint's completeness marker
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
    """A checkpoint directory from itself, a run's `checkpoints/` folder or its out_dir (newest complete)."""
    p = Path(path)
    if _is_fastmoco_checkpoint(p):
        return p
    for folder in (p, p / "checkpoints"):
        if folder.is_dir():
            done = sorted((c for c in folder.glob("step_*") if (c / MARKER).is_file()),
                          key=lambda c: int(c.name.split("_")[1]))
            if done:
                return done[-1]
    raise WeightsError(f"{p}: not a fastmoco checkpoint (no {MARKER} file in it, nor a complete "
                       "step_* checkpoint under it)")


def _load_fastmoco(ckpt: Path) -> tuple[dict, WeightsInfo]:
    meta = json.loads((ckpt / MARKER).read_text())
    cfg = meta.get("config") or {}
    model_cfg = cfg.get("model", {})
    arch, img_size = model_cfg.get("arch"), model_cfg.get("img_size")
    if arch is None or img_size is None:
        raise WeightsError(f"{ckpt / MARKER}: no model.arch / model.img_size in the saved config")
    stage = cfg.get("deepspeed", {}).get("zero_optimization", {}).get("stage", 0)
    if stage > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # DeepSpeed's own files, written by this project's runs: they unpickle (see README).
        sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    else:
        files = sorted(ckpt.glob("*mp_rank_00_model_states.pt"))
        if not files:
            raise WeightsError(f"{ckpt}: no DeepSpeed model states file (*mp_rank_00_model_states.pt)")
        states = torch.load(files[0], map_location="cpu", weights_only=True)
        sd = dict(states["module"])
        sd.update(_bf16_masters(states.get("optimizer"), cfg, files[0]))
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    momentum = _momentum_master(ckpt, cfg)
    if momentum is not None:
        sd.update(momentum)
    epoch = int(meta.get("data", {}).get("epoch", 0))
    method = cfg.get("method", "moco_v3")
    return sd, WeightsInfo(arch, img_size, "fastmoco", str(ckpt), meta.get("step"), epoch, cfg, method,
                           "dino" if method == "dino" else "moco", model_cfg.get("num_heads", 0),
                           model_cfg.get("patch_size", 0), model_cfg.get("mlp_norm", "ln"))


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


def _bf16_masters(optimizer_state, cfg: dict, path: Path) -> dict:
    """ZeRO-0 under bf16: DeepSpeed's bf16 optimizer keeps the fp32 weights of the trainable parameters
    in `fp32_groups`, in the order of the method's optimizer groups. {} when there are none (fp32)."""
    groups = (optimizer_state or {}).get("fp32_groups") if isinstance(optimizer_state, dict) else None
    if not groups:
        return {}
    tensors = [t for group in groups for t in group]
    model, method = _meta_model(cfg)
    name_of = {id(p): n for n, p in model.named_parameters()}
    trainable = [(name_of[id(p)], tuple(p.shape)) for g in method.param_groups(model, None) for p in g["params"]]
    if [tuple(t.shape) for t in tensors] != [shape for _, shape in trainable]:
        raise WeightsError(f"{path}: the optimizer's fp32 weights ({len(tensors)} tensors) do not line up with "
                           f"the model's {len(trainable)} trainable parameters")
    return {name: t for (name, _), t in zip(trainable, tensors)}


def _momentum_master(ckpt: Path, cfg: dict) -> dict | None:
    """The momentum encoder's (teacher's) fp32 EMA state from fastmoco's per-rank files, as full tensors
    by name (`fastmoco.momentum.assemble` puts every rank's pieces together; the state says its layout)."""
    from fastmoco.momentum import assemble

    files = sorted(ckpt.glob("fastmoco_rank*.pt"))
    if not files:
        return None
    states = [torch.load(f, map_location="cpu", weights_only=True)["momentum"] for f in files]
    full = assemble(states)
    model, _ = _meta_model(cfg)
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
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - anything that is not plain tensors is refused
        raise WeightsError(f"{path}: cannot be read as weights only ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200]})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise WeightsError(f"{path}: no 'state_dict' in it: not an official MoCo v3 checkpoint")
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
    """A backbone exported by `export` (timm names), as the online encoder's weights."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        sd = {k: f.get_tensor(k).float() if f.get_tensor(k).is_floating_point() else f.get_tensor(k)
              for k in f.keys()}
        meta = f.metadata() or {}
    arch, img_size, patch, mlp_norm = _arch_from_backbone(sd, "", path)
    method = meta.get("method", "moco_v3")
    info = WeightsInfo(arch, img_size, "safetensors", str(path), method=method, recipe=meta.get("recipe", "moco"),
                       num_heads=int(meta.get("num_heads", 0) or 0), patch_size=patch, mlp_norm=mlp_norm)
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


def build_backbone(info: WeightsInfo, sd: dict, encoder: str = "online") -> VisionTransformer:
    """An fp32 fastmoco ViT backbone holding the chosen encoder's weights."""
    model = info.backbone()
    load_into(model, backbone_state(sd, encoder, info.path, info.method), info.path)
    return model.eval()


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


def export(path: str | os.PathLike, out: str | os.PathLike, *, encoder: str = "",
           official: str | os.PathLike | None = None) -> tuple[Path, Path | None]:
    """Write the chosen encoder's backbone ("": the method's default: MoCo v3 online, DINO teacher) as
    safetensors (timm names) to `out`, and a MoCo v3 model in the official layout to `official`
    (default: <out stem>.moco_v3.pth.tar; "" to skip). Atomic."""
    from fastmoco.methods import METHODS

    sd, info = load_weights(path)
    encoder = encoder or METHODS[info.method].default_encoder
    backbone = {k: v.contiguous() for k, v in backbone_state(sd, encoder, info.path, info.method).items()}
    if info.arch in RESNET_ARCHS:  # torchvision's names: torchvision.models.<arch>() loads it, fc missing
        loads_as = {"torchvision_name": info.arch}
    else:
        size = info.backbone().size
        loads_as = {"timm_name": size.timm_name, "num_heads": str(size.num_heads),
                    "patch_size": str(size.patch_size)}
    meta = {"format": "pt", "arch": info.arch, **loads_as, "img_size": str(info.img_size), "encoder": encoder,
            "method": info.method, "recipe": info.recipe, "source": info.path,
            "step": str(info.step if info.step is not None else "")}
    from safetensors.torch import save_file

    out = Path(out)
    if official is None:  # by default only what the official layout can hold
        off = official_path_for(out) if info.method == "moco_v3" and info.source != "safetensors" else None
    else:
        off = Path(official) if official else None
    if off is not None and (info.source == "safetensors" or info.method != "moco_v3"):
        raise WeightsError(f"{path}: the official MoCo v3 layout needs a MoCo v3 model with its heads "
                           f"(this is a {info.method} {'backbone' if info.source == 'safetensors' else 'model'}); "
                           "pass official='' to skip it")
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
        for tmp, final in staged:
            os.replace(tmp, final)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    return out, off
