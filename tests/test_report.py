"""The run report (fastmoco/evaluation/report.py) and what the kNN monitor records for it, from tiny CPU
runs of MoCo v3 and DINO with an `eval` section: the HTML parses, holds one figure per metric of
metrics.jsonl, every picture decodes to a non-blank image, nothing is fetched at view time; the
neighbours and attention maps of the last evaluation; the TensorBoard attention image of every
evaluation; fastmoco-attention on the run's checkpoint; a screenshot by a real browser (chromium)."""
import base64
import html
import io
import json
import shutil
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from limits import run_until_hang

from fastmoco.evaluation.monitor import NEIGHBOURS, QUERIES
from fastmoco.evaluation.report import ReportError, build_report, main, metric_series, read_records
from test_train import ROOT, run

CONFIGS = {"moco_v3": ROOT / "configs" / "tiny.json", "dino": ROOT / "configs" / "dino_tiny.json"}
STEPS = 3
VOID = {"img", "meta", "br", "hr", "link", "input", "source", "area", "base", "col", "embed", "wbr"}


class Page(HTMLParser):
    """The report's tags checked for nesting; its figures and images collected."""

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.figures, self.images, self.links, self.scripts = [], [], [], [], [], 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag not in VOID:
            self.stack.append(tag)
        if tag == "figure":
            self.figures.append(a)
        if tag == "img":
            self.images.append(a)
        if tag == "script":
            self.scripts += 1
        for key in ("src", "href"):
            if key in a:
                self.links.append(a[key])

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:]}")
        else:
            self.stack.pop()


def parse(text: str) -> Page:
    page = Page()
    page.feed(text)
    page.close()
    assert not page.errors and not page.stack, (page.errors[:5], page.stack)
    return page


def decode(uri: str) -> np.ndarray:
    head, _, data = uri.partition(",")
    assert head in ("data:image/png;base64", "data:image/jpeg;base64"), head[:80]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


def metrics_present(path: Path) -> set[str]:
    """Every number of every record besides step/epoch/time, nested names joined by '/'."""
    found = set()
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        for k, v in rec.items():
            items = [(f"{k}/{k2}", v2) for k2, v2 in v.items()] if isinstance(v, dict) else [(k, v)]
            found |= {name for name, x in items if type(x) in (int, float) and name not in ("step", "epoch", "time")}
    return found


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from fastmoco.pipelines.demo_data import make_demo_data
    root = tmp_path_factory.mktemp("reportdata")
    return make_demo_data(root / "train", 23, seed=0), make_demo_data(root / "val", 13, seed=7)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def trained(request, folders, tmp_path_factory):
    """(method, run dir, stdout) of a tiny run with the kNN monitor at the start and the end."""
    train, val = folders
    out = tmp_path_factory.mktemp(f"run_{request.param}")
    p = run([sys.executable, str(ROOT / "fastmoco" / "train.py"), "--config", str(CONFIGS[request.param]),
             "--logging.out_dir", str(out), "--logging.log_every", "1", "--logging.check_finite_every", "1",
             "--logging.tensorboard", "true", "--schedule.max_steps", str(STEPS), "--eval.train_path", str(train),
             "--eval.val_path", str(val), "--eval.at_start", "true", "--eval.backend", "torchvision",
             "--eval.k", "[1, 3]"], what=f"{request.param} training run with kNN evaluations (fastmoco/train.py)")
    return request.param, out, p.stdout


