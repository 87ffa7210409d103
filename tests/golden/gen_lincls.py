"""lincls_<case>.safetensors: what the official main_lincls.py does with fastmoco's export of a tiny run.

`tiny_export` trains two steps of a CPU config with fastmoco's training entry (seeded, fp32, ZeRO-0) and
exports it (fastmoco.evaluation.weights.export: <out>.moco_v3.pth.tar, the official layout). Then
main_lincls.main_worker runs with --pretrained on that file until it would read ImageNet: it builds the
model (vits.py's ViT at fastmoco's vit_test sizes, or torchvision's resnet18), freezes all but the linear
layer, renames 'module.base_encoder.*' keys, loads with strict=False and asserts that only the linear layer
is missing, and asserts that 2 parameters train. Recorded: which file key each loaded model key came from
(main_lincls renames in place, so a loaded tensor is the file's tensor object), the missing and unexpected
keys, the trainable parameters, and a digest of each loaded tensor.

Tensors: loaded/<model key> (digest). Meta: case, file_keys, loaded {model key: file key}, missing,
unexpected, trainable, reached (the point main_worker got to: "data", past every check).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from limits import run_until_hang

from golden import official, tensors

ROOT = Path(__file__).resolve().parents[2]
# Two steps without warmup and with large steps, so that the online and the momentum encoder differ by
# far more than the tolerance (1e-2 relative here, the tolerance 1e-4): an export that swapped them would
# fail. Both cases train with LARS, whose updates follow the gradients' size: the ViT's AdamW would turn
# the rounding noise of gradients that are 0 in exact arithmetic (the key bias in qkv.bias, the final
# norm's bias before the projector's BatchNorm) into steps of the full learning rate, whose signs differ
# between CPUs (AVX-512 or AVX2 kernels), and no tolerance could tell them from a wrong export.
CASES = {"vit": dict(config="tiny.json", arch="vit_test",
                     overrides=["--optim.name", "lars", "--optim.base_lr", "4", "--optim.trust_coefficient", "0.1"]),
         "r50": dict(config="r50_tiny.json", arch="resnet18",
                     overrides=["--optim.base_lr", "32", "--optim.trust_coefficient", "0.1"])}
TINY_RUN = ["--schedule.max_steps", "2", "--schedule.warmup_epochs", "0", "--seed", "0", "--data.seed", "0",
            "--logging.tensorboard", "false", "--logging.progress", "false", "--deepspeed.zero_optimization.stage", "0"]


def tiny_export(case: str, workdir: Path) -> Path:
    """Two training steps of the case's CPU config, exported; returns the official-layout file."""
    from fastmoco.evaluation.weights import export

    run = workdir / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env.pop("TRITON_INTERPRET", None)
    c = CASES[case]
    cmd = [sys.executable, str(ROOT / "fastmoco" / "train.py"), "--config", str(ROOT / "configs" / c["config"]),
           *TINY_RUN, *c["overrides"], "--logging.out_dir", str(run)]
    p = run_until_hang(cmd, f"two training steps of {c['config']} to export (fastmoco/train.py)", cwd=ROOT, env=env,
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    _, official_file = export(run, workdir / "backbone.safetensors")
    return official_file


class _ReachedData(Exception):
    """main_lincls got to its data loading: everything about the pretrained weights is done."""


def _main_lincls(path: Path, arch: str) -> dict:
    import main_lincls
    import vits

    official.prepare_vits(vits)
    record = {}
    real_load, real_load_state_dict = torch.load, torch.nn.Module.load_state_dict

    def load(f, *a, **kw):   # the pretrained file: remember each tensor's key before main_lincls renames
        ckpt = real_load(f, *a, **kw)
        if str(f) == str(path):
            record["file_keys"] = sorted(ckpt["state_dict"])
            record["key_of"] = {id(v): k for k, v in ckpt["state_dict"].items()}
        return ckpt

    def load_state_dict(self, state_dict, *a, **kw):
        result = real_load_state_dict(self, state_dict, *a, **kw)
        record.update(model=self, passed=dict(state_dict), missing=sorted(result.missing_keys),
                      unexpected=sorted(result.unexpected_keys))
        return result

    def image_folder(*a, **kw):
        raise _ReachedData

    # parse with an arch the parser knows, then the tiny one (vits.vit_test is not among its choices)
    args = main_lincls.parser.parse_args(["-a", "resnet18", "--pretrained", str(path), "imagenet"])
    args.arch, args.distributed, args.multiprocessing_distributed = arch, False, False
    torch.load, torch.nn.Module.load_state_dict = load, load_state_dict
    saved_folder = main_lincls.datasets.ImageFolder
    main_lincls.datasets.ImageFolder = image_folder
    try:
        with official.cuda_is_cpu():
            main_lincls.main_worker(None, 0, args)
        raise AssertionError("main_lincls.main_worker returned before reading its data")
    except _ReachedData:
        record["reached"] = "data"
    finally:
        torch.load, torch.nn.Module.load_state_dict = real_load, real_load_state_dict
        main_lincls.datasets.ImageFolder = saved_folder
    model = record.pop("model")
    record["loaded"] = {k: record["key_of"][id(v)] for k, v in record.pop("passed").items()}
    record["trainable"] = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    record["digests"] = {k: tensors.digest(model.state_dict()[k]) for k in record["loaded"]}
    del record["key_of"]
    return record


def generate(moco_v3: Path, dino: Path, out: Path) -> None:
    import tempfile

    prov = official.provenance(moco_v3, dino)
    for name, c in CASES.items():
        with tempfile.TemporaryDirectory(prefix="fastmoco-golden-lincls-") as tmp:
            record = _main_lincls(tiny_export(name, Path(tmp)), c["arch"])
        digests = record.pop("digests")
        tensors.write(out / f"lincls_{name}.safetensors", {f"loaded/{k}": v for k, v in digests.items()},
                      {"case": c, "tiny_run": TINY_RUN, **record, "official": prov})
