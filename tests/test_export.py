"""Export and evaluation loading of real runs: every ZeRO stage each method supports (MoCo v3 ViT with and
without a frozen patch projection, DINO, MoCo v3 ResNet), each read back exactly as the live model held it
at save time; the load line fastmoco-export prints runs; a damaged newest checkpoint falls back to the
previous one; a failed export writes nothing. CPU, fp32, 2 gloo ranks (tests/export_worker.py)."""
import json
import shutil
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file

from fastmoco.evaluation.cli import export_main
from fastmoco.evaluation.weights import HEAD_PREFIXES, OFFICIAL_PREFIX, PREFIXES, build_backbone, export, load_weights
from test_train import ROOT, free_port, run

WORKER = str(ROOT / "tests" / "export_worker.py")
STEP = "step_00000002"
# ZeRO stages: LARS (the ResNet recipe) locates parameters in ZeRO-1/2 partitions, not in ZeRO-3 shards.
CASES = ([f"moco-z{s}-frozen" for s in range(4)] + [f"moco-z{s}" for s in range(4)] +
         [f"dino-z{s}" for s in range(4)] + [f"r50-z{s}" for s in range(3)])
BF16_CASES = ["moco-z1-frozen-bf16", "moco-z3-frozen-bf16"]   # ZeRO-0 bf16: test_evaluation.py
_TRAINED = {}   # one training per case per session, whichever test module asks first


def trained(tmp_path_factory, cases=CASES + BF16_CASES):
    """The folder holding a 2-rank run of each case (one torchrun for all the cases not trained yet)."""
    if "root" not in _TRAINED:
        _TRAINED["root"] = tmp_path_factory.mktemp("zero_runs")
    root = _TRAINED["root"]
    todo = [c for c in cases if not (root / c / "live.pt").is_file()]
    if todo:
        run_worker("train", root, todo)
    return root


def run_worker(mode, root, cases):
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
         WORKER, mode, str(root), *cases],
        what=f"export worker ({mode}: {len(cases)} case(s), 2 gloo ranks under torchrun)")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return trained(tmp_path_factory)


def method_of(case):
    return {"moco": "moco_v3", "dino": "dino", "r50": "moco_v3"}[case.split("-")[0]]


def backbone_of(sd, method, encoder):
    prefix = PREFIXES[method][encoder]
    return {k[len(prefix):]: v for k, v in sd.items()
            if k.startswith(prefix) and not k[len(prefix):].startswith(HEAD_PREFIXES)}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_export_holds_the_runs_own_weights(runs, tmp_path, case):
    dump = torch.load(runs / case / "live.pt")
    live, method = dump["live"], method_of(case)
    online = PREFIXES[method]["online"]
    if case.startswith("moco"):  # the case is what it says: the online patch projection frozen or not
        assert (online + "patch_embed.proj.weight" in dump["frozen"]) == case.endswith("frozen")
    sd, info = load_weights(runs / case)
    assert (info.method, info.step) == (method, 2)
    assert sd.keys() == live.keys()
    for k, v in live.items():
        assert torch.equal(sd[k], v), k
    momentum = PREFIXES[method]["momentum"]
    assert any(not torch.equal(sd[online + k], sd[momentum + k]) for k in backbone_of(sd, method, "online"))
    for encoder in ("online", "momentum"):
        out, off = export(runs / case, tmp_path / f"{encoder}.safetensors", encoder=encoder)
        want = backbone_of(live, method, encoder)
        got = load_file(out)
        assert got.keys() == want.keys() and len(want) > 20
        for k, v in want.items():
            assert torch.equal(got[k], v), (encoder, k)
        if off is not None:   # MoCo v3: the whole model in the official layout
            again = torch.load(off, weights_only=True)["state_dict"]
            assert again.keys() == {OFFICIAL_PREFIX + k for k in live}
            for k, v in live.items():
                assert torch.equal(again[OFFICIAL_PREFIX + k], v), k
        build_backbone(*reversed(load_weights(out)))   # what fastmoco-knn / -linear build from it


