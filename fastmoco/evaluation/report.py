"""The report of a run as one HTML file: `fastmoco-report RUN_DIR [--out FILE.html]`.

    fastmoco-report runs/demo                  # -> runs/demo/report.html
    fastmoco-report runs/vit_b --out vit_b.html

Self-contained: every picture is embedded (data: URIs), the style is inline,
there is no script and nothing is fetched when it is viewed, so the file can
be mailed or attached as it is. It holds:
- a summary (method, backbone, steps, last loss, last kNN accuracy);
- one plot per metric of the run's metrics.jsonl, whatever the run logged
  (loss, lr, momentum, img/s, kNN top-1/top-5 per k, ...), over steps;
- when the run has kNN evaluation folders (`<run>/eval/step_*`, written by the
  kNN monitor, fastmoco/evaluation/monitor.py), those of the last one: a few
  val images, each with its nearest train images, their classes and cosine
  similarities (framed green where the class is the query's), and the
  last block's class-token attention maps of the same images;
- the checkpoints (step, files, size, whether every file of the manifest is
  there) and the run's config.
Plots are matplotlib's (Agg canvas, fastmoco/evaluation/figures.py). The file
is written atomically; the default is RUN_DIR/report.html. A run with an
`eval` section writes it at its end and prints where.
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import json
import os
import re
import time
from pathlib import Path

from fastmoco.evaluation.figures import new_figure, png_bytes

REPORT = "report.html"
AXES = ("step", "epoch", "time")   # where a record sits, not a metric
THUMB = 112                        # pixels, the retrieval thumbnails
JPEG_QUALITY = 85
TITLES = {"loss": "training loss", "lr": "learning rate", "img_per_s": "throughput (images/s, all processes)",
          "eta_s": "estimated time left (s)", "eval/seconds": "kNN evaluation time (s)",
          "weight_decay": "weight decay"}
MOMENTUM_TITLES = {"moco_v3": "momentum encoder's EMA momentum", "dino": "teacher's EMA momentum"}
_KNN = re.compile(r"eval/knn_top(\d+)@(\d+)$")

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
.metrics{display:flex;flex-wrap:wrap;gap:8px}.metrics figure{margin:0}
figcaption{font-size:12px;color:#555;max-width:130px;overflow-wrap:anywhere}
.row{display:flex;gap:6px;align-items:flex-start;margin-bottom:12px}.row figure{margin:0}
.row img{border:4px solid #bbb}.row .query img{border-color:#333}.row .same img{border-color:#2a2}
.row .other img{border-color:#d33}.attention img{max-width:100%}
pre{background:#f6f6f6;padding:8px;font-size:12px;overflow:auto}.missing{color:#a00;font-size:12px}
"""


class ReportError(ValueError):
    """A run directory that gives no report; the message names the path."""


# -- reading the run -------------------------------------------------------------------------------------
def read_records(path: Path) -> list[dict]:
    """The JSON records of metrics.jsonl, a line torn by a kill skipped."""
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                records.append(rec)
    return records


