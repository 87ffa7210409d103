"""Reference timings: the figures this project measured per device, and the check against them.

bench/reference_timings.json:

    {"tolerance": 0.10,
     "devices": {"NVIDIA H100 80GB HBM3": {
         "model/vit_base/fused/b256/img_per_s": {"value": 1234.5, "commit": "...", "date": "..."},
         ...}}}

A figure's key names section, entry, build, shape and metric, so a run at
another batch or shape is never held to it. Every figure is higher-is-better
(images/s, kernel calls/s). A run fails the check when one of its figures
falls more than `tolerance` below the reference; figures the run did not
measure are listed, not failed. Smoke runs are never compared nor stored.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_PATH = Path(__file__).resolve().parent / "reference_timings.json"
DEFAULT_TOLERANCE = 0.10


def figure_key(rec: dict, metric: str) -> str:
    shape = rec.get("shape") or (f"b{rec['batch']}" if rec.get("batch") else "-")
    return f"{rec['section']}/{rec['name']}/{rec.get('build', '-')}/{shape}/{metric}"


def run_figures(records: list[dict]) -> dict[str, float]:
    """{figure key: value} of every measured figure of a run."""
    out = {}
    for rec in records:
        if rec.get("status") == "ok":
            for metric, value in (rec.get("figures") or {}).items():
                if value is not None:
                    out[figure_key(rec, metric)] = float(value)
    return out


def load(path: Path = DEFAULT_PATH) -> dict:
    if not Path(path).is_file():
        return {"tolerance": DEFAULT_TOLERANCE, "devices": {}}
    ref = json.loads(Path(path).read_text())
    ref.setdefault("tolerance", DEFAULT_TOLERANCE)
    ref.setdefault("devices", {})
    return ref


@dataclass
class Comparison:
    device: str
    tolerance: float
    has_reference: bool
    regressions: list[tuple[str, float, float]] = field(default_factory=list)  # key, now, reference
    passed: list[tuple[str, float, float]] = field(default_factory=list)
    not_measured: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)  # measured, no reference yet

    @property
    def ok(self) -> bool:
        return not self.regressions

    def report(self) -> str:
        if not self.has_reference:
            return (f"reference: no figures for device {self.device!r} in the reference file; nothing compared "
                    f"({len(self.new)} figures could be added with --update)")
        lines = [f"reference: {len(self.passed) + len(self.regressions)} figures compared for {self.device!r}, "
                 f"tolerance {self.tolerance:.0%} below reference"]
        for key, now, ref in self.regressions:
            lines.append(f"  REGRESSION {key}: {now:.4g} vs reference {ref:.4g} ({now / ref - 1:+.1%})")
        for key, now, ref in self.passed:
            lines.append(f"  ok         {key}: {now:.4g} vs reference {ref:.4g} ({now / ref - 1:+.1%})")
        if self.not_measured:
            lines.append(f"  not measured in this run: {len(self.not_measured)} reference figures")
        if self.new:
            lines.append(f"  new (no reference yet): {', '.join(self.new)}")
        lines.append("reference check: " + ("PASSED" if self.ok else
                                            f"FAILED ({len(self.regressions)} figure(s) below tolerance)"))
        return "\n".join(lines)


def compare(records: list[dict], device: str, ref: dict, tolerance: float | None = None) -> Comparison:
    tol = ref.get("tolerance", DEFAULT_TOLERANCE) if tolerance is None else tolerance
    figures = run_figures(records)
    dev_ref = ref.get("devices", {}).get(device)
    cmp = Comparison(device, tol, dev_ref is not None)
    if dev_ref is None:
        cmp.new = sorted(figures)
        return cmp
    for key, entry in sorted(dev_ref.items()):
        value = entry["value"] if isinstance(entry, dict) else float(entry)
        if key not in figures:
            cmp.not_measured.append(key)
        elif figures[key] < value * (1 - tol):
            cmp.regressions.append((key, figures[key], value))
        else:
            cmp.passed.append((key, figures[key], value))
    cmp.new = sorted(set(figures) - set(dev_ref))
    return cmp


def update(records: list[dict], meta: dict, ref: dict) -> tuple[dict, int]:
    """The reference with this run's figures written for its device (others kept); and how many."""
    if meta.get("smoke"):
        raise ValueError("a smoke run is not a measurement: its figures never go into the reference")
    device = meta["device"]["name"]
    dev_ref = ref.setdefault("devices", {}).setdefault(device, {})
    figures = run_figures(records)
    for key, value in figures.items():
        dev_ref[key] = {"value": round(value, 4), "commit": meta.get("commit", ""), "date": meta.get("date", "")}
    ref.setdefault("tolerance", DEFAULT_TOLERANCE)
    return ref, len(figures)


def save(ref: dict, path: Path = DEFAULT_PATH) -> None:
    devices = {d: dict(sorted(f.items())) for d, f in sorted(ref.get("devices", {}).items())}
    Path(path).write_text(json.dumps({"tolerance": ref.get("tolerance", DEFAULT_TOLERANCE), "devices": devices},
                                     indent=1) + "\n")
