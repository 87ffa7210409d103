"""Evaluation: weighted kNN against brute force, linear probes, export/import, the training monitor,
bad input. CPU only (fp32); multi-process on gloo."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn

from fastmoco.evaluation import linear as lin
from fastmoco.evaluation.knn import knn_accuracy
from fastmoco.evaluation.weights import (OFFICIAL_PREFIX, WeightsError, build_backbone, export, init_from,
                                         load_weights)
from fastmoco.models.vit import VIT_SIZES, VisionTransformer
from bench.peer import official_mlp
from test_train import COMMON, ROOT, TINY, free_port, run, train_1proc, train_2proc

EVAL_WORKER = str(ROOT / "tests" / "eval_worker.py")


# -- kNN ---------------------------------------------------------------------------------------------
def brute_force_knn(bank, bank_labels, queries, query_labels, k, temperature, num_classes):
    """DINO's weighted kNN, written out per query in float64 Python."""
    bank = (bank / bank.norm(dim=1, keepdim=True)).double()
    queries = (queries / queries.norm(dim=1, keepdim=True)).double()
    sims = (queries @ bank.T).tolist()
    top1 = top5 = 0
    for i, row in enumerate(sims):
        nearest = sorted(range(len(row)), key=lambda j: -row[j])[:k]
        votes = [0.0] * num_classes
        for j in nearest:
            votes[int(bank_labels[j])] += math.exp(row[j] / temperature)
        ranked = sorted(range(num_classes), key=lambda c: -votes[c])
        label = int(query_labels[i])
        top1 += ranked[0] == label and votes[label] > 0
        top5 += label in ranked[:5] and votes[label] > 0
    n = len(sims)
    return 100.0 * top1 / n, 100.0 * top5 / n


@pytest.mark.parametrize("chunks", [(1024, 262144), (7, 13)])
def test_knn_equals_brute_force_on_random_features(chunks):
    g = torch.Generator().manual_seed(0)
    classes = 9
    bank, queries = torch.randn(157, 24, generator=g), torch.randn(61, 24, generator=g)
    # labels correlated with the features, so the accuracies are neither 0 nor chance
    proj = torch.randn(24, classes, generator=g)
    bank_labels = (bank @ proj + 2 * torch.randn(157, classes, generator=g)).argmax(1)
    query_labels = (queries @ proj + 2 * torch.randn(61, classes, generator=g)).argmax(1)
    ks = (1, 5, 20, 200)     # 200 > bank size: every neighbour votes
    got = knn_accuracy(bank, bank_labels, queries, query_labels, ks=ks, temperature=0.07, num_classes=classes,
                       query_chunk=chunks[0], bank_chunk=chunks[1])
    for k in ks:
        want = brute_force_knn(bank, bank_labels, queries, query_labels, min(k, 157), 0.07, classes)
        assert got[k] == pytest.approx(want, abs=1e-9), (k, got[k], want)
    assert 100 / classes + 10 < got[20][0] < 100


def test_knn_is_perfect_on_separated_clusters():
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(10, 32, generator=g) * 10
    bank_labels, query_labels = torch.arange(300) % 10, torch.arange(77) % 10
    bank = centres[bank_labels] + torch.randn(300, 32, generator=g)
    queries = centres[query_labels] + torch.randn(77, 32, generator=g)
    res = knn_accuracy(bank, bank_labels, queries, query_labels, ks=(20,), num_classes=10, bank_chunk=64)
    assert res == {20: (100.0, 100.0)}


