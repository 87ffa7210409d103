"""LARS: the fused kernels (kernels/lars.py) and the optimizer (fastmoco/optim.py) against the official
rule, written out again here one tensor at a time, on random parameter lists of mixed shapes (1-d, 2-d,
4-d; sizes that are not powers of two, tensors spanning several programs); the exclusion rules checked
one by one; the sm_90 compile; the GPU at R50's parameter list."""
import math

import pytest
import torch

from fastmoco import ops
from fastmoco.kernels.lars import BLOCK, lars_, lars_ref_
from fastmoco.optim import LARS, build_optimizer
from tests.kernel_checks import assert_fits_hopper, compile_for_hopper

HP = dict(lr=0.7, weight_decay=0.05, momentum=0.9, trust_coefficient=0.02)
# 1-d (biases, BN), 2-d (Linear), 4-d (conv) tensors; two span several BLOCKs with a ragged tail
SHAPES = [(37,), (3, 5), (2 * BLOCK + 11,), (7, 3, 3, 3), (5, BLOCK // 3 + 2), (1,), (129, 65), (64,)]


def official_step(p, g, mu, lr, weight_decay, momentum, trust_coefficient):
    """moco-v3 moco/optimizer.py for one tensor, with norms in float64 (an independent reference)."""
    if p.ndim > 1:
        g = g + weight_decay * p
        pn, gn = p.double().norm(), g.double().norm()
        q = trust_coefficient * pn / gn if pn > 0 and gn > 0 else torch.tensor(1.0, dtype=torch.float64)
        g = g * q.float()
    mu.mul_(momentum).add_(g)
    p.sub_(lr * mu)


def random_lists(shapes, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(device) for s in shapes]
    grads = [0.1 * torch.randn(s, generator=gen).to(device) for s in shapes]
    mus = [torch.randn(s, generator=gen).to(device) for s in shapes]
    return params, grads, mus


def run_steps(fn, shapes, steps, seed=0, device="cpu", **hp):
    params, _, mus = random_lists(shapes, seed, device)
    for step in range(steps):
        _, grads, _ = random_lists(shapes, seed + 100 + step, device)
        fn(params, grads, mus, **hp)
    return params, mus


def independent(params, grads, mus, **hp):
    for p, g, mu in zip(params, grads, mus):
        official_step(p, g, mu, **hp)


@pytest.mark.parametrize("fn", [lars_, lars_ref_], ids=["kernel", "reference"])
def test_several_steps_equal_the_official_rule(fn):
    got_p, got_mu = run_steps(fn, SHAPES, 3, **HP)
    want_p, want_mu = run_steps(independent, SHAPES, 3, **HP)
    for s, a, b, c, d in zip(SHAPES, got_p, want_p, got_mu, want_mu):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"param {s}: {m}")
        torch.testing.assert_close(c, d, rtol=1e-5, atol=1e-5, msg=lambda m: f"momentum {s}: {m}")


def test_exclusion_rules_one_by_one():
    """A 1-d tensor: plain momentum SGD, no decay, no ratio; a 2-d one: decay, then ratio; zero weights or a
    zero update: ratio 1."""
    lr, wd, m, tc = 0.5, 0.1, 0.9, 0.01
    b = torch.tensor([1.0, -2.0, 3.0])
    w = torch.tensor([[3.0, 0.0], [0.0, 4.0]])       # ||w|| = 5
    z = torch.zeros(2, 3)                              # ||w|| = 0: ratio 1, no decay effect
    still = torch.tensor([[1.0, 2.0], [2.0, 4.0]])     # gradient -wd * w: the update is 0, ratio 1
    gb, gw, gz, gs = torch.tensor([0.5, 0.5, 0.5]), torch.tensor([[0.0, 1.0], [1.0, 0.0]]), \
        torch.ones(2, 3), -wd * still
    params, grads = [b.clone(), w.clone(), z.clone(), still.clone()], [gb, gw, gz, gs]
    mus = [torch.full_like(t, 0.25) for t in params]
    lars_(params, grads, mus, lr=lr, weight_decay=wd, momentum=m, trust_coefficient=tc)
    mu_b = 0.9 * 0.25 + gb                             # no decay, no ratio
    torch.testing.assert_close(mus[0], mu_b)
    torch.testing.assert_close(params[0], b - lr * mu_b)
    d = gw + wd * w
    q = tc * 5.0 / d.norm()
    torch.testing.assert_close(mus[1], 0.9 * 0.25 + q * d)
    torch.testing.assert_close(params[1], w - lr * (0.9 * 0.25 + q * d))
    torch.testing.assert_close(mus[2], 0.9 * 0.25 + gz)  # ratio 1
    torch.testing.assert_close(mus[3], torch.full_like(still, 0.9 * 0.25))  # d = 0: ratio 1, mu only decays


def test_optimizer_steps_like_the_official_one_and_skips_parameters_without_gradients():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.BatchNorm2d(5), torch.nn.Flatten(),
                                torch.nn.Linear(5 * 9 * 9, 7))
    frozen = model[3].bias
    frozen.requires_grad_(False)
    ref = [p.detach().clone() for p in model.parameters()]
    ref_mu = [torch.zeros_like(p) for p in ref]
    opt = LARS([p for p in model.parameters()], lr=0.3, weight_decay=1e-3, momentum=0.9, trust_coefficient=0.001)
    x = torch.randn(4, 3, 11, 11)
    with ops.fused(lars="on"):
        for _ in range(3):
            opt.zero_grad()
            model(x).square().mean().backward()
            grads = [p.grad.clone() if p.grad is not None else None for p in model.parameters()]
            opt.step()
            for p, g, mu in zip(ref, grads, ref_mu):
                if g is not None:
                    official_step(p, g, mu, lr=0.3, weight_decay=1e-3, momentum=0.9, trust_coefficient=0.001)
    for a, b in zip(model.parameters(), ref):
        torch.testing.assert_close(a.detach(), b, rtol=1e-5, atol=1e-6)
    assert frozen not in opt.state and all(opt.state[p]["mu"].dtype == torch.float32
                                          for p in model.parameters() if p.requires_grad)


