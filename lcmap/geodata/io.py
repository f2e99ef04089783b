"""Raster input for every command: finding files, checking them, valid pixels.

Inputs (:func:`find_raster_files`), each item one of:

- a raster file (``.tif``, ``.tiff``, ``.vrt``, ``.jp2``, ``.img``; a ``.vrt`` is one raster, its
  source files are checked to exist);
- a folder, searched recursively for raster files;
- a glob, quoted so that lcmap expands it (``"naip/*.tif"``, ``"tiles/**/*.tif"``);
- a ``.txt`` list: one path (file, folder or glob) per line, relative paths relative to the
  ``.txt``'s folder; blank lines and lines starting with ``#`` are skipped;
- an ``http(s)://`` URL (or a GDAL ``/vsi...`` path), read remotely with range requests
  (:mod:`lcmap.geodata.remote`);
- a STAC Item or ItemCollection JSON file: one file per Item, its chosen asset
  (:mod:`lcmap.geodata.stac_inputs`; ``--stac-asset``).

Folders and globs skip lcmap's own outputs (:func:`lcmap_output_kind`): maps (the
:data:`LEGEND_TAG` tag), confidence maps (:data:`CONFIDENCE_TAG`), change maps (:data:`CHANGES_TAG`)
and anything under a ``*.partial/`` folder; the skipped files are logged at INFO. A file named
explicitly (a URL included) is never skipped; a STAC file skips lcmap's own map Items and the
output files its Items name. :func:`check_not_an_input` refuses an output path that is one of the
inputs.

Checks (:func:`check_raster_file`, :func:`open_raster`), the same everywhere: a missing path, a
folder or glob with no raster, an unreadable, corrupt or truncated file, a file without a CRS or
geotransform raise :class:`~lcmap.errors.LcmapInputError` naming the file.

Label mosaics (label files onto any grid, one overlap rule) are :mod:`lcmap.geodata.label_mosaic`.
"""

from __future__ import annotations

import glob
import logging
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.errors
from rasterio.enums import MaskFlags
from rasterio.windows import Window

from lcmap.errors import LcmapInputError
from lcmap.geodata import remote
from lcmap.geodata.stac_inputs import STAC_SUFFIXES, stac_asset_hrefs

log = logging.getLogger(__name__)

__all__ = [
    "CHANGES_TAG",
    "CONFIDENCE_TAG",
    "LEGEND_TAG",
    "RASTER_SUFFIXES",
    "check_not_an_input",
    "lcmap_output_kind",
    "check_raster_file",
    "find_raster_files",
    "imagery_valid",
    "open_raster",
    "valid_mask",
]

RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".jp2", ".img")
_GLOB_CHARS = frozenset("*?[")
#: GDAL dataset tag of a map written by ``lcmap predict``: the legend its codes are in (JSON).
LEGEND_TAG = "LCMAP_LEGEND"
#: GDAL dataset tag of a confidence map (``MAP_confidence.tif``).
CONFIDENCE_TAG = "LCMAP_CONFIDENCE"
#: GDAL dataset tag of a change map (``lcmap changes``).
CHANGES_TAG = "LCMAP_CHANGES"
_OUTPUT_TAGS = {
    LEGEND_TAG: "an lcmap map",
    CONFIDENCE_TAG: "an lcmap confidence map",
    CHANGES_TAG: "an lcmap change map",
}
#: Fill of a warped layer where the file wrote nothing (off the file or its nodata).
_UNWRITTEN = np.iinfo(np.int32).min


# ---------------------------------------------------------------------------------------- files
def find_raster_files(paths: str | Path | Iterable[str | Path], what: str) -> list[str]:
    """Expand files, folders, quoted globs and ``.txt`` lists (see the module docstring) to files.

    Returns:
        The raster files, sorted by path (as strings), without duplicates.

    Raises:
        LcmapInputError: a path does not exist, a folder/glob/list holds no raster, nothing given.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[str] = []
    for p in paths:
        files.extend(_expand(str(p), what, seen=set()))
    if not files:
        raise LcmapInputError(f"no {what} files given")
    return sorted(set(files))


def lcmap_output_kind(path: str | Path) -> str | None:
    """Why ``path`` is one of lcmap's own outputs (e.g. ``"an lcmap map"``), or None when it is not.

    Outputs: a file under a ``*.partial`` folder (unfinished map blocks), a GeoTIFF carrying the
    :data:`LEGEND_TAG`, :data:`CONFIDENCE_TAG` or :data:`CHANGES_TAG` dataset tag. A file that
    cannot be opened is not called an output (the checks report it), nor a remote one (outputs are local).
    """
    if remote.is_remote(path):
        return None
    p = Path(path)
    if any(part.endswith(".partial") for part in p.parent.parts):
        return "inside an unfinished map's .partial folder"
    if p.suffix.lower() not in (".tif", ".tiff"):
        return None
    try:
        with rasterio.open(p) as src:
            tags = src.tags()
    except (rasterio.errors.RasterioError, OSError):
        return None
    for tag, kind in _OUTPUT_TAGS.items():
        if tag in tags:
            return kind
    return None


def _skip_outputs(found: list[str], where: str) -> list[str]:
    """``found`` without lcmap's own outputs (each skipped file logged at INFO, with the reason)."""
    kept = []
    for f in found:
        kind = lcmap_output_kind(f)
        if kind is None:
            kept.append(f)
        else:
            log.info("skipped %s (found in %s): %s, not an input", f, where, kind)
    return kept


