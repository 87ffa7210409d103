"""fastmoco's LARS (fastmoco/optim.py; the fused kernel and the reference loop) against three steps of the
official moco-v3 LARS on the same tensors (tests/golden/lars.safetensors, made by tests/golden/gen_lars.py)."""
import pytest
import torch

from fastmoco import ops
from fastmoco.optim import LARS
from golden import tensors


@pytest.mark.parametrize("mode", ["on", "off"], ids=["kernel", "reference"])
def test_lars_steps_equal_the_official_optimizer(mode):
    t, meta = tensors.read("lars.safetensors")
    specs = meta["params"]
    params = [torch.nn.Parameter(t[f"param/{i}/init"].clone()) for i in range(len(specs))]
    groups = [{"params": [p for p, s in zip(params, specs) if s["group"] == k], **hp}
              for k, hp in enumerate(meta["groups"])]
    opt = LARS(groups)
    with ops.fused(lars=mode):
        for step in range(meta["steps"]):
            for i, p in enumerate(params):
                g = t.get(f"grad/{step}/{i}")
                p.grad = None if g is None else g.clone()
            opt.step()
            for i, (p, s) in enumerate(zip(params, specs)):
                what = f"step {step}, param {i} {s['shape']} {s['role']}"
                torch.testing.assert_close(p.detach(), t[f"param/{i}/{step}"], rtol=1e-6, atol=1e-6,
                                           msg=lambda m: f"{what}: weights: {m}")
                torch.testing.assert_close(opt.state[p]["mu"], t[f"mu/{i}/{step}"], rtol=1e-6, atol=1e-6,
                                           msg=lambda m: f"{what}: momentum buffer: {m}")
