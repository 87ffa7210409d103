import json

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
