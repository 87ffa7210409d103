"""Each shipped training config against the official recipe it names (tests/golden/recipes.json: the commands
of moco-v3's CONFIG.md and dino's README.md as the official argparse parsers read them, the official
augmentation objects, model sizes and defaults; made by tests/golden/gen_recipes.py).

What differs on purpose is not among the values checked (bf16 for fp16, ZeRO stages)
and is said in each config's _comment."""
import json
import math
from pathlib import Path

import pytest

from fastmoco.config import load_config
from fastmoco.models.vit import VIT_SIZES
from fastmoco.pipelines.base import BLUR_SIGMA, IMAGENET_MEAN, IMAGENET_STD, SOLARIZE_THRESHOLD, augment_params
from golden.tensors import GOLDEN_DIR

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = json.loads((GOLDEN_DIR / "recipes.json").read_text())
VIT_B = "ViT Models / ViT-Base, 8-node (64-GPU) pre-training."
# config -> the official command it follows. MoCo v3's ViT-L/H, ViT-BN-L/7 and conv-stem ViTs have no command
# in CONFIG.md (the paper's larger models): they take the ViT-B command's optimisation and augmentation.
MOCO = {"r50_100ep": "ResNet-50 models / ResNet-50, 100-epoch pre-training.",
        "vit_s": "ViT Models / ViT-Small, 4-node (32-GPU) pre-training.", "vit_b": VIT_B,
        "vit_l": VIT_B, "vit_h": VIT_B, "vit_bn_l7": VIT_B, "vit_conv_small": VIT_B, "vit_conv_base": VIT_B}
SAME_ARCH = ("r50_100ep", "vit_s", "vit_b")   # the command trains this config's architecture
DINO = {"dino_vit_s16": "Vanilla DINO training", "dino_vit_b16": "Multi-node training / DINO with ViT-base network."}
# Test-only configs (CPU sizes, synthetic data, the README's demo): no recipe.
NOT_RECIPES = {"tiny", "r50_tiny", "vit_bn_tiny", "vit_conv_tiny", "dino_tiny", "demo"}


def test_every_config_is_audited():
    names = {p.stem for p in CONFIGS.glob("*.json")}
    assert names == set(MOCO) | set(DINO) | NOT_RECIPES, sorted(names ^ (set(MOCO) | set(DINO) | NOT_RECIPES))
    for name in names:
        comment = json.loads((CONFIGS / f"{name}.json").read_text()).get("_comment", "")
        assert comment, f"configs/{name}.json has no _comment saying where its values come from"


def _check(pairs: list[tuple[str, object, object]]) -> list[str]:
    return [f"{key}: {got!r} in the config, {want!r} official" for key, got, want in pairs
            if not (math.isclose(got, want, rel_tol=1e-12) if isinstance(want, float) and not isinstance(got, bool)
                    else got == want)]


def _views(recipe_views: list[list[dict]], crops: list[dict], params: dict, interpolation: dict) -> list[tuple]:
    """(key, config value, official value) for each crop against the official transforms of its view."""
    pairs = []
    for i, (view, crop) in enumerate(zip(recipe_views, crops)):
        by_type = {d["type"]: d for d in view}
        rrc, jitter = by_type["RandomResizedCrop"], by_type["ColorJitter"]
        blur = by_type.get("GaussianBlur")
        blur_p = 0.0 if blur is None else blur["apply_p"] * blur.get("prob", 1.0)
        sol = by_type.get("Solarize") or by_type.get("Solarization")
        sol_p = 0.0 if sol is None else sol["apply_p"] * sol.get("p", 1.0)
        pairs += [(f"crop {i} size", crop["size"], rrc["size"][0]), (f"crop {i} scale", crop["scale"], rrc["scale"]),
                  (f"crop {i} blur probability", crop["blur"], blur_p),
                  (f"crop {i} solarize probability", crop["solarize"], sol_p),
                  (f"crop {i} interpolation", interpolation[params["interpolation"]], rrc["interpolation"]),
                  ("data.jitter_prob", params["jitter_prob"], jitter["apply_p"]),
                  ("data.brightness", params["brightness"], round(jitter["brightness"][1] - 1, 6)),
                  ("data.contrast", params["contrast"], round(jitter["contrast"][1] - 1, 6)),
                  ("data.saturation", params["saturation"], round(jitter["saturation"][1] - 1, 6)),
                  ("data.hue", params["hue"], jitter["hue"][1]),
                  ("data.grayscale_prob", params["grayscale_prob"], by_type["RandomGrayscale"]["p"]),
                  ("data.flip_prob", params["flip_prob"], by_type["RandomHorizontalFlip"]["p"]),
                  ("normalisation", [list(IMAGENET_MEAN), list(IMAGENET_STD)],
                   [by_type["Normalize"]["mean"], by_type["Normalize"]["std"]])]
        if blur is not None:
            pairs.append(("blur sigma range", list(BLUR_SIGMA),
                          blur["sigma"] if "sigma" in blur else [blur["radius_min"], blur["radius_max"]]))
    return pairs