def check_not_an_input(outputs: Mapping[str, str | Path], inputs: Iterable[str | Path]) -> None:
    """Refuse an output path that is also an input (compared resolved, ``os.path.samefile`` when both exist).

    Args:
        outputs: ``{what: path}``, e.g. ``{"--out": "map.tif"}``; ``what`` names it in the message.
        inputs: input files (already expanded).

    Raises:
        LcmapInputError: naming the output and the input it would overwrite.
    """
    ins = [Path(p) for p in inputs if not remote.is_remote(p)]  # an output is local
    resolved = {p.resolve(): p for p in ins}
    for what, out in outputs.items():
        o = Path(out)
        hit = resolved.get(o.resolve())
        if hit is None and o.exists():
            hit = next((p for p in ins if p.exists() and os.path.samefile(o, p)), None)
        if hit is not None:
            raise LcmapInputError(
                f"{what} {o} is also an input ({hit}): it would be overwritten. Choose another output path."
            )


def _expand(item: str, what: str, seen: set[Path]) -> list[str]:
    if remote.is_remote(item):  # named explicitly: never skipped; checked when opened
        remote.configure_gdal()
        remote.check_address(item, what)
        return [item]
    path = Path(item)
    if path.is_dir():
        found = sorted(str(f) for f in path.rglob("*") if f.is_file() and f.suffix.lower() in RASTER_SUFFIXES)
        found = _skip_outputs(found, f"{what} folder {path}")
        if not found:
            raise LcmapInputError(f"no raster files ({', '.join(RASTER_SUFFIXES)}) found under {what} folder {path}")
        return found
    if path.is_file():
        if path.suffix.lower() in STAC_SUFFIXES:
            found = [f for href in stac_asset_hrefs(path, what) for f in _expand(href, what, seen)]
            return _skip_outputs(found, f"{what} STAC file {path}")
        return _read_list(path, what, seen) if path.suffix.lower() == ".txt" else [str(path)]
    if _GLOB_CHARS & set(item):
        matches = sorted(glob.glob(item, recursive=True))
        if not matches:
            raise LcmapInputError(f"{what} pattern {item!r} matched no file")
        files: list[str] = []
        for m in _skip_outputs([m for m in matches if not Path(m).is_dir()], f"{what} pattern {item!r}") + [
            m for m in matches if Path(m).is_dir()
        ]:
            mp = Path(m)
            if mp.is_dir() or mp.suffix.lower() in RASTER_SUFFIXES + (".txt",):
                files.extend(_expand(m, what, seen))
        if not files:
            raise LcmapInputError(
                f"{what} pattern {item!r} matched no raster file ({', '.join(RASTER_SUFFIXES)}): "
                + ", ".join(matches[:5])
            )
        return files
    raise LcmapInputError(f"{what} path {path} does not exist")


