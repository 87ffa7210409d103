"""The DALI two-crop graph on real photographs: the CPU twin here, the GPU graph under -m gpu.

Statistics use the graph's debug outputs (per-sample coins, crop windows and
the uint8 image before flip/normalise) and check that each output agrees with
its coin, so they exercise the same graph function that trains.
"""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from fastmoco.config import DataConfig  # noqa: E402
from fastmoco.pipelines import BadImageWarning, scan_image_folder  # noqa: E402
from fastmoco.pipelines.dali import DaliTwoCropLoader  # noqa: E402
from fastmoco.pipelines.demo_data import make_demo_data  # noqa: E402
from cursor_checks import assert_resume_is_uninterrupted  # noqa: E402
from test_pipelines import make_bad_folder  # noqa: E402

MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
STD = np.array([0.229, 0.224, 0.225], np.float32) * 255


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """96 colour photographs (8 classes) for the statistics."""
    return scan_image_folder(make_demo_data(tmp_path_factory.mktemp("photos"), 96, seed=0, color_only=True))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """26 photographs including grey ones (1-channel JPEGs)."""
    return scan_image_folder(make_demo_data(tmp_path_factory.mktemp("mixed"), 26, seed=2))


def _cfg(**kw) -> DataConfig:
    return dataclasses.replace(DataConfig(num_threads=2, image_size=48), **kw)


def _run_epochs(samples, cfg, epochs, batch=32, device="cpu", **kw):
    ld = DaliTwoCropLoader(samples, cfg, batch_size=batch, debug=True, device=device, **kw)
    views, dbg = [], []
    for e in range(epochs):
        ld.set_epoch(e)
        for v1, v2, labels in ld:
            views.append((v1.float().cpu().numpy(), v2.float().cpu().numpy(), labels.cpu().numpy()))
            dbg.append(ld.last_debug)
    cat = {k: np.concatenate([d[k] for d in dbg]) for k in dbg[0]}
    return [np.concatenate(x) for x in zip(*views)], cat


def _binomial_ok(flags, p, n_sd=4.0):
    flags = np.asarray(flags, np.float64)
    sd = np.sqrt(p * (1 - p) / len(flags))
    return abs(flags.mean() - p) <= n_sd * sd + 1e-9, flags.mean()


def _normalise(pre_flip, flip):
    """Reference for flip + normalise + HWC->CHW: (N, 3, S, S) float32."""
    x = pre_flip.astype(np.float32)
    x = np.where(flip[:, None, None, None].astype(bool), x[:, :, ::-1, :], x)
    return ((x - MEAN) / STD).transpose(0, 3, 1, 2)


def test_shapes_dtypes_ranges_and_epoch_length(mixed):
    ld = DaliTwoCropLoader(mixed, _cfg(image_size=56), batch_size=8)
    assert len(ld) == 3 and ld.num_samples == 26
    ld.set_epoch(0)
    batches = list(ld)
    assert len(batches) == 3 and ld.epoch == 1                   # a finished epoch: the position is the next one's start
    lo, hi = (0 - MEAN) / STD, (255 - MEAN) / STD
    for v1, v2, labels in batches:
        for v in (v1, v2):
            assert v.shape == (8, 3, 56, 56) and v.dtype == torch.float32 and v.is_contiguous()
            vn = v.numpy()
            assert (vn >= lo[None, :, None, None] - 1e-4).all() and (vn <= hi[None, :, None, None] + 1e-4).all()
            assert np.isfinite(vn).all() and vn.std() > 0.3
        assert labels.dtype == torch.int64 and labels.shape == (8,) and ((labels >= 0) & (labels < 11)).all()
        assert (v1 - v2).abs().mean() > 0.1                     # two different views
    sd = ld.state_dict()
    assert (sd["epoch"], sd["step"]) == (1, 0) and isinstance(sd["dali"], str)  # DALI's random state rides along


