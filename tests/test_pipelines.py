"""Backend-independent parts of fastmoco.pipelines: epoch plan, folder scan, synthetic
source, torchvision fallback, build_loader. (DALI graph: test_pipelines_dali.py.)"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from cursor_checks import assert_resume_is_uninterrupted
from fastmoco.config import DataConfig
from fastmoco.pipelines import (BadImageWarning, DatasetError, ShardPlan, SyntheticTwoCropLoader, build_loader,
                                scan_image_folder)
from fastmoco.pipelines.base import DataCursor
from fastmoco.pipelines.demo_data import make_demo_data
from fastmoco.pipelines.torchvision_loader import TorchvisionTwoCropLoader, crop_window

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def make_bad_folder(root: Path) -> dict:
    """An ImageFolder with every awkward input of issue 4; returns what the scan must do."""
    from PIL import Image
    import skimage.data

    rng = np.random.default_rng(0)
    for d in ("a", "aa_empty", "b"):
        (root / d).mkdir(parents=True, exist_ok=True)
    photo = Image.fromarray(skimage.data.coffee()).resize((330, 250))
    photo.save(root / "a" / "good.jpg", quality=90)
    raw = (root / "a" / "good.jpg").read_bytes()
    (root / "a" / "truncated.jpg").write_bytes(raw[: len(raw) // 2])
    (root / "a" / "noise.jpg").write_bytes(rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    (root / "a" / "notes.txt").write_text("not an image")
    photo.convert("CMYK").save(root / "b" / "cmyk.jpg", quality=90)
    photo.save(root / "b" / "photo.png")
    photo.convert("RGBA").save(root / "b" / "rgba.png")
    photo.convert("L").save(root / "b" / "gray.jpg", quality=90)
    photo.resize((9, 7)).save(root / "b" / "tiny.jpg", quality=90)
    png = (root / "b" / "photo.png").read_bytes()
    (root / "b" / "truncated.png").write_bytes(png[: len(png) // 2])
    return {"skipped": ["notes.txt", "noise.jpg", "truncated.jpg", "truncated.png"],
            "kept": {"good.jpg": 0, "cmyk.jpg": 2, "photo.png": 2, "rgba.png": 2, "gray.jpg": 2, "tiny.jpg": 2}}


# --- epoch plan ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n,batch,shards", [(103, 8, 2), (64, 16, 1), (50, 7, 3)])
def test_plan_shards_cover_each_sample_once(n, batch, shards):
    for epoch in (0, 1):
        plans = [ShardPlan(n, batch, shard_id=r, num_shards=shards, seed=3) for r in range(shards)]
        parts = [p.shard_indices(epoch) for p in plans]
        allidx = np.concatenate(parts)
        assert len(allidx) == len(set(allidx.tolist())) == (n // shards) * shards
        for p in plans:
            assert p.num_batches == (n // shards) // batch
            assert len(p.epoch_indices(epoch)) == p.num_batches * batch
    a, b = ShardPlan(n, batch, seed=3), ShardPlan(n, batch, seed=3)
    assert np.array_equal(a.shard_indices(5), b.shard_indices(5))
    assert not np.array_equal(a.shard_indices(5), a.shard_indices(6))
    assert not np.array_equal(a.shard_indices(5), ShardPlan(n, batch, seed=4).shard_indices(5))


@pytest.mark.parametrize("n,batch,shards", [(103, 4, 2), (50, 3, 3)])
def test_plan_step_b_of_all_shards_is_the_one_process_global_batch(n, batch, shards):
    one = ShardPlan(n, batch * shards, seed=5)
    plans = [ShardPlan(n, batch, shard_id=r, num_shards=shards, seed=5) for r in range(shards)]
    assert all(p.num_batches == one.num_batches for p in plans)
    for epoch in (0, 3):
        whole = one.epoch_indices(epoch).reshape(one.num_batches, -1)
        parts = [p.epoch_indices(epoch).reshape(p.num_batches, batch) for p in plans]
        for step in range(one.num_batches):
            assert np.array_equal(np.concatenate([q[step] for q in parts]), whole[step])


def test_plan_eval_keeps_everything_in_order():
    plans = [ShardPlan(23, 4, shard_id=r, num_shards=2, train=False) for r in range(2)]
    assert sorted(np.concatenate([p.shard_indices(7) for p in plans]).tolist()) == list(range(23))
    assert [p.num_batches for p in plans] == [3, 3]     # 12 and 11 samples, last batch partial
    with pytest.raises(ValueError, match="no full batch"):
        ShardPlan(10, 16)


@pytest.mark.parametrize("n,batch,shards", [(5, 8, 1), (23, 4, 2), (50, 7, 3)])
def test_plan_training_order_with_drop_last_off_keeps_every_rank_s_partial_batch(n, batch, shards):
    """The linear probe's training order (main_lincls: drop_last=False): shuffled per epoch, the last
    partial batch kept, a split smaller than one batch still gives one; ranks stay in lockstep."""
    plans = [ShardPlan(n, batch, shard_id=r, num_shards=shards, seed=3, drop_last=False) for r in range(shards)]
    per_shard = n // shards
    for epoch in (0, 1):
        parts = [p.epoch_indices(epoch) for p in plans]
        assert all(len(q) == per_shard for q in parts)
        allidx = np.concatenate(parts)
        assert len(set(allidx.tolist())) == per_shard * shards
        batches = [[len(i) for _, _, i in DataCursor(p).batches(across_epochs=False)] for p in plans]
        assert all(b == batches[0] for b in batches) and sum(batches[0]) == per_shard
        assert all(x == batch for x in batches[0][:-1]) and 0 < batches[0][-1] <= batch
    assert not np.array_equal(plans[0].shard_indices(0), plans[0].shard_indices(1))
    # the first full global batches are those of the default (drop_last) order
    dropping = ShardPlan(n, batch, seed=3, num_shards=shards, drop_last=True) if n >= batch * shards else None
    if dropping is not None:
        full = dropping.num_batches * batch
        assert np.array_equal(dropping.epoch_indices(0), plans[0].epoch_indices(0)[:full])


# --- folder scan --------------------------------------------------------------------------------

def test_scan_skips_bad_files_with_warnings_and_keeps_imagefolder_labels(tmp_path):
    from torchvision.datasets import ImageFolder

    expect = make_bad_folder(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = scan_image_folder(tmp_path)
    messages = [str(w.message) for w in caught if issubclass(w.category, BadImageWarning)]
    for name in expect["skipped"]:
        assert any(name in m for m in messages), (name, messages)
    assert any("aa_empty" in m and "no images" in m for m in messages)
    got = {Path(p).name: label for p, label in samples}
    assert got == expect["kept"]
    ref = ImageFolder(str(tmp_path), allow_empty=True).class_to_idx
    assert ref == {"a": 0, "aa_empty": 1, "b": 2}


def test_scan_errors_name_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match="nowhere"):
        scan_image_folder(missing)
    (tmp_path / "flat").mkdir()
    with pytest.raises(DatasetError, match="no class folders"):
        scan_image_folder(tmp_path / "flat")
    (tmp_path / "textonly" / "c").mkdir(parents=True)
    (tmp_path / "textonly" / "c" / "x.txt").write_text("x")
    (tmp_path / "textonly" / "c" / "y.jpg").write_bytes(b"not a jpeg at all")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadImageWarning)
        with pytest.raises(DatasetError, match="textonly.*no usable"):
            scan_image_folder(tmp_path / "textonly")
    assert issubclass(DatasetError, ValueError)


def test_scan_file_list(tmp_path):
    make_bad_folder(tmp_path)
    lst = tmp_path / "list.txt"
    lst.write_text("# comment\nb/cmyk.jpg 5\na/good.jpg 1\na/truncated.jpg 3\nb/missing.jpg 2\n")
    with pytest.warns(BadImageWarning):
        samples = scan_image_folder(tmp_path, lst)
    assert [(Path(p).name, lab) for p, lab in samples] == [("cmyk.jpg", 5), ("good.jpg", 1)]


# --- synthetic source ---------------------------------------------------------------------------

def _collect(loader):
    return [tuple(t.clone() for t in batch) for batch in loader]


def test_synthetic_shapes_determinism_and_bit_identical_resume():
    cfg = DataConfig(source="synthetic", image_size=40, synthetic_size=70, seed=1)
    ld = build_loader(cfg, batch_size=8)
    assert isinstance(ld, SyntheticTwoCropLoader) and len(ld) == 8 and ld.num_samples == 70
    ld.set_epoch(2)
    full = _collect(ld)
    assert len(full) == 8
    v1, v2, labels = full[0]
    assert v1.shape == v2.shape == (8, 3, 40, 40) and v1.dtype == torch.float32 and v1.is_contiguous()
    assert labels.dtype == torch.int64 and labels.shape == (8,)
    assert abs(v1.mean().item()) < 0.3 and 0.6 < v1.std().item() < 1.4
    assert not torch.equal(v1, v2)
    assert torch.corrcoef(torch.stack([v1.flatten(), v2.flatten()]))[0, 1] > 0.8   # positives agree

    resumed = build_loader(cfg, batch_size=8)
    resumed.load_state_dict({"epoch": 2, "step": 3})
    rest = _collect(resumed)
    assert len(rest) == 5 and resumed.state_dict() == {"epoch": 3, "step": 0}  # a finished epoch: the next
    for a, b in zip(full[3:], rest):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    ld.set_epoch(3)
    assert not torch.equal(_collect(ld)[0][0], full[0][0])

    bf = build_loader(cfg, batch_size=8, dtype=torch.bfloat16)
    bf.set_epoch(2)
    assert next(iter(bf))[0].dtype == torch.bfloat16


def test_synthetic_shards_and_partial_iteration():
    cfg = DataConfig(source="synthetic", image_size=16, synthetic_size=40)
    seen = []
    for r in range(2):
        ld = build_loader(cfg, batch_size=5, shard_id=r, num_shards=2)
        ld.set_epoch(0)
        it = iter(ld)
        first = next(it)
        assert ld.state_dict() == {"epoch": 0, "step": 1}
        rest = list(ld)          # a new iteration continues where the last stopped
        seen += [first[2]] + [b[2] for b in rest]
        assert len(rest) == len(ld) - 1
    assert len(torch.cat(seen)) == 40


def test_cursor_positions_and_batches_across_epochs():
    """The cursor: normalised positions, and its batches are the plan's, epoch after epoch."""
    plan = ShardPlan(23, 4, shard_id=1, num_shards=2, seed=3)  # 11 per shard: 2 batches, 3 dropped
    cursor = DataCursor(plan)
    cursor.seek(1, 1)
    got = [(e, s, idx.tolist()) for (e, s, idx), _ in zip(cursor.batches(), range(5))]
    want = [(e, s, plan.epoch_indices(e)[4 * s:4 * s + 4].tolist()) for e, s in ((1, 1), (2, 0), (2, 1), (3, 0), (3, 1))]
    assert got == want and cursor.state_dict() == {"epoch": 1, "step": 1}  # batches() does not move it
    cursor.advance()
    assert cursor.state_dict() == {"epoch": 2, "step": 0}
    cursor.seek(4, 2)  # the end of epoch 4 is the start of 5
    assert cursor.state_dict() == {"epoch": 5, "step": 0}
    with pytest.raises(ValueError, match="out of range"):
        cursor.seek(0, 3)
    evaluation = DataCursor(ShardPlan(10, 4, train=False))
    assert [len(idx) for _, _, idx in evaluation.batches()] == [4, 4, 2]  # one epoch, last batch partial


