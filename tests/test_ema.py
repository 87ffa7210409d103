"""Fused multi-tensor EMA (and the torch foreach path) vs the official per-parameter loop.

Parameter lists follow a ViT's parameter SHAPES (patch embedding, cls token,
position embedding, per block: 2 LayerNorms, qkv, proj, fc1, fc2), plus
1-element tensors. CPU (interpreter): ViT-B's list with every width divided
by ~10 (odd sizes kept); GPU (marker gpu): the full ViT-B and ViT-H lists.
"""
import pytest
import torch

from fastmoco.kernels import ema as ema_mod
from fastmoco import ops
from fastmoco.kernels.ema import ema_coefficients, ema_foreach_, ema_multi_, ema_ref_

DEV = "cuda" if torch.cuda.is_available() else "cpu"
EPS32 = torch.finfo(torch.float32).eps


def vit_param_shapes(dim, depth, mlp_dim, patch, tokens, in_chans=3):
    """Parameter shapes of a ViT in module order, with two 1-element tensors."""
    shapes = [(1, 1, dim), (1, tokens, dim), (dim, in_chans, patch, patch), (dim,), (1,)]
    for _ in range(depth):
        shapes += [(dim,), (dim,), (3 * dim, dim), (3 * dim,), (dim, dim), (dim,),
                   (dim,), (dim,), (mlp_dim, dim), (mlp_dim,), (dim, mlp_dim), (dim,)]
    return shapes + [(dim,), (dim,), (1,)]


VIT_B = dict(dim=768, depth=12, mlp_dim=3072, patch=16, tokens=197)  # 85.8M
VIT_H = dict(dim=1280, depth=32, mlp_dim=5120, patch=14, tokens=257)  # 630.8M
VIT_B_SCALED = dict(dim=76, depth=12, mlp_dim=307, patch=5, tokens=197)  # ~0.9M, same tensor count


def _params(shapes, online_dtype, seed=0, device=DEV):
    g = torch.Generator(device=device).manual_seed(seed)
    momentum = [torch.randn(s, generator=g, device=device) for s in shapes]
    online = [torch.randn(s, generator=g, device=device).to(online_dtype) for s in shapes]
    return momentum, online


def _check_update(new, old, online, m, ref):
    """Lists of tensors, checked one by one (ViT-H in float64 at once would not fit):
    matches the loop (<= 1 ulp: FMA contraction) and the exact update; nothing was lost."""
    m = torch.tensor(m, dtype=torch.float32).item()  # the coefficient the kernel sees
    moved = total = 0
    for n, o, x, r in zip(new, old, online, ref):
        n, o, x, r = (t.double().flatten() for t in (n, o, x, r))
        terms = (m * o).abs() + ((1 - m) * x).abs()
        assert ((n - r).abs() <= 2 * EPS32 * terms).all()
        assert ((n - (m * o + (1 - m) * x)).abs() <= 2 * EPS32 * terms).all()
        moved += (n != o).sum().item()
        total += n.numel()
    assert moved > 0.99 * total, "update lost: momentum did not move"


def _run_and_check(form, shapes, online_dtype, m_value, with_out, seed=0):
    momentum, online = _params(shapes, online_dtype, seed)
    old = [t.clone() for t in momentum]
    ref = [t.clone() for t in momentum]
    m = torch.tensor(m_value, dtype=torch.float32, device=DEV)
    ema_ref_(ref, online, m)
    outs = [torch.full_like(t, float("nan"), dtype=torch.bfloat16) for t in momentum] if with_out else None
    {"multi": ema_multi_, "foreach": ema_foreach_}[form](momentum, online, m, outs)
    new = momentum
    _check_update(new, old, online, m_value, ref)
    if with_out:
        for o, w in zip(outs, new):
            assert torch.equal(o.flatten(), w.flatten().to(torch.bfloat16)), "bf16 copy differs from the momentum"


@pytest.mark.parametrize("with_out", [True, False], ids=["bf16-copy", "no-copy"])
@pytest.mark.parametrize("online_dtype", [torch.float32, torch.bfloat16], ids=["online-fp32", "online-bf16"])
@pytest.mark.parametrize("m", [0.99, 0.99999])
@pytest.mark.parametrize("form", ["multi", "foreach"])
def test_ema_matches_loop(form, m, online_dtype, with_out):
    _run_and_check(form, vit_param_shapes(**VIT_B_SCALED), online_dtype, m, with_out)


