"""DINO against a straightforward implementation written here (timm backbones, torch's weight_norm, the
loss as the paper writes it, center update and temperature schedule), on 1 and 2 gloo processes."""
import math

import pytest
import timm
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from gloo_checks import run_on_two_ranks
from fastmoco import ops
from fastmoco.dino import DINO, cosine_schedule, param_groups, teacher_temp_schedule
from fastmoco.kernels.ema import ema_coefficients
from fastmoco.models.vit import VisionTransformer

ARCH = dict(arch="vit_test", img_size=32, patch_size=8, num_heads=3, out_dim=50, hidden_dim=40, bottleneck_dim=16)
GLOBAL, LOCAL = 32, 16


def crops(batch, seed, n_local=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, GLOBAL, GLOBAL, generator=g) for _ in range(2)] + \
        [torch.randn(batch, 3, LOCAL, LOCAL, generator=g) for _ in range(n_local)]


# -- the independent implementation -------------------------------------------------------------------
def dino_interpolate(pos_embed, grid):
    """DINO's position-embedding resampling: patch part bicubic with the scale factor (grid + 0.1) / side,
    class token as is. (What the official interpolate_pos_encoding gives is pinned by the golden test
    in test_vit.py; a target size= is not it.)"""
    n = pos_embed.shape[1] - 1
    side = int(math.sqrt(n))
    patches = pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    scale = (grid + 0.1) / side
    patches = F.interpolate(patches, scale_factor=(scale, scale), mode="bicubic", align_corners=False)
    return torch.cat([pos_embed[:, :1], patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], 1)


class RefEncoder(nn.Module):
    """timm ViTs (one per crop size, sharing weights) + DINO's head with torch's weight_norm."""

    def __init__(self, state: dict):
        super().__init__()
        kw = dict(patch_size=8, embed_dim=72, depth=2, num_heads=3, num_classes=0, qkv_bias=True)
        self.vit = timm.models.vision_transformer.VisionTransformer(img_size=GLOBAL, **kw)
        self.vit.load_state_dict({k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")})
        self.mlp = nn.Sequential(nn.Linear(72, 40), nn.GELU(), nn.Linear(40, 40), nn.GELU(), nn.Linear(40, 16))
        self.mlp.load_state_dict({k[len("head.mlp."):]: v for k, v in state.items() if k.startswith("head.mlp.")})
        self.last_layer = nn.utils.weight_norm(nn.Linear(16, 50, bias=False))
        self.last_layer.weight_g.data.copy_(state["head.last_layer.weight_g"])
        self.last_layer.weight_v.data.copy_(state["head.last_layer.weight_v"])
        self.last_layer.weight_g.requires_grad_(False)

    def backbone(self, x):
        grid = x.shape[-1] // 8
        pos = self.vit.pos_embed if grid == GLOBAL // 8 else dino_interpolate(self.vit.pos_embed, grid)
        t = self.vit.patch_embed.proj(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.vit.cls_token.expand(x.shape[0], -1, -1), t], 1) + pos
        for blk in self.vit.blocks:
            t = blk(t)
        return self.vit.norm(t)[:, 0]

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(self.backbone(x)), dim=-1))


def ref_loss(student_out, teacher_out, center, temp, student_temp=0.1):
    """The DINO loss as written in the paper: every (teacher global i, student j != i) pair."""
    s = [o / student_temp for o in student_out]
    t = [F.softmax((o - center) / temp, dim=-1) for o in teacher_out]
    total, n = 0.0, 0
    for i, q in enumerate(t):
        for j, v in enumerate(s):
            if j == i:
                continue
            total = total + torch.sum(-q * F.log_softmax(v, dim=-1), dim=-1).mean()
            n += 1
    return total / n


def ref_center(center, teacher_out, momentum=0.9):
    batch = torch.cat(teacher_out).sum(0, keepdim=True)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world > 1:
        dist.all_reduce(batch)
    return center * momentum + batch / (len(torch.cat(teacher_out)) * world) * (1 - momentum)