def test_synthetic_cursor_resume_across_epoch_ends():
    cfg = DataConfig(source="synthetic", image_size=16, synthetic_size=30, seed=2)
    make = lambda: build_loader(cfg, batch_size=4, shard_id=1, num_shards=2)  # noqa: E731  (3 per epoch)
    assert_resume_is_uninterrupted(make, stops=[2, 3, 7], total=10)


# --- torchvision fallback -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_photos(tmp_path_factory):
    return make_demo_data(tmp_path_factory.mktemp("tvphotos"), num_images=22, seed=1)


def test_crop_window_matches_torchvision_statistics():
    g = torch.Generator().manual_seed(0)
    areas, ratios = [], []
    for _ in range(2000):
        top, left, h, w = crop_window(400, 500, (0.08, 1.0), g)
        assert 0 <= top and top + h <= 400 and 0 <= left and left + w <= 500
        areas.append(h * w / 2e5)
        ratios.append(w / h)
    areas, ratios = np.array(areas), np.array(ratios)
    assert areas.min() < 0.1 and areas.max() > 0.95 and 0.45 < areas.mean() < 0.6
    assert ratios.min() > 0.74 and ratios.max() < 1.34


@pytest.mark.parametrize("workers", [0, 2])
def test_torchvision_loader_resume_is_bit_identical(small_photos, workers):
    cfg = DataConfig(path=str(small_photos), backend="torchvision", image_size=40, seed=5)
    ld = TorchvisionTwoCropLoader(scan_image_folder(small_photos), cfg, batch_size=4, num_workers=workers)
    assert len(ld) == 5
    ld.set_epoch(1)
    full = _collect(ld)
    v1, v2, labels = full[0]
    assert v1.shape == (4, 3, 40, 40) and v1.dtype == torch.float32 and labels.dtype == torch.int64
    lo, hi = (0 - MEAN) / STD, (1 - MEAN) / STD
    assert (v1 >= lo - 1e-5).all() and (v1 <= hi + 1e-5).all()
    assert not torch.equal(v1, v2)
    again = TorchvisionTwoCropLoader(scan_image_folder(small_photos), cfg, batch_size=4, num_workers=workers)
    again.load_state_dict({"epoch": 1, "step": 2})
    rest = _collect(again)
    assert len(rest) == 3
    for a, b in zip(full[2:], rest):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