def test_knn_names_bad_shapes():
    with pytest.raises(ValueError, match="width 8, queries of width 9"):
        knn_accuracy(torch.randn(4, 8), torch.zeros(4, dtype=torch.long), torch.randn(2, 9),
                     torch.zeros(2, dtype=torch.long))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A small labelled train/val pair of real JPEG folders (odd sizes: uneven shards)."""
    from fastmoco.pipelines.demo_data import make_demo_data
    root = tmp_path_factory.mktemp("evaldata")
    return make_demo_data(root / "train", 23, seed=0), make_demo_data(root / "val", 13, seed=7)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_two_processes_extract_the_same_features_and_knn_as_one(folders, tmp_path, backend):
    from fastmoco.pipelines import scan_image_folder
    train, val = folders
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    run([sys.executable, EVAL_WORKER, str(one), str(train), str(val), backend])
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
         EVAL_WORKER, str(two), str(train), str(val), backend])
    a, b = torch.load(one), torch.load(two)
    for split, folder in (("train", train), ("val", val)):
        (fa, la), (fb, lb) = a[split], b[split]
        labels = torch.tensor([label for _, label in scan_image_folder(folder)])
        assert torch.equal(la, labels) and torch.equal(lb, labels)   # dataset order on every rank count
        assert fa.shape == fb.shape == (len(labels), VIT_SIZES["vit_test"].embed_dim)
        torch.testing.assert_close(fb, fa, rtol=1e-5, atol=1e-6)
        assert fa.std(0).min() > 0   # real, different features per image
    assert a["knn"] == b["knn"]


# -- linear probes -----------------------------------------------------------------------------------
def test_fast_linear_probe_separates_a_linearly_separable_task():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 6, generator=g)
    x = torch.randn(6000, 12, generator=g)
    logits = x @ w
    margin = logits.topk(2, dim=1).values
    keep = (margin[:, 0] - margin[:, 1]) > 1.0  # linearly separable by construction, with a margin
    x, y = x[keep][:2000], logits[keep][:2000].argmax(1)
    res = lin.train_linear_fast(x[:1500], y[:1500], x[1500:], y[1500:], num_classes=6, epochs=30,
                                batch_size=128, lrs=(0.001, 0.1, 3.0))
    assert res.top1 >= 95.0, res
    assert res.top5 == 100.0
    held = res.extra["heldout_top1"]
    assert res.lr == res.extra["lrs"][max(range(3), key=held.__getitem__)]   # chosen on held-out data
    assert held[0] < held[2]                    # a too-small lr learns less in 40 epochs: they differ


def test_official_linear_probe_learns_and_leaves_the_backbone_bit_identical():
    from fastmoco.config import DataConfig
    from fastmoco.pipelines import SyntheticTwoCropLoader
    torch.manual_seed(0)
    backbone = VisionTransformer("vit_test", img_size=32)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    cfg = DataConfig(source="synthetic", image_size=32, synthetic_size=120)
    train = SyntheticTwoCropLoader(cfg, batch_size=20, train=True)
    val = SyntheticTwoCropLoader(cfg, batch_size=32, train=False)
    res = lin.train_linear_official(backbone, train, val, num_classes=10, epochs=25, base_lr=3.0 * 256 / 20,
                                    log=lambda *_: None)
    assert res.top1 >= 90.0, res
    after = backbone.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    # the sanity check itself catches a changed weight
    with torch.no_grad():
        backbone.blocks[0].mlp.fc1.weight[0, 0] += 1e-6
    with pytest.raises(RuntimeError, match="blocks.0.mlp.fc1.weight"):
        lin.check_unchanged(before, backbone)


def test_official_lr_schedule_is_main_lincls_cosine():
    assert lin.official_lr(0, 90, 12.0) == 12.0
    assert lin.official_lr(45, 90, 12.0) == pytest.approx(6.0)
    assert lin.official_lr(89, 90, 12.0) == pytest.approx(12.0 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))


# -- export and import -------------------------------------------------------------------------------
def official_checkpoint(path, arch, img_size, dim=32, mlp_dim=48, seed=0):
    """An official MoCo v3 checkpoint file: timm ViTs (as moco-v3 vits.py builds on timm) with the
    official heads, every tensor random, saved as main_moco.py saves ({"state_dict": {"module.*"}})."""
    torch.manual_seed(seed)
    size = VIT_SIZES[arch]

    def encoder():
        vit = timm.create_model(size.timm_name, pretrained=False, num_classes=0, img_size=img_size,
                                num_heads=size.num_heads, class_token=True, global_pool="token")
        vit.head = official_mlp(3, size.embed_dim, mlp_dim, dim)
        return vit

    model = nn.ModuleDict({"base_encoder": encoder(), "momentum_encoder": encoder(),
                           "predictor": official_mlp(2, dim, mlp_dim, dim)})
    state = {}
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            v = torch.randn_like(v) * 0.02 + (1.0 if k.endswith("running_var") else 0.0)
        else:
            v = torch.randint_like(v, 100)
        state[OFFICIAL_PREFIX + k] = v
    torch.save({"epoch": 300, "arch": arch, "state_dict": state, "optimizer": {}}, path)
    return state


@pytest.mark.parametrize("arch,img_size", [("vit_small", 32), pytest.param("vit_base", 48, marks=pytest.mark.long)])
def test_official_checkpoint_loads_exactly_and_exports_to_timm(tmp_path, arch, img_size):
    state = official_checkpoint(tmp_path / "checkpoint_0299.pth.tar", arch, img_size)
    sd, info = load_weights(tmp_path / "checkpoint_0299.pth.tar")
    assert (info.arch, info.img_size, info.source, info.epoch) == (arch, img_size, "official", 300)
    assert set(sd) == {k[len(OFFICIAL_PREFIX):] for k in state}
    for k, v in state.items():
        assert torch.equal(sd[k[len(OFFICIAL_PREFIX):]], v.float() if v.is_floating_point() else v), k

    out, off = export(tmp_path / "checkpoint_0299.pth.tar", tmp_path / "out" / "backbone.safetensors")
    size = VIT_SIZES[arch]
    ref = timm.create_model(size.timm_name, pretrained=True, pretrained_cfg_overlay=dict(file=str(out)),
                            num_classes=0, img_size=img_size, num_heads=size.num_heads).eval()
    ours = build_backbone(info, sd, "online")
    x = torch.randn(3, 3, img_size, img_size)
    with torch.no_grad():
        a, b = ours(x), ref(x)
    rel = ((a - b).abs().max() / b.abs().max()).item()
    assert rel < 1e-5, rel
    # the official-layout file round-trips bit for bit, in the official key set
    again = torch.load(off, weights_only=True)
    assert set(again["state_dict"]) == set(state)
    for k, v in state.items():
        assert torch.equal(again["state_dict"][k], v.float() if v.is_floating_point() else v), k


def test_official_checkpoint_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("ran code",))
    torch.save({"state_dict": {}, "payload": Evil()}, tmp_path / "evil.pth.tar")
    with pytest.raises(WeightsError, match=r"evil.pth.tar does not load as tensors and numbers only \(it holds print;"):
        load_weights(tmp_path / "evil.pth.tar")


def test_init_from_refuses_another_architecture_naming_key_and_shapes(tmp_path):
    from fastmoco.moco import MoCo
    official_checkpoint(tmp_path / "small.pth.tar", "vit_small", 32)
    model = MoCo("vit_test", img_size=32, dim=32, mlp_dim=48)
    with pytest.raises(WeightsError, match=r"base_encoder\.cls_token: \(1, 1, 384\) in the checkpoint, "
                                           r"\(1, 1, 72\) in the model"):
        init_from(model, tmp_path / "small.pth.tar")


def test_export_writes_nothing_half_way(tmp_path, monkeypatch):
    official_checkpoint(tmp_path / "c.pth.tar", "vit_small", 32)
    out = tmp_path / "exp" / "b.safetensors"

    def fail(*args, **kwargs):
        raise OSError("No space left on device")
    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OSError):
        export(tmp_path / "c.pth.tar", out)
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == []   # no file, no temporary left


# -- from training runs: ZeRO stages, the monitor, bad input -------------------------------------------
@pytest.mark.slow
def test_bf16_zero0_export_reads_the_fp32_masters(tmp_path):
    """Under bf16 the module is bf16; the export takes the optimizer's fp32 copy (online) and the fp32
    EMA state (momentum): each rounds to the module's bf16 weight, and is not that bf16 value itself."""
    train_1proc(tmp_path, "--schedule.max_steps", "2", "--checkpoint.every_steps", "2",
                "--deepspeed.bf16.enabled", "true")
    sd, info = load_weights(tmp_path)
    module = torch.load(next((tmp_path / "checkpoints" / "step_00000002").glob("*model_states.pt")),
                        weights_only=True)["module"]
    finer = 0
    for k, v in module.items():
        if k.startswith(("base_encoder.blocks", "momentum_encoder.blocks")) and v.is_floating_point():
            assert sd[k].dtype == torch.float32 and v.dtype == torch.bfloat16, k
            assert torch.equal(sd[k].bfloat16(), v), k
            finer += not torch.equal(sd[k], v.float())
    assert finer > 10   # fp32 values that bf16 cannot hold: the masters, not the module


