"""``lcmap evaluate``: score a predicted map against a high-resolution reference.

The map (written by ``lcmap predict``: uint8, nodata 0, legend in the ``LCMAP_LEGEND`` tag) is read
window by window on its own grid, so memory stays bounded whatever its size. The reference -- one
file or several (a mosaic: the first file that has data at a pixel wins) in any CRS and at any
resolution -- is brought onto the map's grid by nearest neighbour through a ``WarpedVRT``. Both are
translated into the common target classes (reference codes through ``--reference-legend``, map
codes through the map's legend tag, the default 4-class target codes 1-4 if the tag is absent).

Pixels are scored where the map and the reference both hold a class that maps to a target class
(nodata, untargeted classes such as snow, and pixels outside the AOI are left out). With a
baseline (the LR product the map was trained from), the baseline is scored on the *same* pixels --
those valid in the map, the reference and the baseline alike -- so the two scores compare fairly,
and the gain (map minus baseline) is reported.

REPORT_DIR receives ``metrics.json``, ``report.md`` and ``confusion.png`` (each written atomically).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.enums import MaskFlags, Resampling
from rasterio.errors import RasterioError
from rasterio.transform import Affine
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds
from rasterio.windows import Window
from rasterio.windows import transform as window_transform

from lcmap.geodata.aoi import AOI, rasterize_aoi, resolve_aoi
from lcmap.errors import LcmapInputError
from lcmap.geodata.legends import IGNORE_INDEX, Legend, get_legend, target_legend
from lcmap.pipeline.metrics import confusion_matrix, scores_from_confusion

__all__ = [
    "LEGEND_TAG",
    "MIOU_RULE",
    "LabelMosaic",
    "evaluate_map",
    "map_legend",
    "read_target_on_grid",
    "write_report",
]

#: GDAL metadata tag holding ``json.dumps(legend.to_dict())`` of the legend of a map's codes.
LEGEND_TAG = "LCMAP_LEGEND"

#: How mIoU is averaged (also written into metrics.json).
MIOU_RULE = (
    "mean IoU over the target classes present in the reference or in the prediction; "
    "a class absent from both is left out, a class predicted but absent from the reference counts "
    "with IoU 0"
)


# ---------------------------------------------------------------------------------------- inputs
def _as_paths(value: str | Path | Sequence[str | Path], what: str) -> list[Path]:
    items = [value] if isinstance(value, (str, Path)) else list(value)
    if not items:
        raise LcmapInputError(f"no {what} file given")
    paths = [Path(p) for p in items]
    for p in paths:
        if not p.exists():
            raise LcmapInputError(f"{what} {p} does not exist")
        if p.is_dir():
            raise LcmapInputError(f"{what} {p} is a folder: pass raster files (GeoTIFF)")
    return paths


def _open_raster(path: Path, what: str) -> rasterio.DatasetReader:
    """Open a georeferenced raster, or raise LcmapInputError naming the file and what to do."""
    try:
        src = rasterio.open(path)
    except RasterioError as exc:
        raise LcmapInputError(
            f"{what} {path} is not a readable raster ({exc}). It may be truncated or not a "
            "GeoTIFF: write it again or pass another file."
        ) from exc
    if src.crs is None:
        src.close()
        raise LcmapInputError(
            f"{what} {path} has no CRS, so it cannot be placed on the map. Assign one "
            "(e.g. gdal_edit.py -a_srs EPSG:XXXX) and try again."
        )
    return src


def _as_legend(legend: Legend | str | Path) -> Legend:
    return legend if isinstance(legend, Legend) else get_legend(legend)


def map_legend(src: rasterio.io.DatasetReader, source: str | Path) -> Legend:
    """The legend of a map's codes: its ``LCMAP_LEGEND`` tag, else the default 4-class target."""
    text = src.tags().get(LEGEND_TAG)
    if not text:
        return target_legend()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LcmapInputError(
            f"map {source}: its {LEGEND_TAG} tag is not valid JSON ({exc}). Write the map again "
            "with 'lcmap predict' or remove the tag to read it as 4-class target codes."
        ) from exc
    return Legend.from_dict(data, source=f"{source} ({LEGEND_TAG} tag)")


