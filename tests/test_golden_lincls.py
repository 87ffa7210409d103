"""fastmoco's export in the official layout, as the official main_lincls.py reads it (tests/golden/lincls_<case>
.safetensors, made by tests/golden/gen_lincls.py by running main_lincls on the export of the same seeded
two-step run): the run is made and exported again here, and its file must hold the keys the official
loader was given, with the values it loaded under each model key; main_lincls found only the linear layer
missing, nothing unexpected, and two trainable parameters."""
import pytest
import torch

from golden import tensors
from golden.gen_lincls import CASES, tiny_export

RTOL = 1e-4    # the same seeded fp32 steps on the CPU: rounding differs between CPUs (measured: 1.1e-5 at most
FLOOR = 1e-2   # between AVX-512 and AVX2 kernels); a tensor of norm below FLOOR (a bias whose exact gradient
               # is 0, holding rounding noise only) is compared relative to FLOOR


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request, tmp_path_factory):
    case = request.param
    path = tiny_export(case, tmp_path_factory.mktemp(f"lincls_{case}"))
    return case, torch.load(path, map_location="cpu", weights_only=True)


def test_main_lincls_loads_the_backbone_and_only_the_linear_layer_is_missing(exported):
    case, ckpt = exported
    golden, meta = tensors.read(f"lincls_{case}.safetensors")
    linear = {"vit": "head", "r50": "fc"}[case]
    # what the official loader concluded about the file the generator exported
    assert meta["reached"] == "data", meta["reached"]
    assert meta["missing"] == [f"{linear}.bias", f"{linear}.weight"] and meta["unexpected"] == [], meta
    assert meta["trainable"] == [f"{linear}.bias", f"{linear}.weight"], meta["trainable"]
    # this export is that file again
    sd = ckpt["state_dict"]
    new, gone = sorted(set(sd) - set(meta["file_keys"])), sorted(set(meta["file_keys"]) - set(sd))
    assert not new and not gone, (f"the export's keys changed from those main_lincls was run on: new {new[:5]}, "
                                  f"gone {gone[:5]}; if on purpose, regenerate: {tensors.REGENERATE}")
    got = {model_key: tensors.digest(sd[file_key]) for model_key, file_key in meta["loaded"].items()}
    want = {k[len("loaded/"):]: v for k, v in golden.items()}
    bad = tensors.compare_digests(got, want, RTOL, floor=FLOOR, what="main_lincls would load a different ")
    assert not bad, "\n".join(bad)