@pytest.mark.long
@pytest.mark.slow
def test_zero3_on_two_processes_exports_the_same_weights_as_zero0(tmp_path):
    """Each export equals its own run's gathered fp32 weights exactly; the ZeRO-3 run's export equals the
    ZeRO-0 run's up to the two runs' own float differences (the momentum encoder as tight as
    test_train's sharded test; Adam moves near-zero biases by about lr whatever the gradient's rounding)."""
    z0, z3 = tmp_path / "z0", tmp_path / "z3"
    train_1proc(z0, "--schedule.max_steps", "4", "--checkpoint.every_steps", "4")
    train_2proc(z3, "--schedule.max_steps", "4", "--checkpoint.every_steps", "4",
                "--deepspeed.zero_optimization.stage", "3")
    exported = {}
    for run_dir in (z0, z3):
        dump = torch.load(run_dir / "dump.pt")
        for encoder in ("online", "momentum"):
            out, _ = export(run_dir, tmp_path / f"{run_dir.name}_{encoder}.safetensors", encoder=encoder)
            w = {k[len("base_encoder."):]: v for k, v in load_weights(out)[0].items()}
            backbone = {k: v for k, v in dump[encoder].items() if not k.startswith("head.")}  # no projector
            assert len(backbone) > 20 and set(backbone) <= set(w)
            for k, v in backbone.items():
                assert torch.equal(w[k], v), (run_dir.name, encoder, k)
            exported[run_dir.name, encoder] = w
    for encoder, atol in (("momentum", 1e-7), ("online", 2e-5)):
        a, b = exported["z0", encoder], exported["z3", encoder]
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=atol, msg=f"{encoder} {k}")
    assert not torch.equal(exported["z0", "online"]["blocks.0.attn.qkv.weight"],
                           exported["z0", "momentum"]["blocks.0.attn.qkv.weight"])


