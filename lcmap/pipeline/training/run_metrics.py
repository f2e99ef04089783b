"""A run's training history: ``RUN_DIR/metrics.csv`` merged from Lightning's CSV logs (resumed
runs included), one row per epoch, and the ``loss.png`` plot (:class:`lcmap.pipeline.runs.RunFolder`
writes them; the epoch summary callback reads them)."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

__all__ = ["epoch_history", "flatten_metrics", "plot_history"]


def _float(value: str) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def flatten_metrics(run_dir: Path, write: bool = True) -> list[dict[str, str]]:
    """Merge ``logs/version_*/metrics.csv`` into ``RUN_DIR/metrics.csv``; return its rows.

    A resumed run logs into a new version; rows of an earlier version at or after the step where
    the next version starts (logged after the checkpoint that was resumed) are dropped.
    """
    versions = []
    for d in (run_dir / "logs").glob("version_*"):
        f = d / "metrics.csv"
        suffix = d.name.split("_", 1)[1]
        if f.is_file() and suffix.isdigit():
            versions.append((int(suffix), f))
    versions.sort()
    tables: list[list[dict[str, str]]] = []
    for _, f in versions:
        with open(f, newline="") as fh:
            tables.append(list(csv.DictReader(fh)))
    rows: list[dict[str, str]] = []
    columns: list[str] = []
    for i, table in enumerate(tables):
        later = [_float(r.get("step", "")) for t in tables[i + 1 :] for r in t]
        later_steps = [s for s in later if s is not None]
        cutoff = min(later_steps) if later_steps else math.inf
        for r in table:
            step = _float(r.get("step", ""))
            if step is not None and step >= cutoff:
                continue
            rows.append(r)
            for k in r:
                if k not in columns:
                    columns.append(k)
    if write:
        first = [c for c in ("epoch", "step") if c in columns]
        order = first + sorted(c for c in columns if c not in ("epoch", "step"))
        tmp = run_dir / ".metrics.csv.tmp"
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=order, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, run_dir / "metrics.csv")
    return rows


def epoch_history(rows: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Per-epoch values (epoch means of the training losses, validation scores) from metric rows."""
    by_epoch: dict[int, dict[str, Any]] = {}
    for r in rows:
        epoch = _float(r.get("epoch", ""))
        if epoch is None:
            continue
        entry = by_epoch.setdefault(int(epoch), {"epoch": int(epoch)})
        for key, value in r.items():
            v = _float(value)
            if v is None:
                continue
            if key.endswith("_epoch"):
                entry[key[: -len("_epoch")]] = v
            elif key in ("val_miou", "val_oa", "step"):
                entry[key] = v
    return [by_epoch[e] for e in sorted(by_epoch)]


def plot_history(history: list[dict[str, Any]], path: Path) -> None:
    """Loss curves (per epoch) and validation mIoU into a PNG (matplotlib Agg), atomically."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("loss", "total"), ("loss_ce", "CE head 1 (LR labels)"), ("loss_mce", "CE head 2 (PLAT mask)")):
        pts = [(h["epoch"] + 1, h[key]) for h in history if h.get(key) is not None]
        if pts:
            ax1.plot(*zip(*pts, strict=True), marker="o", label=label)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("training loss (epoch mean)")
    ax1.grid(alpha=0.3)
    if ax1.lines:
        ax1.legend()
    for key, label in (("val_miou", "val mIoU"), ("val_oa", "val OA")):
        pts = [(h["epoch"] + 1, h[key]) for h in history if h.get(key) is not None]
        if pts:
            ax2.plot(*zip(*pts, strict=True), marker="o", label=label)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("validation score (target classes)")
    ax2.set_ylim(0, 1)
    ax2.grid(alpha=0.3)
    if ax2.lines:
        ax2.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    os.replace(tmp, path)
