"""recipes.json: the official training recipes, as the official parsers read their published commands.

Every command in moco-v3's CONFIG.md (main_moco.py, main_lincls.py) and dino's README.md (main_dino.py,
directly or through run_with_submitit.py) is parsed by the script's own argparse parser, so each recipe
holds every argument: those the command gives and the defaults it leaves. Each is named by the markdown
heading above it, with the <details> summary when it has one ("ResNet-50 models / ResNet-50, 100-epoch
pre-training."). GPUs: torch.distributed.launch's --nproc_per_node, or run_with_submitit's --nodes x --ngpus
(their defaults read from run_with_submitit.py's own add_argument calls: it imports submitit, absent here).

The augmentations are read off the official transform objects: moco-v3's two views from main_worker (run
on the ResNet-50 100-epoch recipe until it builds its ImageFolder), DINO's global and local crops from
main_dino.DataAugmentationDINO with the vanilla recipe's scales; the solarize threshold by running each
solarize transform on the pixel values 0..255. Also recorded: torch.optim.AdamW's defaults (both official
trainings build AdamW without betas or eps), the defaults of moco-v3's LARS, DINO's DINOLoss and DINOHead
(arguments the commands cannot set), and each official ViT's width, depth, heads, patch size and stem, read
off the built model.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import inspect
import io
import json
import re
import shlex
from pathlib import Path

import torch

from golden import official

SCRIPTS = ("main_moco.py", "main_lincls.py", "main_dino.py", "run_with_submitit.py")
R50_RECIPE = "ResNet-50 models / ResNet-50, 100-epoch pre-training."
MOCO_ARCHS = ("vit_small", "vit_base", "vit_conv_small", "vit_conv_base")   # vits.py's
DINO_ARCHS = ("vit_tiny", "vit_small", "vit_base")                          # vision_transformer.py's
DINO_VANILLA = "Vanilla DINO training"


def commands(markdown: str) -> list[tuple[str, str]]:
    """(title, command) for each command in a code block that runs one of SCRIPTS (not --help)."""
    heading, summary, in_code, in_summary, block, out = "", "", False, False, [], []
    for raw in markdown.splitlines():
        line = raw.strip()
        if line.startswith("```"):
            if in_code:
                for cmd in " ".join(block).replace("\\ ", " ").split("\n"):
                    if any(s in cmd for s in SCRIPTS) and "--help" not in cmd:
                        out.append((f"{heading} / {summary}" if summary else heading, " ".join(cmd.split())))
                block = []
            in_code = not in_code
        elif in_code:
            block.append(line if line.endswith("\\") else line + "\n")
        elif line.startswith("#"):
            heading, summary = re.sub(r":[a-z0-9_+-]+:", "", line.lstrip("#")).strip(), ""
        elif "<summary>" in line or in_summary:
            text = line.replace("<summary>", "").replace("</summary>", "").strip()
            summary = (summary + " " + text).strip() if in_summary else text
            in_summary = "</summary>" not in line
    return out


def _jsonable(v):
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    return str(v)


def _given(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """Destinations of the options the command line names."""
    out = set()
    for action in parser._actions:
        if any(tok == opt or tok.startswith(opt + "=") for opt in action.option_strings for tok in argv):
            out.add(action.dest)
    return sorted(out)


def _submitit_parser(dino: Path) -> argparse.ArgumentParser:
    """run_with_submitit.py's own options (--nodes, --ngpus, ...), from its add_argument calls."""
    tree = ast.parse((dino / "run_with_submitit.py").read_text())
    parser = argparse.ArgumentParser(add_help=False)
    types = {"int": int, "str": str, "float": float}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument"
                and isinstance(getattr(node.func.value, "id", None), str) and node.func.value.id == "parser"):
            names = [ast.literal_eval(a) for a in node.args]
            kw = {}
            for k in node.keywords:
                if k.arg == "type" and isinstance(k.value, ast.Name):
                    kw["type"] = types[k.value.id]
                elif k.arg in ("default", "action"):
                    kw[k.arg] = ast.literal_eval(k.value)
            parser.add_argument(*names, **kw)
    return parser


def _dino_parser() -> argparse.ArgumentParser:
    import main_dino

    real = torch.hub.list
    torch.hub.list = lambda *a, **kw: []   # get_args_parser lists XCiT models from GitHub for its choices
    try:
        return argparse.ArgumentParser(parents=[main_dino.get_args_parser()], add_help=False)
    finally:
        torch.hub.list = real


def _recipe(cmd: str, dino: Path) -> dict:
    import main_lincls
    import main_moco

    tokens = shlex.split(re.sub(r"\[[^\]]*\]", "X", cmd))
    at = next(i for i, t in enumerate(tokens) if t.endswith(SCRIPTS))
    script, launcher, argv = Path(tokens[at]).name, tokens[:at], tokens[at + 1:]
    rec = {"command": cmd, "script": script}
    if script in ("main_moco.py", "main_lincls.py"):
        parser = (main_moco if script == "main_moco.py" else main_lincls).parser
        args = vars(parser.parse_args(argv))
        rec.update(args=_jsonable(args), given=_given(parser, argv), global_batch=args["batch_size"])
        return rec
    parser = _dino_parser()
    args, rest = parser.parse_known_args(argv)
    if script == "run_with_submitit.py":
        sub = _submitit_parser(dino).parse_args(rest)
        gpus, rest = sub.nodes * sub.ngpus, []
    else:
        nproc = [t.split("=", 1)[1] for t in launcher if t.startswith("--nproc_per_node=")]
        gpus = int(nproc[0]) if nproc else 1
    if rest:
        raise ValueError(f"{cmd}: arguments no official parser takes: {rest}")
    rec.update(script="main_dino.py", launcher=script if script != "main_dino.py" else " ".join(launcher[1:3]),
               gpus=gpus, args=_jsonable(vars(args)), given=_given(parser, argv),
               global_batch=args.batch_size_per_gpu * gpus)
    return rec