def test_augmentation_statistics_follow_the_config(photos):
    cfg = _cfg()
    (v1, v2, _), d = _run_epochs(photos, cfg, epochs=3)          # 288 images, two views each
    n = len(v1)
    assert n == 288
    for view, out in ((1, v1), (2, v2)):
        pre, flip = d[f"pre_flip{view}"], d[f"flip{view}"]
        # flip + normalise: the output is exactly the debug image, mirrored where the coin says
        np.testing.assert_allclose(out, _normalise(pre, flip), atol=1e-4)
        ok, frac = _binomial_ok(flip, cfg.flip_prob)
        assert ok, ("flip", view, frac)
        assert (flip == 1).any() and (flip == 0).any()
        ok, frac = _binomial_ok(d[f"jitter{view}"], cfg.jitter_prob)
        assert ok, ("jitter", view, frac)
        # grayscale ~0.2 in both views; a grey view has R == G == B exactly, colour photos otherwise not
        gray = d[f"gray{view}"].astype(bool)
        ok, frac = _binomial_ok(gray, cfg.grayscale_prob)
        assert ok, ("gray", view, frac)
        is_gray = (np.abs(pre[..., 0].astype(int) - pre[..., 1]).max((1, 2)) == 0) & \
                  (np.abs(pre[..., 1].astype(int) - pre[..., 2]).max((1, 2)) == 0)
        assert is_gray[gray].all() and is_gray[~gray].mean() < 0.05
        # solarize: 0 in view 1, ~0.2 in view 2; a solarised uint8 image has nothing above 127
        sol = d[f"solarize{view}"].astype(bool)
        ok, frac = _binomial_ok(sol, cfg.solarize_prob[view - 1])
        assert ok, ("solarize", view, frac)
        peak = pre.max((1, 2, 3))
        # (unsolarised crops of these photos mostly reach above 127; some dark crops do not)
        assert (peak[sol] <= 127).all() and (peak[~sol] > 127).mean() > 0.75
        # blur: always on view 1, ~0.1 on view 2
        ok, frac = _binomial_ok(d[f"blur{view}"], cfg.blur_prob[view - 1])
        assert ok, ("blur", view, frac)
        sigma = d[f"sigma{view}"]
        assert sigma.min() >= 0.1 and sigma.max() <= 2.0 and sigma.max() - sigma.min() > 1.0
        # crop windows: area fraction spread over [crop_min, 1], aspect in [3/4, 4/3]
        hw = d[f"image_shape{view}"][:, :2].astype(np.float64)
        crop = d[f"crop_shape{view}"].astype(np.float64)
        anchor = d[f"crop_anchor{view}"]
        assert (anchor >= 0).all() and (anchor + crop <= hw).all()
        area = crop.prod(1) / hw.prod(1)
        assert area.min() >= cfg.crop_min * 0.95 and area.max() <= 1.0
        assert area.min() < 0.15 and area.max() > 0.85 and 0.42 < area.mean() < 0.66
        hist = np.histogram(area, bins=4, range=(0.08, 1.0))[0]
        assert (hist > n * 0.1).all(), hist
        aspect = crop[:, 1] / crop[:, 0]
        assert aspect.min() > 0.70 and aspect.max() < 1.42
    assert d["blur1"].all()
    assert not d["solarize1"].any()


def test_blur_makes_view1_measurably_smoother(photos):
    # only the blur differs between the views: jitter, grey, solarize and flip off
    cfg = _cfg(image_size=64, jitter_prob=0.0, grayscale_prob=0.0, solarize_prob=[0.0, 0.0],
               blur_prob=[1.0, 0.0], flip_prob=0.0)
    (v1, v2, _), d = _run_epochs(photos, cfg, epochs=1)

    def roughness(v):  # mean absolute horizontal + vertical difference, per sample
        return np.abs(np.diff(v, axis=3)).mean((1, 2, 3)) + np.abs(np.diff(v, axis=2)).mean((1, 2, 3))

    r1, r2 = roughness(v1), roughness(v2)
    assert r1.mean() < 0.75 * r2.mean(), (r1.mean(), r2.mean())
    strong = d["sigma1"] > 1.0
    assert r1[strong].mean() < r1[~strong].mean()                 # more sigma, smoother
    assert not d["blur2"].any()