def _check_same_target(a: Legend, b: Legend, what_a: str, what_b: str) -> None:
    if a.target.names != b.target.names:
        raise LcmapInputError(
            f"{what_a} and {what_b} use different target classes ({', '.join(a.target.names)} vs "
            f"{', '.join(b.target.names)}): give legends that map onto the same target scheme."
        )


# ---------------------------------------------------------------------------------------- reading
def _valid_mask(ds: Any, data: np.ndarray, window: Window | None) -> np.ndarray:
    """True where band 1 of ``ds`` holds data (per its nodata value, mask or alpha band)."""
    flags = ds.mask_flag_enums[0]
    if MaskFlags.all_valid in flags:
        return np.ones(data.shape, dtype=bool)
    if MaskFlags.nodata in flags and ds.nodata is not None:
        if isinstance(ds.nodata, float) and math.isnan(ds.nodata):
            return ~np.isnan(data)
        return data != ds.nodata
    return ds.read_masks(1, window=window) > 0


def _encode(codes: np.ndarray, legend: Legend, source: str | Path) -> np.ndarray:
    """Legend indices of ``codes`` (nodata -> IGNORE_INDEX); unknown codes -> UnknownLabelError."""
    return legend.encode(codes, source=source)


def _pixel_bbox(bounds: tuple[float, float, float, float], transform: Affine,
                width: int, height: int) -> tuple[int, int, int, int] | None:
    """(row0, col0, row1, col1) of ``bounds`` (grid CRS) clipped to the grid; None if outside."""
    inv = ~transform
    xmin, ymin, xmax, ymax = bounds
    cols, rows = zip(*(inv @ (x, y) for x in (xmin, xmax) for y in (ymin, ymax)))
    r0, r1 = max(math.floor(min(rows)), 0), min(math.ceil(max(rows)), height)
    c0, c1 = max(math.floor(min(cols)), 0), min(math.ceil(max(cols)), width)
    if r0 >= r1 or c0 >= c1:
        return None
    return r0, c0, r1, c1


def _bbox_meets(bbox: tuple[int, int, int, int] | None, window: Window) -> bool:
    if bbox is None:
        return False
    r0, c0, r1, c1 = bbox
    return (r0 < window.row_off + window.height and window.row_off < r1
            and c0 < window.col_off + window.width and window.col_off < c1)


