"""Fused contrastive loss vs the fp32 PyTorch reference (and the same-dtype PyTorch result).

CPU: Triton interpreter at small, non-power-of-two shapes. GPU (marker gpu):
the issue's sizes, plus a peak-memory check.
"""
import pytest
import torch
import torch.nn.functional as F

from fastmoco.kernels.contrastive import (
    ContrastiveLossFn,
    contrastive_bwd,
    contrastive_fwd,
    contrastive_loss,
    contrastive_loss_ref,
    num_key_splits,
    symmetric_contrastive_loss,
    symmetric_contrastive_loss_ref,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
C = 256
DTYPES = [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)]  # (dtype, atol relative to the gradient's scale)


def _openblas_thread_setters():
    """(get, set) of every loaded OpenBLAS, found by symbol as threadpoolctl does."""
    import ctypes

    with open("/proc/self/maps") as maps:
        libs = {line.split()[-1] for line in maps if ".so" in line and "openblas" in line.split()[-1].lower()}
    found = []
    for path in libs:
        lib = ctypes.CDLL(path)
        for prefix, suffix in (("openblas", ""), ("scipy_openblas", "64_"), ("openblas", "64_")):
            get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
            put = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
            if get is not None and put is not None:
                found.append((get, put))
                break
    return found


@pytest.fixture(autouse=True, scope="module")
def _single_threaded_openblas():
    # The interpreter's tl.dot is numpy.matmul (OpenBLAS). On a busy 2-core
    # machine OpenBLAS's threads make each small tile product ~500x slower
    # (17 ms instead of 30 us). conftest.py setting OPENBLAS_NUM_THREADS=1
    # before numpy loads would do the same for every test file.
    if DEV == "cuda":
        yield
        return
    setters = _openblas_thread_setters()
    saved = [get() for get, _ in setters]
    for _, put in setters:
        put(1)
    yield
    for (_, put), n in zip(setters, saved):
        put(n)


def _inputs(N, M, dtype, seed=0, c=C):
    g = torch.Generator().manual_seed(seed)
    q1, q2 = (torch.randn(N, c, generator=g).to(DEV, dtype).requires_grad_() for _ in range(2))
    k1, k2 = (torch.randn(M, c, generator=g).to(DEV, dtype) for _ in range(2))
    return q1, q2, k1, k2


def _torch_same_dtype(q, k, tau, offset):
    """The unfused computation in the input dtype: the error budget the kernel is held to."""
    qh = F.normalize(q, dim=1)
    kh = F.normalize(k.detach(), dim=1)
    logits = qh @ kh.T / tau
    labels = torch.arange(q.shape[0], device=q.device) + offset
    return F.cross_entropy(logits, labels) * (2 * tau)


def _grads(loss, inputs):
    return torch.autograd.grad(loss, inputs)


def _check(out, gold, same, atol):
    """err(kernel) <= 2 * err(torch same dtype) + atol, errors relative to gold's scale."""
    scale = gold.float().abs().max().clamp_min(1e-30)
    err_k = ((out.float() - gold.float()).abs().max() / scale).item()
    err_t = ((same.float() - gold.float()).abs().max() / scale).item()
    assert err_k <= 2 * err_t + atol, f"kernel err {err_k:.3g} vs torch {err_t:.3g} (atol {atol})"


def _compare_symmetric(N, M, offset, tau, dtype, atol, num_splits=None, c=C, seed=0):
    q1, q2, k1, k2 = _inputs(N, M, dtype, seed, c)
    loss = ContrastiveLossFn.apply(q1, q2, k2, k1, tau, offset, num_splits)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    dq1, dq2 = _grads(loss, (q1, q2))
    gold = symmetric_contrastive_loss_ref(q1, q2, k1, k2, tau, offset)
    gq1, gq2 = _grads(gold, (q1, q2))
    same = _torch_same_dtype(q1, k2, tau, offset) + _torch_same_dtype(q2, k1, tau, offset)
    sq1, sq2 = _grads(same, (q1, q2))
    assert dq1.dtype == dtype and dq2.dtype == dtype
    _check(loss, gold, same, atol=1e-5)
    for out, g, s in ((dq1, gq1, sq1), (dq2, gq2, sq2)):
        assert torch.isfinite(out).all()
        _check(out, g, s, atol)


