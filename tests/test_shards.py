"""Tar shards (WebDataset convention, DALI index files): the writer, the order over ranks, both
loaders, resume, damage, evaluation and training on them (pipelines/shards.py, make_shards.py)."""
import json
import os
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from limits import run_until_hang

from fastmoco.config import DataConfig
from fastmoco.pipelines import BadImageWarning, DatasetError, build_loader
from fastmoco.pipelines.make_shards import make_shards, parse_size
from fastmoco.pipelines.shards import ShardOrderPlan, ShardSamples, buffer_shuffle, parse_index

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ["torchvision", pytest.param("dali", marks=pytest.mark.skipif(
    __import__("importlib").util.find_spec("nvidia.dali") is None, reason="nvidia-dali is not installed"))]
SHARD_BYTES = 150_000      # the demo photographs are ~30-60 kB: 5-7 shards of 24 images


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from fastmoco.pipelines.demo_data import make_demo_data

    root = tmp_path_factory.mktemp("shards")
    train = make_demo_data(root / "photos" / "train", num_images=24, seed=0)
    val = make_demo_data(root / "photos" / "val", num_images=11, seed=5)
    make_shards(train, root / "shards", shard_size=SHARD_BYTES, log=lambda m: None)
    make_shards(val, root / "shards" / "val", shard_size=SHARD_BYTES, prefix="val", log=lambda m: None,
                classes=json.loads((root / "shards" / "manifest.json").read_text())["classes"])
    return root


def copy_shards(demo, tmp_path) -> Path:
    out = tmp_path / "shards"
    shutil.copytree(demo / "shards", out, ignore=shutil.ignore_patterns("val"))
    return out


def cfg_for(path, backend, **kw):
    """Torchvision in the test process (no workers: their warnings would not reach pytest). No
    verification at build unless asked (data.verify_images, on by default, would drop a damaged shard
    by its checksum before the read-time paths these tests exercise)."""
    kw.setdefault("verify_images", False)
    return DataConfig(source="shards", path=str(path), backend=backend, image_size=32,
                      num_threads=0 if backend == "torchvision" else 1, shuffle_buffer=5, **kw)


# -- the writer ------------------------------------------------------------------------------
def test_index_files_equal_dalis_wds2idx_and_its_reader_gets_our_samples(demo, tmp_path):
    """The index is byte for byte what DALI's own tool writes for the shard, and DALI's native
    webdataset reader, given our shards and index files, yields the images and labels we read."""
    wds2idx = Path(sys.executable).with_name("wds2idx")
    if not wds2idx.is_file():
        pytest.skip("DALI's wds2idx is not installed")
    src = ShardSamples(demo / "shards")
    for tar in src.shards:
        p = run_until_hang([str(wds2idx), str(tar), str(tmp_path / "dali.idx")], f"DALI's wds2idx on {tar.name}",
                           capture_output=True)
        assert p.returncode == 0, p.stderr[-3000:]
        assert (tmp_path / "dali.idx").read_text() == tar.with_suffix(".idx").read_text(), tar
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=len(src), num_threads=1, device_id=None)
    def native():
        return tuple(fn.readers.webdataset(paths=[str(t) for t in src.shards],
                                           index_paths=[str(t.with_suffix(".idx")) for t in src.shards],
                                           ext=["jpg", "cls"], missing_component_behavior="error"))

    pipe = native()
    pipe.build()
    images, labels = pipe.run()
    theirs = [(bytes(np.asarray(images[i])), int(bytes(np.asarray(labels[i])))) for i in range(len(src))]
    ours = [(src.read(i)[0].tobytes(), src.read(i)[1]) for i in range(len(src))]
    assert theirs == ours


