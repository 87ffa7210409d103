"""DINO's training step against the official code's own outputs (tests/golden/gen_dino_training.py ran
facebookresearch/dino's utils.clip_gradients and main_dino.train_one_epoch; the figures are in
tests/golden/dino_training*.pt):

- per-parameter clipping on plain tensors, and on pieces of parameters cut by a ZeRO-like flat
  partition on two ranks (fastmoco.optim: `clip_per_parameter_`, `locate_partitions`, `GradientRules`);
- two epochs of the Trainer's real step on a tiny DINO head under DeepSpeed ZeRO 0-3 (one process, and
  two processes under ZeRO-2/3): loss, center, the gradients AdamW steps (clipped, the frozen layer's
  dropped), student weights, the frozen last layer's AdamW state (none in epoch 0: the official
  cancels its gradients), and the teacher read back from the checkpoint saved after each step (the
  official teacher after the same step's EMA update);
- the bf16 wrappers (ZeRO-0's unfused optimizer, DeepSpeed's BF16_Optimizer) to bf16's tolerance.

Run as a script, this file is the DeepSpeed worker (alone or under torchrun):
    python tests/test_golden_dino_training.py OUT RUN [RUN ...]     # RUN: a ZeRO stage, or a key of BF16
"""
import os
import socket
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn as nn
from limits import run_until_hang

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
CONFIG = str(ROOT / "configs" / "dino_tiny.json")
# bf16 runs: (ZeRO stage, extra overrides); 1-bf16-fp32acc is DeepSpeed's BF16_Optimizer
BF16 = {"0-bf16": (0, []), "1-bf16-fp32acc": (1, ["--deepspeed.data_types", '{"grad_accum_dtype": "fp32"}'])}


def golden(name: str) -> dict:
    return torch.load(GOLDEN / name, weights_only=True)


# -- per-parameter clipping -----------------------------------------------------------------------------
def test_clip_per_parameter_equals_the_official_clip_gradients():
    from fastmoco.optim import clip_per_parameter_

    g = golden("dino_training_clip.pt")
    grads = [g["before"][n].clone() for n in g["names"]]
    norms = clip_per_parameter_(grads, g["clip"])
    torch.testing.assert_close(norms, g["norms"], rtol=1e-6, atol=0)
    for n, got in zip(g["names"], grads):
        torch.testing.assert_close(got, g["after"][n], rtol=1e-6, atol=0, msg=lambda m: f"{n}: {m}")
    clipped = [n for n in g["names"] if not torch.equal(g["before"][n], g["after"][n])]
    assert len(clipped) == 3 and len(clipped) < len(g["names"]) - 2   # both cases are in the golden


PARTITION = 37   # elements per rank of the fake flat buffer (2 ranks): cuts parameter "c" in two