class LabelMosaic:
    """Label rasters (one file or a mosaic) read on a target grid as target-class indices.

    Each file is reprojected onto the grid (``crs``, ``transform``, ``width``, ``height``) by
    nearest neighbour through a :class:`~rasterio.vrt.WarpedVRT`; where files overlap, the first
    one holding a legend class (not nodata) wins. Use as a context manager.

    Args:
        paths: the label files.
        legend: the legend of their codes.
        crs, transform, width, height: the grid to read on (typically the map's).
        what: the files' role, for messages (``reference``, ``baseline``).
    """

    def __init__(self, paths: Sequence[str | Path], legend: Legend, crs: CRS | str,
                 transform: Affine, width: int, height: int, what: str = "reference") -> None:
        self.paths = _as_paths(paths, what)
        self.legend = legend
        self.what = what
        self.shape = (int(height), int(width))
        self._index_to_target = legend.index_to_target_lut()
        self._sources: list[rasterio.DatasetReader] = []
        self._vrts: list[WarpedVRT] = []
        self.bboxes: list[tuple[int, int, int, int] | None] = []
        crs = CRS.from_user_input(crs)
        try:
            for path in self.paths:
                src = _open_raster(path, what)
                self._sources.append(src)
                kwargs: dict[str, Any] = dict(crs=crs, transform=transform, width=int(width),
                                              height=int(height), resampling=Resampling.nearest)
                if src.nodata is None:
                    kwargs["add_alpha"] = True  # so that pixels off the file read as masked
                self._vrts.append(WarpedVRT(src, **kwargs))
                try:
                    grid_bounds = transform_bounds(src.crs, crs, *src.bounds, densify_pts=21)
                    self.bboxes.append(_pixel_bbox(grid_bounds, transform, int(width), int(height)))
                except Exception:  # a rotated grid or a projection error: read it everywhere
                    self.bboxes.append((0, 0, int(height), int(width)))
        except BaseException:
            self.close()
            raise

    @property
    def overlaps_grid(self) -> bool:
        """Whether any file's footprint meets the grid."""
        return any(b is not None for b in self.bboxes)

    def meets(self, window: Window) -> bool:
        """Whether any file's footprint meets ``window`` (cheap bounding-box test)."""
        return any(_bbox_meets(b, window) for b in self.bboxes)

    def read(self, window: Window | None = None) -> np.ndarray:
        """Target indices (uint8) in ``window`` of the grid; IGNORE_INDEX where there is no class.

        Raises:
            UnknownLabelError: a file holds codes its legend does not define (listed, with the file).
            LcmapInputError: a file cannot be read.
        """
        if window is None:
            window = Window(0, 0, self.shape[1], self.shape[0])
        shape = (int(window.height), int(window.width))
        out = np.full(shape, IGNORE_INDEX, dtype=np.uint8)
        filled = np.zeros(shape, dtype=bool)
        for path, vrt, bbox in zip(self.paths, self._vrts, self.bboxes):
            if not _bbox_meets(bbox, window):
                continue
            try:
                data = vrt.read(1, window=window)
                valid = _valid_mask(vrt, data, window)
            except RasterioError as exc:
                raise LcmapInputError(
                    f"{self.what} {path} could not be read ({exc}); it may be truncated or corrupt"
                ) from exc
            valid &= ~filled
            if not valid.any():
                continue
            idx = _encode(data[valid], self.legend, path)
            has_class = idx != IGNORE_INDEX
            sel = np.flatnonzero(valid.ravel())[has_class]
            out.ravel()[sel] = self._index_to_target[idx[has_class]]
            filled.ravel()[sel] = True
            if filled.all():
                break
        return out

    def close(self) -> None:
        for ds in (*self._vrts, *self._sources):
            try:
                ds.close()
            except Exception:
                pass
        self._vrts, self._sources = [], []

    def __enter__(self) -> "LabelMosaic":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_target_on_grid(paths: Sequence[str | Path] | str | Path, legend: Legend, crs: CRS | str,
                        transform: Affine, width: int, height: int,
                        window: Window | None = None) -> np.ndarray:
    """Label file(s) in ``legend`` codes read on a grid as target indices (uint8).

    Nearest-neighbour reprojection; several files form a mosaic (first file with a class wins).
    IGNORE_INDEX marks nodata, untargeted classes and pixels off the files. ``window`` (a
    rasterio Window of the grid; None = the whole grid) selects the part to read.
    """
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    with LabelMosaic(paths, legend, crs, transform, width, height) as mosaic:
        return mosaic.read(window)


def _read_map_target(src: rasterio.DatasetReader, legend: Legend, lut: np.ndarray,
                     window: Window, source: str | Path) -> np.ndarray:
    """The map's target indices in ``window`` (its own grid); IGNORE_INDEX where no class."""
    try:
        data = src.read(1, window=window)
        valid = _valid_mask(src, data, window)
    except RasterioError as exc:
        raise LcmapInputError(f"map {source} could not be read ({exc}); it may be truncated") from exc
    out = np.full(data.shape, IGNORE_INDEX, dtype=np.uint8)
    if valid.any():
        out[valid] = lut[_encode(data[valid], legend, source)]
    return out


def _windows(height: int, width: int, block_px: int) -> Iterator[Window]:
    for row in range(0, height, block_px):
        for col in range(0, width, block_px):
            yield Window(col, row, min(block_px, width - col), min(block_px, height - row))


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), disable=not enabled)


