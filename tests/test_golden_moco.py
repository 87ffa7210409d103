"""fastmoco's Trainer against two training steps of the official MoCo v3 (main_moco.py's train loop over
moco/builder.py's MoCo_ViT / MoCo_ResNet; tests/golden/moco_step_<case>.safetensors, made by
tests/golden/gen_moco_step.py): the same seeded weights, loaded through fastmoco's importer of official
checkpoints (`model.init_from`), the same images; the lr and momentum of each step, the loss, the gradient
of every parameter, and the online weights, momentum encoder and BatchNorm statistics after each step.
The Trainer (DeepSpeed, ZeRO-0, fp32) runs in its own process: tests/golden/trainer_step.py."""
import os
import sys
from pathlib import Path

import pytest
import torch
from limits import run_until_hang

from fastmoco.moco import MoCo
from golden import tensors

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "golden" / "trainer_step.py"
CASES = ("vit", "vit_conv", "r50")
GOLDEN = {case: tensors.read(f"moco_step_{case}.safetensors") for case in CASES}
LOSS_RTOL = 2e-5
GRAD_RTOL, GRAD_FLOOR = 3e-4, 1e-3       # floor: of the step's largest gradient norm (rounding-noise gradients)
STATE_RTOL, STATE_ULPS = 1e-3, 1e-6      # ULPS: of the tensor's own norm (an EMA's fp32 rounding on values ~1)
NOISE = 1e-6                             # a gradient this small next to the largest one is rounding noise


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("golden_moco") / "steps.pt"
    # CPU and fp32 as the golden files were made, on a GPU box too; the reference ops (the kernels have
    # their own tests)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    env.pop("TRITON_INTERPRET", None)
    p = run_until_hang([sys.executable, str(WORKER), str(out), *CASES],
                       f"{WORKER.name}: two golden MoCo v3 steps of {', '.join(CASES)} (1 process)",
                       cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise AssertionError(f"{WORKER.name} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return torch.load(out, weights_only=True)


def _step_keys(t: dict, kind: str, step: int) -> dict:
    prefix = f"{kind}/{step}/"
    return {k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)}


@pytest.mark.parametrize("case", CASES)
def test_lr_momentum_and_loss_of_each_step(trainer_run, case):
    got, (want, meta) = trainer_run[case], GOLDEN[case]
    torch.testing.assert_close(got["lr"], want["lr"], rtol=1e-9, atol=0,
                               msg=lambda m: f"lr of the two steps (official adjust_learning_rate): {m}")
    # fastmoco hands the EMA an fp32 m: within fp32 rounding of the official double
    torch.testing.assert_close(got["m"], want["m"], rtol=0, atol=1e-7,
                               msg=lambda m: f"momentum of the two steps (official adjust_moco_momentum): {m}")
    torch.testing.assert_close(got["loss"], want["loss"], rtol=LOSS_RTOL, atol=0, msg=lambda m: f"loss: {m}")


@pytest.mark.parametrize("case", CASES)
def test_gradient_of_every_parameter(trainer_run, case):
    got, (want, meta) = trainer_run[case], GOLDEN[case]
    bad = []
    for step in range(meta["iters"]):
        g, w = _step_keys(got, "grad", step), _step_keys(want, "grad", step)
        floor = GRAD_FLOOR * max(d[0].item() for d in w.values())
        bad += tensors.compare_digests(g, w, GRAD_RTOL, floor, what=f"step {step} gradient of ")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("case", CASES)
def test_weights_momentum_encoder_and_batchnorm_statistics_after_each_step(trainer_run, case):
    """The state after each step minus the initial one: AdamW / LARS updates of the online encoder and
    predictor, the momentum encoder's EMA (taken before the optimizer step, as the official forward does),
    BatchNorm running statistics. A parameter whose gradient is rounding noise (the final norm's bias, which
    the projector's BatchNorm cancels) moves by noise under AdamW: only its gradient is compared."""
    got, (want, meta) = trainer_run[case], GOLDEN[case]
    bad = []
    for step in range(meta["iters"]):
        g, w = _step_keys(got, "delta", step), _step_keys(want, "delta", step)
        grads = {n: d[0].item() for n, d in _step_keys(want, "grad", step).items()}
        noise = {n for n, v in grads.items() if v < NOISE * max(grads.values())}
        for name in sorted(set(g) & set(w) - noise):
            floor = STATE_ULPS / STATE_RTOL * got[f"norm/{step}/{name}"].item()
            bad += tensors.compare_digests({name: g[name]}, {name: w[name]}, STATE_RTOL, floor,
                                           what=f"step {step} change of ")
        bad += [f"step {step}: {k} missing here" for k in sorted(set(w) - set(g))]
        bad += [f"step {step}: {k} not in the official model" for k in sorted(set(g) - set(w))]
        gv, wv = _step_keys(got, "value", step), _step_keys(want, "value", step)
        bad += [f"step {step} {k}: {gv.get(k)} here, {v.tolist()} official" for k, v in wv.items()
                if k not in gv or not torch.equal(gv[k], v)]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("case", ["vit", "vit_conv"])
def test_fixed_position_table_equals_vits_py(case):
    """fastmoco's own sin-cos table at construction against vits.py's build_2d_sincos_position_embedding."""
    want, meta = GOLDEN[case]
    c = meta["case"]
    model = MoCo(c["arch"], img_size=c["img"], dim=c["dim"], mlp_dim=c["mlp_dim"], tau=c["tau"],
                 frozen_patch_embed=c["stop_grad_conv1"])
    for enc in ("base_encoder", "momentum_encoder"):
        torch.testing.assert_close(getattr(model, enc).pos_embed, want[f"kept/{enc}.pos_embed"], rtol=0, atol=1e-6)