def flat_layout(shapes, align, partition):
    """Where a ZeRO-1/2-like wrapper puts each parameter in its flat buffer (each parameter padded to a
    multiple of `align` elements, the buffer to 2 partitions of `partition` elements), written out here
    independently of fastmoco/optim.py."""
    offsets, off = [], 0
    for s in shapes:
        offsets.append(off)
        off += -(-math.prod(s) // align) * align
    assert off <= 2 * partition
    return offsets


def pieces_of_rank(shapes, offsets, partition, rank):
    """(start in the partition, length, parameter index) of each parameter's part inside rank's slice."""
    lo, out = rank * partition, []
    for n, (s, off) in enumerate(zip(shapes, offsets)):
        a, b = max(off, lo), min(off + math.prod(s), lo + partition)
        if a < b:
            out.append((a - lo, b - a, n))
    return out


def _pieces_worker(rank, world, fn_name, shapes, partition, steps):
    import torch.distributed as dist

    from fastmoco.kernels import lars as module
    from fastmoco.kernels.lars import Pieces

    fn = getattr(module, fn_name)
    offsets = flat_layout(shapes, 4, partition)
    params, _, mus = random_lists(shapes, 0)
    flat = torch.full((2 * partition,), 7.0)  # padding: must stay as it is
    mflat = torch.full((2 * partition,), 7.0)
    for off, p, mu in zip(offsets, params, mus):
        flat[off:off + p.numel()] = p.flatten()
        mflat[off:off + p.numel()] = mu.flatten()
    part, mpart = flat[rank * partition:(rank + 1) * partition].clone(), mflat[rank * partition:(rank + 1) * partition].clone()
    mine = pieces_of_rank(shapes, offsets, partition, rank)
    pieces = Pieces(tuple(n for _, _, n in mine), tuple(len(s) > 1 for s in shapes),
                    torch.full((2, len(shapes)), float("nan")), dist.all_reduce)
    for step in range(steps):
        _, grads, _ = random_lists(shapes, 100 + step)
        gflat = torch.full((2 * partition,), float("nan"))
        for off, g in zip(offsets, grads):
            gflat[off:off + g.numel()] = g.flatten()
        grad = gflat[rank * partition:(rank + 1) * partition].clone()
        fn([part[a:a + n] for a, n, _ in mine], [grad[a:a + n] for a, n, _ in mine],
           [mpart[a:a + n] for a, n, _ in mine], pieces=pieces, **HP)
    both = [torch.empty_like(part) for _ in range(world)], [torch.empty_like(mpart) for _ in range(world)]
    dist.all_gather(both[0], part)
    dist.all_gather(both[1], mpart)
    return torch.cat(both[0]), torch.cat(both[1])


@pytest.mark.parametrize("fn_name", ["lars_", "lars_ref_"], ids=["kernel", "reference"])
@pytest.mark.parametrize("partition", [12000, 40000], ids=["split-mid-parameter", "rank1-holds-only-padding"])
def test_pieces_on_two_ranks_equal_the_official_rule_on_whole_tensors(fn_name, partition):
    """ZeRO-1/2's layout: each rank steps its slice of a flat buffer; parameters cut at the partition
    boundary take the norms of the whole parameter (one all-reduce); the padding is left alone."""
    from gloo_checks import run_on_two_ranks

    offsets = flat_layout(SHAPES, 4, partition)
    assert offsets[4] < 12000 < offsets[5] - 4  # the first layout cuts the (5, BLOCK//3+2) weight in two
    flat, mflat = run_on_two_ranks(_pieces_worker, fn_name, SHAPES, partition, 3)
    want_p, want_mu = run_steps(independent, SHAPES, 3, **HP)
    covered = torch.zeros(2 * partition, dtype=torch.bool)
    for s, off, p, mu in zip(SHAPES, offsets, want_p, want_mu):
        n = p.numel()
        torch.testing.assert_close(flat[off:off + n].view(s), p, rtol=1e-5, atol=1e-5, msg=lambda m: f"param {s}: {m}")
        torch.testing.assert_close(mflat[off:off + n].view(s), mu, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"momentum {s}: {m}")
        covered[off:off + n] = True
    assert (flat[~covered] == 7.0).all() and (mflat[~covered] == 7.0).all()


def test_unlocated_flat_partitions_are_refused_naming_the_stage():
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = LARS([p], lr=0.1)
    flat = torch.nn.Parameter(torch.randn(12))  # what a ZeRO wrapper puts in the group
    opt.param_groups[0]["params"] = [flat]
    flat.grad = torch.randn(12)
    with pytest.raises(ValueError, match="locate_partitions"):
        opt.step()


def test_config_choice_and_zero3_refusal():
    from fastmoco.config import ConfigError, load_config

    cfg = load_config(None, ["--optim.name", "lars", "--optim.weight_decay", "1e-6"])
    p = torch.nn.Parameter(torch.randn(3, 3))
    opt = build_optimizer(cfg.optim, [{"params": [p]}], lr=0.1, use_cuda=False, zero_stage=0)
    assert isinstance(opt, LARS) and opt.param_groups[0]["momentum"] == 0.9
    assert isinstance(build_optimizer(cfg.optim, [{"params": [p]}], lr=0.1, use_cuda=False, zero_stage=2), LARS)
    with pytest.raises(ConfigError, match="stage 0, 1 or 2, got 3"):
        build_optimizer(cfg.optim, [{"params": [p]}], lr=0.1, use_cuda=False, zero_stage=3)
    cfg.optim.name = "sgd"
    with pytest.raises(ConfigError, match="'sgd' unknown"):
        build_optimizer(cfg.optim, [{"params": [p]}], lr=0.1, use_cuda=False, zero_stage=0)


def test_bad_lists_are_named():
    p, g, mu = torch.randn(3, 3), torch.randn(3, 3), torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"momentum buffer \(3, 4\)"):
        lars_([p], [g], [mu], **HP)
    with pytest.raises(TypeError, match="grad must be fp32"):
        lars_([p], [g.bfloat16()], [torch.zeros(3, 3)], **HP)


