"""``lcmap evaluate``: score a predicted map against a high-resolution reference.

The map (written by ``lcmap predict``: uint8, nodata 0, legend in the ``LCMAP_LEGEND`` tag) is read
block by block on its own grid (``rioxarray``/dask) and the confusion matrix is counted by the
statistics engine of ``lcmap stats`` (:func:`lcmap.pipeline.analysis.zonal.count_pairs`, dask's threads, a
few blocks in memory whatever the map's size), which also gives the km² of each class over the
scored pixels (``area_km2``: map, reference, baseline). The reference -- one
file or several (files, folders, quoted globs, ``.txt`` lists: :mod:`lcmap.geodata.io`) in any CRS
and at any resolution -- is brought onto the map's grid by nearest neighbour through a
:class:`~lcmap.geodata.label_mosaic.LabelMosaic` (where files overlap, the first file in sorted path order
holding a label wins). Both are translated into the common target classes (reference codes through
``--reference-legend``, map codes through the map's legend tag, the default 4-class target codes 1-4
if the tag is absent).

Pixels are scored where the map and the reference both hold a class that maps to a target class
(nodata, untargeted classes such as snow, and pixels outside the AOI are left out). With a
baseline (the LR product the map was trained from), the baseline is scored on the *same* pixels --
those valid in the map, the reference and the baseline alike -- so the two scores compare fairly,
and the gain (map minus baseline) is reported.

REPORT_DIR receives ``metrics.json``, ``report.md`` and ``confusion.png``
(:mod:`lcmap.pipeline.analysis.evaluate_report`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.enums import MaskFlags
from rasterio.transform import Affine
from rasterio.windows import Window

from lcmap.errors import LcmapInputError
from lcmap.geodata.aoi import AOI, rasterize_aoi, resolve_aoi
from lcmap.geodata.io import check_not_an_input, check_raster_file, open_raster, valid_mask
from lcmap.geodata.label_mosaic import Grid, LabelMosaic
from lcmap.geodata.legends import IGNORE_INDEX, Legend, get_legend, target_legend
from lcmap.pipeline.analysis.evaluate_report import REPORT_FILES, format_score, write_report
from lcmap.pipeline.metrics import MIOU_RULE, scores_from_confusion
from lcmap.pipeline.prediction.cog import LEGEND_TAG

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
        check_raster_file(map_path, "map")  # readable to its last block (not truncated)
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
        grid = Grid.of(src.crs, src.transform, src.width, src.height)

        aoi_geom = None
        aoi_bbox: tuple[int, int, int, int] | None = (0, 0, src.height, src.width)
        if aoi is not None:
            aoi.check_overlap(tuple(src.bounds), src.crs, f"the map {map_path}")
            aoi_geom = aoi.to_crs(src.crs)
            aoi_bbox = _pixel_bbox(aoi_geom.bounds, src.transform, src.width, src.height)

        _check_overlap(ref_mosaic, "reference", map_path, src, grid)
        if base_mosaic is not None:
            _check_overlap(base_mosaic, "baseline", map_path, src, grid)
        base_input = (base_mosaic, base_legend) if base_mosaic is not None and base_legend is not None else None
        cm_map, cm_base, areas_km2 = _count_scored_pixels(
            map_path, src, grid, legend, (ref_mosaic, ref_legend), base_input, aoi_geom, aoi_bbox, block_px, progress
        )

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
            "area_km2": {who: dict(zip(class_names, km2.tolist(), strict=True)) for who, km2 in areas_km2.items()},
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


# ---------------------------------------------------------------------------------------- counting
class _ThreadMosaics:
    """One copy of a :class:`LabelMosaic` per dask worker thread (a rasterio handle is not
    thread-safe; the copies share the checked file list and footprints)."""

    def __init__(self, mosaic: LabelMosaic) -> None:
        self.mosaic, self.local = mosaic, threading.local()
        self.copies: list[LabelMosaic] = []
        self.lock = threading.Lock()

    def get(self) -> LabelMosaic:
        mine = getattr(self.local, "mosaic", None)
        if mine is None:
            mine = copy.copy(self.mosaic)
            mine._handles = {}
            self.local.mosaic = mine
            with self.lock:
                self.copies.append(mine)
        return mine

    def close(self) -> None:
        for m in self.copies:
            m.close()


def _count_scored_pixels(
    map_path: Path,
    src: rasterio.DatasetReader,
    grid: Grid,
    legend: Legend,
    reference: tuple[LabelMosaic, Legend],
    baseline: tuple[LabelMosaic, Legend] | None,
    aoi_geom: Any,
    aoi_bbox: tuple[int, int, int, int] | None,
    block_px: int,
    progress: bool,
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Confusion matrices (map, baseline; int64 ``(n, n)``, rows = reference) and km² per target
    class over the scored pixels, counted blockwise by :func:`lcmap.pipeline.analysis.zonal.count_pairs`.

    The map is read lazily (``rioxarray``, chunks of ``block_px``); each block reads the reference
    (and baseline) on its grid through their :class:`LabelMosaic` (the overlap rule). Every pixel
    gets a reference index ``a`` and a (map, baseline) index ``b = map * (n + 1) + baseline``, where
    ``n`` (one past the classes) marks a pixel not scored in all three: nodata, untargeted, outside
    the AOI. One pass counts both matrices: the map's sums over the baseline axis, the baseline's
    over the map axis.
    """
    import dask.array as da
    import rioxarray

    from lcmap.pipeline.analysis.zonal import count_pairs, pixel_area_m2_per_row

    n = len(legend.target)
    n_base = n + 1 if baseline is not None else 1  # without a baseline: one valid index (0)
    out_idx = np.array([n, n, n_base - 1 if baseline is not None else 0])
    map_lut = legend.index_to_target_lut()
    flags = src.mask_flag_enums[0]
    nodata = src.nodata if MaskFlags.nodata in flags else None
    all_valid = MaskFlags.all_valid in flags
    ref_mosaics = _ThreadMosaics(reference[0])
    base_mosaics = _ThreadMosaics(baseline[0]) if baseline is not None else None
    mask_handles = threading.local()

    def map_valid(codes: np.ndarray, window: Window) -> np.ndarray:
        if all_valid:
            return np.ones(codes.shape, dtype=bool)
        if nodata is not None:
            return ~np.isnan(codes) if isinstance(nodata, float) and math.isnan(nodata) else codes != nodata
        handle = getattr(mask_handles, "src", None)  # mask or alpha band: read per thread
        if handle is None:
            handle = mask_handles.src = rasterio.open(map_path)
        return valid_mask(handle, codes, window)

    def indices(codes: np.ndarray, block_info: Any = None) -> np.ndarray:
        (r0, r1), (c0, c1) = block_info[0]["array-location"]
        window = Window(c0, r0, c1 - c0, r1 - r0)
        out = np.empty((3, *codes.shape), dtype=np.int16)
        out[:] = out_idx[:, None, None]
        win_grid = grid.window(window)
        ref_m = ref_mosaics.get()
        if not _bbox_meets(aoi_bbox, window) or not ref_m.meets(win_grid):
            return _pair_index(out, n, n_base)
        base_m = base_mosaics.get() if base_mosaics is not None else None
        if base_m is not None and not base_m.meets(win_grid):
            return _pair_index(out, n, n_base)
        pred = np.full(codes.shape, IGNORE_INDEX, dtype=np.uint8)
        valid = map_valid(codes, window)
        if valid.any():
            pred[valid] = map_lut[legend.encode(codes[valid], source=map_path, option=None)]
        valid = pred != IGNORE_INDEX
        if aoi_geom is not None and valid.any():
            valid &= rasterize_aoi(aoi_geom, win_grid.transform, valid.shape)
        if valid.any():
            truth = ref_m.read_target(win_grid, reference[1], option="--reference-legend")
            valid &= truth != IGNORE_INDEX
        if valid.any() and base_m is not None and baseline is not None:
            base = base_m.read_target(win_grid, baseline[1], option="--baseline-legend")
            valid &= base != IGNORE_INDEX
            out[2][valid] = base[valid]
        if valid.any():
            out[0][valid] = truth[valid]
            out[1][valid] = pred[valid]
        return _pair_index(out, n, n_base)

    raster = rioxarray.open_rasterio(
        map_path, chunks={"band": 1, "y": block_px, "x": block_px}, lock=False, cache=False, masked=False
    )
    codes = raster.isel(band=0).data  # type: ignore[union-attr]
    pairs = da.map_blocks(indices, codes, dtype=np.int32, meta=np.empty((0, 0), dtype=np.int32))
    n_b = (n + 1) * n_base
    row_area_m2 = pixel_area_m2_per_row(src.crs, src.transform, src.height)
    try:
        with _progress(progress) as bar:
            task = bar.add_task("Scoring (Mpx)", total=round(src.width * src.height / 1e6, 1))
            counts = count_pairs(
                pairs // n_b, pairs % n_b, n + 1, n_b, row_area_m2,
                on_block=lambda px: bar.advance(task, px / 1e6), source=f"map {map_path}",
            )  # fmt: skip
    finally:
        ref_mosaics.close()
        if base_mosaics is not None:
            base_mosaics.close()
        handle = getattr(mask_handles, "src", None)
        if handle is not None:
            handle.close()
    kb = n if baseline is not None else 1
    scored = counts.pixels.reshape(n + 1, n + 1, n_base)[:n, :n, :kb]
    area_m2 = counts.area_m2.reshape(n + 1, n + 1, n_base)[:n, :n, :kb]
    areas = {"map": area_m2.sum(axis=(0, 2)) / 1e6, "reference": area_m2.sum(axis=(1, 2)) / 1e6}
    cm_base = np.zeros((n, n), dtype=np.int64)
    if baseline is not None:
        cm_base = scored.sum(axis=1)
        areas["baseline"] = area_m2.sum(axis=(0, 1)) / 1e6
    return scored.sum(axis=2), cm_base, areas


def _pair_index(idx: np.ndarray, n: int, n_base: int) -> np.ndarray:
    """``(3, H, W)`` reference/map/baseline indices -> one int32 index ``(ref * (n + 1) + map) * n_base + base``."""
    return (idx[0].astype(np.int32) * (n + 1) + idx[1]) * n_base + idx[2]


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