def test_manifest_counts_classes_checksums_and_labels_match_the_folder(demo):
    m = json.loads((demo / "shards" / "manifest.json").read_text())
    photos = demo / "photos" / "train"
    from fastmoco.pipelines import scan_image_folder

    folder = scan_image_folder(photos)
    assert m["samples"] == 24 == sum(s["samples"] for s in m["shards"]) and len(m["shards"]) >= 4
    assert m["classes"] == sorted(p.name for p in photos.iterdir() if p.is_dir())
    from fastmoco.pipelines.shards import sha256_file

    for s in m["shards"]:
        assert sha256_file(demo / "shards" / s["name"]) == s["sha256"]
    src = ShardSamples(demo / "shards")
    by_bytes = {Path(p).read_bytes(): label for p, label in folder}
    assert sorted(by_bytes[src.read(i)[0].tobytes()] for i in range(len(src))) == sorted(l for _, l in folder)
    assert all(by_bytes[src.read(i)[0].tobytes()] == src.read(i)[1] for i in range(len(src)))
    val = json.loads((demo / "shards" / "val" / "manifest.json").read_text())
    assert val["classes"] == m["classes"] and val["samples"] == 11


def test_make_shards_skips_damaged_inputs_by_name_and_resumes_per_shard(demo, tmp_path, monkeypatch):
    import fastmoco.pipelines.make_shards as ms

    photos = tmp_path / "photos"
    shutil.copytree(demo / "photos" / "train", photos)
    victim = sorted(photos.glob("*/*.jpg"))[3]
    victim.write_bytes(victim.read_bytes()[:2000])              # truncated: no end-of-image marker
    real, calls = ms.write_shard, []

    def crash_after_two(path, samples):
        if len(calls) == 2:
            raise OSError("simulated crash")
        calls.append(path.name)
        return real(path, samples)

    monkeypatch.setattr(ms, "write_shard", crash_after_two)
    with pytest.raises(OSError, match="simulated"):
        make_shards(photos, tmp_path / "out", shard_size=SHARD_BYTES, log=lambda m: None)
    assert not (tmp_path / "out" / "manifest.json").exists()   # no manifest: an incomplete set
    done = {n: (tmp_path / "out" / n).stat().st_mtime_ns for n in calls}
    monkeypatch.setattr(ms, "write_shard", real)
    log = []
    m = make_shards(photos, tmp_path / "out", shard_size=SHARD_BYTES, log=log.append)
    assert {n: (tmp_path / "out" / n).stat().st_mtime_ns for n in calls} == done   # kept, not rewritten
    assert "(2 kept from an earlier run)" in log[-1]
    assert m["samples"] == 23 and len(m["skipped"]) == 1 and str(victim) in m["skipped"][0]
    assert any(str(victim) in line and "truncated" in line for line in log)
    assert len(ShardSamples(tmp_path / "out")) == 23
    assert not list((tmp_path / "out").glob(".*.tmp"))


def test_command_writes_train_and_val_shard_sets(demo, tmp_path, capsys):
    from fastmoco.pipelines.make_shards import main

    photos = demo / "photos"
    main([str(photos / "train"), str(tmp_path / "out"), "--shard-size", "150kB", "--val", str(photos / "val")])
    train, val = ShardSamples(tmp_path / "out"), ShardSamples(tmp_path / "out" / "val")
    assert (len(train), len(val)) == (24, 11) and val.classes == train.classes and len(train.shards) >= 4
    assert all(t.name.startswith("val-") for t in val.shards)
    assert "24 samples, 11 classes" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="fastmoco-make-shards: --shard-size: expected a size"):
        main([str(photos / "train"), str(tmp_path / "x"), "--shard-size", "big"])


def test_parse_size():
    assert parse_size("1GB") == 10**9 and parse_size("500MB") == 5 * 10**8 and parse_size("2GiB") == 2 * 2**30
    with pytest.raises(ValueError, match="--shard-size"):
        parse_size("lots")


# -- the order ---------------------------------------------------------------------------------
SIZES = [7, 5, 9, 4, 6, 8, 3]     # 42 samples in 7 shards of unequal size


