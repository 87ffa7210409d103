import json
import re

import pytest

from fastmoco.config import Config, ConfigError, from_dict, load_config, to_dict


def test_defaults_are_the_paper_recipe():
    cfg = Config()
    assert cfg.optim.name == "adamw" and cfg.optim.base_lr == 1.5e-4 and cfg.optim.weight_decay == 0.1
    assert cfg.moco.tau == 0.2 and cfg.moco.momentum == 0.99 and cfg.moco.momentum_cosine
    assert cfg.schedule.epochs == 300 and cfg.schedule.warmup_epochs == 40
    assert cfg.data.blur_prob == [1.0, 0.1] and cfg.data.solarize_prob == [0.0, 0.2]


def test_unknown_key_is_named_with_its_path(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"optim": {"base_lr": 1e-3, "lrr": 2}}))
    with pytest.raises(ConfigError, match=r"optim\.lrr"):
        load_config(p)
    p.write_text(json.dumps({"optimizer": {}}))
    with pytest.raises(ConfigError, match="optimizer"):
        load_config(p)


def test_wrong_type_is_named(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"model": {"img_size": "big"}}))
    with pytest.raises(ConfigError, match=r"model\.img_size"):
        load_config(p)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(bad)


def test_dotted_overrides_and_roundtrip(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"model": {"arch": "vit_base"}, "deepspeed": {"train_micro_batch_size_per_gpu": 8}}))
    cfg = load_config(p, ["--optim.base_lr", "1e-4", "--model.grad_checkpointing=true",
                          "--data.path", "/data/in1k", "--deepspeed.zero_optimization.stage", "3"])
    assert cfg.model.arch == "vit_base" and cfg.optim.base_lr == 1e-4 and cfg.model.grad_checkpointing is True
    assert cfg.data.path == "/data/in1k"
    assert cfg.deepspeed == {"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 3}}
    # The resolved config is plain JSON and reads back to the same thing.
    d = json.loads(json.dumps(to_dict(cfg)))
    assert from_dict(d) == cfg
    with pytest.raises(ConfigError, match=r"optim\.nope"):
        load_config(p, ["--optim.nope", "1"])
    with pytest.raises(ConfigError, match="missing value"):
        load_config(p, ["--optim.base_lr"])


def test_shipped_configs_load_and_follow_the_recipe():
    from pathlib import Path
    root = Path(__file__).resolve().parents[1] / "configs"
    names = {p.stem for p in root.glob("*.json")}
    assert {"vit_s", "vit_b", "vit_l", "vit_h", "tiny", "demo"} <= names
    for name in names:
        load_config(root / f"{name}.json")
    for name in ("vit_s", "vit_b", "vit_l", "vit_h"):
        c = load_config(root / f"{name}.json")
        assert (c.optim.name, c.optim.base_lr, c.optim.weight_decay) == ("adamw", 1.5e-4, 0.1)
        assert (c.schedule.epochs, c.schedule.warmup_epochs) == (300, 40)
        assert (c.moco.tau, c.moco.momentum, c.moco.momentum_cosine) == (0.2, 0.99, True)
        assert c.model.frozen_patch_embed and c.deepspeed["train_batch_size"] == 4096
        assert c.data.backend == "dali"
    h = load_config(root / "vit_h.json")
    assert h.model.arch == "vit_huge" and h.model.grad_checkpointing
    assert h.deepspeed["zero_optimization"]["stage"] == 3 and h.deepspeed["bf16"]["enabled"] in (True, "auto")


def test_fused_switch_modes_and_layernorm_widths():
    import torch

    from fastmoco import ops
    cpu = torch.zeros(2, 768)
    with ops.fused(attention="auto", layernorm="auto"):
        assert not ops.use_fused("attention", cpu) and not ops.use_fused("layernorm", cpu)  # CPU: reference
    with ops.fused(attention="on", layernorm="on"):
        assert ops.use_fused("attention", cpu) and ops.use_fused("layernorm", torch.zeros(2, 384))
    with ops.fused(attention="off"):
        assert not ops.use_fused("attention", cpu)
    from fastmoco.kernels.layernorm import AUTO_WIDTHS
    assert AUTO_WIDTHS == {768}
    with pytest.raises(ValueError, match="unknown fused op"):
        ops.set_fused(softmax="on")


# -- what a resume may change (issue 21) --------------------------------------------------------------------
def _leaves(cls, prefix=""):
    """Dotted names of every field of dataclass `cls`, recursively (the deepspeed dict is one leaf)."""
    import dataclasses
    import typing
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaves(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


def test_every_config_key_has_a_resume_rule_and_every_rule_a_key():
    from fastmoco.config import RESUME_RULES
    leaves = set(_leaves(Config))
    unclassified = sorted(k for k in leaves if k not in RESUME_RULES)
    assert unclassified == [], f"classify these keys in fastmoco.config.RESUME_RULES: {unclassified}"
    stale = sorted(k for k in RESUME_RULES if k.split(".")[0] not in ("run", "deepspeed") and k not in leaves)
    assert stale == []
    # the run's shape is what the Trainer records; every FIXED key says why
    from fastmoco.config import FIXED, _fixed_why
    assert {k for k in RESUME_RULES if k.startswith("run.")} == {f"run.{k}" for k in (
        "global_batch", "steps_per_epoch", "dataset", "world_size", "zero_stage", "bf16")}
    assert all(_fixed_why(k) for k, rule in RESUME_RULES.items() if rule == FIXED)


def _meta(**changes):
    cfg = to_dict(Config())
    for key, value in changes.items():
        node = cfg
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    return {"config": cfg, "run": {"global_batch": 256, "zero_stage": 0, "dataset": "10 files, sha256 ab"}}


def test_resume_changes_sorts_every_difference_into_its_class():
    from fastmoco.config import resume_changes
    saved = _meta()
    now = _meta(**{"optim.base_lr": 3e-4, "optim.name": "lars", "data.path": "/moved", "logging.out_dir": "x",
                   "schedule.max_steps": 9, "deepspeed.zero_optimization": {"stage": 0, "overlap_comm": True},
                   "deepspeed.gradient_clipping": 1.0})
    now["run"]["dataset"] = "10 files, sha256 cd"
    cannot, refused, accepted = resume_changes(saved, now)
    assert [c.split(" (")[0] for c in cannot] == ["optim.name: 'adamw' -> 'lars'"]
    assert "another optimizer" in cannot[0] and "--model.init_from" in cannot[0]
    assert refused == ["deepspeed.gradient_clipping: 0.0 -> 1.0", "optim.base_lr: 0.00015 -> 0.0003",
                       "run.dataset: '10 files, sha256 ab' -> '10 files, sha256 cd'"]
    assert accepted == ["data.path: '' -> '/moved'", "deepspeed.zero_optimization.overlap_comm: None -> True"]
    cannot, refused, accepted = resume_changes(saved, now, allow=("optim", "run.dataset",
                                                                   "deepspeed.gradient_clipping", "optim.name"))
    assert len(cannot) == 1 and refused == []     # allowing a FIXED key changes nothing
    assert "optim.base_lr: 0.00015 -> 0.0003 (--allow-change)" in accepted
    # a run shape value an older checkpoint did not record is not compared
    assert resume_changes({"config": saved["config"], "run": {}}, now)[1][-1].startswith("optim.base_lr")


@pytest.mark.parametrize("key, expect", [
    ("optim.base_lrr", "--allow-change optim.base_lrr: no such config key"),
    ("run.zero_stagee", "no such config key"),
    ("model.arch", "model.arch cannot change at resume (the checkpoint's weights"),
    ("run.zero_stage", "run.zero_stage cannot change at resume (DeepSpeed's files of one ZeRO stage"),
    ("optim.name", "optim.name cannot change at resume"),
])
def test_allow_change_refuses_unknown_keys_and_changes_that_cannot_load(key, expect):
    from fastmoco.config import check_allow_change
    with pytest.raises(ConfigError, match=re.escape(expect)):
        check_allow_change([key], Config())


def test_allow_change_takes_keys_sections_run_shape_and_deepspeed_keys():
    from fastmoco.config import check_allow_change
    check_allow_change(["optim.base_lr", "optim", "schedule.epochs", "run.global_batch", "run.dataset",
                        "deepspeed.gradient_clipping", "deepspeed.zero_optimization.stage", "data.blur_prob"], Config())