def official_layout_file(path, arch, **kw):
    """A fastmoco MoCo model (random weights, BN statistics moved off their init) saved in the official
    layout, the way main_moco.py saves ({"state_dict": {"module.<name>": ...}})."""
    from fastmoco.moco import MoCo
    torch.manual_seed(0)
    model = MoCo(arch, img_size=32, dim=16, mlp_dim=24, frozen_patch_embed=False, **kw)
    sd = {k: torch.randn_like(v) * 0.02 + (1.0 if k.endswith("running_var") else 0.0) if v.is_floating_point()
          else v for k, v in model.state_dict().items()}
    torch.save({"state_dict": {OFFICIAL_PREFIX + k: v for k, v in sd.items()}, "arch": arch}, path)
    return path


@pytest.mark.parametrize("arch,kw,library", [("vit_test", {}, "timm"), ("vit_test", {"mlp_norm": "bn"}, "fastmoco"),
                                             ("vit_conv_test", {}, "fastmoco"), ("resnet18", {}, "torchvision")])
def test_every_printed_load_line_loads_the_backbone(tmp_path, capsys, arch, kw, library):
    """fastmoco-export prints one line of Python; run as printed it gives a model whose features equal
    fastmoco's backbone (vit_test: timm needs its width and depth; timm has no conv stem or ViT-BN)."""
    out = tmp_path / "b.safetensors"
    export_main(["--checkpoint", str(official_layout_file(tmp_path / "c.pth.tar", arch, **kw)), "--out", str(out)])
    assert assert_load_line_works(capsys.readouterr().out, out, in_size=32) == library


@pytest.mark.slow
def test_an_exported_dino_teacher_loads_by_its_line_and_in_knn(runs, tmp_path, capsys):
    """DINO's ViT (its own head count) from a run, through timm; fastmoco-knn takes the exported file's one
    encoder by default (a DINO run's default, the teacher, is not in a backbone file)."""
    from fastmoco.evaluation.cli import knn_main
    from fastmoco.pipelines.demo_data import make_demo_data
    out = tmp_path / "b.safetensors"
    export_main(["--checkpoint", str(runs / "dino-z0"), "--out", str(out)])
    assert assert_load_line_works(capsys.readouterr().out, out, in_size=32) == "timm"
    data = make_demo_data(tmp_path / "data", 8, seed=0)
    knn_main(["--checkpoint", str(out), "--train", str(data), "--val", str(data), "--backend", "torchvision",
              "--num-threads", "1", "--batch-size", "4", "--k", "1", "--json", str(tmp_path / "knn.json")])
    assert json.loads((tmp_path / "knn.json").read_text())["knn"]["1"]["top1"] == 100.0   # val = train