def test_rare_ops_change_exactly_the_samples_whose_coin_is_set(photos):
    """Blur and solarize run as DALI conditionals (only for their samples): per sample, the image
    after them equals the one before where both coins are 0, is its solarisation (numpy reference)
    where only solarize is set, and is smoother where blur is set with a sigma that can show."""
    cfg = _cfg(jitter_prob=0.0, grayscale_prob=0.0, solarize_prob=[0.0, 0.5], blur_prob=[0.0, 0.5], flip_prob=0.0)
    _, d = _run_epochs(photos, cfg, epochs=1)
    pre, out = d["pre_blur2"].astype(np.int16), d["pre_flip2"].astype(np.int16)
    blur, sol, sigma = d["blur2"].astype(bool), d["solarize2"].astype(bool), d["sigma2"]
    for coins, frac in ((blur, 0.5), (sol, 0.5)):
        ok, got = _binomial_ok(coins, frac)
        assert ok, got
    neither, only_sol = ~blur & ~sol, ~blur & sol
    assert neither.sum() > 5 and only_sol.sum() > 5 and (blur & ~sol).sum() > 5
    assert (out[neither] == pre[neither]).all()
    solarized = np.where(pre >= 128, 255 - pre, pre)
    assert (out[only_sol] == solarized[only_sol]).all()

    def roughness(x):  # (N, S, S, 3) -> per sample mean absolute neighbour difference
        x = x.astype(np.float64)
        return np.abs(np.diff(x, axis=1)).mean((1, 2, 3)) + np.abs(np.diff(x, axis=2)).mean((1, 2, 3))

    shown = blur & ~sol & (sigma > 0.5)  # sigma near 0.1 leaves a uint8 image as it was
    assert shown.sum() > 3 and (roughness(out[shown]) < roughness(pre[shown])).all()
    assert (d["pre_blur1"] == d["pre_flip1"]).all()  # view 1: neither op configured


def test_shards_cover_each_file_once_and_follow_the_plan(mixed):
    cfg = _cfg(image_size=32)
    for epoch in (0, 1):
        seen = []
        for rank in range(2):
            ld = DaliTwoCropLoader(mixed, cfg, batch_size=4, shard_id=rank, num_shards=2, debug=True)
            ld.set_epoch(epoch)
            planned = ld.plan.epoch_indices(epoch)
            got_shapes, got_labels = [], []
            for _, _, labels in ld:
                got_shapes.append(ld.last_debug["image_shape1"][:, :2])
                got_labels.append(labels.numpy())
            shapes = np.concatenate(got_shapes)
            from PIL import Image
            expect = [Image.open(mixed[i][0]).size[::-1] for i in planned]
            assert np.array_equal(shapes, np.array(expect))             # the reader read the planned files
            assert np.array_equal(np.concatenate(got_labels), [mixed[i][1] for i in planned])
            seen += planned.tolist()
        assert len(seen) == len(set(seen)) == 24                   # 26 // 2 = 13 per shard -> 3 batches of 4


def test_one_pipeline_serves_consecutive_epochs_in_plan_order(mixed):
    """No rebuild between epochs (a rebuild costs seconds on a GPU), and still each epoch's order."""
    from PIL import Image
    ld = DaliTwoCropLoader(mixed, _cfg(image_size=32), batch_size=4, debug=True)
    pipes = []
    for epoch in range(3):
        ld.set_epoch(epoch)
        shapes = []
        for _ in ld:
            shapes.append(ld.last_debug["image_shape1"][:, :2])
        pipes.append(ld._pipe)
        expect = [Image.open(mixed[i][0]).size[::-1] for i in ld.plan.epoch_indices(epoch)]
        assert np.array_equal(np.concatenate(shapes), np.array(expect)), epoch
    assert pipes[0] is pipes[1] is pipes[2]
    ld.load_state_dict({"epoch": 1, "step": 2})  # a jump (resume) rebuilds, at the right place
    shapes = [ld.last_debug["image_shape1"][:, :2] for _ in ld]
    expect = [Image.open(mixed[i][0]).size[::-1] for i in ld.plan.epoch_indices(1, 2)]
    assert np.array_equal(np.concatenate(shapes), np.array(expect)) and ld._pipe is not pipes[0]
    # the training thread's time in pipe.run() and, within it, in the feeders of both pipelines
    host = ld.host_time()
    assert host["batches"] == 3 * len(ld) + len(shapes) and 0 < host["feeder_s"] < host["run_s"], host