# --- build_loader -------------------------------------------------------------------------------

def test_torchvision_cursor_resume_across_epoch_ends(small_photos):
    cfg = DataConfig(path=str(small_photos), backend="torchvision", image_size=24, seed=3)
    samples = scan_image_folder(small_photos)
    make = lambda: TorchvisionTwoCropLoader(samples, cfg, batch_size=6, num_workers=0)  # noqa: E731  (3 per epoch)
    assert_resume_is_uninterrupted(make, stops=[2, 3, 4], total=7)


def test_build_loader_picks_backend_and_falls_back(small_photos, monkeypatch):
    import fastmoco.pipelines.dali as dali_mod

    cfg = DataConfig(path=str(small_photos), image_size=32)
    if dali_mod.HAS_DALI:
        assert isinstance(build_loader(cfg, batch_size=4), dali_mod.DaliTwoCropLoader)
    monkeypatch.setattr(dali_mod, "HAS_DALI", False)
    with pytest.warns(RuntimeWarning, match="torchvision"):
        ld = build_loader(cfg, batch_size=4)
    assert isinstance(ld, TorchvisionTwoCropLoader)
    with pytest.raises(ValueError, match="backend"):
        build_loader(DataConfig(path=str(small_photos), backend="opencv"), batch_size=4)
    with pytest.raises(ValueError, match="source"):
        build_loader(DataConfig(source="web"), batch_size=4)
    with pytest.raises(DatasetError):
        build_loader(DataConfig(path=str(small_photos / "nope")), batch_size=4)


