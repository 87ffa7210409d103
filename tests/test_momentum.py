"""The momentum encoder's fp32 EMA state when the module is cast to bf16 and when ZeRO-3 shards it."""
import types

import torch

from fastmoco.momentum import MomentumState, shard_of
from fastmoco.moco import MoCo


def test_bf16_module_keeps_an_fp32_master_and_writes_the_bf16_copy():
    torch.manual_seed(0)
    model = MoCo("vit_test", img_size=32, dim=16, mlp_dim=24)
    fp32 = [p.detach().clone() for p in model.momentum_encoder.parameters()]
    with torch.no_grad():
        for p in model.base_encoder.parameters():
            p.add_(torch.randn_like(p))
    model.to(torch.bfloat16)  # what DeepSpeed's bf16 mode does to the whole module
    state = model.build_momentum_state(fp32)
    assert all(t.dtype == torch.float32 for t in state.master)
    assert state.copy is not None and all(t.dtype == torch.bfloat16 for t in state.copy)
    online = [p.detach().float() for p in model.base_encoder.parameters()]
    m = 0.99999  # a bf16 weight could not absorb a (1 - m) step; the fp32 master must
    for _ in range(3):
        model.update_momentum_encoder(torch.tensor(m))
    expect = [(v * m ** 3 + o * (1 - m ** 3)) for v, o in zip(fp32, online)]
    for got, want, copy in zip(state.master, expect, model.momentum_encoder.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # a lost update is off by ~3e-5
        assert torch.equal(copy.data, got.to(torch.bfloat16))  # the forward reads the rounded master
    moved = [(g - v).abs().max() for g, v in zip(state.master, fp32)]
    assert max(moved) > 0  # the tiny update was kept


def test_zero3_shards_slice_the_full_tensor_like_deepspeed():
    full = torch.arange(10, dtype=torch.float32).reshape(2, 5)
    for rank, expect in ((0, [0, 1, 2, 3, 4]), (1, [5, 6, 7, 8, 9])):
        p = types.SimpleNamespace(ds_tensor=torch.zeros(5))
        assert shard_of(full, p, rank).tolist() == expect
    odd = torch.arange(7, dtype=torch.float32)
    p = types.SimpleNamespace(ds_tensor=torch.zeros(4))  # ceil(7 / 2), the last rank zero padded
    assert shard_of(odd, p, 1).tolist() == [4, 5, 6, 0]


def test_state_dict_round_trip_and_shape_errors():
    torch.manual_seed(0)
    a = MoCo("vit_test", img_size=32, dim=16, mlp_dim=24)
    b = MoCo("vit_test", img_size=32, dim=16, mlp_dim=24)
    sa, sb = a.build_momentum_state(), b.build_momentum_state()
    with torch.no_grad():
        for p in a.momentum_encoder.parameters():
            p.add_(1.0)
    sb.load_state_dict(sa.state_dict())
    for x, y in zip(a.momentum_encoder.parameters(), b.momentum_encoder.parameters()):
        assert torch.equal(x, y)
    other = MomentumState([torch.zeros(3)], [torch.zeros(3)])
    try:
        other.load_state_dict({"master": [torch.zeros(4)]})
    except ValueError as e:
        assert "shape (4,)" in str(e)
    else:
        raise AssertionError("a mismatched momentum state loaded")