INTERPOLATION = {"linear": "InterpolationMode.BILINEAR", "cubic": "InterpolationMode.BICUBIC"}


@pytest.mark.parametrize("name", sorted(MOCO))
def test_moco_v3_config_follows_its_recipe(name):
    cfg, recipe = load_config(CONFIGS / f"{name}.json"), RECIPES["moco_v3"][MOCO[name]]
    a = recipe["args"]
    pairs = [("optim.name", cfg.optim.name, a["optimizer"]), ("optim.base_lr", cfg.optim.base_lr, a["lr"]),
             ("optim.weight_decay", cfg.optim.weight_decay, a["weight_decay"]),
             ("schedule.epochs", cfg.schedule.epochs, a["epochs"]),
             ("schedule.warmup_epochs", cfg.schedule.warmup_epochs, a["warmup_epochs"]),
             ("moco.momentum", cfg.moco.momentum, a["moco_m"]), ("moco.momentum_cosine", cfg.moco.momentum_cosine,
                                                                 a["moco_m_cos"]),
             ("moco.tau", cfg.moco.tau, a["moco_t"]), ("moco.dim", cfg.moco.dim, a["moco_dim"]),
             ("moco.mlp_dim", cfg.moco.mlp_dim, a["moco_mlp_dim"]), ("data.crop_min", cfg.data.crop_min, a["crop_min"]),
             ("deepspeed.train_batch_size", cfg.deepspeed.get("train_batch_size"), recipe["global_batch"]),
             ("deepspeed.gradient_clipping", cfg.deepspeed.get("gradient_clipping", 0.0), 0.0),   # none in main_moco
             ("data.interpolation", cfg.data.interpolation, "linear")]
    if a["optimizer"] == "lars":
        lars = RECIPES["defaults"]["moco.optimizer.LARS"]
        pairs += [("optim.momentum", cfg.optim.momentum, a["momentum"]),
                  ("optim.trust_coefficient", cfg.optim.trust_coefficient, lars["trust_coefficient"])]
    else:
        adamw = RECIPES["adamw_defaults"]
        pairs += [("optim.betas", list(cfg.optim.betas), adamw["betas"]), ("optim.eps", cfg.optim.eps, adamw["eps"])]
    if name in SAME_ARCH:
        pairs.append(("model.arch", cfg.model.arch, a["arch"]))
    if cfg.model.arch in RECIPES["archs"]["moco_v3"]:
        size, official = VIT_SIZES[cfg.model.arch], RECIPES["archs"]["moco_v3"][cfg.model.arch]
        pairs += [(f"{cfg.model.arch} size", [size.embed_dim, size.depth, cfg.model.num_heads or size.num_heads,
                                               cfg.model.patch_size or size.patch_size, size.stem],
                   [official[k] for k in ("embed_dim", "depth", "num_heads", "patch_size", "stem")])]
    if cfg.model.arch.startswith("vit") and VIT_SIZES[cfg.model.arch].stem == "patch":
        pairs.append(("model.frozen_patch_embed", cfg.model.frozen_patch_embed, a["stop_grad_conv1"]))
    aug = RECIPES["augmentation"]["moco_v3"]
    views = [[dict(d, scale=[a["crop_min"], 1.0]) if d["type"] == "RandomResizedCrop" else d for d in aug[v]]
             for v in ("view1", "view2")]   # the transforms were read at the R50 recipe's crop_min
    params = augment_params(cfg.data)
    pairs += _views(views, params["crops"], params, INTERPOLATION)
    pairs.append(("solarize threshold", SOLARIZE_THRESHOLD, aug["solarize_threshold"]))
    bad = _check(pairs)
    assert not bad, f"configs/{name}.json against {MOCO[name]!r}:\n" + "\n".join(bad)