def test_multi_on_unaligned_shards():
    """ZeRO-3-like shard lists: views at odd offsets of flat buffers (no vector
    hints), empty shards, and tensors larger than one block."""
    sizes = [5000, 1, 0, 8193, 77, 4096, 3]
    total = sum(sizes) + 1
    mom_buf = torch.randn(total, device=DEV)
    onl_buf = torch.randn(total, device=DEV).to(torch.bfloat16)
    out_buf = torch.full((total,), float("nan"), device=DEV, dtype=torch.bfloat16)
    offsets = torch.tensor([0] + sizes).cumsum(0)[:-1] + 1  # start at element 1: 4-byte, not 16-byte, aligned
    momentum = [mom_buf[o: o + n] for o, n in zip(offsets.tolist(), sizes)]
    online = [onl_buf[o: o + n] for o, n in zip(offsets.tolist(), sizes)]
    outs = [out_buf[o: o + n] for o, n in zip(offsets.tolist(), sizes)]
    before = mom_buf.clone()
    ref = [t.clone() for t in momentum]
    m = torch.tensor(0.996, device=DEV)
    ema_ref_(ref, online, m)
    ema_multi_(momentum, online, m, outs)
    assert not ema_mod._plan_for([t for t in momentum if t.numel()], [t for t in online if t.numel()],
                                 [t for t in outs if t.numel()]).is_aligned
    _check_update(momentum, [before[o: o + n] for o, n in zip(offsets.tolist(), sizes)], online, 0.996, ref)
    assert mom_buf[0] == before[0], "element outside every shard was written"
    assert torch.equal(out_buf[1:], mom_buf[1:].to(torch.bfloat16))


def test_pointer_tables_are_cached(monkeypatch):
    """Same tensors: no rebuild (no host->device copy); [m, 1 - m] is read anew every call."""
    momentum, online = _params(vit_param_shapes(**dict(VIT_B_SCALED, depth=2)), torch.float32, seed=1)
    m = ema_coefficients(0.9).to(DEV)
    ema_multi_(momentum, online, m)
    built = []
    real = ema_mod._MultiPlan
    monkeypatch.setattr(ema_mod, "_MultiPlan", lambda *a: built.append(1) or real(*a))
    ref = [t.clone() for t in momentum]
    for value in (0.5, 0.75):
        m.copy_(ema_coefficients(value))  # the device tensor changes; the kernel must see the new values
        ema_ref_(ref, online, m)
        ema_multi_(momentum, online, m)
        for a, b in zip(momentum, ref):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert built == [], "pointer table rebuilt for the same tensors"
    ema_multi_([t.clone() for t in momentum], online, m)  # new storage: new table
    assert built == [1]