# -- tests ---------------------------------------------------------------------------------------------
def test_schedules_are_dinos():
    lr = cosine_schedule(0.5, 1e-6, epochs=5, steps_per_epoch=4, warmup_epochs=2)
    assert lr.shape == (20,)
    assert lr[:8].tolist() == pytest.approx(torch.linspace(0, 0.5, 8).tolist())
    assert lr[8] == pytest.approx(0.5) and lr[-1] == pytest.approx(1e-6 + 0.5 * (0.5 - 1e-6) *
                                                                  (1 + math.cos(math.pi * 11 / 12)))
    temps = teacher_temp_schedule(0.04, 0.07, warmup_epochs=3, epochs=5, steps_per_epoch=2)
    assert temps.tolist() == pytest.approx([0.04, 0.04, 0.055, 0.055, 0.07, 0.07, 0.07, 0.07, 0.07, 0.07])
    m = cosine_schedule(0.996, 1.0, epochs=2, steps_per_epoch=3)
    assert m[0] == pytest.approx(0.996) and m.diff().min() > 0


def test_head_and_groups_follow_the_official_layout():
    model = DINO(**ARCH)
    names = set(model.state_dict())
    for k in ("student.head.mlp.0.weight", "student.head.mlp.4.bias", "student.head.last_layer.weight_g",
              "student.head.last_layer.weight_v", "teacher.backbone.pos_embed", "center"):
        assert k in names, k
    assert not model.student.head.last_layer.weight_g.requires_grad    # norm_last_layer
    groups = param_groups(model)
    by = {(g["apply_wd"], g["last_layer"]): g for g in groups}
    assert by[False, False]["weight_decay"] == 0.0
    assert all(p.dim() > 1 for p in by[True, False]["params"])
    assert by[True, True]["params"] == [model.student.head.last_layer.weight_v]
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.student.parameters())


def test_method_clips_per_parameter_freezes_by_dropping_gradients_and_updates_the_teacher_after_the_step():
    """What DINOMethod tells the Trainer: per-parameter clipping at dino.clip_grad (DeepSpeed's global
    clipping refused beside it, naming both keys), the last-layer groups frozen in epoch 0 only, no
    teacher update in the forward and one after the step (the golden test checks the numbers)."""
    from fastmoco.config import ConfigError, load_config
    from fastmoco.methods import get_method

    from test_train import ROOT
    config = str(ROOT / "configs" / "dino_tiny.json")
    method = get_method(load_config(config))
    assert method.clip_per_parameter == 3.0
    with pytest.raises(ConfigError, match=r"dino.clip_grad 3.0.*deepspeed.gradient_clipping 1.0"):
        get_method(load_config(config, ["--deepspeed.gradient_clipping", "1.0"]))
    assert get_method(load_config(config, ["--dino.clip_grad", "0", "--deepspeed.gradient_clipping", "1.0"])) \
        .clip_per_parameter == 0.0
    with pytest.raises(ConfigError, match="dino.clip_grad"):
        get_method(load_config(config, ["--dino.clip_grad", "-1"]))
    groups = param_groups(DINO(**ARCH))
    assert [method.frozen(g, 0) for g in groups] == [g["last_layer"] for g in groups]
    assert not any(method.frozen(g, 1) for g in groups)
    sched = method.schedules(load_config(config), steps_per_epoch=4, global_batch=8)
    assert "m" not in method.step_kwargs(sched, "cpu")(3)
    calls = []
    method.after_step(sched, "cpu")(type("M", (), {"update_teacher": lambda self, c: calls.append(c)})(), 3)
    assert torch.equal(calls[0], ema_coefficients(sched.momentum[3].item()))