def _zero12_like(shapes: list[tuple], rank: int, align: int = 4):
    """What DeepSpeed's ZeRO-1/2 wrapper holds (names as stage_1_and_2.py): a flat bf16-role buffer with
    every parameter a view into it (each padded to `align`), and this rank's fp32 partition of it."""
    import math
    import types

    import torch.distributed as dist

    offsets, off = [], 0
    for s in shapes:
        offsets.append(off)
        off += -(-math.prod(s) // align) * align
    assert off <= 2 * PARTITION
    flat16 = torch.zeros(2 * PARTITION)
    params = [flat16[o:o + math.prod(s)].view(s) for o, s in zip(offsets, shapes)]
    part32 = torch.nn.Parameter(torch.zeros(PARTITION))
    wrapper = types.SimpleNamespace(bit16_groups_flat=[flat16], single_partition_of_fp32_groups=[part32],
                                    bit16_groups=[params], real_dp_process_group=[dist.group.WORLD])
    return wrapper, offsets, part32


def _clip_pieces_worker(rank, world):
    from fastmoco.optim import GradientRules

    g = golden("dino_training_clip.pt")
    shapes = [tuple(g["before"][n].shape) for n in g["names"]]
    wrapper, offsets, part32 = _zero12_like(shapes, rank)
    full = torch.full((2 * PARTITION,), float("nan"))   # padding: not a parameter's, left as it is
    for o, n in zip(offsets, g["names"]):
        full[o:o + g["before"][n].numel()] = g["before"][n].flatten()
    part32.grad = full[rank * PARTITION:(rank + 1) * PARTITION].clone()
    opt = torch.optim.SGD([part32], lr=0.0)   # what the wrapper steps: this rank's partition
    rules = GradientRules(opt, g["clip"])
    rules.locate(wrapper)
    opt.step()
    out = [torch.empty(PARTITION) for _ in range(world)]
    torch.distributed.all_gather(out, part32.grad)
    return torch.cat(out), offsets


def test_clip_per_parameter_on_flat_partitions_of_two_ranks_equals_the_official():
    """ZeRO-1/2's layout: each rank clips its slice of a flat buffer; a parameter cut by the partition
    boundary is clipped by its whole norm (one all-reduce), the padding is untouched."""
    from gloo_checks import run_on_two_ranks

    g = golden("dino_training_clip.pt")
    flat, offsets = run_on_two_ranks(_clip_pieces_worker)
    covered = torch.zeros_like(flat, dtype=torch.bool)
    cut = False
    for o, n in zip(offsets, g["names"]):
        k = g["after"][n].numel()
        cut |= o < PARTITION < o + k
        torch.testing.assert_close(flat[o:o + k].view(g["after"][n].shape), g["after"][n], rtol=1e-6, atol=0,
                                   msg=lambda m: f"{n}: {m}")
        covered[o:o + k] = True
    assert cut, "the layout should cut a parameter at the partition boundary"
    assert flat[~covered].isnan().all()


def test_unlocated_flat_partition_is_refused():
    from fastmoco.optim import GradientRules

    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=0.1)
    GradientRules(opt, 3.0).locate(None)
    flat = torch.nn.Parameter(torch.zeros(12))
    flat.grad = torch.ones(12)
    opt.param_groups[0]["params"] = [flat]   # what a ZeRO wrapper does to the client's groups
    with pytest.raises(ValueError, match="after_initialize"):
        opt.step()


# -- the Trainer's step under DeepSpeed vs train_one_epoch ---------------------------------------------
class _Features(nn.Module):
    """The identity backbone: every crop is already a feature vector (B, in_dim), as in the golden run."""

    def forward(self, x, head=False):
        return x


def head_only_dino(run: dict, initial: dict):
    """fastmoco's DINO with the golden run's head (fastmoco's DINOHead) and an identity backbone, the
    student and the teacher starting from the official student's weights."""
    from fastmoco.dino import DINO, DINOHead

    model = DINO("vit_test", img_size=32, patch_size=8, num_heads=3, out_dim=run["out_dim"], drop_path=0.0)
    for enc in (model.student, model.teacher):
        enc.backbone = _Features()
        enc.head = DINOHead(run["in_dim"], run["out_dim"], run["hidden_dim"], run["bottleneck_dim"])
        enc.load_state_dict(initial, strict=True)
    model.teacher.requires_grad_(False)
    return model


