"""memory.backbone_chunk (fastmoco/chunked.py): the backbone in chunks gives the whole batch's loss and
gradients, under every ZeRO stage and on two ranks, while the activations kept grow with the chunk."""
from __future__ import annotations

import functools
import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from fastmoco.config import ConfigError, load_config
from fastmoco.moco import MoCo
from test_train import ROOT, TINY, baseline, losses, train_1proc, train_2proc  # noqa: F401 (fixture)


def tiny_moco(chunk: int, frozen: bool = True, drop_path: float = 0.0, checkpointing: bool = False) -> MoCo:
    torch.manual_seed(0)
    model = MoCo("vit_test", img_size=32, dim=16, mlp_dim=32, frozen_patch_embed=frozen, backbone_chunk=chunk,
                 grad_checkpointing=checkpointing)
    if drop_path:
        for block in model.base_encoder.blocks:   # DINO's student has drop path; MoCo v3's recipe none
            block.drop_path = drop_path
    return model


def loss_and_grads(model: MoCo, x1, x2):
    loss = model(x1, x2, torch.tensor([0.99, 0.01]))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(got: dict, ref: dict, rtol: float = 1e-4) -> None:
    """Every gradient equal up to summation order: each tensor's difference relative to its norm, or to a
    thousandth of the largest gradient's norm for a tensor below that (a bias whose exact gradient is 0,
    such as the final norm's ahead of the projector's BatchNorm, holds rounding noise only). Measured
    between chunked and whole: 3e-7 with AVX-512 kernels, 1.2e-5 with AVX2 ones; a chunk lost or counted
    twice is an error of 1e-1 or more."""
    assert got.keys() == ref.keys()
    floor = 1e-3 * max(g.norm().item() for g in ref.values())
    for n in ref:
        err = (got[n] - ref[n]).norm().item() / max(ref[n].norm().item(), floor)
        assert err <= rtol, (n, err)


@pytest.mark.parametrize("frozen,checkpointing", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("chunk", [1, 2, 3, 10])
def test_chunks_give_the_whole_batch_gradients(chunk, frozen, checkpointing):
    torch.manual_seed(1)
    x1, x2 = torch.randn(5, 3, 32, 32), torch.randn(5, 3, 32, 32)   # 10 views: 3 does not divide them
    ref_loss, ref = loss_and_grads(tiny_moco(0, frozen), x1, x2)
    loss, got = loss_and_grads(tiny_moco(chunk, frozen, checkpointing=checkpointing), x1, x2)
    assert torch.allclose(loss, ref_loss, rtol=1e-5)   # a few fp32 ulps: the sums run in another order
    assert got.keys() == ref.keys() and any(n.startswith("base_encoder.blocks") for n in got)
    assert ("base_encoder.patch_embed.proj.weight" in got) == (not frozen)
    assert_grads_close(got, ref)


def test_a_chunk_runs_again_with_the_random_state_of_its_first_run():
    """Drop path: the backward's second run of each chunk draws the masks of its first run, so the
    gradients are those of plain autograd through the same masks (the chunks' own, drawn in turn)."""
    from fastmoco.chunked import spans
    torch.manual_seed(1)
    x1, x2 = torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32)
    model = tiny_moco(4, drop_path=0.5)
    torch.manual_seed(7)
    loss, got = loss_and_grads(model, x1, x2)

    ref_model = tiny_moco(0, drop_path=0.5)
    enc = ref_model.base_encoder
    torch.manual_seed(7)
    x = torch.cat([x1, x2])
    feats = torch.cat([enc(x[a:b], head=False) for a, b in spans(6, 4)])   # plain autograd, chunk by chunk
    q1, q2 = ref_model.predictor(enc.head(feats[:3])), ref_model.predictor(enc.head(feats[3:]))
    with torch.no_grad():
        ref_model.update_momentum_encoder(torch.tensor([0.99, 0.01]))
        fk = ref_model._backbone(ref_model.momentum_encoder, x1, x2)
        k1, k2 = ref_model.momentum_encoder.head(fk[:3]), ref_model.momentum_encoder.head(fk[3:])
    from fastmoco import ops
    ref_loss = ops.symmetric_contrastive_loss(q1, q2, k1, k2, ref_model.tau, 0)
    ref_loss.backward()
    assert torch.allclose(loss, ref_loss.detach(), rtol=1e-5)
    assert_grads_close(got, {n: p.grad for n, p in ref_model.named_parameters() if p.grad is not None})


