"""The report of ``lcmap evaluate``: ``metrics.json``, ``report.md`` and ``confusion.png``.

:func:`write_report` writes the three files into REPORT_DIR, each atomically (a temporary file
renamed into place), from the metrics dict of :func:`lcmap.pipeline.analysis.evaluate.evaluate_map`.
:func:`format_score` is the one way scores are printed (``n/a`` where undefined).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from lcmap.errors import LcmapInputError
from lcmap.pipeline.metrics import MIOU_RULE

__all__ = ["format_score", "write_report"]


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


#: The files :func:`write_report` writes into REPORT_DIR.
REPORT_FILES = ("metrics.json", "report.md", "confusion.png")


def write_report(metrics: dict[str, Any], out_dir: str | Path) -> None:
    """Write ``metrics.json``, ``report.md`` and ``confusion.png`` into ``out_dir`` (created)."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LcmapInputError(f"cannot create the report folder {out}: {exc}") from exc
    _atomic_write(out / "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode())
    _atomic_write(out / "report.md", _markdown(metrics).encode())
    _atomic_write(out / "confusion.png", _confusion_png(metrics))


def format_score(value: float | None, signed: bool = False) -> str:
    """A score with 3 decimals (``+`` sign with ``signed``); ``n/a`` where it is undefined (None).

    A value that rounds to zero prints as ``0.000`` (``+0.000``), never ``-0.000``.
    """
    if value is None:
        return "n/a"
    value = round(float(value), 3) + 0.0  # + 0.0 turns -0.0 into 0.0
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _per_class_table(scores: dict[str, Any]) -> list[str]:
    lines = ["| class | IoU | precision | recall | F1 | reference px |", "|---|---:|---:|---:|---:|---:|"]
    for name in scores["class_names"]:
        c = scores["per_class"][name]
        lines.append(
            f"| {name} | {format_score(c['iou'])} | {format_score(c['precision'])} | {format_score(c['recall'])} "
            f"| {format_score(c['f1'])} | {c['support_px']:,} |"
        )
    return lines


def _confusion_table(scores: dict[str, Any], pred_label: str) -> list[str]:
    names = scores["class_names"]
    cm = np.asarray(scores["confusion"], dtype=np.int64)
    lines = [f"| reference \\ {pred_label} | " + " | ".join(names) + " | total |", "|---|" + "---:|" * (len(names) + 1)]
    for i, name in enumerate(names):
        lines.append(f"| {name} | " + " | ".join(f"{int(v):,}" for v in cm[i]) + f" | {int(cm[i].sum()):,} |")
    lines.append("| total | " + " | ".join(f"{int(v):,}" for v in cm.sum(axis=0)) + f" | {int(cm.sum()):,} |")
    return lines


def _markdown(m: dict[str, Any]) -> str:
    base = m.get("baseline")
    lines = ["# lcmap evaluate", ""]
    lines.append(f"- Map: `{m['map']}` (legend {m.get('map_legend', 'n/a')})")
    lines.append(
        f"- Reference: {', '.join(f'`{p}`' for p in m['reference'])} (legend {m.get('reference_legend', 'n/a')})"
    )
    if base:
        lines.append(
            f"- Baseline: {', '.join(f'`{p}`' for p in base.get('files', []))} (legend {base.get('legend', 'n/a')})"
        )
    if m.get("aoi"):
        lines.append(f"- AOI: {m['aoi']}")
    inputs = "map, reference and baseline" if base else "map and reference"
    lines.append(
        f"- Pixels scored: {m['pixels']:,} (a target class in the {inputs} alike"
        + (", inside the AOI" if m.get("aoi") else "")
        + ")"
    )
    lines.append(f"- mIoU: {m.get('miou_rule', MIOU_RULE)}")
    lines += [
        "",
        "## Overall",
        "",
        "| | OA | mIoU | kappa |",
        "|---|---:|---:|---:|",
        f"| map | {format_score(m['oa'])} | {format_score(m['miou'])} | {format_score(m['kappa'])} |",
    ]
    if base:
        g = m["gain"]
        lines.append(
            f"| baseline | {format_score(base['oa'])} | {format_score(base['miou'])} | {format_score(base['kappa'])} |"
        )
        lines.append(
            f"| gain (map - baseline) | {format_score(g['oa'], True)} | {format_score(g['miou'], True)} "
            f"| {format_score(g['kappa'], True)} |"
        )
        lines += [
            "",
            f"mIoU over the classes present in the reference (the same classes for map and "
            f"baseline): map {format_score(m.get('miou_reference_classes'))}, baseline "
            f"{format_score(base.get('miou_reference_classes'))}, "
            f"gain {format_score(g.get('miou_reference_classes'), True)}.",
        ]
    lines += _area_table(m)
    lines += ["", "## Per class: map", ""] + _per_class_table(m)
    if base:
        lines += ["", "## Per class: baseline", ""] + _per_class_table(base)
    lines += ["", "## Confusion matrix: map (pixels; rows = reference, columns = map)", ""]
    lines += _confusion_table(m, "map")
    if base:
        lines += ["", "## Confusion matrix: baseline (pixels; rows = reference, columns = baseline)", ""]
        lines += _confusion_table(base, "baseline")
    return "\n".join(lines) + "\n"


def _area_table(m: dict[str, Any]) -> list[str]:
    """km² of each class over the scored pixels (map, reference, baseline); none for older metrics."""
    areas = m.get("area_km2")
    if not areas:
        return []
    who = [w for w in ("map", "reference", "baseline") if w in areas]
    lines = ["", "## Area per class (km², scored pixels)", "", "| class | " + " | ".join(who) + " |"]
    lines.append("|---|" + "---:|" * len(who))
    for name in m["class_names"]:
        lines.append(f"| {name} | " + " | ".join(f"{areas[w].get(name, 0.0):.6f}" for w in who) + " |")
    lines.append("| total | " + " | ".join(f"{sum(areas[w].values()):.6f}" for w in who) + " |")
    return lines


def _short_count(n: int) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.1f}{suffix}"
    return str(n)


def _confusion_png(m: dict[str, Any]) -> bytes:
    """Row-normalised confusion matrix (map, and baseline beside it) as PNG bytes (Agg)."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [("map", m)] + ([("baseline", m["baseline"])] if m.get("baseline") else [])
    names = m["class_names"]
    n = len(names)
    side = max(4.0, 0.9 * n + 2.0)
    fig = Figure(figsize=(side * len(panels) + 1.5, side), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    image = None
    for ax, (label, scores) in zip(axes, panels, strict=False):
        cm = np.asarray(scores["confusion"], dtype=np.float64)
        rows = cm.sum(axis=1, keepdims=True)
        norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
        image = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
        for i in range(n):
            for j in range(n):
                ax.text(
                    j,
                    i,
                    f"{norm[i, j]:.0%}\n{_short_count(int(cm[i, j]))}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if norm[i, j] > 0.5 else "black",
                )
        ax.set_xticks(range(n), names, rotation=30, ha="right")
        ax.set_yticks(range(n), names)
        ax.set_xlabel(label)
        ax.set_ylabel("reference")
        ax.set_title(
            f"{label}: OA {format_score(scores['oa'])}, mIoU {format_score(scores['miou'])}, "
            f"kappa {format_score(scores['kappa'])}",
            fontsize=9,
        )
    if image is not None:
        fig.colorbar(image, ax=list(axes), shrink=0.8, label="share of the reference row")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
