"""The momentum encoder's fp32 EMA state: under bf16 it blends the optimizer's fp32 master weights
(in each ZeRO stage's layout), and it round-trips through checkpoints.

Run as a script, this file is the worker of the DeepSpeed test (under torchrun or alone):
    python tests/test_momentum.py OUT [--dotted.overrides ...]
"""
import json
import os
import socket
import sys
import types
from pathlib import Path

import pytest
import torch

from fastmoco.momentum import MomentumState, assemble
from fastmoco.moco import MoCo
from limits import run_until_hang

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.json")
STEPS = 3
# m = 0.5 and a large lr: the fp32 master moves several bf16 steps per update, so blending the
# bf16-rounded weights instead would be off by ~1e-4 (the tolerance below is ~1e-6)
BF16_RUN = ["--deepspeed.bf16.enabled", "true", "--moco.momentum", "0.5", "--optim.base_lr", "0.05",
            "--schedule.warmup_epochs", "0", "--logging.tensorboard", "false"]


def _zero0_like(model: MoCo) -> types.SimpleNamespace:
    """What DeepSpeed's unfused bf16 optimizer (ZeRO-0) exposes: bf16 params and their fp32 masters."""
    bf16 = [p for p in model.parameters() if p.requires_grad]
    return types.SimpleNamespace(fp16_groups=[bf16], fp32_groups=[[p.detach().float() for p in bf16]])


def test_bf16_module_blends_the_optimizers_fp32_master_and_writes_the_bf16_copy():
    torch.manual_seed(0)
    model = MoCo("vit_test", img_size=32, dim=16, mlp_dim=24)
    model.to(torch.bfloat16)  # what DeepSpeed's bf16 mode does to the whole module
    opt = _zero0_like(model)
    with pytest.raises(ValueError, match="optimizer"):
        model.build_momentum_state()
    state = model.build_momentum_state(opt)
    online = [p for p in model.base_encoder.parameters() if p.requires_grad]
    fp32_of = {id(p): t for p, t in zip(opt.fp16_groups[0], opt.fp32_groups[0])}
    start = [fp32_of[id(p)].clone() for p in online]  # the momentum encoder starts as the online one
    for t in opt.fp32_groups[0]:  # an optimizer step: the master moves by less than a bf16 ulp
        t.add_(torch.randn_like(t) * 1e-4)
    master = [fp32_of[id(p)].clone() for p in online]
    m = 0.99999  # a bf16 weight could not absorb a (1 - m) step; the fp32 master must
    for _ in range(3):
        model.update_momentum_encoder(torch.tensor(m))
    assert all(t.dtype == torch.float32 for t in state.master)
    frozen = [q for q, p in zip(model.momentum_encoder.parameters(), model.base_encoder.parameters())
              if not p.requires_grad]
    assert len(state.params) == len(online) and frozen  # the frozen patch projection is left out
    for got, s, w, q in zip(state.full_master(), start, master, state.params):
        want = s * m ** 3 + w * (1 - m ** 3)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
        assert torch.equal(q.data, got.to(torch.bfloat16))  # the forward reads the rounded master
    moved = max((g - s).abs().max() for g, s in zip(state.master, start))
    assert moved > 0  # the tiny update was kept