def describe(t, apply_p: float = 1.0) -> list[dict]:
    """The leaf transforms of a (nested) transform, each with its public numeric/text settings and the
    probability of the RandomApply around it."""
    inner = getattr(t, "transforms", None)
    if inner is not None:
        p = apply_p * getattr(t, "p", 1.0) if type(t).__name__ == "RandomApply" else apply_p
        return [d for x in inner for d in describe(x, p)]
    attrs = {k: _jsonable(v) for k, v in vars(t).items() if not k.startswith("_") and not callable(v)}
    return [{"type": type(t).__name__, "apply_p": apply_p, **attrs}]


def solarize_threshold(transform) -> int:
    """The first pixel value the solarize transform inverts, found by running it on 0..255."""
    from PIL import Image

    ramp = Image.fromarray(torch.arange(256, dtype=torch.uint8).reshape(16, 16).numpy()).convert("RGB")
    out = torch.tensor(list(transform(ramp).getdata()))[:, 0]
    changed = (out != torch.arange(256)).nonzero()
    return int(changed[0]) if len(changed) else 256


class _ReachedData(Exception):
    pass


def _moco_views(recipe: dict) -> dict:
    """main_moco.main_worker on the recipe until it makes its dataset: the TwoCropsTransform it passes."""
    import main_moco

    args = argparse.Namespace(**recipe["args"])
    args.distributed = args.multiprocessing_distributed = False   # one process; print stays print
    seen = {}

    def image_folder(root, transform):
        seen["transform"] = transform
        raise _ReachedData

    saved = main_moco.datasets.ImageFolder, main_moco.SummaryWriter
    main_moco.datasets.ImageFolder, main_moco.SummaryWriter = image_folder, lambda *a, **kw: None
    try:
        with official.cuda_is_cpu(), contextlib.redirect_stdout(io.StringIO()):
            main_moco.main_worker(None, 0, args)
    except _ReachedData:
        pass
    finally:
        main_moco.datasets.ImageFolder, main_moco.SummaryWriter = saved
    t = seen["transform"]
    return {"view1": describe(t.base_transform1), "view2": describe(t.base_transform2)}


def _defaults(fn) -> dict:
    return {k: _jsonable(p.default) for k, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _vit_size(model) -> dict:
    """A ViT's width, depth, heads and patch size, read off the built model."""
    patch = getattr(model.patch_embed, "patch_size", 16)
    return {"embed_dim": model.embed_dim, "depth": len(model.blocks), "num_heads": model.blocks[0].attn.num_heads,
            "patch_size": patch[0] if isinstance(patch, (tuple, list)) else patch,
            "stem": "patch" if hasattr(model.patch_embed.proj, "weight") else "conv"}


def generate(moco_v3: Path, dino: Path, out: Path) -> None:
    import main_dino
    import moco.loader
    import moco.optimizer
    import utils
    import vision_transformer
    import vits

    official.prepare_vits(vits)
    result = {"official": official.provenance(moco_v3, dino), "moco_v3": {}, "dino": {}}
    for repo, md, key in ((moco_v3, "CONFIG.md", "moco_v3"), (dino, "README.md", "dino")):
        for title, cmd in commands((repo / md).read_text()):
            if title in result[key]:
                raise ValueError(f"{md}: two commands under {title!r}")
            result[key][title] = _recipe(cmd, dino)
    vanilla = result["dino"][DINO_VANILLA]["args"]
    aug = main_dino.DataAugmentationDINO(vanilla["global_crops_scale"], vanilla["local_crops_scale"],
                                         vanilla["local_crops_number"])
    result["augmentation"] = {
        "moco_v3": {"recipe": R50_RECIPE, **_moco_views(result["moco_v3"][R50_RECIPE]),
                    "solarize_threshold": solarize_threshold(moco.loader.Solarize())},
        "dino": {"recipe": DINO_VANILLA, "global1": describe(aug.global_transfo1),
                 "global2": describe(aug.global_transfo2), "local": describe(aug.local_transfo),
                 "local_crops_number": aug.local_crops_number,
                 "solarize_threshold": solarize_threshold(utils.Solarization(1.0))}}
    adamw = inspect.signature(torch.optim.AdamW).parameters
    result["adamw_defaults"] = {k: _jsonable(adamw[k].default) for k in ("betas", "eps")}
    result["defaults"] = {"moco.optimizer.LARS": _defaults(moco.optimizer.LARS),
                          "main_dino.DINOLoss": _defaults(main_dino.DINOLoss),
                          "vision_transformer.DINOHead": _defaults(vision_transformer.DINOHead)}
    result["archs"] = {"moco_v3": {a: _vit_size(vits.__dict__[a]()) for a in MOCO_ARCHS},
                       "dino": {a: _vit_size(vision_transformer.__dict__[a](patch_size=16)) for a in DINO_ARCHS}}
    (out / "recipes.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