def test_kernels_compile_for_hopper_without_spills():
    mod = "fastmoco.kernels.lars"
    norms = {"module": mod, "kernel": "_lars_norms_kernel",
             "args": {"ptr_tab": "*i64", "numel_tab": "*i64", "blk_tab": "*i64", "part_ptr": "*fp32", "wd": "fp32",
                      "T": "i32", "B_a": "i32"},
             "constexprs": {"BLOCK": BLOCK}, "divisible_by_16": [], "num_warps": 8, "num_stages": 3}
    sumsq = {"module": mod, "kernel": "_lars_sumsq_kernel",
             "args": {"part_ptr": "*fp32", "red_tab": "*i64", "sq_ptr": "*fp32", "N": "i32", "N_a": "i32",
                      "B_a": "i32"},
             "constexprs": {"RBLOCK": 1024}, "divisible_by_16": [], "num_warps": 4, "num_stages": 3}
    apply = {"module": mod, "kernel": "_lars_apply_kernel",
             "args": {"ptr_tab": "*i64", "numel_tab": "*i64", "blk_tab": "*i64", "owner_tab": "*i64",
                      "sq_ptr": "*fp32", "adapt_ptr": "*fp32", "lr": "fp32", "wd": "fp32", "momentum": "fp32",
                      "trust": "fp32", "T": "i32", "N": "i32", "B": "i32"},
             "constexprs": {"BLOCK": BLOCK}, "divisible_by_16": [], "num_warps": 8, "num_stages": 3}
    for label, result in zip(("norms", "sumsq", "apply"), compile_for_hopper([norms, sumsq, apply])):
        assert_fits_hopper(f"lars {label}", result)


def r50_shapes():
    import torchvision

    return [tuple(p.shape) for p in torchvision.models.resnet50().parameters()]


@pytest.mark.gpu
def test_kernel_equals_the_official_rule_on_r50_parameters_on_the_gpu():
    shapes = r50_shapes()
    hp = dict(lr=9.6, weight_decay=1e-6, momentum=0.9, trust_coefficient=0.001)
    got_p, got_mu = run_steps(lars_, shapes, 5, device="cuda", **hp)
    want_p, want_mu = run_steps(lars_ref_, shapes, 5, device="cuda", **hp)
    worst = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got_p, want_p))
    assert worst < 1e-5 and math.isfinite(worst), worst
    for a, b in zip(got_mu, want_mu):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
