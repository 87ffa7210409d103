"""The bench's report: tables of a run's records, one section after another.

Each entry module (bench/model_step.py, kernels.py, pipeline.py, breakdown.py, evaluation.py,
dino.py) owns its section(s): `TITLES` {section: title} and `table(recs, markdown)` with its own
columns; this module only orders the sections, prints the header and offers the renderers.
"""
from __future__ import annotations

import importlib

# section -> the entry module that measures and renders it, in report order
ENTRIES = {"model": "bench.model_step", "kernels": "bench.kernels", "data": "bench.pipeline",
           "e2e": "bench.pipeline", "breakdown": "bench.breakdown", "eval": "bench.evaluation", "dino": "bench.dino",
           "r50": "bench.r50"}
SMOKE_LABEL = "SMOKE (CPU): not a measurement"


def fmt(v, spec: str = ".1f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def render(headers: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 or i == len(cells) - 1 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def simple_table(recs: list[dict], markdown: bool, first: str) -> str:
    headers = [first, "build", "batch", "img/s", "details"]
    rows = []
    for r in recs:
        if r["status"] != "ok":
            rows.append([r["name"], r.get("build", "-"), "-", "-", f"{r['status']}: {r.get('reason')}"])
            continue
        m = r["metrics"]
        details = {k: v for k, v in m.items() if k != "img_per_s" and v is not None}
        text = ", ".join(f"{k} {fmt(v, '.3g') if isinstance(v, float) else v}" for k, v in details.items()
                         if not isinstance(v, list))
        rows.append([r["name"], r.get("build", "-"), str(r.get("batch", "-")), fmt(m.get("img_per_s")), text])
    return render(headers, rows, markdown)



def print_report(records: list[dict], meta: dict, markdown: bool) -> None:
    smoke = meta.get("smoke")
    if markdown:
        print(f"### {meta['date'][:10]} {meta['device']['name']}, commit {meta['commit']}\n")
        if smoke:
            print(f"**{SMOKE_LABEL}**\n")
        print(f"`{meta['command']}`; versions: "
              + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + "\n")
    for section, module_name in ENTRIES.items():
        recs = [r for r in records if r["section"] == section]
        if not recs:
            continue
        module = importlib.import_module(module_name)
        title = module.TITLES[section] + (f"  [{SMOKE_LABEL}]" if smoke else "")
        print(f"\n{'#### ' if markdown else '== '}{title}\n")
        print(module.table(recs, markdown))
    print()


def header(meta: dict) -> str:
    lines = [f"fastmoco bench  {meta['date']}  commit {meta['commit']}",
             f"device: {meta['device']['name']}" + (f", {meta['device'].get('memory_gib')} GiB"
                                                    if meta['device'].get('memory_gib') else ""),
             "versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
             f"command: {meta['command']}"]
    if meta.get("smoke"):
        lines.insert(0, f"*** {SMOKE_LABEL}: tiny shapes that keep the code working; no figure below is a "
                        "measurement ***")
    return "\n".join(lines)