def test_seeded_determinism_and_resume(mixed):
    cfg = _cfg(image_size=32, seed=7)

    def epoch_batches(loader, epoch=None):
        if epoch is not None:
            loader.set_epoch(epoch)
        out = []
        for v1, v2, labels in loader:
            out.append((v1.clone(), v2.clone(), labels.clone(), loader.last_debug["image_shape1"]))
        return out

    a = epoch_batches(DaliTwoCropLoader(mixed, cfg, batch_size=4, debug=True), 1)
    b = epoch_batches(DaliTwoCropLoader(mixed, cfg, batch_size=4, debug=True), 1)
    assert len(a) == 6
    for x, y in zip(a, b):                                          # same seed: same batches
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) and torch.equal(x[2], y[2])
    other = epoch_batches(DaliTwoCropLoader(mixed, _cfg(image_size=32, seed=8), batch_size=4, debug=True), 1)
    assert not all(np.array_equal(x[3], y[3]) for x, y in zip(a, other))

    # interrupted after 2 batches, resumed from the state dict in a new loader
    first = DaliTwoCropLoader(mixed, cfg, batch_size=4, debug=True)
    first.set_epoch(1)
    it = iter(first)
    next(it), next(it)
    sd = first.state_dict()
    assert (sd["epoch"], sd["step"]) == (1, 2)
    resumed = DaliTwoCropLoader(mixed, cfg, batch_size=4, debug=True)
    resumed.load_state_dict(sd)
    rest = epoch_batches(resumed)
    assert len(rest) == 4 and (resumed.state_dict()["epoch"], resumed.state_dict()["step"]) == (2, 0)
    for x, y in zip(a[2:], rest):                                   # the file sequence and the augmentations continue exactly
        assert torch.equal(x[2], y[2]) and np.array_equal(x[3], y[3])
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
    again = DaliTwoCropLoader(mixed, cfg, batch_size=4, debug=True)
    again.load_state_dict({"epoch": 1, "step": 2})                   # a position alone: re-seeded from (seed, epoch, step)
    b1 = epoch_batches(again)
    again2 = DaliTwoCropLoader(mixed, cfg, batch_size=4, debug=True)
    again2.load_state_dict({"epoch": 1, "step": 2})
    for x, y in zip(b1, epoch_batches(again2)):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
    # the same loader, continuing after a break, also continues the sequence
    for x, y in zip(a[2:], epoch_batches(first)):
        assert torch.equal(x[2], y[2]) and np.array_equal(x[3], y[3])


def test_cursor_resume_across_epoch_ends_is_uninterrupted(mixed):
    """Saved at any position (mid-epoch, an epoch end), a fresh loader given the state continues
    with the uninterrupted run's batches: files and augmentations, bit for bit."""
    cfg = _cfg(image_size=24, seed=3)
    make = lambda: DaliTwoCropLoader(mixed, cfg, batch_size=8)  # noqa: E731  (3 batches per epoch)
    assert_resume_is_uninterrupted(make, stops=[2, 3, 4], total=7)


def test_eval_mode_keeps_order_and_partial_batch(mixed):
    ld = DaliTwoCropLoader(mixed, _cfg(image_size=40), batch_size=10, train=False)
    assert len(ld) == 3
    batches = list(ld)
    assert [len(b[2]) for b in batches] == [10, 10, 6]
    assert torch.equal(torch.cat([b[2] for b in batches]), torch.tensor([lab for _, lab in mixed]))
    assert all(torch.equal(v1, v2) for v1, v2, _ in batches)


def test_awkward_inputs_are_decoded_or_skipped(tmp_path):
    make_bad_folder(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadImageWarning)
        samples = scan_image_folder(tmp_path)
    names = [Path(p).name for p, _ in samples]
    cfg = _cfg(image_size=40)
    # training graph: CMYK, PNG (RGB / RGBA), grey and 9x7 JPEGs all go through
    ld = DaliTwoCropLoader(samples, cfg, batch_size=3)
    for v1, v2, _ in ld:
        assert v1.shape == (3, 3, 40, 40) and torch.isfinite(v1).all() and torch.isfinite(v2).all()
    # evaluation graph (deterministic): each decodes to the same photograph as good.jpg
    ev = DaliTwoCropLoader(samples, cfg, batch_size=len(samples), train=False)
    views = next(iter(ev))[0]
    ref = views[names.index("good.jpg")]
    for name in ("cmyk.jpg", "photo.png", "rgba.png"):
        assert (views[names.index(name)] - ref).abs().mean() < 0.05, name
    gray = views[names.index("gray.jpg")]
    assert (gray[0] * 0.229 + 0.485 - gray[1] * 0.224 - 0.456).abs().max() < 1e-5     # grey decodes to R == G
    tiny = views[names.index("tiny.jpg")]
    assert tiny.shape == (3, 40, 40) and tiny.std() > 0.05


# --- GPU: the same graph on the device (run with `pytest -m gpu`) ---------------------------------