def _zero12_like(model: MoCo, align: int = 8) -> types.SimpleNamespace:
    """What DeepSpeed's ZeRO-1/2 optimizer exposes on one rank: the group's bf16 parameters as views
    into one flat buffer (each padded to `align`), and the rank's fp32 partition of it (all of it).
    The predictor's parameters are put between the encoder's, so the EMA's runs must split there."""
    online = [p for p in model.base_encoder.parameters() if p.requires_grad]
    group = online[:3] + list(model.predictor.parameters()) + online[3:]
    sizes = [-(-p.numel() // align) * align for p in group]
    flat = torch.zeros(sum(sizes), dtype=torch.bfloat16)
    off = 0
    for p, n in zip(group, sizes):
        flat[off:off + p.numel()] = p.data.reshape(-1)
        p.data = flat[off:off + p.numel()].view(p.shape)
        off += n
    return types.SimpleNamespace(bit16_groups_flat=[flat], single_partition_of_fp32_groups=[flat.float()],
                                 bit16_groups=[group])


def test_flat_partition_layout_blends_the_fp32_partition_and_skips_other_parameters():
    torch.manual_seed(0)
    model = MoCo("vit_test", img_size=32, dim=16, mlp_dim=24).to(torch.bfloat16)
    opt = _zero12_like(model)
    state = model.build_momentum_state(opt)
    online = [p for p in model.base_encoder.parameters() if p.requires_grad]
    assert len(state.params) == len(online) and len(state._ema_master) == 2  # two runs: the predictor splits them
    part = opt.single_partition_of_fp32_groups[0]
    flat = opt.bit16_groups_flat[0]

    def fp32_of(p):  # the partition's elements of parameter p (world 1: the partition is the flat buffer)
        off = (p.data_ptr() - flat.data_ptr()) // 2
        return part[off:off + p.numel()].view(p.shape).clone()

    start = [fp32_of(p) for p in online]
    predictor_before = [p.detach().clone() for p in model.predictor.parameters()]
    part.add_(torch.randn_like(part) * 1e-3)  # an optimizer step
    master = [fp32_of(p) for p in online]
    m = 0.9
    model.update_momentum_encoder(torch.tensor(m))
    for got, s, w, q in zip(state.full_master(), start, master, state.params):
        torch.testing.assert_close(got, m * s + (1 - m) * w, rtol=1e-6, atol=1e-9)
        assert torch.equal(q.data, got.to(torch.bfloat16))  # the momentum encoder reads bf16(master)
    for p, before in zip(model.predictor.parameters(), predictor_before):
        assert torch.equal(p, before)  # the EMA touches no other parameter of the group
    full = assemble([state.state_dict()])
    index = {id(q): i for i, q in enumerate(model.momentum_encoder.parameters())}
    for q, got in zip(state.params, state.full_master()):
        assert torch.equal(full[index[id(q)]], got)


def test_state_dict_round_trip_and_shape_errors():
    torch.manual_seed(0)
    a = MoCo("vit_test", img_size=32, dim=16, mlp_dim=24)
    b = MoCo("vit_test", img_size=32, dim=16, mlp_dim=24)
    sa, sb = a.build_momentum_state(), b.build_momentum_state()
    with torch.no_grad():
        for p in a.momentum_encoder.parameters():
            p.add_(1.0)
    sb.load_state_dict(sa.state_dict())
    full = assemble([sa.state_dict()])  # what an export rebuilds from the checkpoint files
    for i, (x, y) in enumerate(zip(a.momentum_encoder.parameters(), b.momentum_encoder.parameters())):
        assert torch.equal(x, y) and torch.equal(full[i], x)
    other = MomentumState([torch.zeros(3)], [torch.zeros(3)])
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        other.load_state_dict({"master": [torch.zeros(4)]})


def test_an_optimizer_without_fp32_master_is_named():
    model = MoCo("vit_test", img_size=32, dim=16, mlp_dim=24).to(torch.bfloat16)
    with pytest.raises(ValueError, match="optimizer SGD: no fp32 master"):
        model.build_momentum_state(torch.optim.SGD(model.parameters(), lr=0.1))


# -- DeepSpeed, bf16, every ZeRO stage -----------------------------------------------------------------
def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _run(cmd, what, env=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    env.pop("TRITON_INTERPRET", None)  # the EMA's torch path; the kernel has its own tests
    p = run_until_hang(cmd, what, cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise AssertionError(f"{cmd} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")


@pytest.mark.slow
@pytest.mark.parametrize("stage, procs, extra", [
    (0, 1, []), (3, 1, []),
    # ~7-10 s each on 2 cores: in the long run (`pytest -m long`)
    *(pytest.param(*case, marks=pytest.mark.long) for case in [
        (1, 1, []), (2, 1, []), (0, 2, []), (1, 2, []), (2, 2, []), (3, 2, []),
        (1, 2, ["--deepspeed.data_types", '{"grad_accum_dtype": "fp32"}']),  # DeepSpeed's BF16_Optimizer
    ]),
])
def test_bf16_ema_follows_the_fp32_master_trajectory(tmp_path, stage, procs, extra):
    """After some bf16 steps the momentum state equals the EMA of the online encoder's fp32 master,
    read step by step through DeepSpeed's own accessor (safe_get_full_fp32_param)."""
    _check_trajectory(tmp_path, stage, procs, extra)


@pytest.mark.gpu
@pytest.mark.parametrize("stage", [1, 3])  # the recipes' stages: ViT-S/B ZeRO-1, ViT-H ZeRO-3
def test_bf16_ema_follows_the_fp32_master_trajectory_on_the_gpu(tmp_path, stage):
    """The same on CUDA: the fused EMA kernel over views into DeepSpeed's flat fp32 partitions.
    FASTMOCO_TUNE=0: the other ops take their untimed defaults, so a fresh process does not spend
    its first step timing kernel against torch at every tiny shape (the H200 run of 2026-12-04 cut
    this test off after 60 s and again after ~100 s)."""
    _check_trajectory(tmp_path, stage, 1, [], {"FASTMOCO_TUNE": "0"})


def _check_trajectory(tmp_path, stage, procs, extra, env=None):
    launch = [sys.executable] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port", _free_port()]
    out = tmp_path / "result.json"
    _run([*launch, __file__, str(out), "--logging.out_dir", str(tmp_path), "--deepspeed.zero_optimization.stage",
          str(stage), "--deepspeed.train_micro_batch_size_per_gpu", str(8 // procs), *extra],
         f"bf16 EMA trajectory worker (ZeRO-{stage}, {procs} process(es))", env)
    r = json.loads(out.read_text())
    assert r["optimizer"] == ("BF16_Optimizer" if extra else {0: "FP16_UnfusedOptimizer", 3: "DeepSpeedZeroOptimizer_Stage3"}
                              .get(stage, "DeepSpeedZeroOptimizer"))
    assert r["params"] == r["trainable_online"] > 0
    assert r["max_err"] <= 1e-6, r  # EMA of the fp32 master, to fp32 rounding
    assert r["bf16_err"] > 1e-5, r  # ... which is measurably not the EMA of the bf16 weights
    assert r["copy_equal"], r  # the momentum forward reads bf16(master), whole on every rank
    assert r["assembled_equal"], r  # the per-rank checkpoint states rebuild the same full weights
    assert r["master_moved"] > 1e-3


def _worker(out: str, overrides: list[str]) -> None:
    from deepspeed.utils import safe_get_full_fp32_param

    from fastmoco.config import load_config
    from fastmoco.train import Trainer, fill_single_process_env

    fill_single_process_env()
    t = Trainer(load_config(TINY, BF16_RUN + overrides))
    state = t.model.momentum_state
    online = [p for p in t.model.base_encoder.parameters() if p.requires_grad]

    def fp32_master():  # collective under ZeRO: every rank calls it
        full = [safe_get_full_fp32_param(p) for p in online]
        if all(f is None for f in full):  # ZeRO-0: the unfused bf16 optimizer's per-parameter fp32 copies
            opt = t.optimizer
            fp32_of = {id(a): b for ga, gb in zip(opt.fp16_groups, opt.fp32_groups) for a, b in zip(ga, gb)}
            full = [fp32_of[id(p)] for p in online]
        return [f.detach().clone() for f in full]

    def bf16_weights():
        import deepspeed
        with deepspeed.zero.GatheredParameters(online):
            return [p.detach().float().clone() for p in online]

    expect = fp32_master()
    start = [e.clone() for e in expect]
    via_bf16 = bf16_weights()  # what blending the module weights would have given
    batches = iter(t.loader)
    for _ in range(STEPS):
        w, wb = fp32_master(), bf16_weights()  # what the EMA of this step blends
        m = t.momenta[t.step]
        expect = [m * e + (1 - m) * x for e, x in zip(expect, w)]
        via_bf16 = [m * e + (1 - m) * x for e, x in zip(via_bf16, wb)]
        x1, x2, _ = next(batches)
        t.train_step(x1, x2)
        t.step += 1
    got = state.full_master()
    import deepspeed
    import torch.distributed as dist

    from fastmoco.momentum import assemble
    states = [None] * t.world  # what the checkpoint files hold, one per rank
    dist.all_gather_object(states, state.state_dict())
    module_index = {id(q): i for i, q in enumerate(t.model.momentum_encoder.parameters())}
    from_files = assemble(states)
    assembled_equal = sorted(from_files) == sorted(module_index[id(q)] for q in state.params) and all(
        torch.equal(from_files[module_index[id(q)]], g.cpu()) for q, g in zip(state.params, got))
    with deepspeed.zero.GatheredParameters(state.params):
        copy_equal = all(torch.equal(q.detach(), g.to(torch.bfloat16)) for q, g in zip(state.params, got))
    err = lambda a, b: max(((x - y).abs() / (y.abs() + 1e-3)).max().item() for x, y in zip(a, b))  # noqa: E731
    if t.rank == 0:
        Path(out).write_text(json.dumps({
            "optimizer": type(t.optimizer).__name__, "params": len(state.params), "trainable_online": len(online),
            "max_err": err(got, expect), "bf16_err": err(via_bf16, expect), "copy_equal": copy_equal, "assembled_equal": assembled_equal,
            "master_moved": err(expect, start)}))


if __name__ == "__main__":
    from fastmoco.distributed import process_entry
    process_entry(lambda argv: _worker(argv[0], argv[1:]))()   # ends like fastmoco's own entries (end_process)