def _read_list(path: Path, what: str, seen: set[Path]) -> list[str]:
    """The rasters a ``.txt`` list names (relative entries are relative to its folder)."""
    key = path.resolve()
    if key in seen:
        raise LcmapInputError(f"{what} list {path} includes itself (through another list)")
    seen = seen | {key}
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise LcmapInputError(f"{what} list {path} cannot be read ({exc})") from exc
    files: list[str] = []
    for number, line in enumerate(lines, start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        entry_path = Path(entry).expanduser()
        if not entry_path.is_absolute():
            entry_path = path.parent / entry_path
        try:
            files.extend(_expand(entry if remote.is_remote(entry) else os.path.normpath(entry_path), what, seen))
        except LcmapInputError as exc:
            raise LcmapInputError(f"{what} list {path}, line {number}: {exc}") from exc
    if not files:
        raise LcmapInputError(f"{what} list {path} names no file (one path per line, # for comments)")
    return files


# ---------------------------------------------------------------------------------------- checks
def open_raster(path: str | Path, what: str) -> rasterio.io.DatasetReader:
    """Open a georeferenced raster (the caller closes it).

    Raises:
        LcmapInputError: naming the file, if it does not exist, cannot be read (corrupt, truncated,
            not a raster), has no CRS or no geotransform, or is a ``.vrt`` whose sources are missing.
    """
    if not remote.is_remote(path) and not Path(path).exists():
        raise LcmapInputError(f"{what} {path} does not exist")
    try:
        src = rasterio.open(path)
    except (rasterio.errors.RasterioError, OSError) as exc:
        raise _unreadable(path, what, exc) from exc
    try:
        if src.crs is None:
            raise LcmapInputError(
                f"{what} file {path} has no CRS, so it cannot be placed on a grid. Assign one "
                "(e.g. gdal_edit.py -a_srs EPSG:XXXX) or use a georeferenced GeoTIFF."
            )
        if src.transform.is_identity:
            raise LcmapInputError(f"{what} file {path} has no geotransform (pixel grid unknown)")
        if str(path).lower().endswith(".vrt"):
            if any(remote.is_remote(f) for f in src.files[1:]):  # a local .vrt over URLs
                remote.configure_gdal()
            missing = [f for f in src.files[1:] if not remote.is_remote(f) and not Path(f).exists()]
            if missing:
                raise LcmapInputError(f"{what} file {path} refers to missing files: {', '.join(missing[:5])}")
    except BaseException:
        src.close()
        raise
    return src


def _unreadable(path: str | Path, what: str, exc: Exception) -> LcmapInputError:
    if remote.is_remote(path):
        return remote.unreadable(str(path), what, exc)
    reason = str(exc.__cause__ or exc.__context__ or exc).strip()  # GDAL's reason, not "see previous"
    return LcmapInputError(
        f"{what} file {path} is not a readable raster ({reason}). It may be corrupt or truncated: "
        "re-download or re-export it."
    )


def check_raster_file(path: str | Path, what: str) -> dict[str, Any]:
    """Check a raster (see :func:`open_raster`) and that its last block reads; return its profile.

    Reading the bottom-right block catches truncated files before work starts. A remote file's
    header is checked, its last block is not read: that would cost one tile per file (~1 MB with
    512 px tiles) however small the area mapped.

    Returns:
        ``{"crs", "res", "count", "dtype", "nodata", "bounds"}`` (bounds in the file's CRS).
    """
    with open_raster(path, what) as src:
        try:
            h, w = src.height, src.width
            if not remote.is_remote(path):
                src.read(window=Window(max(0, w - 16), max(0, h - 16), min(16, w), min(16, h)))
        except (rasterio.errors.RasterioError, OSError) as exc:
            raise _unreadable(path, what, exc) from exc
        return {
            "crs": src.crs,
            "res": src.res,
            "count": src.count,
            "dtype": src.dtypes[0],
            "nodata": src.nodata,
            "bounds": tuple(src.bounds),
        }


# ---------------------------------------------------------------------------------------- valid pixels
def imagery_valid(image: Any, nodata: float) -> Any:
    """Valid-pixel mask ``(..., H, W)`` of an image ``(C, H, W)`` or a batch ``(B, C, H, W)``
    (numpy array or torch tensor, the mask is of the same kind): not all bands equal to ``nodata``,
    and (float imagery) every band finite: NaN and +-inf are nodata whatever the file's nodata
    value (NaN is float imagery's usual nodata, and ``NaN != NaN``). The one valid-pixel rule of
    lcmap. Numpy arrays are compared band by band (no ``(C, H, W)`` temporary: half the time)."""
    if isinstance(image, np.ndarray):
        ok = image[..., 0, :, :] != nodata
        for band in range(1, image.shape[-3]):
            ok |= image[..., band, :, :] != nodata
        if image.dtype.kind == "f":
            for band in range(image.shape[-3]):
                ok &= np.isfinite(image[..., band, :, :])
        return ok
    ok = ~(image == nodata).all(dim=-3)
    if image.is_floating_point():
        ok &= image.isfinite().all(dim=-3)
    return ok


def valid_mask(ds: Any, data: np.ndarray, window: Window | None) -> np.ndarray:
    """True where ``data`` (band 1 of ``ds`` read in ``window``) holds data: per the file's nodata
    value (NaN included), else its mask or alpha band."""
    flags = ds.mask_flag_enums[0]
    if MaskFlags.all_valid in flags:
        return np.ones(data.shape, dtype=bool)
    if MaskFlags.nodata in flags and ds.nodata is not None:
        if isinstance(ds.nodata, float) and math.isnan(ds.nodata):
            return ~np.isnan(data)
        return data != ds.nodata
    return ds.read_masks(1, window=window) > 0