@pytest.mark.parametrize("dtype,atol", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("tau", [0.2, 1.0])
@pytest.mark.parametrize("ratio,offset_rows", [(1, 0), (4, 0), (4, 1)], ids=["M=N", "M=4N", "M=4N-offN"])
@pytest.mark.parametrize("N", [1, 7, 200])
def test_symmetric_matches_reference(N, ratio, offset_rows, tau, dtype, atol):
    """Both terms in one launch; N not a multiple of the block; offsets 0 and N."""
    if N == 1 and ratio == 1:  # one key: softmax = one-hot, loss and gradient are exactly 0
        q1, q2, k1, k2 = _inputs(1, 1, dtype)
        loss = symmetric_contrastive_loss(q1, q2, k1, k2, tau, 0)
        assert loss.abs() < 1e-6 and all((g == 0).all() for g in _grads(loss, (q1, q2)))
        return
    _compare_symmetric(N, ratio * N, offset_rows * N, tau, dtype, atol)


@pytest.mark.parametrize("dtype,atol", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("num_splits", [2, 5])
def test_split_keys_matches_reference(num_splits, dtype, atol):
    """Keys split across programs (partial lse + combine, partial dq + reduce)."""
    N, M = 37, 4 * 37 * 5  # 740 keys: splits of 384 / 256 keys, the last one ragged
    splits, _ = num_key_splits(N, M, 2, torch.device(DEV), num_splits)
    assert splits > 1
    _compare_symmetric(N, M, 2 * N, 0.2, dtype, atol, num_splits=num_splits)


def test_odd_feature_width():
    """C not a power of two: the column mask."""
    _compare_symmetric(19, 76, 19, 0.2, torch.float32, 1e-5, c=96)


@pytest.mark.parametrize("dtype,atol", DTYPES, ids=["fp32", "bf16"])
def test_single_term(dtype, atol):
    N, M, off, tau = 23, 92, 46, 0.2
    q, _, k, _ = _inputs(N, M, dtype)
    loss = contrastive_loss(q, k, tau, off)
    (dq,) = _grads(loss, (q,))
    gold = contrastive_loss_ref(q, k, tau, off)
    (gq,) = _grads(gold, (q,))
    same = _torch_same_dtype(q, k, tau, off)
    (sq,) = _grads(same, (q,))
    _check(loss, gold, same, 1e-5)
    _check(dq, gq, sq, atol)


@pytest.mark.parametrize("tau", [0.05, 0.01])
def test_large_logits_stay_finite(tau):
    """|logit| up to 1/tau; near-duplicate keys make the positives dominate."""
    N, M = 29, 116
    q1, q2, k1, k2 = _inputs(N, M, torch.float32, seed=3)
    with torch.no_grad():  # keys = the queries' near copies: positive logits close to 1/tau
        k2[N: 2 * N] = q1 + 0.01 * torch.randn_like(q1)
        k1[N: 2 * N] = q2 + 0.01 * torch.randn_like(q2)
    loss = symmetric_contrastive_loss(q1, q2, k1, k2, tau, N)
    dq1, dq2 = _grads(loss, (q1, q2))
    gold = symmetric_contrastive_loss_ref(q1, q2, k1, k2, tau, N)
    gq1, gq2 = _grads(gold, (q1, q2))
    assert torch.isfinite(loss) and torch.isfinite(dq1).all() and torch.isfinite(dq2).all()
    torch.testing.assert_close(loss, gold, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dq1, gq1, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(dq2, gq2, atol=1e-6, rtol=1e-4)


def test_backward_writes_every_element():
    """Poisoned output buffer: an unwritten gradient element fails."""
    N, M = 45, 180
    q1, q2, k1, k2 = _inputs(N, M, torch.float32, seed=1)
    loss, lse, rk = contrastive_fwd(q1, q2, k2, k1, 0.2, N)
    for splits in (1, 3):
        dq = torch.full((2, N, C), float("nan"), device=DEV)
        contrastive_bwd(torch.ones((), device=DEV), q1, q2, k2, k1, lse, rk, 0.2, N, num_splits=splits, dq=dq)
        assert torch.isfinite(dq).all()
    gq1, gq2 = _grads(symmetric_contrastive_loss_ref(q1, q2, k1, k2, 0.2, N), (q1, q2))
    torch.testing.assert_close(dq, torch.stack([gq1, gq2]), atol=1e-7, rtol=1e-4)


def test_upstream_gradient_and_no_key_gradient():
    """dloss scales dq (read on the device); keys get no gradient even if they require one."""
    N, M = 13, 52
    q1, q2, k1, k2 = _inputs(N, M, torch.float32, seed=2)
    k1.requires_grad_()
    loss = symmetric_contrastive_loss(q1, q2, k1, k2, 0.2, 0)
    dq1, dk1 = torch.autograd.grad(loss * 3.5, (q1, k1), allow_unused=True)
    assert dk1 is None
    gq1 = torch.autograd.grad(symmetric_contrastive_loss_ref(q1, q2, k1, k2, 0.2, 0) * 3.5, q1)[0]
    torch.testing.assert_close(dq1, gq1, atol=1e-7, rtol=1e-4)


def test_rejects_labels_outside_keys():
    q1, q2, k1, k2 = _inputs(8, 16, torch.float32)
    with pytest.raises(ValueError):
        symmetric_contrastive_loss(q1, q2, k1, k2, 0.2, 9)


# ----------------------------------------------------------------------------- GPU, full sizes
GPU_SIZES = [(4096, 4096, 0), (256, 4096, 256 * 7), (1024, 65536, 1024 * 63), (1, 8, 7), (200, 800, 200)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,atol", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("tau", [0.2, 1.0])
@pytest.mark.parametrize("N,M,offset", GPU_SIZES, ids=[f"N{n}-M{m}" for n, m, _ in GPU_SIZES])
def test_gpu_full_sizes(N, M, offset, tau, dtype, atol):
    _compare_symmetric(N, M, offset, tau, dtype, atol, seed=N + M)


@pytest.mark.gpu
@pytest.mark.parametrize("tau", [0.05, 0.02])
def test_gpu_large_logits_bf16(tau):
    N, M = 1024, 8192
    q1, q2, k1, k2 = _inputs(N, M, torch.bfloat16, seed=5)
    with torch.no_grad():
        k2[:N] = q1
        k1[:N] = q2
    loss = symmetric_contrastive_loss(q1, q2, k1, k2, tau, 0)
    dq1, dq2 = _grads(loss, (q1, q2))
    assert torch.isfinite(loss) and torch.isfinite(dq1).all() and torch.isfinite(dq2).all()
    gold = symmetric_contrastive_loss_ref(q1, q2, k1, k2, tau, 0)
    torch.testing.assert_close(loss, gold, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("N,M", [(4096, 4096), (256, 4096), (1024, 65536)])
def test_gpu_memory_is_linear(N, M):
    """Fused fwd+bwd allocates O(N + M) floats plus split partials, never N x M logits."""
    q1, q2, k1, k2 = _inputs(N, M, torch.bfloat16, seed=7)
    symmetric_contrastive_loss(q1, q2, k1, k2, 0.2, 0).backward()  # autotune outside the measurement
    q1.grad = q2.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    symmetric_contrastive_loss(q1, q2, k1, k2, 0.2, 0).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    splits, _ = num_key_splits(N, M, 2, q1.device)
    budget = 2 * (2 * N * C * 2) + 2 * (splits * N * C + 8 * (N + M)) * 4 + (1 << 20)  # dq (+ a copy) + partials + rows
    assert extra <= budget, f"{extra / 2**20:.1f} MiB > {budget / 2**20:.1f} MiB"
    assert extra < 2 * N * M * 4  # less than even ONE fp32 logits matrix of a pair


def test_kernels_compile_for_hopper():
    """The forward and backward (split and not) compile for sm_90 with the named constants and the
    pair pointer helper, at ViT-B/16's head width and a config the autotuner may pick; no spills."""
    from kernel_checks import assert_fits_hopper, compile_for_hopper

    common = {"qa_ptr": "*bf16", "qb_ptr": "*bf16", "ka_ptr": "*bf16", "kb_ptr": "*bf16", "rk_ptr": "*fp32",
              "N": "i32", "M": "i32", "C": "i32", "stride_q": "i32", "stride_k": "i32", "offset": "i32",
              "keys_per_split": "i32", "inv_tau": "fp32", "eps": "fp32"}
    tiles = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_C": 256, "IS_FP32": False, "IS_INTERPRETER": False}
    specs = [{"module": "fastmoco.kernels.contrastive", "kernel": "_contrastive_fwd_kernel",
              "args": {**common, "part_ptr": "*fp32"}, "constexprs": tiles,
              "divisible_by_16": ["qa_ptr", "qb_ptr", "ka_ptr", "kb_ptr"], "num_warps": 4, "num_stages": 2}]
    for split in (False, True):
        specs.append({"module": "fastmoco.kernels.contrastive", "kernel": "_contrastive_bwd_kernel",
                      "args": {**common, "lse_ptr": "*fp32", "gout_ptr": "*fp32",
                               "dq_ptr": "*fp32" if split else "*bf16", "grad_scale": "fp32"},
                      "constexprs": {**tiles, "IS_SPLIT": split},
                      "divisible_by_16": ["qa_ptr", "qb_ptr", "ka_ptr", "kb_ptr"], "num_warps": 4, "num_stages": 2})
    for spec, result in zip(specs, compile_for_hopper(specs)):
        assert_fits_hopper(f"{spec['kernel']} {spec['constexprs']}", result)
