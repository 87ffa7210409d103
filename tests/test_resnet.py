"""MoCo v3 with a ResNet trunk (the official MoCo_ResNet) against an independent implementation
(torchvision ResNet, plain BatchNorm, the official MLPs from bench/peer.py, the official loss); 2 gloo
ranks against 1 process (BatchNorm of trunk and heads over the global batch); a tiny LARS run that
resumes exactly; export into torchvision. resnet18 at 32 px keeps the CPU time small: the code path is
resnet50's (same class, same heads)."""
import json
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from gloo_checks import moco_loss_and_grads, run_on_two_ranks
from bench.peer import official_mlp
from fastmoco.models.heads import GlobalBatchNorm2d
from fastmoco.moco import MoCo
from test_moco import assert_grad_close
from test_train import COMMON, ROOT, WORKER, free_port, losses, run

ARCH, IMG, DIM, MLP, TAU = "resnet18", 32, 32, 48, 1.0
R50_TINY = str(ROOT / "configs" / "r50_tiny.json")


def make_model(seed=0):
    torch.manual_seed(seed)
    model = MoCo(ARCH, img_size=IMG, dim=DIM, mlp_dim=MLP, tau=TAU)
    with torch.no_grad():  # zero_init_residual zeroes each block's last BN weight: make every branch count
        for enc in (model.base_encoder, model.momentum_encoder):
            for m in enc.modules():
                if isinstance(m, GlobalBatchNorm2d):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
        for p in model.momentum_encoder.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


def make_batch(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, IMG, IMG, generator=g), torch.randn(n, 3, IMG, IMG, generator=g)


def torchvision_encoder(ours_encoder):
    """torchvision's resnet18 (plain BatchNorm2d) with the official 2-layer projector as fc."""
    enc = torchvision.models.resnet18(zero_init_residual=True)
    enc.fc = official_mlp(2, enc.fc.in_features, MLP, DIM)
    enc.load_state_dict(ours_encoder.state_dict())
    return enc


def ctr(q, k, tau=TAU):
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    return F.cross_entropy(q @ k.T / tau, torch.arange(q.shape[0])) * 2 * tau


def test_structure_is_the_official_moco_resnet():
    model = make_model()
    enc = model.base_encoder
    assert [type(m) for m in enc.fc] == [nn.Linear, type(enc.fc[1]), nn.ReLU, nn.Linear, type(enc.fc[1])]
    assert not enc.fc[4].affine and enc.fc[0].in_features == 512
    assert [type(m) for m in model.predictor][-1] is nn.Linear  # predictor: no last BN (last_bn=False)
    assert not any(type(m) is nn.BatchNorm2d for m in enc.modules())
    r50 = MoCo("resnet50", dim=256, mlp_dim=4096)
    assert r50.base_encoder.fc[0].weight.shape == (4096, 2048) and r50.predictor[0].weight.shape == (4096, 256)
    fresh = MoCo("resnet50")
    assert all((b.bn3.weight == 0).all() for layer in (fresh.base_encoder.layer1, fresh.base_encoder.layer4)
               for b in layer)  # zero_init_residual


def test_loss_and_gradients_match_independent_implementation():
    model = make_model()
    x1, x2 = make_batch(8)
    base, mom = torchvision_encoder(model.base_encoder), torchvision_encoder(model.momentum_encoder)
    pred = official_mlp(2, DIM, MLP, DIM, last_bn=False)
    pred.load_state_dict(model.predictor.state_dict())
    q1, q2 = pred(base(x1)), pred(base(x2))  # one call per view, as the official forward
    with torch.no_grad():
        k1, k2 = mom(x1), mom(x2)
    loss_ind = ctr(q1, k2) + ctr(q2, k1)
    loss_ind.backward()
    loss = model(x1, x2)
    loss.backward()
    assert loss.item() == pytest.approx(loss_ind.item(), rel=1e-5)
    theirs = dict(base.named_parameters())
    for name, p in model.base_encoder.named_parameters():
        assert_grad_close(p.grad, theirs[name].grad, name)
    for a, b in zip(model.predictor.parameters(), pred.parameters()):
        assert_grad_close(a.grad, b.grad, "predictor")
    # the momentum encoder's BN statistics moved (train mode, batch statistics) like torchvision's
    torch.testing.assert_close(model.momentum_encoder.bn1.running_mean, mom.bn1.running_mean)


def _rank_worker(rank, world):
    model = make_model()
    out = torch.cat([moco_loss_and_grads(model, *make_batch(8), rank, world),
                     model.base_encoder.layer2[0].bn1.running_var])
    dist.all_reduce(out)
    return out / world


def test_two_gloo_ranks_equal_one_process_on_the_global_batch():
    model = make_model()
    one = moco_loss_and_grads(model, *make_batch(8))
    out = run_on_two_ranks(_rank_worker)
    assert out[0].item() == pytest.approx(one[0].item(), rel=1e-5)
    assert_grad_close(out[1:one.numel()], one[1:], "all gradients")
    # the trunk's running statistics come from the global batch on every rank
    torch.testing.assert_close(out[one.numel():], model.base_encoder.layer2[0].bn1.running_var)


def train(out, *extra):
    return run([sys.executable, str(ROOT / "fastmoco" / "train.py"), "--config", R50_TINY,
                "--logging.out_dir", str(out), *COMMON, *extra])