# ---------------------------------------------------------------------------------------- scoring
def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def evaluate_map(
    map_path: str | Path,
    reference: str | Path | Sequence[str | Path],
    reference_legend: Legend | str | Path,
    out_dir: str | Path,
    baseline: str | Path | Sequence[str | Path] | None = None,
    baseline_legend: Legend | str | Path | None = None,
    aoi: AOI | str | Path | None = None,
    block_px: int = 2048,
    progress: bool = True,
) -> dict[str, Any]:
    """Score a map against an HR reference (and optionally an LR baseline) on the target classes.

    Args:
        map_path: the map written by ``lcmap predict`` (its grid is the scoring grid).
        reference: the HR reference label file(s); several files form a mosaic.
        reference_legend: legend of the reference codes (a Legend, a built-in name or a YAML file).
        out_dir: REPORT_DIR, created; receives metrics.json, report.md and confusion.png.
        baseline: the LR label file(s) to compare with, scored on the same pixels.
        baseline_legend: legend of the baseline codes (required with ``baseline``).
        aoi: score only inside this area (an :class:`~lcmap.geodata.aoi.AOI` or a polygon file).
        block_px: side of the square windows the map is read in (bounds memory).
        progress: show a progress bar over the windows (on stderr).

    Returns:
        The metrics dict also written to ``metrics.json``: ``oa``, ``miou``, ``kappa``,
        ``per_class``, ``confusion`` (rows = reference, cols = map), ``class_names``, ``pixels``
        (pixels scored), ``map``, ``reference`` (list of files), ``map_legend``,
        ``reference_legend``, ``aoi``, ``miou_rule``; with a baseline also ``baseline`` (the same
        scores, ``pixels``, ``files``, ``legend``) and ``gain`` (``{oa, miou, kappa}``, map minus
        baseline; None where either is undefined).

    Raises:
        LcmapInputError: missing/corrupt files, no CRS, a reference/baseline/AOI that does not
            overlap the map, no pixel valid in all inputs, incompatible legends.
        UnknownLabelError: codes outside their legend (the message lists them and the file).
    """
    if int(block_px) < 1:
        raise LcmapInputError(f"block size must be a positive number of pixels, got {block_px}")
    block_px = int(block_px)
    map_path = Path(map_path)
    ref_paths = _as_paths(reference, "reference")
    ref_legend = _as_legend(reference_legend)
    base_paths: list[Path] | None = None
    base_legend: Legend | None = None
    if baseline is not None:
        base_paths = _as_paths(baseline, "baseline")
        if baseline_legend is None:
            raise LcmapInputError(
                "--baseline needs --baseline-legend: the legend of the LR product's codes "
                "(e.g. nlcd, worldcover, or a YAML legend file)"
            )
        base_legend = _as_legend(baseline_legend)
    if isinstance(aoi, (str, Path)):
        aoi = resolve_aoi(aoi, None)

    if not map_path.exists():
        raise LcmapInputError(f"map {map_path} does not exist: pass the GeoTIFF written by 'lcmap predict'")
    with _open_raster(map_path, "map") as src:
        legend = map_legend(src, map_path)
        class_names = ref_legend.target.names
        _check_same_target(ref_legend, legend, f"reference legend {ref_legend.name!r}",
                           f"the map's legend {legend.name!r}")
        if base_legend is not None:
            _check_same_target(ref_legend, base_legend, f"reference legend {ref_legend.name!r}",
                               f"baseline legend {base_legend.name!r}")
        num_classes = len(class_names)
        map_lut = legend.index_to_target_lut()
        grid = dict(crs=src.crs, transform=src.transform, width=src.width, height=src.height)

        aoi_geom = None
        aoi_bbox: tuple[int, int, int, int] | None = (0, 0, src.height, src.width)
        if aoi is not None:
            aoi.check_overlap(tuple(src.bounds), src.crs, f"the map {map_path}")
            aoi_geom = aoi.to_crs(src.crs)
            aoi_bbox = _pixel_bbox(aoi_geom.bounds, src.transform, src.width, src.height)

        cm_map = np.zeros((num_classes, num_classes), dtype=np.int64)
        cm_base = np.zeros_like(cm_map)
        with LabelMosaic(ref_paths, ref_legend, what="reference", **grid) as ref_mosaic, \
                _maybe_mosaic(base_paths, base_legend, grid) as base_mosaic:
            _check_overlap(ref_mosaic, "reference", map_path, src)
            if base_mosaic is not None:
                _check_overlap(base_mosaic, "baseline", map_path, src)
            windows = [w for w in _windows(src.height, src.width, block_px)
                       if _bbox_meets(aoi_bbox, w) and ref_mosaic.meets(w)
                       and (base_mosaic is None or base_mosaic.meets(w))]
            with _progress(progress) as bar:
                task = bar.add_task("Scoring", total=len(windows))
                for window in windows:
                    pred = _read_map_target(src, legend, map_lut, window, map_path)
                    valid = pred != IGNORE_INDEX
                    if aoi_geom is not None and valid.any():
                        valid &= rasterize_aoi(aoi_geom, window_transform(window, src.transform),
                                               valid.shape)
                    if valid.any():
                        truth = ref_mosaic.read(window)
                        valid &= truth != IGNORE_INDEX
                    if valid.any() and base_mosaic is not None:
                        base = base_mosaic.read(window)
                        valid &= base != IGNORE_INDEX
                    if valid.any():
                        cm_map += confusion_matrix(truth[valid], pred[valid], num_classes)
                        if base_mosaic is not None:
                            cm_base += confusion_matrix(truth[valid], base[valid], num_classes)
                    bar.advance(task)

    pixels = int(cm_map.sum())
    if pixels == 0:
        inputs = "map and reference" + (" and baseline" if base_paths else "")
        raise LcmapInputError(
            f"no pixel holds a target class in the {inputs} alike"
            + (f" inside the AOI ({aoi.source})" if aoi is not None else "")
            + f": map {map_path}, reference {', '.join(map(str, ref_paths))}. Check that they "
            "cover the same area and that the legends are right (nodata and untargeted classes "
            "are not scored)."
        )

    metrics: dict[str, Any] = scores_from_confusion(cm_map, class_names)
    metrics.update({
        "pixels": pixels,
        "map": str(map_path),
        "map_legend": legend.name,
        "reference": [str(p) for p in ref_paths],
        "reference_legend": ref_legend.name,
        "aoi": aoi.source if aoi is not None else None,
        "miou_rule": MIOU_RULE,
    })
    if base_paths is not None and base_legend is not None:
        base_scores = scores_from_confusion(cm_base, class_names)
        base_scores.update({"pixels": int(cm_base.sum()), "files": [str(p) for p in base_paths],
                            "legend": base_legend.name})
        metrics["baseline"] = base_scores
        metrics["gain"] = {k: _diff(metrics[k], base_scores[k]) for k in ("oa", "miou", "miou_reference_classes", "kappa")}

    write_report(metrics, out_dir)
    return metrics