@pytest.mark.parametrize("backend", ["synthetic", "torchvision"])
def test_multi_crop_views_on_every_backend(small_photos, backend):
    """DINO's multi-crop: 2 global + N local views, each at its crop size, every view different; the
    two-crop views of MoCo unchanged by adding locals (same seeds per view index)."""
    common = dict(image_size=32, num_threads=0, synthetic_size=24)
    if backend == "synthetic":
        two = SyntheticTwoCropLoader(DataConfig(source="synthetic", **common), batch_size=4)
        multi = SyntheticTwoCropLoader(DataConfig(source="synthetic", local_crops=3, local_size=16, **common),
                                       batch_size=4)
    else:
        samples = scan_image_folder(small_photos)
        two = TorchvisionTwoCropLoader(samples, DataConfig(**common), batch_size=4)
        multi = TorchvisionTwoCropLoader(samples, DataConfig(local_crops=3, local_size=16, **common), batch_size=4)
    *views, labels = next(iter(multi))
    assert [tuple(v.shape) for v in views] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 3
    assert labels.shape == (4,)
    assert all((views[i] - views[j]).abs().mean() > 0.01 for i in range(2, 5) for j in range(i + 1, 5))
    v1, v2, labels2 = next(iter(two))
    assert torch.equal(v1, views[0]) and torch.equal(v2, views[1]) and torch.equal(labels, labels2)