def kept_bytes(run) -> int:
    """Bytes autograd keeps for the backward while `run()` runs (saved-tensor hooks: the activations a
    forward holds until its backward)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return total


def saved_bytes(chunk: int, n: int) -> int:
    """Bytes autograd keeps for the backward of one step at micro batch n."""
    model = tiny_moco(chunk)
    x1, x2 = torch.randn(n, 3, 32, 32), torch.randn(n, 3, 32, 32)
    loss = []
    total = kept_bytes(lambda: loss.append(model(x1, x2)))
    loss[0].backward()
    return total


def test_the_activations_kept_grow_with_the_chunk_not_the_micro_batch():
    grow_whole = saved_bytes(0, 32) - saved_bytes(0, 16)
    grow_chunked = saved_bytes(4, 32) - saved_bytes(4, 16)
    # chunked: only the images, the heads' activations and the class tokens grow with the batch
    assert grow_chunked < grow_whole / 10, (grow_chunked, grow_whole)


def test_the_key_is_checked_and_a_backbone_with_batch_statistics_is_refused():
    for bad in ("-1", "2.5", "big", "true"):
        with pytest.raises(ConfigError, match=r"memory.backbone_chunk must be an integer >= 0 .* or \"auto\""):
            load_config(TINY, ["--memory.backbone_chunk", bad])
    assert load_config(TINY, ["--memory.backbone_chunk", "auto"]).memory.backbone_chunk == "auto"
    with pytest.raises(ValueError, match="memory.backbone_chunk auto: model.arch vit_test .* BatchNorm inside"):
        MoCo("vit_test", img_size=32, dim=16, mlp_dim=32, mlp_norm="bn", backbone_chunk="auto")
    with pytest.raises(ValueError, match="memory.backbone_chunk 4: model.arch vit_test .* BatchNorm inside"):
        MoCo("vit_test", img_size=32, dim=16, mlp_dim=32, mlp_norm="bn", backbone_chunk=4)


@pytest.mark.slow
def test_a_chunked_run_has_the_unchunked_runs_losses_for_20_steps(tmp_path):
    train_1proc(tmp_path / "whole", "--schedule.max_steps", "20")
    train_1proc(tmp_path / "chunked", "--schedule.max_steps", "20", "--memory.backbone_chunk", "3")
    whole, chunked = losses(tmp_path / "whole"), losses(tmp_path / "chunked")
    assert sorted(chunked) == list(range(1, 21))
    for s in chunked:
        assert chunked[s] == pytest.approx(whole[s], rel=1e-5, abs=1e-6), (s, chunked[s], whole[s])


@pytest.mark.long
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_chunks_on_two_ranks_under_every_zero_stage_equal_one_unchunked_process(baseline, tmp_path, stage):  # noqa
    train_2proc(tmp_path, "--schedule.max_steps", "4", "--deepspeed.zero_optimization.stage", str(stage),
                "--memory.backbone_chunk", "3")
    one, two = losses(baseline), losses(tmp_path)
    assert sorted(two) == [1, 2, 3, 4]
    for s in two:
        assert two[s] == pytest.approx(one[s], rel=1e-5, abs=1e-6), (s, two[s], one[s])


# -- DINO: chunks within each crop group (2 global, 3 local crops) --------------------------------------
def dino_loss_and_grads(chunk: int):
    from fastmoco.dino import DINO
    from test_dino import ARCH, crops
    torch.manual_seed(0)
    model = DINO(**ARCH, drop_path=0.0, backbone_chunk=chunk)
    loss = model(*crops(3, seed=1), teacher_temp=0.04)   # groups of 6 global and 9 local images
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk", [1, 2, 4, 9])
def test_dino_chunks_give_the_whole_batch_gradients(chunk):
    ref_loss, ref = dino_loss_and_grads(0)
    loss, got = dino_loss_and_grads(chunk)
    assert torch.allclose(loss, ref_loss, rtol=1e-5)   # a few fp32 ulps: the sums run in another order
    assert got.keys() == ref.keys() and any(n.startswith("student.backbone.blocks") for n in got)
    assert_grads_close(got, ref)


@pytest.mark.long
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_dino_chunks_on_two_ranks_equal_the_unchunked_run(tmp_path, stage):
    """Against the same two ranks unchunked (tests/test_dino.py compares two ranks with one process)."""
    from test_dino import _losses, _train
    common = ("--schedule.max_steps", "4", "--model.drop_path", "0.0",   # drop path: masks drawn per chunk
              "--deepspeed.zero_optimization.stage", str(stage), "--deepspeed.train_micro_batch_size_per_gpu", "4")
    _train(tmp_path / "whole", *common, nproc=2)
    _train(tmp_path / "chunked", *common, "--memory.backbone_chunk", "3", nproc=2)
    whole, chunked = _losses(tmp_path / "whole"), _losses(tmp_path / "chunked")
    assert sorted(chunked) == [1, 2, 3, 4]
    for s in chunked:
        assert chunked[s] == pytest.approx(whole[s], rel=1e-6, abs=1e-7), (s, chunked[s], whole[s])


# -- memory.backbone_chunk "auto" ------------------------------------------------------------------------------
def test_bf16_chunks_add_no_error_to_bf16_gradients():
    """Chunk gradients accumulate in the parameters' dtype: in bf16, 16 chunks must not move the
    gradients measurably further from the fp32 ones than bf16 itself does (measured: 0.2378 relative
    error unchunked, 0.2377-0.2378 with chunks of 16, 4 or 2)."""
    torch.manual_seed(1)
    x1, x2 = torch.randn(16, 3, 32, 32), torch.randn(16, 3, 32, 32)

    def grads(chunk, dtype):
        model = tiny_moco(chunk).to(dtype)
        model(x1.to(dtype), x2.to(dtype)).backward()
        return torch.cat([p.grad.float().flatten() for n, p in model.named_parameters()
                          if p.grad is not None and n.startswith("base_encoder.blocks")])

    ref = grads(0, torch.float32)
    whole = (grads(0, torch.bfloat16) - ref).norm() / ref.norm()
    chunked = (grads(2, torch.bfloat16) - ref).norm() / ref.norm()   # 16 chunks of the 32 views
    assert chunked < 1.05 * whole, (chunked, whole)


def test_fit_chunk_takes_the_largest_chunk_the_linear_memory_model_allows():
    from fastmoco.chunked import fit_chunk
    calls = []

    def measure(n):   # 100 fixed + 10 per image
        calls.append(n)
        return 100 + 10 * n

    assert fit_chunk(measure, 1000, budget=100 + 10 * 37.5) == (32, 10, 100)   # 37 fit; whole tiles from 16
    assert calls == [4, 8]
    assert fit_chunk(measure, 1000, budget=100 + 10 * 13) == (13, 10, 100)
    assert fit_chunk(measure, 50, budget=100 + 10 * 50) == (0, 10, 100)         # all 50 at once: no chunks
    assert fit_chunk(measure, 3, budget=1000)[0] == 0                             # one probe of the 3
    with pytest.raises(ValueError, match="memory.backbone_chunk auto: .* one image needs .* does not fit"):
        fit_chunk(measure, 1000, budget=105)


def test_auto_chunk_probes_the_real_backbone_and_its_chunk_fits_the_budget():
    """fit_chunk over probe_step (the backbone's forward and backward, the function the GPU probe
    times), measured here by the bytes autograd keeps (saved-tensor hooks, the CPU's stand-in for
    the CUDA peak): the chunk found fits the budget, the next whole tile does not."""
    from fastmoco.chunked import fit_chunk, probe_step
    backbone = tiny_moco(0).base_encoder

    def kept(n):
        return kept_bytes(probe_step(lambda x: backbone(x, head=False), n, 32, torch.device("cpu"), torch.float32))

    budget = (kept(20) + kept(21)) / 2
    chunk, per, base = fit_chunk(kept, 100, budget)
    assert chunk == 16 and kept(16) <= budget < kept(24)
    assert per == kept(9) - kept(8) > 0


@pytest.mark.slow
def test_auto_on_the_cpu_is_the_whole_batch_and_says_so(tmp_path):
    p = train_1proc(tmp_path, "--schedule.max_steps", "2", "--memory.backbone_chunk", "auto")
    assert ("memory.backbone_chunk auto: the whole micro batch (16 images per backbone call): device memory "
            "is probed on a GPU only") in p.stdout


@pytest.mark.long
def test_a_chunked_run_stopped_by_sigterm_resumes_exactly_with_the_knn_monitor(tmp_path):
    """Preemption, exact resume and the kNN monitor with chunks: SIGTERM at step 3 saves at step 4; the
    resumed run's losses and kNN records equal an uninterrupted chunked run's bit for bit."""
    from fastmoco.pipelines.demo_data import make_demo_data
    from test_reliability import COMMON, WORKER, _popen, _wait_for, train
    from limits import communicate_until_hang
    train_dir, val_dir = make_demo_data(tmp_path / "train", 23, seed=0), make_demo_data(tmp_path / "val", 13, seed=7)
    common = ("--memory.backbone_chunk", "3", "--eval.train_path", str(train_dir), "--eval.val_path", str(val_dir),
              "--eval.every_epochs", "1", "--eval.backend", "torchvision", "--eval.k", "[1, 3]")
    train(tmp_path / "whole", "--schedule.max_steps", "12", *common)
    out, marker = tmp_path / "stopped", tmp_path / "wait"
    proc = _popen([sys.executable, WORKER, "wait-at:3", str(marker), TINY, "--logging.out_dir", str(out), *COMMON,
                   "--schedule.max_steps", "12", *common])
    os.kill(_wait_for(Path(f"{marker}.rank0"), proc), signal.SIGTERM)
    communicate_until_hang(proc, "chunked training worker sent SIGTERM at step 3, which should save and exit")
    assert proc.returncode == 0
    assert (out / "checkpoints" / "step_00000004" / "COMPLETE").is_file()
    train(out, "--resume", "auto", "--schedule.max_steps", "12", *common)

    def records(run):
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    whole, resumed = records(tmp_path / "whole"), records(out)
    assert {r["step"]: r["loss"] for r in resumed if "loss" in r} == \
        {r["step"]: r["loss"] for r in whole if "loss" in r}
    def knn(recs):   # (step, kNN accuracies) of each evaluation record
        return [(r["step"], {k: v for k, v in r["eval"].items() if k.startswith("knn_")}) for r in recs if "eval" in r]
    assert [s for s, _ in knn(whole)] == [8, 12] and knn(resumed) == knn(whole)


# -- on the GPU (bench/gpu_session.sh, stage chunk) --------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _vit_s() -> torch.nn.Module:
    from fastmoco.models.vit import VisionTransformer
    return VisionTransformer("vit_small").cuda().to(torch.bfloat16)


def _vit_s_probe(n: int) -> int:
    from fastmoco.chunked import cuda_peak, probe_step
    return cuda_peak(probe_step(lambda x: _vit_s()(x, head=False), n, 224, torch.device("cuda"), torch.bfloat16))


@pytest.mark.gpu
def test_gpu_auto_chunk_fits_the_budget_it_is_given():
    """ViT-S/16 bf16 on the device: the chunk fit_chunk finds for a budget of 64 images' measured
    peak fits that budget (the allocator keeps memory linear in the chunk)."""
    from fastmoco.chunked import fit_chunk
    _vit_s_probe(4)   # one-time allocations (cuBLAS workspace, kernels) before measuring
    budget = _vit_s_probe(64)
    chunk, per, base = fit_chunk(_vit_s_probe, 4096, budget)
    assert chunk in (56, 64), (chunk, per, base)
    assert _vit_s_probe(chunk) <= budget * 1.01
    assert _vit_s_probe(chunk + 16) > budget


@pytest.mark.gpu
def test_gpu_a_chunked_step_peak_grows_with_the_chunk_not_the_micro_batch():
    """A MoCo ViT-S/16 step (bf16, device tensors): the peak memory's growth from micro batch 64 to
    128 with chunks of 32 is under a fifth of the unchunked growth."""
    def peak(micro: int, chunk: int) -> int:
        torch.manual_seed(0)
        model = MoCo("vit_small", backbone_chunk=chunk).cuda().to(torch.bfloat16)   # no m: no EMA here
        x1 = torch.randn(micro, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
        x2 = torch.randn_like(x1)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        model(x1, x2).backward()
        torch.cuda.synchronize()
        used = torch.cuda.max_memory_allocated() - before
        del model
        torch.cuda.empty_cache()
        return used

    whole = peak(128, 0) - peak(64, 0)
    chunked = peak(128, 32) - peak(64, 32)
    assert chunked < whole / 5, (chunked, whole)
