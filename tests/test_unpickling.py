"""Nothing in fastmoco unpickles code: a payload (an object whose unpickling would create a marker file)
planted in each kind of file of a checkpoint (DeepSpeed's model states, its optimizer states of every
ZeRO stage, fastmoco's per-rank state) is refused with a one-line error naming the file, by evaluation,
export and --resume alike, and the marker never appears; the same checkpoints, untouched, resume to
exactly the weights they were saved from (the allowlist covers what DeepSpeed writes). CPU, fp32,
2 gloo ranks (tests/export_worker.py)."""
import json
import shutil

import pytest
import torch

from fastmoco import checkpoint
from fastmoco.evaluation.weights import WeightsError, load_weights
from test_evaluation import cli_export
from test_export import STEP, rewrite_manifest, run_worker, trained

CASES = [f"moco-z{s}-frozen" for s in range(4)]   # the shipped configs' shape: frozen patch projection
REFUSED = "does not load as tensors and numbers only (it holds exec;"   # fastmoco.checkpoint.load_file
KINDS = {"model_states": "model_states.pt", "optim_states": "optim_states.pt", "fastmoco": "fastmoco_rank"}


class Payload:
    """Unpickled, creates `marker`: what a hostile checkpoint would do with os.system."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def kinds_in(ckpt):
    return sorted(kind for kind, part in KINDS.items() if any(part in f.name for f in ckpt.iterdir()))


def plant(ckpt, kind, marker):
    """The payload in every rank's file of `kind` (so every rank meets it), the manifest rewritten to match."""
    files = [f for f in ckpt.iterdir() if KINDS[kind] in f.name]
    assert files
    for f in files:
        state = torch.load(f, weights_only=False)   # the test's own file, just written by its run
        state["payload"] = Payload(marker)
        torch.save(state, f)
    rewrite_manifest(ckpt)
    return files


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Each case's run with a copy of its checkpoint per kind of file, the payload planted in it; the
    resume worker has resumed each run and tried to load each planted copy (ROOT/<case>/resume.json)."""
    root = trained(tmp_path_factory, CASES)
    markers = tmp_path_factory.mktemp("markers")
    for case in CASES:
        shutil.rmtree(root / case / "planted", ignore_errors=True)
        for kind in kinds_in(root / case / "checkpoints" / STEP):
            copy = root / case / "planted" / kind / STEP
            shutil.copytree(root / case / "checkpoints" / STEP, copy)
            plant(copy, kind, markers / f"{case}-{kind}")
    run_worker("resume", root, CASES)
    return root, markers


def test_the_payload_is_live(tmp_path):
    """The test's payload does run when unpickled without weights_only (so its absence below means something)."""
    torch.save({"payload": Payload(tmp_path / "ran")}, tmp_path / "f.pt")
    torch.load(tmp_path / "f.pt", weights_only=False)
    assert (tmp_path / "ran").exists()


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_evaluation_export_and_resume_refuse_every_planted_file(planted, tmp_path, case):
    root, markers = planted
    kinds = kinds_in(root / case / "checkpoints" / STEP)
    assert kinds == (["fastmoco", "model_states"] if case.startswith("moco-z0") else sorted(KINDS))
    resumed = json.loads((root / case / "resume.json").read_text())
    assert resumed["mismatch"] == []   # the untouched checkpoint resumed, weights only, exactly
    for kind in kinds:
        ckpt = root / case / "planted" / kind / STEP
        with pytest.raises(WeightsError) as e:
            load_weights(ckpt)
        assert f"{ckpt}/" in str(e.value) and REFUSED in str(e.value), str(e.value)
        code, err = cli_export("--checkpoint", ckpt, "--out", tmp_path / f"{kind}.safetensors")
        assert code == 2 and REFUSED in err and "Traceback" not in err, err
        assert not (tmp_path / f"{kind}.safetensors").exists()
        assert f"{ckpt}/" in resumed["planted"][kind] and REFUSED in resumed["planted"][kind], resumed["planted"]
    assert sorted(p.name for p in markers.iterdir()) == []


@pytest.mark.slow
def test_a_zero0_checkpoint_claiming_stage_1_runs_nothing(planted, tmp_path):
    """The route the security report took: a ZeRO-0 checkpoint whose COMPLETE says stage 1 (once DeepSpeed's
    fp32 consolidation, which unpickles), its model states holding the payload."""
    root, _ = planted
    ckpt = tmp_path / STEP
    shutil.copytree(root / "moco-z0-frozen" / "checkpoints" / STEP, ckpt)
    plant(ckpt, "model_states", tmp_path / "ran")
    meta = json.loads((ckpt / checkpoint.MARKER).read_text())
    meta["config"]["deepspeed"]["zero_optimization"]["stage"] = 1
    (ckpt / checkpoint.MARKER).write_text(json.dumps(meta))
    code, err = cli_export("--checkpoint", ckpt, "--out", tmp_path / "b.safetensors")
    assert code == 2 and REFUSED in err, err
    assert not (tmp_path / "ran").exists() and not (tmp_path / "b.safetensors").exists()