def _maybe_mosaic(paths: list[Path] | None, legend: Legend | None, grid: dict[str, Any]):
    if paths is None or legend is None:
        return contextlib.nullcontext()
    return LabelMosaic(paths, legend, what="baseline", **grid)


def _check_overlap(mosaic: LabelMosaic, what: str, map_path: Path, src: rasterio.DatasetReader) -> None:
    if mosaic.overlaps_grid:
        return
    details = []
    for p, s in zip(mosaic.paths, mosaic._sources):
        details.append(f"{p}: bounds {tuple(round(v, 3) for v in s.bounds)} in {s.crs.to_string()}")
    raise LcmapInputError(
        f"the {what} does not overlap the map {map_path} (map bounds "
        f"{tuple(round(v, 3) for v in src.bounds)} in {src.crs.to_string()}; "
        + "; ".join(details) + f"). Pass {what} files that cover the mapped area."
    )


# ---------------------------------------------------------------------------------------- report
def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


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


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _per_class_table(scores: dict[str, Any]) -> list[str]:
    lines = ["| class | IoU | precision | recall | F1 | reference px |",
             "|---|---:|---:|---:|---:|---:|"]
    for name in scores["class_names"]:
        c = scores["per_class"][name]
        lines.append(f"| {name} | {_fmt(c['iou'])} | {_fmt(c['precision'])} | {_fmt(c['recall'])} "
                     f"| {_fmt(c['f1'])} | {c['support_px']:,} |")
    return lines