def _flatten(rec: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in rec.items():
        out.update(_flatten(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def metric_series(records: list[dict]) -> dict[str, tuple[list, list]]:
    """{metric: (steps, values)} of every number the records hold besides AXES, nested keys joined
    by '/' (an evaluation record's {"eval": {"knn_top1@20": ...}} -> "eval/knn_top1@20"): the
    top-level ones (training) first, each group in the order its metrics first appear."""
    series: dict[str, tuple[list, list]] = {}
    for rec in records:
        if not isinstance(rec.get("step"), (int, float)):
            continue
        for key, value in _flatten(rec).items():
            if key in AXES or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            steps, values = series.setdefault(key, ([], []))
            steps.append(rec["step"])
            values.append(value)
    return dict(sorted(series.items(), key=lambda item: "/" in item[0]))  # stable: first appearance kept


def metric_title(name: str, method: str) -> str:
    knn = _KNN.match(name)
    if knn:
        return f"kNN top-{knn.group(1)} accuracy, k={knn.group(2)} (%)"
    if name == "momentum":
        return MOMENTUM_TITLES.get(method, "EMA momentum")
    return TITLES.get(name, name)


def newest_evaluation(run_dir: Path, steps: set[int] | None = None) -> tuple[Path, dict] | None:
    """(folder, retrievals record) of the last kNN evaluation the monitor recorded, if any; with
    `steps`, only of those steps (the evaluations metrics.jsonl holds: a run resumed from an
    earlier checkpoint drops the later ones there, their folders stay until the run passes again)."""
    from fastmoco.evaluation.monitor import EVAL_DIR, RETRIEVALS

    found = []
    for d in (run_dir / EVAL_DIR).glob("step_*"):
        try:
            step = int(d.name.split("_")[1])
        except ValueError:
            continue
        if steps is None or step in steps:
            found.append((step, d))
    for _, d in sorted(found, reverse=True):
        try:
            return d, json.loads((d / RETRIEVALS).read_text())
        except (OSError, json.JSONDecodeError):
            continue
    return None


# -- pictures ----------------------------------------------------------------------------------------------
def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def plot_metric(title: str, steps: list, values: list) -> bytes:
    from matplotlib.ticker import MaxNLocator

    fig = new_figure(4.2, 2.6)
    ax = fig.add_subplot(1, 1, 1)
    few = len(values) <= 40
    ax.plot(steps, values, marker="o" if few else None, markersize=3, linewidth=1.2, color="#1f5fa8")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return png_bytes(fig)


def thumbnail(path: str) -> str | None:
    """A square JPEG thumbnail of an image file as a data URI; None when it cannot be read."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as f:
            img = ImageOps.fit(f.convert("RGB"), (THUMB, THUMB), Image.BICUBIC)
    except (OSError, ValueError, SyntaxError):
        return None
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return data_uri(buf.getvalue(), "image/jpeg")


# -- the sections -----------------------------------------------------------------------------------------
def _e(x) -> str:
    return html.escape(str(x))


def _table(rows: list[tuple], header: tuple | None = None) -> str:
    head = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _summary(run_dir: Path, config: dict, records: list[dict], series: dict) -> str:
    model = config.get("model", {})
    rows = [("run", run_dir), ("method", config.get("method", "moco_v3")),
            ("backbone", f"{model.get('arch', '?')}" + (f", patch {model['patch_size']}" if model.get("patch_size")
                                                        else "") + f", {model.get('img_size', '?')} px")]
    train = [r for r in records if "loss" in r]
    if train:
        last = train[-1]
        rows += [("steps", last["step"]), ("epochs completed", last.get("epoch", "?")),
                 ("last loss", f"{last['loss']:.4f}")]
    times = [r["time"] for r in records if isinstance(r.get("time"), (int, float))]
    if len(times) > 1:
        rows.append(("logged time span", f"{(max(times) - min(times)) / 60:.1f} min"))
    for name, (steps, values) in series.items():
        knn = _KNN.match(name)
        if knn and knn.group(1) == "1":
            first = f"{values[0]:.2f}% at step {steps[0]} -> " if len(values) > 1 else ""
            rows.append((f"kNN top-1, k={knn.group(2)}", f"{first}{values[-1]:.2f}% at step {steps[-1]}"))
    return _table(rows)


def _metrics(series: dict, method: str) -> str:
    if not series:
        return "<p>metrics.jsonl holds no metric yet.</p>"
    figures = []
    for name, (steps, values) in series.items():
        title = metric_title(name, method)
        uri = data_uri(plot_metric(title, steps, values), "image/png")
        figures.append(f'<figure class="metric" data-metric="{_e(name)}"><img alt="{_e(title)}" src="{uri}">'
                       f"</figure>")
    return f'<div class="metrics">{"".join(figures)}</div>'


def _picture(path: str, caption: str, kind: str) -> str:
    uri = thumbnail(path)
    img = (f'<img alt="{_e(Path(path).name)}" src="{uri}" width="{THUMB}" height="{THUMB}">' if uri else
           f'<div class="missing">cannot read {_e(path)}</div>')
    return f'<figure class="{kind}">{img}<figcaption>{caption}</figcaption></figure>'


def _retrievals(record: dict) -> str:
    rows = []
    for q in record.get("queries", []):
        cells = [_picture(q["path"], f"<b>{_e(q['class'])}</b><br>{_e(Path(q['path']).name)}", "query")]
        for n in q.get("neighbours", []):
            kind = "same" if n["label"] == q["label"] else "other"
            cells.append(_picture(n["path"], f"{_e(n['class'])}<br>cos {n['similarity']:.3f}", kind))
        rows.append(f'<div class="row">{"".join(cells)}</div>')
    return "".join(rows)


def _attention(folder: Path, record: dict) -> str:
    parts = []
    for q in record.get("queries", []):
        png = folder / q["attention"] if q.get("attention") else None
        if png is not None and png.is_file():
            parts.append(f'<figure class="attention"><img alt="attention of {_e(Path(q["path"]).name)}" '
                         f'src="{data_uri(png.read_bytes(), "image/png")}"></figure>')
    return "".join(parts)


def _evaluation(run_dir: Path, records: list[dict]) -> str:
    found = newest_evaluation(run_dir, {r["step"] for r in records if "eval" in r and "step" in r})
    if found is None:
        return ("<h2>Nearest neighbours and attention maps</h2><p>No kNN evaluation folder in this run "
                "(<code>eval/step_*</code>: written by the kNN monitor, config section <code>eval</code>).</p>")
    folder, record = found
    where = (f"step {_e(record.get('step'))}, {_e(record.get('encoder', ''))} encoder; val images from "
             f"<code>{_e(record.get('val_path', ''))}</code>, neighbours from "
             f"<code>{_e(record.get('train_path', ''))}</code>")
    out = (f"<h2>Nearest neighbours</h2><p>The last kNN evaluation ({where}): each val image (dark frame) with "
           f"its nearest train images by cosine similarity of the class-token features; green frame: the "
           f"query's class, red: another.</p>{_retrievals(record)}")
    maps = _attention(folder, record)
    if maps:
        out += ("<h2>Attention maps</h2><p>The same val images: the last block's attention of the class token "
                f"over the patches, every head and their mean (step {_e(record.get('step'))}).</p>{maps}")
    return out


def _checkpoints(run_dir: Path) -> str:
    from fastmoco.checkpoint import complete_checkpoints, problems, read_meta

    rows = []
    for path in complete_checkpoints(run_dir / "checkpoints"):
        meta = read_meta(path)
        files = meta.get("files", {})
        bad = problems(path)
        rows.append((path.name, meta.get("step", "?"), meta.get("data", {}).get("epoch", "?"), len(files),
                     f"{sum(files.values()) / 2 ** 20:.1f} MiB", "; ".join(bad) if bad else "complete"))
    if not rows:
        return "<p>No complete checkpoint.</p>"
    return (f"<p>In <code>{_e(run_dir / 'checkpoints')}</code>:</p>"
            + _table(rows, ("checkpoint", "step", "epoch", "files", "size", "state")))


def _config(run_dir: Path) -> dict:
    """The run's resolved config: config.json, else the newest checkpoint's."""
    from fastmoco.checkpoint import complete_checkpoints, read_meta

    path = run_dir / "config.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ReportError(f"{path} is not valid JSON ({e})") from None
    done = complete_checkpoints(run_dir / "checkpoints")
    return read_meta(done[-1]).get("config", {}) if done else {}


def build_report(run_dir: str | os.PathLike) -> str:
    """The report of `run_dir` (a run's logging.out_dir) as one HTML document."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"run directory {str(run_dir)!r} does not exist")
    metrics = run_dir / "metrics.jsonl"
    config = _config(run_dir)
    if not metrics.is_file() and not config:
        raise ReportError(f"{run_dir}: no metrics.jsonl, config.json or checkpoint: not a fastmoco run "
                          "directory (logging.out_dir)")
    records = read_records(metrics)
    series = metric_series(records)
    method = config.get("method", "moco_v3")
    title = f"fastmoco run: {run_dir.resolve().name}"
    body = [f"<h1>{_e(title)}</h1>", _summary(run_dir, config, records, series),
            f"<h2>Metrics</h2><p>From <code>{_e(metrics)}</code>, over training steps.</p>", _metrics(series, method),
            _evaluation(run_dir, records), "<h2>Checkpoints</h2>", _checkpoints(run_dir),
            "<h2>Config</h2>", f"<pre>{_e(json.dumps(config, indent=1))}</pre>",
            f"<p style='color:#888;font-size:11px'>written {_e(time.strftime('%Y-%m-%d %H:%M:%S'))} by "
            "fastmoco-report</p>"]
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(title)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>\n")


def write_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write the report of `run_dir` to `out` (default RUN_DIR/report.html), atomically."""
    text = build_report(run_dir)
    out = Path(out) if out else Path(run_dir) / REPORT
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def main(argv: list[str] | None = None) -> None:
    from fastmoco.evaluation.cli import _errors

    p = argparse.ArgumentParser(prog="fastmoco-report", description="One self-contained HTML report of a run: "
                                "plots of its metrics, nearest neighbours and attention maps of its last kNN "
                                "evaluation, its checkpoints and config.")
    p.add_argument("run_dir", help="the run's logging.out_dir")
    p.add_argument("--out", default="", help=f"the HTML file (default RUN_DIR/{REPORT})")
    args = p.parse_args(argv)
    with _errors():
        print(f"report: {write_report(args.run_dir, args.out or None)}", flush=True)


if __name__ == "__main__":
    main()
