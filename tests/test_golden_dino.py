"""DINO's loss, head and position-embedding resampling against the official code's outputs
(tests/golden/dino_loss, dino_head and pos_embed .safetensors, made by tests/golden/gen_dino_parts.py)."""
import pytest
import torch

from fastmoco import ops
from fastmoco.dino import DINO, DINOHead
from fastmoco.models.vit import VisionTransformer
from golden import tensors
from golden.gen_dino_parts import PATCHES, SIZES, loss_inputs, pos_embed_inputs

LOSS, LOSS_META = tensors.read("dino_loss.safetensors")
HEAD, HEAD_META = tensors.read("dino_head.safetensors")
POS, POS_META = tensors.read("pos_embed.safetensors")


@pytest.mark.parametrize("mode", ["on", "off"], ids=["kernel", "reference"])
@pytest.mark.parametrize("case", sorted(LOSS_META["epochs"]))
def test_dino_loss_gradient_and_center(case, mode):
    cfg, x = LOSS_META["loss"], loss_inputs()
    tensors.check_inputs(x, LOSS["input_sums"], "dino_loss")
    b, k = cfg["batch"], cfg["out_dim"]
    model = DINO("vit_test", img_size=32, patch_size=8, num_heads=3, out_dim=k, hidden_dim=16, bottleneck_dim=8,
                 student_temp=cfg["student_temp"], center_momentum=cfg["center_momentum"])
    model.center.copy_(x["center"])
    student = x["student"].clone().view(cfg["ncrops"], b, k).requires_grad_()   # crops were stacked on the batch
    teacher = x["teacher"].clone().view(2, b, k).requires_grad_()
    with ops.fused(dino_loss=mode):
        loss, teacher_sum = ops.dino_loss(student, teacher, model.center[0], cfg["student_temp"],
                                          LOSS_META["teacher_temp"][case])
        loss.backward()
        model.update_center(teacher_sum, 2 * b)
    tensors.assert_close(loss.reshape(1), LOSS[f"{case}/loss"], 1e-6, "loss")
    tensors.assert_close(student.grad.reshape(-1, k), LOSS[f"{case}/student_grad"], 1e-5,
                         "gradient w.r.t. the student outputs")
    assert teacher.grad is None or not teacher.grad.any(), "the official loss passes no gradient to the teacher"
    tensors.assert_close(model.center, LOSS[f"{case}/center"], 1e-6, "center after the update")


@pytest.mark.parametrize("case", ["norm_last_layer", "free_last_layer"])
def test_dino_head_output_and_gradients(case):
    h = HEAD_META["head"]
    state = {k[len(f"{case}/state/"):]: v for k, v in HEAD.items() if k.startswith(f"{case}/state/")}
    head = DINOHead(h["in_dim"], h["out_dim"], hidden_dim=h["hidden_dim"], bottleneck_dim=h["bottleneck_dim"],
                    num_layers=3, norm_last_layer=case == "norm_last_layer")
    head.load_state_dict(state)   # strict: the official names
    x = HEAD[f"{case}/x"].clone().requires_grad_()
    y = head(x)
    (y * HEAD[f"{case}/probe"]).sum().backward()
    tensors.assert_close(y, HEAD[f"{case}/out"], 1e-5, "output")
    tensors.assert_close(x.grad, HEAD[f"{case}/grad/x"], 1e-5, "gradient w.r.t. the input")
    want = {k[len(f"{case}/grad/"):] for k in HEAD if k.startswith(f"{case}/grad/") and k != f"{case}/grad/x"}
    got = {n for n, p in head.named_parameters() if p.grad is not None}
    assert got == want, f"parameters trained here {sorted(got)}, by the official head {sorted(want)}"
    for n, p in head.named_parameters():
        if p.grad is not None:
            tensors.assert_close(p.grad, HEAD[f"{case}/grad/{n}"], 1e-5, f"gradient of {n}")


def _vit(patch: int, table: torch.Tensor | None = None, state: dict | None = None) -> VisionTransformer:
    vit = POS_META["vit"]
    model = VisionTransformer("vit_test", img_size=vit["img_size"], frozen_patch_embed=False, recipe="dino",
                              num_heads=vit["num_heads"], patch_size=patch).eval()
    assert (model.embed_dim, len(model.blocks)) == (vit["embed_dim"], vit["depth"])
    if state is not None:
        model.load_state_dict(state)
    if table is not None:
        with torch.no_grad():
            model.pos_embed.copy_(table)
    return model


@pytest.fixture(scope="module")
def pos_inputs():
    x = pos_embed_inputs(POS_META["states"])
    tensors.check_inputs(x, POS["input_sums"], "pos_embed")
    return x


@pytest.mark.parametrize("size", [tuple(s) for s in SIZES], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("table", ["random", "smooth"])
@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: f"p{p}")
def test_interpolate_pos_encoding(pos_inputs, patch, table, size):
    """fastmoco's table for a grid (VisionTransformer.pos_embed_for) against interpolate_pos_encoding."""
    h, w = size
    with torch.no_grad():
        got = _vit(patch, pos_inputs[f"p{patch}/{table}"]).pos_embed_for(h // patch, w // patch)
    want = POS[f"p{patch}/{table}/{h}x{w}"]
    what = f"{h}x{w} px, patch {patch}, {table} table"
    if (h, w) == (96, 96):   # stored whole
        tensors.assert_close(got, want, 1e-5, what)
    else:                    # a digest
        err = tensors.digest_error(tensors.digest(got), want)
        assert err < 1e-5, f"{what}: differs by {err:.3g} of the official table's norm (digest)"


@pytest.mark.parametrize("size", [tuple(s) for s in SIZES], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: f"p{p}")
def test_features_at_each_resolution(pos_inputs, patch, size):
    """The class-token features of the DINO ViT (seeded weights, random table) at the crops' sizes."""
    h, w = size
    prefix = f"p{patch}/state/"
    model = _vit(patch, state={k[len(prefix):]: v for k, v in pos_inputs.items() if k.startswith(prefix)})
    with torch.no_grad():
        got = model(pos_inputs[f"images{h}x{w}"])
    tensors.assert_close(got, POS[f"p{patch}/features/{h}x{w}"], 1e-5, f"{h}x{w} px, patch {patch}: features")