def _confusion_table(scores: dict[str, Any], pred_label: str) -> list[str]:
    names = scores["class_names"]
    cm = np.asarray(scores["confusion"], dtype=np.int64)
    lines = [f"| reference \\ {pred_label} | " + " | ".join(names) + " | total |",
             "|---|" + "---:|" * (len(names) + 1)]
    for i, name in enumerate(names):
        lines.append(f"| {name} | " + " | ".join(f"{int(v):,}" for v in cm[i])
                     + f" | {int(cm[i].sum()):,} |")
    lines.append("| total | " + " | ".join(f"{int(v):,}" for v in cm.sum(axis=0))
                 + f" | {int(cm.sum()):,} |")
    return lines


def _markdown(m: dict[str, Any]) -> str:
    base = m.get("baseline")
    lines = ["# lcmap evaluate", ""]
    lines.append(f"- Map: `{m['map']}` (legend {m.get('map_legend', 'n/a')})")
    lines.append(f"- Reference: {', '.join(f'`{p}`' for p in m['reference'])} "
                 f"(legend {m.get('reference_legend', 'n/a')})")
    if base:
        lines.append(f"- Baseline: {', '.join(f'`{p}`' for p in base.get('files', []))} "
                     f"(legend {base.get('legend', 'n/a')})")
    if m.get("aoi"):
        lines.append(f"- AOI: {m['aoi']}")
    inputs = "map, reference and baseline" if base else "map and reference"
    lines.append(f"- Pixels scored: {m['pixels']:,} (a target class in the {inputs} alike"
                 + (", inside the AOI" if m.get("aoi") else "") + ")")
    lines.append(f"- mIoU: {m.get('miou_rule', MIOU_RULE)}")
    lines += ["", "## Overall", "", "| | OA | mIoU | kappa |", "|---|---:|---:|---:|",
              f"| map | {_fmt(m['oa'])} | {_fmt(m['miou'])} | {_fmt(m['kappa'])} |"]
    if base:
        g = m["gain"]
        lines.append(f"| baseline | {_fmt(base['oa'])} | {_fmt(base['miou'])} | {_fmt(base['kappa'])} |")
        lines.append(f"| gain (map - baseline) | {_fmt(g['oa'], True)} | {_fmt(g['miou'], True)} "
                     f"| {_fmt(g['kappa'], True)} |")
        lines += ["", f"mIoU over the classes present in the reference (the same classes for map and "
                      f"baseline): map {_fmt(m.get('miou_reference_classes'))}, baseline "
                      f"{_fmt(base.get('miou_reference_classes'))}, gain {_fmt(g.get('miou_reference_classes'), True)}."]
    lines += ["", "## Per class: map", ""] + _per_class_table(m)
    if base:
        lines += ["", "## Per class: baseline", ""] + _per_class_table(base)
    lines += ["", "## Confusion matrix: map (pixels; rows = reference, columns = map)", ""]
    lines += _confusion_table(m, "map")
    if base:
        lines += ["", "## Confusion matrix: baseline (pixels; rows = reference, columns = baseline)", ""]
        lines += _confusion_table(base, "baseline")
    return "\n".join(lines) + "\n"


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
    for ax, (label, scores) in zip(axes, panels):
        cm = np.asarray(scores["confusion"], dtype=np.float64)
        rows = cm.sum(axis=1, keepdims=True)
        norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
        image = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{norm[i, j]:.0%}\n{_short_count(int(cm[i, j]))}", ha="center",
                        va="center", fontsize=8, color="white" if norm[i, j] > 0.5 else "black")
        ax.set_xticks(range(n), names, rotation=30, ha="right")
        ax.set_yticks(range(n), names)
        ax.set_xlabel(label)
        ax.set_ylabel("reference")
        ax.set_title(f"{label}: OA {_fmt(scores['oa'])}, mIoU {_fmt(scores['miou'])}, "
                     f"kappa {_fmt(scores['kappa'])}", fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=list(axes), shrink=0.8, label="share of the reference row")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