@pytest.mark.parametrize("mode", ["auto", "on"], ids=["cpu-foreach-or-cuda-kernel", "kernel"])
def test_update_dispatch(mode):
    """The switch's `ema_update_` with the bf16 copy, whichever path it takes; empty list: nothing."""
    shapes = vit_param_shapes(**dict(VIT_B_SCALED, depth=1))
    momentum, online = _params(shapes, torch.bfloat16, seed=2)
    ref = [t.clone() for t in momentum]
    m = torch.tensor(0.99, device=DEV)
    outs = [torch.full_like(t, float("nan"), dtype=torch.bfloat16) for t in momentum]
    with ops.fused(ema=mode):
        ops.ema_update_(momentum, online, m, outs)
        ops.ema_update_([], [], m)
    ema_ref_(ref, online, m)
    for a, b, o in zip(momentum, ref, outs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
        assert torch.equal(o, a.to(torch.bfloat16))
    flat, flat_online = torch.randn(1001, device=DEV), torch.randn(1001, device=DEV)
    flat_ref = flat.clone()
    with ops.fused(ema=mode):
        ops.ema_update_([flat], [flat_online], m)
    ema_ref_([flat_ref], [flat_online], m)
    torch.testing.assert_close(flat, flat_ref, atol=1e-6, rtol=1e-6)


def test_apex_is_a_mode_of_the_ops_switch(monkeypatch):
    """apex's path is the EMA switch's mode "apex" (FASTMOCO_FUSED_EMA=apex, read with the other ops'
    modes): on CUDA tensors it runs ema_apex_, on the CPU the reference; the old variable is refused."""
    ran = []
    for name in ("ema_multi_", "ema_foreach_", "ema_apex_"):
        monkeypatch.setattr(ema_mod, name, lambda *a, _n=name: ran.append(_n))
    cuda_like = type("T", (), {"is_cuda": True})()
    with ops.fused(ema="apex"):
        ops.ema_update_([torch.zeros(3)], [torch.zeros(3)], 0.9)
        ops.ema_update_([cuda_like], [cuda_like], 0.9)
    assert ran == ["ema_foreach_", "ema_apex_"]
    with pytest.raises(ValueError, match="not in"):
        ops.set_fused(attention="apex")
    monkeypatch.setenv("FASTMOCO_FUSED_EMA", "apex")
    assert ops._modes_from_env()["ema"] == "apex"
    monkeypatch.setenv("FASTMOCO_FUSED_ATTENTION", "apex")
    with pytest.raises(ValueError, match="FASTMOCO_FUSED_ATTENTION='apex'"):
        ops._modes_from_env()
    monkeypatch.delenv("FASTMOCO_FUSED_ATTENTION")
    monkeypatch.setenv("FASTMOCO_EMA_APEX", "1")
    with pytest.raises(ValueError, match="FASTMOCO_FUSED_EMA=apex"):
        ops._modes_from_env()


# The official loops multiply by m and by 1 - m, both Python floats (float64) rounded once to fp32;
# fp32(1 - fp32(m)) is off by up to 1e-4 relative over MoCo v3's ViT-B schedule and 0 where fp32(m) is 1.
VIT_B_ITERS = dict(epochs=300, steps_per_epoch=312)   # 93,600 iterations (batch 4096)


def _coefficients_read_by(fn, coef, n):
    """[m, 1 - m] as an EMA path applies them: from 0 towards 1 gives 1 - m, from 1 towards 0 gives m."""
    zeros, ones = torch.zeros(n, device=DEV), torch.ones(n, device=DEV)
    a, b = [zeros.clone()], [ones.clone()]
    fn(a, [ones], coef)
    fn(b, [zeros], coef)
    return b[0], a[0]


@pytest.mark.parametrize("path", ["multi", "foreach", "reference"])
def test_coefficients_are_m_and_one_minus_m_of_the_float64_schedule(path):
    """Through the methods' step functions (MoCo v3: forward's `m`; DINO: the teacher update after the
    step), every path applies fp32(m_t) and fp32(1 - m_t) of the float64 schedule, also at the end of
    ViT-B's schedule, where fp32(m_t) is 1 and 1 - m_t is ~1e-11 (DINO ViT-S/16's: its last 217 of
    125,100 iterations)."""
    from fastmoco.methods import DINOMethod, MoCoV3, Schedules
    from fastmoco.dino import cosine_schedule
    from fastmoco.schedules import build_schedules

    fn = {"multi": ema_multi_, "foreach": ema_foreach_, "reference": lambda a, b, c: ema_ref_(a, b, c)}[path]
    moco = build_schedules(base_lr=1.5e-4, global_batch=4096, warmup_epochs=40, m0=0.99, **VIT_B_ITERS)
    assert (moco.momentum[-102:].float() == 1).all() and (moco.momentum[-103].float() < 1)   # the count
    coef_of = MoCoV3().step_kwargs(Schedules(lr=moco.lr, momentum=moco.momentum), DEV)
    steps = [0, 1, 5000, 46800, 93000] + list(range(93600 - 110, 93600))
    got = torch.stack([torch.stack(_coefficients_read_by(fn, coef_of(t)["m"], 5)) for t in steps])   # (S, 2, 5)
    m64 = moco.momentum[steps]
    assert (got[:, 0] == m64.float()[:, None].to(DEV)).all()
    assert (got[:, 1] == (1 - m64).float()[:, None].to(DEV)).all()
    assert (got[:, 1] > 0).all()                                   # the EMA never stops
    dino_m = cosine_schedule(0.996, 1.0, 100, 1251)   # DINO ViT-S/16: 100 epochs at batch 1024
    assert (dino_m[-217:].float() == 1).all() and dino_m[-218].float() < 1
    updated = []

    class Teacher:  # what DINOMethod.after_step calls
        def update_teacher(self, coef):
            updated.append(torch.stack(_coefficients_read_by(fn, coef, 3)))

    after = DINOMethod().after_step(Schedules(lr=dino_m, momentum=dino_m), DEV)
    steps = [0, 125000, 125099]
    for t in steps:
        after(Teacher(), t)
    want = torch.stack([dino_m[steps], 1 - dino_m[steps]], 1).float().to(DEV)
    assert torch.equal(torch.stack(updated)[..., 0], want)


def test_rejects_bf16_state():
    momentum, online = _params([(7,)], torch.float32)
    with pytest.raises(TypeError):
        ema_multi_([momentum[0].to(torch.bfloat16)], online, torch.tensor(0.9, device=DEV))


# ----------------------------------------------------------------------------- GPU, full sizes
@pytest.mark.gpu
@pytest.mark.parametrize("online_dtype", [torch.float32, torch.bfloat16], ids=["online-fp32", "online-bf16"])
@pytest.mark.parametrize("m", [0.99, 0.99999])
@pytest.mark.parametrize("form", ["multi", "foreach"])
@pytest.mark.parametrize("model", ["vit_b", "vit_h"])
def test_gpu_full_vit(model, form, m, online_dtype):
    shapes = vit_param_shapes(**(VIT_B if model == "vit_b" else VIT_H))
    _run_and_check(form, shapes, online_dtype, m, with_out=True)
    torch.cuda.empty_cache()


@pytest.mark.gpu
def test_gpu_cuda_graph_capture():
    """No host sync: the update (and its bf16 copy) replays from a CUDA graph with m changed on the device."""
    momentum, online = _params(vit_param_shapes(**VIT_B), torch.bfloat16, seed=4)
    outs = [torch.empty_like(t, dtype=torch.bfloat16) for t in momentum]
    m = ema_coefficients(0.99).to(DEV)
    ops.ema_update_(momentum, online, m, outs)  # builds and caches the pointer table, compiles
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.ema_update_(momentum, online, m, outs)
    ref = [t.clone() for t in momentum]
    m.copy_(ema_coefficients(0.9995))
    graph.replay()
    ema_ref_(ref, online, m)
    for a, b, o in zip(momentum, ref, outs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
        assert torch.equal(o, a.to(torch.bfloat16))


@pytest.mark.gpu
def test_gpu_apex_path_matches():
    if ema_mod._apex_axpby() is None:
        pytest.skip("apex amp_C is not installed")
    momentum, online = _params(vit_param_shapes(**VIT_B), torch.bfloat16, seed=5)
    ref = [t.clone() for t in momentum]
    outs = [torch.empty_like(t, dtype=torch.bfloat16) for t in momentum]
    m = torch.tensor(0.996, device=DEV)
    ema_mod.ema_apex_(momentum, online, m, outs)
    ema_ref_(ref, online, m)
    for a, b, o in zip(momentum, ref, outs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
        assert torch.equal(o, a.to(torch.bfloat16))


def test_kernel_compiles_for_hopper():
    """The multi-tensor kernel (bf16 online, bf16 copy, aligned: the training case) compiles for sm_90."""
    from kernel_checks import assert_fits_hopper, compile_for_hopper

    spec = {"module": "fastmoco.kernels.ema", "kernel": "_ema_multi_kernel",
            "args": {"ptr_tab": "*i64", "numel_tab": "*i64", "blk_tab": "*i64", "coef_ptr": "*fp32", "T": "i32",
                     "B": "i32"},
            "constexprs": {"BLOCK": ema_mod.BLOCK, "IS_ONLINE_BF16": True, "HAS_OUT": True, "IS_ALIGNED": True,
                           "IS_INTERPRETER": False},
            "divisible_by_16": [], "num_warps": ema_mod.NUM_WARPS, "num_stages": 1}
    assert_fits_hopper("ema multi", compile_for_hopper([spec])[0])