def _records(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_monitor_does_not_change_the_training(folders, tmp_path):
    train, val = folders
    plain, monitored = tmp_path / "plain", tmp_path / "monitored"
    train_1proc(plain, "--schedule.max_steps", "10")
    p = train_1proc(monitored, "--schedule.max_steps", "10", "--eval.train_path", str(train), "--eval.val_path",
                    str(val), "--eval.every_epochs", "1", "--eval.at_start", "true", "--eval.backend",
                    "torchvision", "--eval.k", "[1, 3]")
    a = {r["step"]: r["loss"] for r in _records(plain) if "loss" in r}
    b = {r["step"]: r["loss"] for r in _records(monitored) if "loss" in r}
    assert sorted(a) == list(range(1, 11)) and a == b          # bit-identical losses
    evals = [r for r in _records(monitored) if "eval" in r]
    assert [r["step"] for r in evals] == [0, 8, 10]             # start, end of epoch 1, end of run
    for r in evals:
        assert set(r["eval"]) == {"knn_top1@1", "knn_top5@1", "knn_top1@3", "knn_top5@3", "seconds"}
        assert 0 <= r["eval"]["knn_top1@1"] <= 100
    assert "kNN accuracy of the online backbone" in p.stdout and "at initialisation" in p.stdout
    # the finished run resumed: nothing trained, no evaluation run or recorded again, the same summary
    summary = p.stdout[p.stdout.index("kNN accuracy"):].splitlines()[:2]
    again = run([sys.executable, str(ROOT / "fastmoco" / "train.py"), "--config", TINY, *COMMON, "--logging.out_dir",
                 str(monitored), "--schedule.max_steps", "10", "--eval.train_path", str(train), "--eval.val_path",
                 str(val), "--eval.every_epochs", "1", "--eval.at_start", "true", "--eval.backend", "torchvision",
                 "--eval.k", "[1, 3]", "--resume", "auto"], what="the finished monitored run resumed (train.py)")
    assert [r for r in _records(monitored) if "eval" in r] == evals
    assert "kNN on" not in again.stdout and again.stdout[again.stdout.index("kNN accuracy"):].splitlines()[:2] \
        == summary, again.stdout


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing_val", "class_not_in_train", "other_arch"])
def test_bad_evaluation_input_is_named_before_anything_runs(folders, tmp_path, case):
    train, val = folders
    if case == "missing_val":
        cmd = [sys.executable, str(ROOT / "fastmoco" / "train.py"), "--config", TINY, *COMMON,
               "--logging.out_dir", str(tmp_path / "run"), "--eval.train_path", str(train),
               "--eval.val_path", str(tmp_path / "no_val")]
        expect = f"folder {str(tmp_path / 'no_val')!r} does not exist"
    elif case == "class_not_in_train":
        odd = tmp_path / "val"
        (odd / "zebra").mkdir(parents=True)
        for src in sorted(Path(val).glob("*/*.jpg"))[:2]:
            (odd / "zebra" / src.name).write_bytes(src.read_bytes())
        official_checkpoint(tmp_path / "c.pth.tar", "vit_small", 32)
        cmd = [sys.executable, "-m", "fastmoco.evaluation.cli", "knn", "--checkpoint", str(tmp_path / "c.pth.tar"),
               "--train", str(train), "--val", str(odd), "--backend", "torchvision"]
        expect = "class 'zebra' is not in the --train split"
    else:
        official_checkpoint(tmp_path / "small.pth.tar", "vit_small", 32)
        cmd = [sys.executable, str(ROOT / "fastmoco" / "train.py"), "--config", TINY, *COMMON,
               "--logging.out_dir", str(tmp_path / "run"), "--model.init_from", str(tmp_path / "small.pth.tar")]
        expect = "base_encoder.cls_token: (1, 1, 384) in the checkpoint, (1, 1, 72) in the model"
    p = run(cmd, check=False)
    assert p.returncode != 0
    assert expect in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_knn_and_linear_commands_on_a_training_checkpoint(folders, tmp_path):
    train, val = folders
    train_1proc(tmp_path / "run", "--schedule.max_steps", "2", "--checkpoint.every_steps", "2")
    common = ["--checkpoint", str(tmp_path / "run"), "--train", str(train), "--val", str(val),
              "--backend", "torchvision", "--num-threads", "1", "--batch-size", "8"]
    p = run([sys.executable, "-m", "fastmoco.evaluation.cli", "knn", *common, "--k", "1", "3",
             "--json", str(tmp_path / "knn.json")])
    r = json.loads((tmp_path / "knn.json").read_text())
    assert r["arch"] == "vit_test" and r["val_samples"] == 13 and r["train_samples"] == 23
    assert set(r["knn"]) == {"1", "3"} and "kNN on" in p.stdout
    p = run([sys.executable, "-m", "fastmoco.evaluation.cli", "linear", *common, "--fast", "--epochs", "5",
             "--json", str(tmp_path / "lin.json")])
    r = json.loads((tmp_path / "lin.json").read_text())
    assert r["mode"] == "fast" and 0 <= r["top1"] <= r["top5"] <= 100
    assert "NOT the paper's protocol" in p.stdout


@pytest.mark.slow
def test_linear_knn_and_extraction_keep_a_split_smaller_than_one_batch(folders, tmp_path):
    """fastmoco-linear at its official default batch (1024 per process) on 23 train images: main_lincls
    keeps the last partial batch (drop_last=False), so does fastmoco (it refused: "no full batch of
    1024"); kNN and extraction see every image of both splits at that batch."""
    train, val = folders
    train_1proc(tmp_path / "run", "--schedule.max_steps", "1", "--checkpoint.every_steps", "1")
    common = ["--checkpoint", str(tmp_path / "run"), "--train", str(train), "--val", str(val),
              "--backend", "torchvision", "--num-threads", "1"]
    p = run([sys.executable, "-m", "fastmoco.evaluation.cli", "linear", *common, "--epochs", "2",
             "--json", str(tmp_path / "lin.json")])
    r = json.loads((tmp_path / "lin.json").read_text())
    assert r["mode"] == "official" and 0 <= r["top1"] <= r["top5"] <= 100, p.stdout
    assert r["train_images_per_epoch"] == 23, r     # the one partial batch, kept
    p = run([sys.executable, "-m", "fastmoco.evaluation.cli", "knn", *common, "--batch-size", "1024", "--k", "1",
             "--json", str(tmp_path / "knn.json")])
    r = json.loads((tmp_path / "knn.json").read_text())
    assert r["train_samples"] == 23 and r["val_samples"] == 13


# -- bench entry and GPU ---------------------------------------------------------------------------------
def test_evaluation_bench_smoke_runs_every_entry(tmp_path):
    import bench.evaluation as be
    from fastmoco.pipelines.demo_data import make_demo_data
    data = make_demo_data(tmp_path / "data", 12, seed=3)
    recs = be.bench_evaluation(torch.device("cpu"), data_dir=data, threads=1, smoke=True)
    assert [(r["name"], r["status"]) for r in recs] == [("features", "ok"), ("features", "ok"), ("knn", "ok")]
    assert recs[1]["metrics"]["images"] == 12 and recs[1]["figures"]["img_per_s"] > 0
    assert "queries_per_s" in be.table(recs, markdown=False)


@pytest.mark.gpu
def test_knn_on_the_gpu_equals_the_cpu():
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(5000, 64, generator=g), torch.randn(700, 64, generator=g)
    bl, ql = torch.randint(50, (5000,), generator=g), torch.randint(50, (700,), generator=g)
    cpu = knn_accuracy(bank, bl, queries, ql, num_classes=50)
    gpu = knn_accuracy(bank.cuda(), bl.cuda(), queries.cuda(), ql.cuda(), num_classes=50, bank_chunk=1000,
                       query_chunk=128)
    for k in cpu:
        assert gpu[k] == pytest.approx(cpu[k], abs=100 / 700 + 1e-9)   # at most one near-tie query apart


@pytest.mark.gpu
def test_gpu_extraction_matches_the_cpu_twin(folders):
    """DALI on the GPU (nvJPEG decode, GPU resize/crop) against its CPU twin, same backbone in fp32: the
    decoders and resamplers differ slightly, so features agree closely, not bit for bit; labels exactly."""
    from fastmoco.config import DataConfig
    from fastmoco.evaluation.features import LabelledSplit, extract_features
    train, _ = folders
    torch.manual_seed(0)
    backbone = VisionTransformer("vit_small", img_size=64).eval()
    split = LabelledSplit.scan("train", str(train))
    out = {}
    for dev in ("cpu", "cuda"):
        loader = split.loader(DataConfig(backend="dali", num_threads=2), batch_size=5, image_size=64,
                              device=torch.device(dev), dtype=torch.float32)
        out[dev] = extract_features(backbone.to(dev), loader, image_size=64)
    (fc, lc), (fg, lg) = out["cpu"], out["cuda"]
    assert torch.equal(lc, lg.cpu())
    cos = torch.nn.functional.cosine_similarity(fc, fg.cpu().float(), dim=1)
    assert cos.min() > 0.99, cos.min()


# -- the export command's bad input: hostile files, outputs it must not replace ----------------------
def cli_export(*args):
    """fastmoco-export in this process: (exit status, stderr)."""
    import contextlib
    import io
    from fastmoco.evaluation.cli import export_main
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            export_main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


def hostile_safetensors(path, kind):
    """A .safetensors file that is damaged or lies about itself in the way `kind` names."""
    import struct
    from safetensors.torch import save_file
    if kind == "garbage":
        path.write_bytes(bytes(range(256)) * 4)
    elif kind == "huge_header":        # the header claims 2**62 bytes
        path.write_bytes(struct.pack("<Q", 2 ** 62) + b"{}")
    elif kind == "offsets_past_end":   # a tensor whose bytes lie beyond the file
        header = json.dumps({"cls_token": {"dtype": "F32", "shape": [1, 1, 72], "data_offsets": [0, 288]}}).encode()
        path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    else:                              # a real backbone whose metadata is not what export writes
        torch.manual_seed(0)
        backbone = {k: v.contiguous() for k, v in VisionTransformer("vit_test", img_size=32).state_dict().items()}
        meta = {"method": "evil"} if kind == "unknown_method" else {"num_heads": "5"}
        save_file(backbone, str(path), metadata=meta)
    return path


@pytest.mark.parametrize("kind", ["garbage", "huge_header", "offsets_past_end", "unknown_method", "bad_num_heads"])
def test_a_hostile_safetensors_file_is_refused_in_one_line(tmp_path, kind):
    src = hostile_safetensors(tmp_path / "in.safetensors", kind)
    code, err = cli_export("--checkpoint", src, "--out", tmp_path / "out.safetensors")
    assert code == 2, err
    assert f"{src}: " in err and "Traceback" not in err, err
    expect = {"unknown_method": "metadata method 'evil' unknown", "bad_num_heads": "num_heads 5 does not divide"}
    assert expect.get(kind, "not a readable safetensors file") in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]