@pytest.mark.gpu
def test_gpu_views_are_bf16_on_device_and_match_statistics(photos):
    cfg = dataclasses.replace(_cfg(image_size=224), num_threads=4)
    ld = DaliTwoCropLoader(photos, cfg, batch_size=32, device="cuda", dtype=torch.bfloat16, debug=True)
    ld.set_epoch(0)
    for v1, v2, labels in ld:
        assert v1.device.type == "cuda" and v1.dtype == torch.bfloat16 and v1.shape == (32, 3, 224, 224)
        assert v1.is_contiguous() and labels.device.type == "cuda" and labels.dtype == torch.int64
        assert torch.isfinite(v1.float()).all() and (v1.float() - v2.float()).abs().mean() > 0.1
        d = ld.last_debug
        np.testing.assert_allclose(v1.float().cpu().numpy(), _normalise(d["pre_flip1"], d["flip1"]), atol=0.02)
    (_, _, _), d = _run_epochs(photos, _cfg(image_size=96), epochs=3, device="cuda")
    for view in (1, 2):
        pre = d[f"pre_flip{view}"]
        gray, sol = d[f"gray{view}"].astype(bool), d[f"solarize{view}"].astype(bool)
        assert _binomial_ok(gray, 0.2)[0] and _binomial_ok(sol, [0.0, 0.2][view - 1])[0]
        assert (pre.max((1, 2, 3))[sol] <= 127).all()
        assert (np.ptp(pre.astype(int), axis=3).max((1, 2))[gray] == 0).all()


@pytest.mark.gpu
def test_gpu_matches_cpu_twin_in_eval_and_decodes_awkward_inputs(tmp_path):
    make_bad_folder(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadImageWarning)
        samples = scan_image_folder(tmp_path)
    cfg = _cfg(image_size=64)
    cpu = next(iter(DaliTwoCropLoader(samples, cfg, batch_size=len(samples), train=False)))[0]
    gpu = next(iter(DaliTwoCropLoader(samples, cfg, batch_size=len(samples), train=False, device="cuda")))[0]
    # nvJPEG vs libjpeg-turbo IDCT and upsampling differ by a few levels at most
    assert (gpu.cpu() - cpu).abs().mean() < 0.03
    ld = DaliTwoCropLoader(samples, cfg, batch_size=3, device="cuda", dtype=torch.bfloat16)
    for epoch in range(2):
        ld.set_epoch(epoch)
        assert sum(1 for _ in ld) == len(ld)


@pytest.mark.gpu
def test_gpu_benchmark_runs(tmp_path):
    from bench.pipeline import benchmark_pipeline

    root = make_demo_data(tmp_path / "bench", 256)
    res = benchmark_pipeline(str(root), "dali", batch_size=64, num_threads=8, num_batches=8, warmup=2)
    assert res["images_per_s"] > 0 and res["dtype"] == "bfloat16"
    print(res)


def test_multi_crop_views_follow_their_crop_specs(photos):
    """DINO's multi-crop on the same graph: 2 global crops (scale 0.4-1, blur 1.0 / 0.1, solarize 0 / 0.2)
    and 4 local ones (96 -> here 24 px, scale 0.05-0.4, blur 0.5, no solarize), bicubic resize."""
    cfg = _cfg(image_size=48, crop_min=0.4, local_crops=4, local_size=24, local_scale=[0.05, 0.4],
               local_blur_prob=0.5, local_solarize_prob=0.0, interpolation="cubic")
    ld = DaliTwoCropLoader(photos, cfg, batch_size=32, debug=True)
    dbg, shapes = [], None
    for e in range(2):
        ld.set_epoch(e)
        for *views, labels in ld:
            shapes = [tuple(v.shape) for v in views]
            dbg.append(ld.last_debug)
    assert shapes == [(32, 3, 48, 48)] * 2 + [(32, 3, 24, 24)] * 4 and labels.shape == (32,)
    d = {k: np.concatenate([x[k] for x in dbg]) for k in dbg[0]}
    specs = [((0.4, 1.0), 1.0, 0.0), ((0.4, 1.0), 0.1, 0.2)] + [((0.05, 0.4), 0.5, 0.0)] * 4
    for view, ((lo, hi), blur, sol) in enumerate(specs, 1):
        hw = d[f"image_shape{view}"][:, :2].astype(np.float64)
        area = d[f"crop_shape{view}"].astype(np.float64).prod(1) / hw.prod(1)
        assert area.min() >= lo * 0.95 and area.max() <= hi * 1.05, (view, area.min(), area.max())
        assert area.max() - area.min() > 0.5 * (hi - lo)
        for key, p in (("blur", blur), ("solarize", sol), ("flip", cfg.flip_prob), ("jitter", cfg.jitter_prob),
                       ("gray", cfg.grayscale_prob)):
            ok, frac = _binomial_ok(d[f"{key}{view}"], p)
            assert ok, (view, key, frac)
    # the local crops of one image are different crops of it
    assert (d["crop_anchor3"] != d["crop_anchor4"]).any(1).mean() > 0.9