@pytest.mark.parametrize("ranks,batch", [(1, 4), (2, 4), (3, 5), (4, 3)])
def test_every_sample_once_per_epoch_over_the_ranks_each_rank_its_own_shards(ranks, batch):
    first = np.cumsum([0] + SIZES)
    for epoch in range(3):
        parts = [ShardOrderPlan(SIZES, batch, shard_id=r, num_shards=ranks, seed=3, shuffle_buffer=6)
                 for r in range(ranks)]
        seen = np.concatenate([p.epoch_indices(epoch) for p in parts])
        plan = parts[0]
        assert all(len(p.epoch_indices(epoch)) == plan.num_batches * batch for p in parts)   # lockstep
        assert len(np.unique(seen)) == len(seen) == 42 - plan.dropped_per_epoch
        assert plan.dropped_per_epoch == 42 - (42 // ranks // batch) * batch * ranks
        for r, p in enumerate(parts):   # a rank reads a contiguous run of the shard order
            shards = set(np.searchsorted(first, p.epoch_indices(epoch), side="right") - 1)
            assert len(shards) <= -(-len(SIZES) // ranks) + 1, (r, shards)
    plan = ShardOrderPlan(SIZES, 4, seed=3, shuffle_buffer=6)
    assert np.array_equal(plan.shard_indices(1), ShardOrderPlan(SIZES, 4, seed=3, shuffle_buffer=6).shard_indices(1))
    assert not np.array_equal(plan.shard_indices(1), plan.shard_indices(2))
    assert not np.array_equal(plan.shard_indices(1), ShardOrderPlan(SIZES, 4, seed=4).shard_indices(1))


def test_buffer_shuffle_keeps_the_samples_and_mixes_only_within_the_buffer():
    stream = np.arange(100)
    rng = np.random.default_rng(0)
    assert np.array_equal(buffer_shuffle(stream, 1, rng), stream)
    out = buffer_shuffle(stream, 8, rng)
    assert sorted(out) == list(range(100)) and not np.array_equal(out, stream)
    # an output at position n was at most n + buffer - 1 in the stream (it had entered the buffer)
    assert all(out[n] <= n + 7 for n in range(92))


# -- the loaders -----------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_loaders_on_two_ranks_read_the_plan_once_per_epoch(demo, backend):
    """What each rank's loader hands out (labels) is what its plan lists, read from the shards."""
    src = ShardSamples(demo / "shards")
    seen = []
    for rank in range(2):
        loader = build_loader(cfg_for(demo / "shards", backend), batch_size=4, shard_id=rank, num_shards=2)
        for epoch in range(2):
            labels = torch.cat([y for *_, y in loader])
            idx = loader.plan.epoch_indices(epoch)
            assert labels.tolist() == [src.read(i)[1] for i in idx]
            seen.append(idx)
    assert sorted(np.concatenate(seen[0::2]).tolist()) == list(range(24))   # epoch 0, both ranks


@pytest.mark.parametrize("backend", BACKENDS)
def test_mid_epoch_resume_gives_the_uninterrupted_batches(demo, backend):
    cfg = cfg_for(demo / "shards", backend)
    whole = build_loader(cfg, batch_size=4, shard_id=1, num_shards=2)
    ref = [b for _ in range(2) for b in whole]              # two epochs, 3 batches each
    part = build_loader(cfg, batch_size=4, shard_id=1, num_shards=2)
    it = iter(part)
    first = [next(it) for _ in range(2)]
    state = json.loads(json.dumps(part.state_dict()))       # what a checkpoint keeps
    resumed = build_loader(cfg, batch_size=4, shard_id=1, num_shards=2)
    resumed.load_state_dict(state)
    rest = [b for b in resumed] + [b for b in resumed]
    for a, b in zip(ref, first + rest, strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)


@pytest.mark.gpu
def test_dali_gpu_loader_on_shards_reads_the_plan_in_bf16(demo):
    """The GPU graph (nvJPEG decode) on shards: bf16 views on the device, labels as the plan lists."""
    pytest.importorskip("nvidia.dali")
    src = ShardSamples(demo / "shards")
    loader = build_loader(cfg_for(demo / "shards", "dali"), batch_size=4, shard_id=1, num_shards=2,
                          device="cuda", dtype=torch.bfloat16)
    batches = list(loader)
    assert all(v.device.type == "cuda" and v.dtype == torch.bfloat16 for *views, _ in batches for v in views)
    labels = torch.cat([y for *_, y in batches]).cpu()
    assert labels.tolist() == [src.read(i)[1] for i in loader.plan.epoch_indices(0)]


def test_dali_multi_crop_views_from_shards(demo):
    pytest.importorskip("nvidia.dali")
    loader = build_loader(cfg_for(demo / "shards", "dali", local_crops=2, local_size=16), batch_size=4)
    views = next(iter(loader))
    assert [tuple(v.shape) for v in views[:-1]] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 2


def _damage_member(shards: Path) -> str:
    """Overwrite the start of one image member (its JPEG header) in place: the shard keeps its size."""
    src = ShardSamples(shards)
    victim = 5
    name = src.name(victim)
    with open(src.shards[src.shard_of[victim]], "r+b") as f:
        f.seek(int(src.image_at[victim]))
        f.write(b"not a jpeg at all")
    return name


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_corrupt_member_is_named_and_replaced(demo, tmp_path, backend):
    shards = copy_shards(demo, tmp_path)
    name = _damage_member(shards)
    assert ".tar:" in name and name.endswith(".jpg")
    loader = build_loader(cfg_for(shards, backend, max_bad_fraction=0.5), batch_size=4)
    with pytest.warns(BadImageWarning, match=f"skipping {name}: .*another sample takes its place"):
        n = sum(len(y) for *_, y in loader)
    assert n == 24       # the batch kept its size


def test_truncated_shards_are_named_and_left_out(demo, tmp_path):
    shards = copy_shards(demo, tmp_path)
    victim = sorted(shards.glob("*.tar"))[1]
    size = ShardSamples(shards).shard_sizes[1]
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    with pytest.warns(BadImageWarning, match=f"skipping shard {victim}: .* bytes, the manifest says"):
        assert len(ShardSamples(shards)) == 24 - size
    (shards / "manifest.json").unlink()                   # a bare folder of shards: the index tells
    with pytest.warns(BadImageWarning, match=f"skipping shard {victim}: truncated: its index lists data up to"):
        assert len(ShardSamples(shards)) == 24 - size
    with pytest.warns(BadImageWarning), pytest.raises(DatasetError, match="max_bad_fraction"):
        ShardSamples(shards, max_bad_fraction=0.1)


def test_a_shard_truncated_during_the_run_names_the_member(demo, tmp_path):
    shards = copy_shards(demo, tmp_path)
    loader = build_loader(cfg_for(shards, "torchvision", max_bad_fraction=0.9), batch_size=4)
    last = loader.dataset.source.shards[-1]
    with open(last, "r+b") as f:
        f.truncate(1024)
    # a read that fails is "unreadable" on every source (folder.BadSamples), naming the member and why
    with pytest.warns(BadImageWarning, match=rf"skipping {last}:\S+\.jpg: unreadable \(shard ends at "
                                            r"byte \d+, the member needs \d+\.\.\d+ \(truncated\)"):
        sum(len(y) for *_, y in loader)


def test_bad_shard_sets_fail_clearly(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        ShardSamples(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no manifest.json and no"):
        ShardSamples(tmp_path / "empty")
    (tmp_path / "empty" / "a.tar").write_bytes(b"")
    (tmp_path / "empty" / "a.idx").write_text("v1.2 1\njpg 512 10\n")
    with pytest.raises(DatasetError, match=r"a\.idx:2: expected 'ext offset size name' groups"):
        ShardSamples(tmp_path / "empty")


# -- evaluation ------------------------------------------------------------------------------
class _MeanColour(torch.nn.Module):
    """A 'backbone' whose feature is the mean colour of the image: equal inputs, equal features."""
    embed_dim = 3

    def forward(self, x, head=False):
        return x.float().mean(dim=(2, 3))


def test_evaluation_reads_shards_as_it_reads_the_folder(demo):
    from fastmoco.evaluation.features import LabelledSplit, extract_features

    kw = dict(batch_size=4, image_size=32, device="cpu", dtype=torch.float32)
    data = DataConfig(backend="torchvision", num_threads=0)
    out = {}
    for kind, train_path, val_path in (("folder", demo / "photos" / "train", demo / "photos" / "val"),
                                       ("shards", demo / "shards", demo / "shards" / "val")):
        train = LabelledSplit.scan("train", str(train_path))
        val = LabelledSplit.scan("val", str(val_path), reference=train)
        assert val.source == kind and train.classes == out.get("classes", train.classes)
        out["classes"] = train.classes
        feats, labels = extract_features(_MeanColour(), val.loader(data, **kw), image_size=32, split=val)
        rows = sorted(zip(labels.tolist(), feats.tolist()))
        out[kind] = rows
    assert len(out["shards"]) == 11 and out["shards"] == out["folder"]


# -- training --------------------------------------------------------------------------------
def _train_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    return env


def _run(cmd, what):
    p = run_until_hang(cmd, what, cwd=ROOT, env=_train_env(), capture_output=True, text=True)
    assert p.returncode == 0, f"{cmd} failed:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


@pytest.mark.long
@pytest.mark.slow
def test_training_on_shards_resumes_mid_epoch_to_the_uninterrupted_losses(demo, tmp_path):
    pytest.importorskip("nvidia.dali")
    from test_train import COMMON, TINY, losses, train_1proc

    data = ["--data.source", "shards", "--data.path", str(demo / "shards"), "--data.backend", "dali",
            "--data.num_threads", "1", "--data.shuffle_buffer", "6", "--schedule.epochs", "3",
            "--checkpoint.every_epochs", "0"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    p = train_1proc(whole, "--schedule.max_steps", "5", *data)        # 3 steps per epoch
    assert "data: 24 samples in" in p.stdout and "0 samples per epoch are left out" in p.stdout
    train_1proc(part, "--schedule.max_steps", "2", *data)             # stops mid-epoch 0
    p = _run([sys.executable, str(ROOT / "fastmoco" / "train.py"), "--config", TINY, "--resume", "auto",
              "--logging.out_dir", str(part), "--schedule.max_steps", "5", *COMMON, *data],
             "training run on shards resumed from step 2 (fastmoco/train.py, 1 process)")
    assert "resumed from" in p.stdout and "step_00000002" in p.stdout
    one, two = losses(whole), losses(part)
    assert sorted(two) == list(range(1, 6)) and all(np.isfinite(list(one.values())))
    assert two == one


@pytest.mark.slow
def test_training_on_shards_with_two_gloo_ranks_reads_each_sample_once(demo, tmp_path):
    from test_train import COMMON, TINY, WORKER, free_port

    out = tmp_path / "run"
    dump = tmp_path / "ranks"
    p = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
              WORKER, "fit-ranks", str(dump), TINY, "--logging.out_dir", str(out), *COMMON,
              "--deepspeed.train_micro_batch_size_per_gpu", "4", "--schedule.max_steps", "3",
              "--data.source", "shards", "--data.path", str(demo / "shards"), "--data.backend", "torchvision",
              "--data.num_threads", "0", "--data.shuffle_buffer", "6"],
             "training worker on shards (fit-ranks, 2 gloo ranks under torchrun)")
    assert "over 2 rank(s): 3 batches of 4 per rank and epoch; 0 samples per epoch are left out" in p.stdout
    recs = [json.loads(Path(f"{dump}.rank{r}.json").read_text()) for r in range(2)]
    assert [(r["shard_id"], r["num_shards"]) for r in recs] == [(0, 2), (1, 2)]
    assert sorted(recs[0]["epoch0"] + recs[1]["epoch0"]) == list(range(24))
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
