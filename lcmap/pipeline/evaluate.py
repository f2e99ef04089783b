"""``lcmap evaluate``: score a predicted map against a high-resolution reference.

The map (written by ``lcmap predict``: uint8, nodata 0, legend in the ``LCMAP_LEGEND`` tag) is read
window by window on its own grid, so memory stays bounded whatever its size. The reference -- one
file or several (files, folders, quoted globs, ``.txt`` lists: :mod:`lcmap.geodata.io`) in any CRS
and at any resolution -- is brought onto the map's grid by nearest neighbour through a
:class:`~lcmap.geodata.io.LabelMosaic` (where files overlap, the first file in sorted path order
holding a label wins). Both are translated into the common target classes (reference codes through
``--reference-legend``, map codes through the map's legend tag, the default 4-class target codes 1-4
if the tag is absent).

Pixels are scored where the map and the reference both hold a class that maps to a target class
(nodata, untargeted classes such as snow, and pixels outside the AOI are left out). With a
baseline (the LR product the map was trained from), the baseline is scored on the *same* pixels --
those valid in the map, the reference and the baseline alike -- so the two scores compare fairly,
and the gain (map minus baseline) is reported.

REPORT_DIR receives ``metrics.json``, ``report.md`` and ``confusion.png``
(:mod:`lcmap.pipeline.evaluate_report`).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.errors import RasterioError
from rasterio.transform import Affine
from rasterio.windows import Window

from lcmap.errors import LcmapInputError
from lcmap.geodata.aoi import AOI, rasterize_aoi, resolve_aoi
from lcmap.geodata.io import Grid, LabelMosaic, check_not_an_input, open_raster, valid_mask
from lcmap.geodata.legends import IGNORE_INDEX, Legend, get_legend, target_legend
from lcmap.pipeline.cog import LEGEND_TAG
from lcmap.pipeline.evaluate_report import REPORT_FILES, format_score, write_report
from lcmap.pipeline.metrics import MIOU_RULE, confusion_matrix, scores_from_confusion

__all__ = [
    "LEGEND_TAG",
    "MIOU_RULE",
    "evaluate_map",
    "format_score",
    "map_legend",
    "read_target_on_grid",
    "write_report",
]


# ---------------------------------------------------------------------------------------- inputs
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
def _pixel_bbox(
    bounds: tuple[float, float, float, float], transform: Affine, width: int, height: int
) -> tuple[int, int, int, int] | None:
    """(row0, col0, row1, col1) of ``bounds`` (grid CRS) clipped to the grid; None if outside."""
    inv = ~transform
    xmin, ymin, xmax, ymax = bounds
    cols, rows = zip(*(inv @ (x, y) for x in (xmin, xmax) for y in (ymin, ymax)), strict=False)
    r0, r1 = max(math.floor(min(rows)), 0), min(math.ceil(max(rows)), height)
    c0, c1 = max(math.floor(min(cols)), 0), min(math.ceil(max(cols)), width)
    if r0 >= r1 or c0 >= c1:
        return None
    return r0, c0, r1, c1


def _bbox_meets(bbox: tuple[int, int, int, int] | None, window: Window) -> bool:
    if bbox is None:
        return False
    r0, c0, r1, c1 = bbox
    return (
        r0 < window.row_off + window.height
        and window.row_off < r1
        and c0 < window.col_off + window.width
        and window.col_off < c1
    )


def read_target_on_grid(
    paths: Sequence[str | Path] | str | Path,
    legend: Legend,
    crs: CRS | str,
    transform: Affine,
    width: int,
    height: int,
    window: Window | None = None,
) -> np.ndarray:
    """Label file(s) in ``legend`` codes read on a grid as target indices (uint8 ``(H, W)``).

    Nearest-neighbour reprojection; several files (or folders, globs, ``.txt`` lists) form a mosaic
    (the first file in sorted path order holding a label wins). IGNORE_INDEX marks nodata,
    untargeted classes and pixels off the files. ``window`` (a rasterio Window of the grid; None =
    the whole grid) selects the part to read.
    """
    grid = Grid.of(crs, transform, width, height)
    if window is not None:
        grid = grid.window(window)
    with LabelMosaic(paths, what="reference", no_label_codes=legend.nodata) as mosaic:
        return mosaic.read_target(grid, legend, option="--reference-legend")


def _read_map_target(
    src: rasterio.DatasetReader, legend: Legend, lut: np.ndarray, window: Window, source: str | Path
) -> np.ndarray:
    """The map's target indices in ``window`` (its own grid); IGNORE_INDEX where no class."""
    try:
        data = src.read(1, window=window)
        valid = valid_mask(src, data, window)
    except RasterioError as exc:
        raise LcmapInputError(f"map {source} could not be read ({exc}); it may be truncated") from exc
    out = np.full(data.shape, IGNORE_INDEX, dtype=np.uint8)
    if valid.any():
        out[valid] = lut[legend.encode(data[valid], source=source, option=None)]
    return out