@pytest.mark.slow
def test_the_run_ends_by_writing_its_report(trained):
    method, out, stdout = trained
    assert f"report: {out / 'report.html'}" in stdout.splitlines()
    lines = stdout.splitlines()
    assert lines.index(f"report: {out / 'report.html'}") > max(i for i, s in enumerate(lines) if "kNN" in s)
    page = parse((out / "report.html").read_text())
    # one figure per metric of metrics.jsonl, training and evaluation alike
    plotted = [f["data-metric"] for f in page.figures if f.get("class") == "metric"]
    present = metrics_present(out / "metrics.jsonl")
    assert sorted(plotted) == sorted(present)
    assert {"loss", "lr", "momentum", "img_per_s", "eval/knn_top1@1", "eval/knn_top1@3"} <= present
    # every picture embedded and a real picture
    assert page.images and page.scripts == 0
    assert all(link.startswith("data:image/") for link in page.links), [x[:60] for x in page.links]
    for img in page.images:
        picture = decode(img["src"])
        assert picture.shape[0] > 20 and picture.shape[1] > 20 and picture.std() > 5, img.get("alt")
    # the last evaluation's neighbours and attention maps
    kinds = [f.get("class") for f in page.figures]
    assert kinds.count("query") == QUERIES
    assert kinds.count("same") + kinds.count("other") == QUERIES * NEIGHBOURS
    assert kinds.count("attention") == QUERIES
    text = (out / "report.html").read_text()
    assert f"The last kNN evaluation (step {STEPS}," in text
    assert f'"method": "{method}"' in html.unescape(text)                 # the config is in it


@pytest.mark.slow
def test_the_monitor_records_each_evaluation(trained, folders):
    method, out, _ = trained
    train, val = folders
    steps = sorted(int(d.name.split("_")[1]) for d in (out / "eval").glob("step_*"))
    assert steps == [0, STEPS] and not list((out / "eval").glob(".*"))
    record = json.loads((out / "eval" / f"step_{STEPS:08d}" / "retrievals.json").read_text())
    assert record["encoder"] == ("momentum" if method == "dino" else "online")
    val_files = sorted(str(p) for p in Path(val).glob("*/*.jpg"))
    assert [q["path"] for q in record["queries"]] == [val_files[i] for i in (0, 4, 8, 12)]  # spread, fixed
    for q in record["queries"]:
        assert q["class"] == Path(q["path"]).parent.name
        sims = [n["similarity"] for n in q["neighbours"]]
        assert len(sims) == NEIGHBOURS and sims == sorted(sims, reverse=True) and all(-1 <= s <= 1 for s in sims)
        for n in q["neighbours"]:
            assert Path(n["path"]).parent.parent == Path(train) and n["class"] == Path(n["path"]).parent.name
        assert (out / "eval" / f"step_{STEPS:08d}" / q["attention"]).is_file()
    # TensorBoard: the first query's attention figure at each evaluation
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(out / "tb"), size_guidance={"images": 0})
    acc.Reload()
    events = acc.Images("eval/attention")
    assert [e.step for e in events] == [0, STEPS]
    assert decode("data:image/png;base64," + base64.b64encode(events[-1].encoded_image_string).decode()).std() > 5


@pytest.mark.slow
def test_both_commands_on_the_run(trained, tmp_path, capsys):
    method, out, _ = trained
    main([str(out), "--out", str(tmp_path / "r.html")])
    assert capsys.readouterr().out.strip() == f"report: {tmp_path / 'r.html'}"
    parse((tmp_path / "r.html").read_text())
    from fastmoco.evaluation.attention import main as attention_main
    val_image = json.loads((out / "eval" / f"step_{STEPS:08d}" / "retrievals.json").read_text())["queries"][0]["path"]
    attention_main(["--checkpoint", str(out), "--images", val_image, "--out", str(tmp_path / "maps"),
                    "--threshold", "0.6"])
    assert f"{'momentum' if method == 'dino' else 'online'} encoder" in capsys.readouterr().out
    picture = np.asarray(Image.open(tmp_path / "maps" / f"{Path(val_image).stem}.png").convert("RGB"))
    assert picture.std() > 5