@pytest.mark.parametrize("name", sorted(DINO))
def test_dino_config_follows_its_recipe(name):
    cfg, recipe = load_config(CONFIGS / f"{name}.json"), RECIPES["dino"][DINO[name]]
    a, d, loss, head = recipe["args"], cfg.dino, RECIPES["defaults"]["main_dino.DINOLoss"], \
        RECIPES["defaults"]["vision_transformer.DINOHead"]
    official = RECIPES["archs"]["dino"][a["arch"]]
    size = VIT_SIZES[cfg.model.arch]
    pairs = [("model.arch", cfg.model.arch, a["arch"]), ("model.patch_size", cfg.model.patch_size, a["patch_size"]),
             ("model size", [size.embed_dim, size.depth, cfg.model.num_heads or size.num_heads],
              [official["embed_dim"], official["depth"], official["num_heads"]]),
             ("model.drop_path", cfg.model.drop_path, a["drop_path_rate"]),
             ("model.frozen_patch_embed", cfg.model.frozen_patch_embed, False),
             ("dino.out_dim", d.out_dim, a["out_dim"]),
             ("dino.norm_last_layer", d.norm_last_layer, a["norm_last_layer"]),
             ("dino.hidden_dim", d.hidden_dim, head["hidden_dim"]),
             ("dino.bottleneck_dim", d.bottleneck_dim, head["bottleneck_dim"]),
             ("BN in the head (fastmoco has none)", False, a["use_bn_in_head"]),
             ("dino.student_temp", d.student_temp, loss["student_temp"]),
             ("dino.center_momentum", d.center_momentum, loss["center_momentum"]),
             ("dino.momentum_teacher", d.momentum_teacher, a["momentum_teacher"]),
             ("dino.warmup_teacher_temp", d.warmup_teacher_temp, a["warmup_teacher_temp"]),
             ("dino.teacher_temp", d.teacher_temp, a["teacher_temp"]),
             ("dino.warmup_teacher_temp_epochs", d.warmup_teacher_temp_epochs, a["warmup_teacher_temp_epochs"]),
             ("dino.freeze_last_layer", d.freeze_last_layer, a["freeze_last_layer"]),
             ("dino.weight_decay_end", d.weight_decay_end, a["weight_decay_end"]),
             ("dino.min_lr", d.min_lr, a["min_lr"]),
             ("dino.global_crops", d.global_crops, 2),
             ("optim.name", cfg.optim.name, a["optimizer"]), ("optim.base_lr", cfg.optim.base_lr, a["lr"]),
             ("optim.weight_decay", cfg.optim.weight_decay, a["weight_decay"]),
             ("optim.betas", list(cfg.optim.betas), RECIPES["adamw_defaults"]["betas"]),
             ("optim.eps", cfg.optim.eps, RECIPES["adamw_defaults"]["eps"]),
             ("schedule.epochs", cfg.schedule.epochs, a["epochs"]),
             ("schedule.warmup_epochs", cfg.schedule.warmup_epochs, a["warmup_epochs"]),
             ("deepspeed.train_batch_size", cfg.deepspeed.get("train_batch_size"), recipe["global_batch"]),
             ("dino.clip_grad (each parameter on its own)", d.clip_grad, a["clip_grad"]),
             ("deepspeed.gradient_clipping (global norm: none in main_dino)",
              cfg.deepspeed.get("gradient_clipping", 0.0), 0.0),
             ("data.crop_min", [cfg.data.crop_min, 1.0], a["global_crops_scale"]),
             ("data.local_crops", cfg.data.local_crops, a["local_crops_number"]),
             ("data.local_scale", cfg.data.local_scale, a["local_crops_scale"])]
    aug = RECIPES["augmentation"]["dino"]
    assert aug["recipe"] == "Vanilla DINO training" and a["global_crops_scale"] == \
        RECIPES["dino"][aug["recipe"]]["args"]["global_crops_scale"], "the transforms were read at other scales"
    params = augment_params(cfg.data)
    local = [aug["local"]] * cfg.data.local_crops
    pairs += _views([aug["global1"], aug["global2"], *local], params["crops"], params, INTERPOLATION)
    pairs.append(("solarize threshold", SOLARIZE_THRESHOLD, aug["solarize_threshold"]))
    bad = _check(pairs)
    assert not bad, f"configs/{name}.json against {DINO[name]!r}:\n" + "\n".join(bad)