def test_export_refuses_a_directory_and_existing_files_unless_forced(tmp_path):
    src = tmp_path / "c.pth.tar"
    official_checkpoint(src, "vit_small", 32)
    (tmp_path / "adir").mkdir()
    code, err = cli_export("--checkpoint", src, "--out", tmp_path / "adir")
    assert code == 2 and f"{tmp_path / 'adir'} is a directory" in err and "Traceback" not in err, err

    out, off = tmp_path / "b.safetensors", tmp_path / "b.moco_v3.pth.tar"
    out.write_bytes(b"keep me")
    code, err = cli_export("--checkpoint", src, "--out", out)
    assert code == 2 and f"{out} exists: pass --force" in err, err
    assert out.read_bytes() == b"keep me" and not off.exists()
    out.unlink()
    off.write_bytes(b"keep me too")   # only the second file exists: nothing is written either
    code, err = cli_export("--checkpoint", src, "--out", out)
    assert code == 2 and f"{off} exists: pass --force" in err, err
    assert not out.exists() and off.read_bytes() == b"keep me too"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "b.moco_v3.pth.tar", "c.pth.tar"]

    code, err = cli_export("--checkpoint", src, "--out", out, "--force")
    assert code == 0, err
    sd, _ = load_weights(src)
    assert torch.equal(load_weights(out)[0]["base_encoder.cls_token"], sd["base_encoder.cls_token"])
    assert torch.load(off, weights_only=True)["state_dict"].keys() == {OFFICIAL_PREFIX + k for k in sd}


def test_exported_files_get_the_mode_a_new_file_gets_here(tmp_path):
    """safetensors writes its file 0600; the export is read by other users and jobs like the .pth.tar."""
    src = tmp_path / "c.pth.tar"
    official_checkpoint(src, "vit_small", 32)
    old = os.umask(0o022)
    try:
        code, err = cli_export("--checkpoint", src, "--out", tmp_path / "b.safetensors")
    finally:
        os.umask(old)
    assert code == 0, err
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in tmp_path.glob("b.*")}
    assert modes == {"b.safetensors": "0o644", "b.moco_v3.pth.tar": "0o644"}, modes