def assert_load_line_works(printed, out, in_size):
    lines = [line.strip() for line in printed.splitlines() if line.startswith("  ")]
    assert len(lines) == 1, printed
    library, code = lines[0].split(": ", 1)
    scope = {}
    exec(code, scope)  # noqa: S102 - the line the command printed, as a user would paste it
    model = scope["model"].eval()
    ours = build_backbone(*reversed(load_weights(out))).eval()
    x = torch.randn(2, 3, in_size, in_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(x), ours(x)
    if library == "torchvision":   # torchvision's fc is random; compare the trunk's features
        model.fc = torch.nn.Identity()
        with torch.no_grad():
            a = model(x)
    torch.testing.assert_close(a, b.reshape(a.shape), rtol=1e-5, atol=1e-5)
    return library


@pytest.mark.slow
@pytest.mark.parametrize("case", BF16_CASES)
def test_bf16_export_holds_the_fp32_copies(runs, case):
    """Under bf16 the trainable weights are DeepSpeed's fp32 copies (equal to what DeepSpeed's own
    consolidation, zero_to_fp32, makes of them), the momentum encoder fastmoco's fp32 EMA state, the
    frozen patch projection as stored: each rounds to the live bf16 module's value, and many are finer."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    live = torch.load(runs / case / "live.pt")["live"]
    sd, _ = load_weights(runs / case)
    assert sd.keys() == live.keys()
    finer = 0
    for k, v in live.items():
        if not v.is_floating_point():   # BatchNorm's step counts
            assert torch.equal(sd[k], v), k
            continue
        assert sd[k].dtype == torch.float32 and torch.equal(sd[k].to(v.dtype), v), k
        finer += not torch.equal(sd[k], v.float())
    assert finer > 30
    # the test's own files, just written: DeepSpeed's consolidation (which unpickles) as the reference
    ref = get_fp32_state_dict_from_zero_checkpoint(str(runs / case / "checkpoints"), tag=STEP)
    trainable = [k for k in ref if k.startswith(("base_encoder", "predictor")) and "patch_embed" not in k]
    assert len(trainable) > 30
    for k in trainable:
        assert torch.equal(sd[k], ref[k].float()), k


def copy_step(run_dir, new_step):
    """A second complete checkpoint in `run_dir`, a copy of its last one under a newer step."""
    ckpts = run_dir / "checkpoints"
    new = ckpts / f"step_{new_step:08d}"
    shutil.copytree(ckpts / STEP, new)
    return new


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_evaluation_skips_a_damaged_newest_checkpoint_as_resume_does(runs, tmp_path, capsys, damage):
    case = "moco-z1-frozen"
    run_dir = tmp_path / case
    shutil.copytree(runs / case, run_dir)
    newer = copy_step(run_dir, 3)
    victim = newer / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    if damage == "truncated":
        victim.write_bytes(victim.read_bytes()[:1000])
    else:
        victim.unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sd, info = load_weights(run_dir)
        export_main(["--checkpoint", str(run_dir), "--out", str(tmp_path / "b.safetensors")])
    assert info.path == str(run_dir / "checkpoints" / STEP)
    assert [str(w.message) for w in caught if "skipping damaged checkpoint" in str(w.message)
            and str(newer) in str(w.message)], [str(w.message) for w in caught]
    live = torch.load(runs / case / "live.pt")["live"]
    assert all(torch.equal(sd[k], v) for k, v in live.items())
    got, want = load_file(tmp_path / "b.safetensors"), backbone_of(live, "moco_v3", "online")
    assert got.keys() == want.keys() and all(torch.equal(got[k], v) for k, v in want.items())
    # named explicitly, the damaged checkpoint is refused with what is wrong with it
    with pytest.raises(SystemExit) as e:
        export_main(["--checkpoint", str(newer), "--out", str(tmp_path / "c.safetensors")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert str(newer) in err and "zero_pp_rank_1_mp_rank_00_optim_states.pt" in err and "Traceback" not in err
    assert not (tmp_path / "c.safetensors").exists()


@pytest.mark.slow
def test_an_export_that_fails_writes_no_file(runs, tmp_path, capsys):
    """What the ZeRO-1 consolidation did (the frozen patch projection lost): export exits 2, naming the
    key, and neither output file exists."""
    case = "moco-z1-frozen"
    run_dir = tmp_path / case
    shutil.copytree(runs / case, run_dir)
    ckpt = run_dir / "checkpoints" / STEP
    states_file = ckpt / "mp_rank_00_model_states.pt"
    states = torch.load(states_file, weights_only=True)
    for k in ("base_encoder.patch_embed.proj.weight", "base_encoder.patch_embed.proj.bias"):
        del states["module"][k]
    torch.save(states, states_file)
    rewrite_manifest(ckpt)
    out = tmp_path / "exp" / "b.safetensors"
    with pytest.raises(SystemExit) as e:
        export_main(["--checkpoint", str(run_dir), "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "missing base_encoder.patch_embed.proj.weight" in err and str(ckpt) in err, err
    assert not (tmp_path / "exp").exists() or list((tmp_path / "exp").iterdir()) == []


def rewrite_manifest(ckpt):
    """The COMPLETE file's manifest as if the checkpoint had been written as it now is (a tampered or
    re-saved file then passes the size check, as an attacker's would)."""
    from fastmoco.checkpoint import MARKER, _manifest
    meta = json.loads((ckpt / MARKER).read_text())
    meta["files"] = {k: v for k, v in _manifest(ckpt).items() if k != MARKER}
    (ckpt / MARKER).write_text(json.dumps(meta, indent=1))