def _windows(height: int, width: int, block_px: int) -> Iterator[Window]:
    for row in range(0, height, block_px):
        for col in range(0, width, block_px):
            yield Window(col, row, min(block_px, width - col), min(block_px, height - row))


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )


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
        reference: the HR reference: files, folders, quoted globs or ``.txt`` lists; several files
            form a mosaic.
        reference_legend: legend of the reference codes (a Legend, a built-in name or a YAML file).
        out_dir: REPORT_DIR, created; receives metrics.json, report.md and confusion.png.
        baseline: the LR label file(s) to compare with, scored on the same pixels (as ``reference``).
        baseline_legend: legend of the baseline codes (required with ``baseline``).
        aoi: score only inside this area (an :class:`~lcmap.geodata.aoi.AOI` or a polygon file).
        block_px: side of the square windows the map is read in (bounds memory).
        progress: show a progress bar over the windows (on stderr).

    Returns:
        The metrics dict also written to ``metrics.json``: ``oa``, ``miou``, ``kappa``,
        ``per_class``, ``confusion`` (rows = reference, cols = map), ``class_names``, ``pixels``
        (pixels scored), ``map``, ``reference`` (list of files, sorted), ``map_legend``,
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
    ref_legend = _as_legend(reference_legend)
    base_legend: Legend | None = None
    if baseline is not None:
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
    with contextlib.ExitStack() as stack:
        ref_mosaic = stack.enter_context(LabelMosaic(reference, "reference", no_label_codes=ref_legend.nodata))
        base_mosaic = None
        if baseline is not None and base_legend is not None:
            base_mosaic = stack.enter_context(LabelMosaic(baseline, "baseline", no_label_codes=base_legend.nodata))
        input_files = [str(map_path), *ref_mosaic.paths, *(base_mosaic.paths if base_mosaic is not None else [])]
        written = {name: Path(out_dir) / name for name in REPORT_FILES}
        check_not_an_input({"--out": Path(out_dir), **{f"--out's {n}": f for n, f in written.items()}}, input_files)
        src = stack.enter_context(open_raster(map_path, "map"))
        legend = map_legend(src, map_path)
        class_names = ref_legend.target.names
        _check_same_target(
            ref_legend, legend, f"reference legend {ref_legend.name!r}", f"the map's legend {legend.name!r}"
        )
        if base_legend is not None:
            _check_same_target(
                ref_legend,
                base_legend,
                f"reference legend {ref_legend.name!r}",
                f"baseline legend {base_legend.name!r}",
            )
        num_classes = len(class_names)
        map_lut = legend.index_to_target_lut()
        grid = Grid.of(src.crs, src.transform, src.width, src.height)

        aoi_geom = None
        aoi_bbox: tuple[int, int, int, int] | None = (0, 0, src.height, src.width)
        if aoi is not None:
            aoi.check_overlap(tuple(src.bounds), src.crs, f"the map {map_path}")
            aoi_geom = aoi.to_crs(src.crs)
            aoi_bbox = _pixel_bbox(aoi_geom.bounds, src.transform, src.width, src.height)

        cm_map = np.zeros((num_classes, num_classes), dtype=np.int64)
        cm_base = np.zeros_like(cm_map)
        _check_overlap(ref_mosaic, "reference", map_path, src, grid)
        if base_mosaic is not None:
            _check_overlap(base_mosaic, "baseline", map_path, src, grid)
        windows = [
            w
            for w in _windows(src.height, src.width, block_px)
            if _bbox_meets(aoi_bbox, w)
            and ref_mosaic.meets(grid.window(w))
            and (base_mosaic is None or base_mosaic.meets(grid.window(w)))
        ]
        with _progress(progress) as bar:
            task = bar.add_task("Scoring", total=len(windows))
            for window in windows:
                pred = _read_map_target(src, legend, map_lut, window, map_path)
                valid = pred != IGNORE_INDEX
                win_grid = grid.window(window)
                if aoi_geom is not None and valid.any():
                    valid &= rasterize_aoi(aoi_geom, win_grid.transform, valid.shape)
                if valid.any():
                    truth = ref_mosaic.read_target(win_grid, ref_legend, option="--reference-legend")
                    valid &= truth != IGNORE_INDEX
                if valid.any() and base_mosaic is not None and base_legend is not None:
                    base = base_mosaic.read_target(win_grid, base_legend, option="--baseline-legend")
                    valid &= base != IGNORE_INDEX
                if valid.any():
                    cm_map += confusion_matrix(truth[valid], pred[valid], num_classes)
                    if base_mosaic is not None:
                        cm_base += confusion_matrix(truth[valid], base[valid], num_classes)
                bar.advance(task)

    ref_paths = ref_mosaic.paths
    pixels = int(cm_map.sum())
    if pixels == 0:
        inputs = "map and reference" + (" and baseline" if base_mosaic is not None else "")
        raise LcmapInputError(
            f"no pixel holds a target class in the {inputs} alike"
            + (f" inside the AOI ({aoi.source})" if aoi is not None else "")
            + f": map {map_path}, reference {', '.join(map(str, ref_paths))}. Check that they "
            "cover the same area and that the legends are right (nodata and untargeted classes "
            "are not scored)."
        )

    metrics: dict[str, Any] = scores_from_confusion(cm_map, class_names)
    metrics.update(
        {
            "pixels": pixels,
            "map": str(map_path),
            "map_legend": legend.name,
            "reference": [str(p) for p in ref_paths],
            "reference_legend": ref_legend.name,
            "aoi": aoi.source if aoi is not None else None,
            "miou_rule": MIOU_RULE,
        }
    )
    if base_mosaic is not None and base_legend is not None:
        base_scores = scores_from_confusion(cm_base, class_names)
        base_scores.update(
            {"pixels": int(cm_base.sum()), "files": [str(p) for p in base_mosaic.paths], "legend": base_legend.name}
        )
        metrics["baseline"] = base_scores
        metrics["gain"] = {
            k: _diff(metrics[k], base_scores[k]) for k in ("oa", "miou", "miou_reference_classes", "kappa")
        }

    write_report(metrics, out_dir)
    return metrics


def _check_overlap(mosaic: LabelMosaic, what: str, map_path: Path, src: rasterio.DatasetReader, grid: Grid) -> None:
    if mosaic.meets(grid):
        return
    details = [
        f"{p}: bounds {tuple(round(v, 3) for v in prof['bounds'])} in {prof['crs'].to_string()}"
        for p, prof in zip(mosaic.paths, mosaic.profiles, strict=False)
    ]
    raise LcmapInputError(
        f"the {what} does not overlap the map {map_path} (map bounds "
        f"{tuple(round(v, 3) for v in src.bounds)} in {src.crs.to_string()}; "
        + "; ".join(details)
        + f"). Pass {what} files that cover the mapped area."
    )