@pytest.mark.parametrize("fused", ["off", "on"])
def test_three_steps_equal_the_straightforward_implementation(fused):
    """Loss and every student gradient at each step, the center and the teacher after each step, over a
    teacher-temperature warmup and the momentum schedule; plain SGD on both sides; the teacher updated
    after the optimizer step with this step's m (DINO's order)."""
    torch.manual_seed(0)
    model = DINO(**ARCH, drop_path=0.0)
    student_state = {k[len("student."):]: v.clone() for k, v in model.state_dict().items() if k.startswith("student.")}
    ref_s, ref_t = RefEncoder(student_state), RefEncoder(student_state).requires_grad_(False)
    center = torch.zeros(1, 50)
    temps = teacher_temp_schedule(0.04, 0.07, warmup_epochs=2, epochs=3, steps_per_epoch=1).tolist()
    momenta = cosine_schedule(0.9, 1.0, epochs=3, steps_per_epoch=1).tolist()
    ours_params = [p for p in model.student.parameters() if p.requires_grad]
    ref_params = [p for p in ref_s.parameters() if p.requires_grad]
    opt, ref_opt = torch.optim.SGD(ours_params, lr=0.5), torch.optim.SGD(ref_params, lr=0.5)
    with ops.fused(dino_loss=fused):
        for step in range(3):
            views = crops(4, seed=step)
            loss = model(*views, teacher_temp=temps[step])
            opt.zero_grad()
            loss.backward()

            student_out = [ref_s(v) for v in views]
            with torch.no_grad():
                teacher_out = [ref_t(v) for v in views[:2]]
            rl = ref_loss(student_out, teacher_out, center, temps[step])
            ref_opt.zero_grad()
            rl.backward()
            assert loss.item() == pytest.approx(rl.item(), rel=1e-5), step
            ours_grads = dict(model.student.named_parameters())
            for name, p in ref_s.named_parameters():
                if not p.requires_grad:
                    continue
                mine = ours_grads[_our_name(name)].grad
                # the fused loss sums in another order: fp32 noise relative to the tensor's largest entry
                torch.testing.assert_close(mine, p.grad, rtol=1e-4, atol=max(1e-6, 1e-5 * p.grad.abs().max().item()),
                                           msg=f"step {step} {name}")
            opt.step()
            model.update_teacher(ema_coefficients(momenta[step]))
            ref_opt.step()
            with torch.no_grad():   # DINO's order: center after the loss, teacher EMA after the step
                center = ref_center(center, teacher_out)
                for pt, ps in zip(ref_t.parameters(), ref_s.parameters()):
                    pt.mul_(momenta[step]).add_((1 - momenta[step]) * ps)
            torch.testing.assert_close(model.center, center, rtol=1e-5, atol=1e-7)
            teacher = dict(model.teacher.named_parameters())
            for name, p in ref_t.named_parameters():
                torch.testing.assert_close(teacher[_our_name(name)], p, rtol=1e-4, atol=1e-5,
                                           msg=lambda m: f"step {step} {name}: {m}")


def _our_name(ref_name: str) -> str:
    if ref_name.startswith("vit."):
        return "backbone." + ref_name[len("vit."):]
    return "head." + ref_name


def test_drop_path_is_per_sample_and_off_in_eval():
    from fastmoco.models.vit import drop_path
    torch.manual_seed(0)
    y = drop_path(torch.ones(4000, 3, 5), 0.3, training=True)
    per_sample = y.reshape(4000, -1)
    assert ((per_sample == 0).all(1) | (per_sample == 1 / 0.7).all(1)).all()   # whole samples, rescaled
    assert (per_sample[:, 0] == 0).float().mean().item() == pytest.approx(0.3, abs=0.03)
    assert torch.equal(drop_path(torch.ones(4, 2), 0.3, training=False), torch.ones(4, 2))
    vit = VisionTransformer("vit_test", img_size=32, recipe="dino", drop_path=0.5)
    assert [b.drop_path for b in vit.blocks] == [0.0, 0.5]     # linearly increasing, as DINO
    x = torch.randn(8, 3, 32, 32)
    vit.eval()
    assert torch.equal(vit(x), vit(x))
    vit.train()
    assert not torch.equal(vit(x), vit(x))


def _two_rank_worker(rank, world):
    torch.manual_seed(0)
    model = DINO(**ARCH, drop_path=0.0)
    views = [v[rank * 3:(rank + 1) * 3] for v in crops(6, seed=1)]
    loss = model(*views, teacher_temp=0.05)
    loss.backward()
    grads = torch.cat([p.grad.reshape(-1) for p in model.student.parameters() if p.requires_grad])
    dist.all_reduce(grads)
    return {"grads": grads / world, "center": model.center.clone(), "loss": loss.detach()}


@pytest.mark.slow
def test_two_ranks_equal_one_process_on_the_global_batch(tmp_path):
    two = run_on_two_ranks(_two_rank_worker)
    torch.manual_seed(0)
    model = DINO(**ARCH, drop_path=0.0)
    loss = model(*crops(6, seed=1), teacher_temp=0.05)
    loss.backward()
    grads = torch.cat([p.grad.reshape(-1) for p in model.student.parameters() if p.requires_grad])
    torch.testing.assert_close(two["center"], model.center, rtol=1e-5, atol=1e-7)   # all-reduced
    # per parameter, to fp32 noise at that parameter's scale (the head's gradients reach ~200, and sums
    # over 3 + 3 rows differ from sums over 6 in the last bits)
    sizes = [p.numel() for p in model.student.parameters() if p.requires_grad]
    for (name, p), a, b in zip([(n, p) for n, p in model.student.named_parameters() if p.requires_grad],
                               two["grads"].split(sizes), grads.split(sizes)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * b.abs().max().item(), msg=lambda m: f"{name}: {m}")