def _overrides(run: dict, stage: int, world: int, out: Path, bf16: bool) -> list[str]:
    return ["--logging.out_dir", str(out), "--logging.tensorboard", "false", "--logging.progress", "false",
            "--checkpoint.keep", "100", "--checkpoint.every_epochs", "0",
            "--schedule.epochs", str(run["epochs"]), "--schedule.warmup_epochs", str(run["warmup_epochs"]),
            "--optim.base_lr", str(run["base_lr"]), "--optim.weight_decay", str(run["weight_decay"]),
            "--dino.min_lr", str(run["min_lr"]), "--dino.weight_decay_end", str(run["weight_decay_end"]),
            "--dino.momentum_teacher", str(run["momentum_teacher"]), "--dino.out_dim", str(run["out_dim"]),
            "--dino.warmup_teacher_temp", str(run["warmup_teacher_temp"]),
            "--dino.teacher_temp", str(run["teacher_temp"]),
            "--dino.warmup_teacher_temp_epochs", str(run["warmup_teacher_temp_epochs"]),
            "--dino.clip_grad", str(run["clip_grad"]), "--dino.freeze_last_layer", str(run["freeze_last_layer"]),
            "--data.local_crops", str(run["crops"] - 2), "--data.synthetic_size", str(run["iters"] * run["batch"]),
            "--deepspeed.train_micro_batch_size_per_gpu", str(run["batch"] // world),
            "--deepspeed.zero_optimization.stage", str(stage), "--deepspeed.bf16.enabled", str(bf16).lower()]


def _trainer(key: str, out: Path, resume: str = ""):
    """A Trainer on the golden run's config whose model is the golden head (fastmoco's DINO classes);
    its client optimizer records, after the gradient rules, what AdamW steps and the last layer's state."""
    from fastmoco import methods, train
    from fastmoco.config import load_config

    g = golden("dino_training.pt")
    run = g["run"]
    clients = []
    real_build_optimizer = train.build_optimizer

    def build(self, cfg):
        return head_only_dino(run, g["initial"])

    def build_optimizer(*a, **k):
        clients.append(real_build_optimizer(*a, **k))
        return clients[-1]

    world = int(os.environ.get("WORLD_SIZE", "1"))
    stage, extra = BF16[key] if key in BF16 else (int(key), [])
    cfg = load_config(CONFIG, _overrides(run, stage, world, out / f"run{key}", key in BF16) + extra)
    with mock.patch.object(methods.DINOMethod, "build", build), mock.patch.object(train, "build_optimizer",
                                                                                 build_optimizer):
        t = train.Trainer(cfg, resume=resume)
    K, BN = run["out_dim"], run["bottleneck_dim"]
    t.adamw_last, t.grad_sq = [], []

    def record_grads(opt, args, kwargs):   # after GradientRules' hook: what AdamW steps (ZeRO: per group)
        grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
        t.grad_sq[-1] += sum(float(g.double().square().sum()) for g in grads)

    def record_last_layer(opt, args, kwargs):  # the frozen group's state (a flat partition under ZeRO)
        for group in opt.param_groups:
            if group.get("last_layer") and group["params"]:
                state = opt.state[group["params"][0]]
                t.adamw_last.append({k: v.reshape(-1)[:K * BN].view(K, BN).clone() if v.dim() else v.clone()
                                     for k, v in state.items()} if state and world == 1 else None)

    clients[-1].register_step_pre_hook(record_grads)   # registered after the rules': runs after them
    clients[-1].register_step_post_hook(record_last_layer)
    return t


def _steps(t) -> list[dict]:
    """The golden run's remaining steps through the Trainer's train_step; after each, a checkpoint, whose
    teacher is read back from its files (fastmoco.momentum.assemble, as export does)."""
    import deepspeed
    import torch.distributed as dist

    from fastmoco.momentum import assemble

    g = golden("dino_training.pt")
    run = g["run"]
    world = t.world
    teacher_names = [n for n, _ in t.model.teacher.named_parameters()]
    rows = slice(t.rank * run["batch"] // world, (t.rank + 1) * run["batch"] // world)
    dtype = next(t.model.parameters()).dtype
    steps = []
    for step in range(t.step, len(g["inputs"])):
        t.epoch = step // run["iters"]   # what fit() counts from the loader
        t.grad_sq.append(0.0)
        loss = t.train_step(*[v[rows].to(dtype) for v in g["inputs"][step]])
        t.step += 1
        loss = loss.detach().float().clone()
        dist.all_reduce(loss)
        params = dict(t.model.student.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values())):   # ZeRO-3: collective; else as is
            student = {n: p.detach().clone() for n, p in params.items()}   # fp32 run: the master's values
        path = t.save()
        states = [torch.load(f, weights_only=True)["momentum"] for f in sorted(path.glob("fastmoco_rank*.pt"))]
        teacher = {teacher_names[i]: v for i, v in assemble(states).items()}
        steps.append({"loss": loss / world, "center": t.model.center.float().clone(), "student": student,
                      "teacher": teacher, "grad_norm": t.grad_sq[-1] ** 0.5 if world == 1 else None})
    return steps


def _trainer_run(key: str, out: Path) -> dict:
    """The golden run through the Trainer; fp32 runs also again from the checkpoint saved at the end of
    the frozen epoch (the last layer's optimizer state there: none)."""
    import deepspeed

    from fastmoco.checkpoint import tag_for

    g = golden("dino_training.pt")
    t = _trainer(key, out)
    result = {"steps": _steps(t), "adamw_last": t.adamw_last, "optimizer": type(t.optimizer).__name__}
    if key not in BF16:
        frozen = g["run"]["freeze_last_layer"] * g["run"]["iters"]
        resumed = _trainer(key, out, resume=str(t.ckpt_dir / tag_for(frozen)))
        assert resumed.step == frozen
        result["resumed"] = {"steps": _steps(resumed), "adamw_last": resumed.adamw_last}
    deepspeed.comm.barrier()
    return result if t.rank == 0 else None


def _worker(out: str, keys: list[str]) -> None:
    from fastmoco.train import fill_single_process_env

    fill_single_process_env()
    results = {k: _trainer_run(k, Path(out).parent) for k in keys}
    if int(os.environ["RANK"]) == 0:
        torch.save(results, out)


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _run_worker(tmp_path, stages, procs) -> dict:
    out = tmp_path / "result.pt"
    launch = [sys.executable] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port", _free_port()]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)   # the references (the kernels have their own tests)
    p = run_until_hang([*launch, __file__, str(out), *map(str, stages)],
                       f"golden DINO training worker ({procs} process(es), ZeRO stage(s) {stages})",
                       cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode:
        raise AssertionError(f"worker failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return torch.load(out, weights_only=False)


def _grad_norm(step: dict) -> float:
    """The norm of every gradient AdamW stepped in a golden step (clipped; none for a frozen layer)."""
    return sum(float(g.double().square().sum()) for g in step["grads"].values()) ** 0.5


def _check_against_golden(result: dict, stage: int, adamw: bool, first: int = 0) -> None:
    """`result`: steps `first`... of the golden run (first > 0: a run resumed from a checkpoint)."""
    g = golden("dino_training.pt")
    run = g["run"]
    last = "head.last_layer.weight_v"
    assert len(g["steps"]) == run["epochs"] * run["iters"] and len(result["steps"]) == len(g["steps"]) - first
    for i, (got, want) in enumerate(zip(result["steps"], g["steps"][first:])):
        step = first + i
        where = f"ZeRO-{stage} step {step}" + (f" (resumed at {first})" if first else "")
        torch.testing.assert_close(got["loss"], want["loss"], rtol=1e-5, atol=1e-6, msg=lambda m: f"{where} loss: {m}")
        if got["grad_norm"] is not None:
            assert got["grad_norm"] == pytest.approx(_grad_norm(want), rel=1e-5), where
        torch.testing.assert_close(got["center"], want["center"], rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{where} center: {m}")
        assert got["student"].keys() == want["student"].keys()
        for n, v in want["student"].items():
            torch.testing.assert_close(got["student"][n], v, rtol=2e-4, atol=2e-6,
                                       msg=lambda m: f"{where} student {n}: {m}")
        for n, v in want["teacher"].items():
            if n in got["teacher"]:   # the frozen weight_g (norm_last_layer) is not in the EMA state
                torch.testing.assert_close(got["teacher"][n], v, rtol=2e-4, atol=2e-6,
                                           msg=lambda m: f"{where} teacher {n}: {m}")
        assert set(want["teacher"]) - set(got["teacher"]) <= {"head.last_layer.weight_g"}
        if adamw:   # the last layer's AdamW state: none while frozen, then counted from its first step
            mine, theirs = result["adamw_last"][i], want["adamw"].get(last)
            assert (mine is None) == (theirs is None), f"{where}: AdamW state {mine} vs the official {theirs}"
            if theirs is not None:
                assert float(mine["step"]) == float(theirs["step"]), where
                for k in ("exp_avg", "exp_avg_sq"):   # an entry near 0 carries the others' rounding noise,
                    # which differs between CPUs (AVX-512 or AVX2 kernels): absolute tolerance from the largest
                    torch.testing.assert_close(mine[k], theirs[k], rtol=2e-4, atol=2e-4 * theirs[k].abs().max().item(),
                                               msg=lambda m: f"{where} {k}: {m}")
    frozen_steps = run["freeze_last_layer"] * run["iters"]
    assert torch.equal(g["steps"][frozen_steps - 1]["student"][last], g["initial"][last])   # still at init
    assert not torch.equal(g["steps"][-1]["student"][last], g["initial"][last])


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return _run_worker(tmp_path_factory.mktemp("golden_dino"), ["0", "1", "2", "3", *BF16], 1)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_trainer_steps_equal_official_train_one_epoch(one_process, stage):
    """ZeRO 0-3, one process: per-parameter clipping, the frozen last layer (no AdamW state in epoch 0,
    step count from 1 after it), the teacher's EMA after each optimizer step as saved in the checkpoint;
    and the same steps again from the checkpoint saved at the end of the frozen epoch."""
    result = one_process[str(stage)]
    assert result["optimizer"] == {0: "AdamW", 3: "DeepSpeedZeroOptimizer_Stage3"}.get(stage, "DeepSpeedZeroOptimizer")
    _check_against_golden(result, stage, adamw=True)
    g = golden("dino_training.pt")
    _check_against_golden(result["resumed"], stage, adamw=True,
                          first=g["run"]["freeze_last_layer"] * g["run"]["iters"])


@pytest.mark.long
@pytest.mark.slow
def test_trainer_steps_on_two_ranks_equal_official_train_one_epoch(tmp_path):
    """ZeRO-2 and ZeRO-3 on two gloo ranks (half the batch each): parameters cut between the ranks'
    partitions or shards are clipped by their whole norms."""
    results = _run_worker(tmp_path, ["2", "3"], 2)
    for stage, result in results.items():
        _check_against_golden(result, int(stage), adamw=False)


@pytest.mark.slow
@pytest.mark.parametrize("key, wrapper", [("0-bf16", "FP16_UnfusedOptimizer"), ("1-bf16-fp32acc", "BF16_Optimizer")])
def test_bf16_wrappers_clip_per_parameter_and_freeze_the_last_layer(one_process, key, wrapper):
    """The bf16 wrappers step fp32 copies of their own (whole per parameter, or flat partitions): the
    gradients AdamW steps are clipped per parameter with the frozen layer's dropped (their norm as the
    official's to bf16's precision; unclipped it would be ~500x), and the last layer has AdamW state
    only after the freeze, counted from 1 (ZeRO-0's wrapper steps the optimizer once while it is built:
    that state is dropped, fastmoco.optim.after_initialize)."""
    result = one_process[key]
    g = golden("dino_training.pt")
    frozen = g["run"]["freeze_last_layer"] * g["run"]["iters"]
    assert result["optimizer"] == wrapper
    for step, (got, want) in enumerate(zip(result["steps"], g["steps"])):
        assert got["grad_norm"] == pytest.approx(_grad_norm(want), rel=0.1), step
        state = result["adamw_last"][step]
        assert (state is None) == (step < frozen), step
        assert state is None or float(state["step"]) == float(want["adamw"]["head.last_layer.weight_v"]["step"])
    torch.testing.assert_close(result["steps"][0]["loss"], g["steps"][0]["loss"], rtol=2e-2, atol=0)


if __name__ == "__main__":
    from fastmoco.distributed import process_entry
    process_entry(lambda argv: _worker(argv[0], argv[1:]))()   # ends like fastmoco's own entries (end_process)