@pytest.mark.slow
@pytest.mark.parametrize("trained", ["moco_v3"], indirect=True)   # one browser run is enough
def test_a_browser_renders_the_report(trained, tmp_path):
    method, out, _ = trained
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")
    shot = tmp_path / "shot.png"
    p = run_until_hang([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--window-size=1200,2400", f"--screenshot={shot}", (out / "report.html").as_uri()],
                       "headless chromium taking a screenshot of report.html", capture_output=True, text=True)
    assert shot.is_file(), p.stderr[-2000:]
    picture = np.asarray(Image.open(shot).convert("RGB")).astype(np.float64)
    assert picture.shape[:2] == (2400, 1200)
    # drawn, not blank: the page's plots and photographs make many distinct colours, in each half
    for part in (picture[:1200], picture[1200:]):
        assert part.std() > 10 and len(np.unique(part.reshape(-1, 3), axis=0)) > 100


# -- without a run -------------------------------------------------------------------------------------------
def test_metric_series_reads_what_a_run_logged(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "epoch": 0, "eval": {"knn_top1@20": 10.0, "seconds": 2}, "split": "v", "time": 1}\n'
                    '{"step": 2, "epoch": 0, "loss": 5.0, "lr": 0.1, "stalled": false, "time": 2}\n'
                    '{"step": 4, "epoch": 1, "loss": 4.0, "lr": 0.2, "mem": {"gib": 3.5}, "time": 3}\n'
                    '{"step": 6, "loss": 3.')                                          # torn by a kill
    series = metric_series(read_records(path))
    assert list(series) == ["loss", "lr", "eval/knn_top1@20", "eval/seconds", "mem/gib"]
    assert series["loss"] == ([2, 4], [5.0, 4.0]) and series["mem/gib"] == ([4], [3.5])


def test_a_folder_without_a_run_is_named(tmp_path, capsys):
    with pytest.raises(ReportError, match=f"{tmp_path}: no metrics.jsonl, config.json or checkpoint"):
        build_report(tmp_path)
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "nope")])
    assert e.value.code == 2 and f"run directory {str(tmp_path / 'nope')!r} does not exist" in capsys.readouterr().err


def test_overwrite_removes_the_previous_runs_evaluations_and_report(tmp_path):
    from fastmoco.checkpoint import CheckpointError, claim_out_dir
    (tmp_path / "eval" / "step_00000004").mkdir(parents=True)
    (tmp_path / "report.html").write_text("old")
    with pytest.raises(CheckpointError, match="holds a previous run"):
        claim_out_dir(tmp_path, resume="", overwrite=False)
    lock, removed = claim_out_dir(tmp_path, resume="", overwrite=True)
    lock.release()
    assert any(str(tmp_path / "eval") in line for line in removed), removed
    assert any(str(tmp_path / "report.html") in line for line in removed), removed
    assert not (tmp_path / "eval").exists() and not (tmp_path / "report.html").exists()


def test_the_report_shows_the_last_evaluation_the_metrics_hold(tmp_path):
    """A run resumed from an earlier checkpoint drops later evaluations from metrics.jsonl; their folders
    stay until the run passes that step again, and the report must not show them."""
    photo = tmp_path / "a" / "x.jpg"
    photo.parent.mkdir()
    Image.fromarray((np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8)).save(photo)
    lines = [{"step": s, "epoch": 0, "eval": {"knn_top1@20": float(s)}} for s in (0, 4)]
    lines.insert(1, {"step": 2, "epoch": 0, "loss": 3.0})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    for step in (0, 4, 8):      # 8: from before the resume
        d = tmp_path / "eval" / f"step_{step:08d}"
        d.mkdir(parents=True)
        q = {"path": str(photo), "label": 0, "class": f"class{step}",
             "neighbours": [{"path": str(photo), "label": 0, "class": "a", "similarity": 0.9},
                            {"path": str(tmp_path / "gone.jpg"), "label": 1, "class": "b", "similarity": 0.5}]}
        (d / "retrievals.json").write_text(json.dumps({"step": step, "encoder": "online", "queries": [q]}))
    text = build_report(tmp_path)
    page = parse(text)
    assert "The last kNN evaluation (step 4," in text and "class4" in text and "class8" not in text
    assert [f.get("class") for f in page.figures if f.get("class") in ("query", "same", "other")] == \
        ["query", "same", "other"]
    assert f"cannot read {tmp_path / 'gone.jpg'}" in html.unescape(text)      # a file gone since: named
    assert sorted(f["data-metric"] for f in page.figures if f.get("class") == "metric") == \
        ["eval/knn_top1@20", "loss"]