# -- on the Trainer: train, checkpoint, resume, 2 ranks, evaluation ---------------------------------
def _train(out_dir, *overrides, nproc=1):
    import sys
    from test_train import COMMON, ROOT, free_port, run
    cmd = [str(ROOT / "fastmoco" / "train.py"), "--config", str(ROOT / "configs" / "dino_tiny.json"),
           "--logging.out_dir", str(out_dir), *COMMON, *overrides]
    if nproc > 1:
        cmd = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", free_port(), *cmd]
    return run([sys.executable, *cmd])


def _losses(out_dir):
    import json
    recs = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


@pytest.mark.long
@pytest.mark.slow
def test_dino_run_resumes_exactly(tmp_path):
    """12 steps (over the epoch ends at 8, with the last layer frozen in epoch 0, drop path on) equal
    6 steps, then a resume to 12."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    _train(full, "--schedule.max_steps", "12")
    _train(cut, "--schedule.max_steps", "6")
    p = _train(cut, "--schedule.max_steps", "12", "--resume", "auto")
    assert "resumed from" in p.stdout
    a, b = _losses(full), _losses(cut)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    assert a == b                                             # bit-identical, after the resume too
    assert len(set(a.values())) == 12


@pytest.fixture(scope="module")
def dino_one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("dino_one")
    _train(out, "--schedule.max_steps", "4", "--model.drop_path", "0.0")
    return _losses(out)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 3])
def test_dino_two_ranks_equal_one_process(dino_one_process, tmp_path, stage):
    """To fp32 rounding (measured 1e-7 relative). ZeRO-3 keeps the teacher's small parameters whole
    between steps: unless they are gathered again after the EMA, the teacher forward reads them one
    update late (step 3 was 1.8e-5 off, step 4 4.4e-5; fastmoco/momentum.py _shard_pieces)."""
    _train(tmp_path, "--schedule.max_steps", "4", "--model.drop_path", "0.0", "--deepspeed.zero_optimization.stage",
           str(stage), "--deepspeed.train_micro_batch_size_per_gpu", "4", nproc=2)
    a, b = dino_one_process, _losses(tmp_path)
    assert sorted(b) == [1, 2, 3, 4]
    for s in b:
        assert b[s] == pytest.approx(a[s], rel=5e-6), (s, a[s], b[s])


@pytest.mark.slow
def test_knn_and_export_of_a_dino_teacher(tmp_path):
    """The evaluation commands on a DINO checkpoint: kNN of the teacher (the default), export of the
    teacher's backbone that loads back with the DINO recipe (learned position embedding)."""
    import json
    import sys
    from fastmoco.evaluation.weights import build_backbone, export, load_weights
    from fastmoco.pipelines.demo_data import make_demo_data
    from test_train import run
    train = make_demo_data(tmp_path / "data" / "train", 18, seed=0)
    val = make_demo_data(tmp_path / "data" / "val", 11, seed=5)
    _train(tmp_path / "run", "--schedule.max_steps", "3", "--checkpoint.every_steps", "3")
    run([sys.executable, "-m", "fastmoco.evaluation.cli", "knn", "--checkpoint", str(tmp_path / "run"), "--train",
         str(train), "--val", str(val), "--backend", "torchvision", "--num-threads", "1", "--batch-size", "8",
         "--k", "1", "3", "--json", str(tmp_path / "knn.json")])
    r = json.loads((tmp_path / "knn.json").read_text())
    assert r["encoder"] == "momentum" and r["val_samples"] == 11 and set(r["knn"]) == {"1", "3"}
    sd, info = load_weights(tmp_path / "run")
    assert info.method == "dino" and "teacher.head.last_layer.weight_v" in sd and "center" in sd
    out, off = export(tmp_path / "run", tmp_path / "teacher.safetensors")
    assert off is None                                        # no MoCo v3 layout for a DINO model
    teacher = build_backbone(info, sd, "momentum")
    again = build_backbone(*reversed(load_weights(out)))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(teacher(x, head=False), again(x, head=False))
        assert not torch.equal(teacher(x, head=False), build_backbone(info, sd, "online")(x, head=False))