@pytest.fixture(scope="module")
def r50_run(tmp_path_factory):
    """The tiny LARS config, 6 steps in one go (over the epoch boundary at 4: 32 samples, batch 8)."""
    out = tmp_path_factory.mktemp("r50") / "full"
    train(out, "--schedule.max_steps", "6")
    return out


@pytest.mark.slow
def test_tiny_r50_config_trains_with_lars_and_resumes_exactly(r50_run, tmp_path):
    train(tmp_path, "--schedule.max_steps", "3", "--checkpoint.every_steps", "3")
    p = train(tmp_path, "--schedule.max_steps", "6", "--resume", "auto")
    assert "resumed from" in p.stdout and "step_00000003" in p.stdout
    one, two = losses(r50_run), losses(tmp_path)
    assert sorted(one) == sorted(two) == list(range(1, 7))
    for s in one:
        assert two[s] == one[s], (s, two[s], one[s])
    assert one[6] != one[5]


# Updates large enough that a wrong trust ratio on any parameter shows in the weights after 3 steps
# (the recipe's lr x trust moves a weight by ~1e-5 of its norm per step: inside fp32 noise).
LOUD_LARS = ["--optim.base_lr", "5.0", "--optim.trust_coefficient", "0.01", "--schedule.max_steps", "3"]


def train_worker(out, nproc, *extra):
    launch = [sys.executable] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", free_port()]
    return run([*launch, WORKER, "fit", str(out / "dump.pt"), R50_TINY, "--logging.out_dir", str(out), *COMMON,
                "--deepspeed.train_micro_batch_size_per_gpu", str(8 // nproc), *LOUD_LARS, *extra])


@pytest.fixture(scope="module")
def r50_one_process(tmp_path_factory):
    """ZeRO-0, one process, micro batch 8, LARS by the official per-parameter loop (CPU: the reference)."""
    out = tmp_path_factory.mktemp("r50_zero0")
    train_worker(out, 1)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_lars_under_zero_on_two_processes_equals_one_process(r50_one_process, tmp_path, stage):
    """ZeRO-1/2 step LARS on each rank's slice of the flat fp32 buffer: losses per step and both encoders'
    weights after 3 steps equal one ZeRO-0 process on the same global batch."""
    train_worker(tmp_path, 2, "--deepspeed.zero_optimization.stage", str(stage))
    one, two = losses(r50_one_process), losses(tmp_path)
    assert sorted(two) == sorted(one) == [1, 2, 3] and one[3] != one[2]
    for s in two:
        assert two[s] == pytest.approx(one[s], rel=1e-5), (s, two[s], one[s])
    a, b = torch.load(r50_one_process / "dump.pt"), torch.load(tmp_path / "dump.pt")
    torch.manual_seed(0)  # configs/r50_tiny.json's seed and model: the Trainer's initial weights
    start = dict(MoCo(ARCH, img_size=IMG, dim=32, mlp_dim=64, tau=TAU).base_encoder.named_parameters())
    moved = 0.0
    for enc in ("online", "momentum"):
        assert a[enc].keys() == b[enc].keys() and len(a[enc]) > 60
        for n in a[enc]:
            torch.testing.assert_close(b[enc][n], a[enc][n], rtol=1e-4, atol=1e-6, msg=lambda m: f"{enc} {n}: {m}")
            if enc == "online" and n in start and start[n].ndim > 1:
                moved = max(moved, ((a[enc][n] - start[n]).norm() / start[n].norm()).item())
    assert 1e-3 < moved < 0.1, moved  # the updates are not lost in the tolerance


@pytest.mark.slow
def test_export_loads_into_torchvision_and_knn_runs(r50_run, tmp_path):
    from safetensors.torch import load_file

    from fastmoco.evaluation.weights import build_backbone, export, load_weights
    from fastmoco.pipelines.demo_data import make_demo_data

    out, official = export(r50_run, tmp_path / "r18.safetensors")
    tv = torchvision.models.resnet18()
    missing, unexpected = tv.load_state_dict(load_file(out), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    sd, info = load_weights(r50_run)
    assert info.arch == ARCH
    torch.testing.assert_close(tv.layer3[1].conv2.weight, sd["base_encoder.layer3.1.conv2.weight"], rtol=0, atol=0)
    assert not torch.equal(tv.layer3[1].conv2.weight, torchvision.models.resnet18().layer3[1].conv2.weight)
    tv.fc = nn.Identity()
    x = torch.randn(3, 3, IMG, IMG)
    torch.testing.assert_close(build_backbone(info, sd)(x, head=False), tv.eval()(x))
    ckpt = torch.load(official, weights_only=True)["state_dict"]
    assert ckpt["module.base_encoder.fc.0.weight"].shape == (64, 512)  # the official MoCo_ResNet layout
    # the exported backbone reads back, and the kNN command evaluates the run
    _, back = load_weights(out)
    assert back.arch == ARCH
    train_dir, val_dir = make_demo_data(tmp_path / "train", 12, seed=0), make_demo_data(tmp_path / "val", 7, seed=1)
    run([sys.executable, "-m", "fastmoco.evaluation.cli", "knn", "--checkpoint", str(r50_run), "--train",
         str(train_dir), "--val", str(val_dir), "--backend", "torchvision", "--num-threads", "1", "--batch-size",
         "4", "--k", "1", "3", "--json", str(tmp_path / "knn.json")])
    r = json.loads((tmp_path / "knn.json").read_text())
    assert r["arch"] == ARCH and r["val_samples"] == 7 and set(r["knn"]) == {"1", "3"}
