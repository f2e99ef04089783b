"""The map on disk: block files, the resume manifest, and the final COG with its legend.

0. **One writer.** :func:`lock_partial` takes an OS lock (``fcntl.flock``) on
   ``MAP.tif.partial/.lock`` for the whole run, COG assembly included; a second run on the same
   ``--out`` is refused at once (:class:`~lcmap.errors.OutputLockedError`, with the owner's pid).
   The kernel releases the lock when the owner dies, even by SIGKILL. Dask workers write block
   files into the folder without taking the lock: the driver process holds it for them, and the
   lock file holds the run's token while the run wants blocks (:mod:`lcmap.pipeline.prediction.run_lock`): a
   task that outlives its run (scheduler lost, ``lcmap predict`` stopped or killed) writes no block.
1. **Block files.** Each finished block is a small GeoTIFF ``MAP.tif.partial/blocks/rRRRRR_cCCCCC.tif``
   (band 1 class codes, band 2 confidence), written under a temporary name, read back and compared
   with the arrays written, then renamed (:func:`write_block`), and only then recorded as finished
   by its sidecar ``rRRRRR_cCCCCC.tif.sha256`` (file size and SHA-256). Each block has its own
   file, so no file is written by two processes.
2. **Resume.** ``MAP.tif.partial/manifest.json`` records the parameters (:func:`fingerprint`:
   checkpoint and imagery files with size and mtime, grid, windows, block size, codes, AOI hash).
   Re-running the same command skips finished blocks whose size and checksum match their sidecar
   (:func:`prepare_partial`; others are recomputed, said in the log); different parameters start
   over (only the run holding the lock ever deletes anything in the folder).
3. **COG.** The blocks are mosaicked (GDAL VRT) and copied to a COG with internal ``mode``
   overviews, a colour table, category names (``MAP.tif.aux.xml``), the :data:`LEGEND_TAG` tag,
   and ``MAP.qml`` for QGIS (:func:`write_map`; the GDAL side is :mod:`lcmap.pipeline.prediction.cog`).
   ``MAP.tif`` appears only when done; with confidence, ``MAP_confidence.tif`` too.
4. **A full disk** is recognised by :func:`is_enospc` (errno; GDAL's error messages, which carry no
   errno, captured while writing by :class:`GdalErrors`; or a failed write with the disk full) and
   reported with the space a map of this size needs (:func:`space_error`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.errors
from rasterio.transform import Affine

from lcmap.errors import DiskFullError, LcmapInputError
from lcmap.geodata.legends import MAP_NODATA, Legend
from lcmap.geodata.remote import remote_identities
from lcmap.pipeline.folder_lock import LOCK_NAME, hold_folder_lock
from lcmap.pipeline.prediction import cog
from lcmap.pipeline.prediction.inference import PredictJob
from lcmap.pipeline.prediction.job_tags import confidence_tags, map_tags
from lcmap.pipeline.prediction.run_lock import RunLock, RunOver, check_run
from lcmap.pipeline.prediction.tiling import CONFIDENCE_NODATA, Block, OutputGrid

log = logging.getLogger(__name__)

__all__ = [
    "LEGEND_TAG",
    "MANIFEST_VERSION",
    "GDAL_CACHE_BYTES",
    "GdalErrors",
    "confidence_path",
    "block_path",
    "lock_partial",
    "finished_blocks",
    "verify_block",
    "write_block",
    "fingerprint",
    "prepare_partial",
    "write_map",
    "remove_block",
    "is_enospc",
    "space_error",
]

LEGEND_TAG = cog.LEGEND_TAG
#: 2: --legend target sums LR-class probabilities per target class; 3: lattice windows, context boxes
MANIFEST_VERSION = 3
#: GDAL block cache while predicting blocks and writing the COG (bytes).
GDAL_CACHE_BYTES = 64 * 1024 * 1024


def confidence_path(out: Path) -> Path:
    """``MAP_confidence.tif`` for ``MAP.tif``."""
    return out.with_name(out.stem + "_confidence" + out.suffix)


# ------------------------------------------------------------------------------ one writer
@contextmanager
def lock_partial(partial: Path, out: Path) -> Iterator[RunLock]:
    """Hold the OS lock on ``partial`` (``MAP.tif.partial``) while the body runs; the folder is created.

    The lock (:func:`lcmap.pipeline.folder_lock.hold_folder_lock`: ``fcntl.flock`` on
    ``partial/.lock``, opened without following a symlink, holding the owner's pid and the run's
    token) is released when the body ends or the process dies (SIGKILL included). It is still held
    while the body removes ``partial`` after a finished map. Block files are written only while the
    token is there and the lock held (:func:`~lcmap.pipeline.prediction.run_lock.run_is_over`): the token is
    removed when the body ends, however it ends, so no worker of this run writes a block after it.

    Raises:
        OutputLockedError: another process holds the lock (the message names ``out`` and its pid).
        LcmapInputError: ``partial`` exists and is not an unfinished lcmap map, or is a symlink.
    """
    _check_partial_is_ours(partial)
    with hold_folder_lock(partial, str(out)) as lock:
        fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW)  # the token is written through it; the lock is the OS's
        run_lock = RunLock(lock, fd)
        try:
            run_lock.claim()
            yield run_lock
        finally:
            run_lock.revoke()  # no block of this run appears after it
            os.close(fd)


def finished_blocks(blocks_dir: str | Path, names: Iterable[str]) -> int:
    """How many blocks of ``names`` have a file in ``blocks_dir`` recorded as finished (what a re-run resumes)."""
    files = [Path(blocks_dir) / f"{name}.tif" for name in names]
    return sum(1 for f in files if f.is_file() and _sidecar(f).is_file())


def _check_partial_is_ours(partial: Path) -> None:
    """Refuse a ``partial`` that lcmap did not make: a symlink (or one inside: its target would be
    emptied and written), a file, or a folder of other files without a manifest."""
    links = [p for p in (partial, partial / "blocks", partial / "manifest.json") if p.is_symlink()]
    if links:
        raise LcmapInputError(
            f"{links[0]} is a symlink: lcmap follows none in an unfinished map's folder (it would delete and "
            f"write files where it points). Remove the link, or choose another --out"
        )
    if partial.exists() and not (partial / "manifest.json").is_file():
        if not partial.is_dir():
            raise LcmapInputError(f"{partial} exists and is not a folder: move it away or choose another --out")
        foreign = [p for p in partial.iterdir() if p.name not in ("blocks", LOCK_NAME)]
        if foreign:
            raise LcmapInputError(
                f"{partial} exists and is not an unfinished lcmap map (no manifest.json): move it away "
                "or choose another --out"
            )


class GdalErrors(logging.Handler):
    """Collect GDAL's error messages (rasterio logs them on ``rasterio._err``) while in a ``with`` block.

    GDAL reports write failures (a full disk among them) in messages without an errno, often
    only as the *previous* errors of the exception rasterio raises; :func:`is_enospc` reads
    ``messages``. They are not passed on to the log meanwhile (the caller logs them when useful).
    """

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.messages: list[str] = []
        self._logger = logging.getLogger("rasterio")
        self._level = self._logger.level

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> GdalErrors:
        self._propagate = self._logger.propagate
        self._logger.addHandler(self)
        self._logger.propagate = False
        if self._logger.getEffectiveLevel() > logging.INFO:
            self._logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc: object) -> None:
        self._logger.removeHandler(self)
        self._logger.setLevel(self._level)
        self._logger.propagate = self._propagate


# ------------------------------------------------------------------------------ block files
def block_path(blocks_dir: str | Path, block: Block) -> Path:
    """The file of one finished block."""
    return Path(blocks_dir) / f"{block.name}.tif"


def write_block(
    path: Path, grid: OutputGrid, block: Block, codes: np.ndarray, conf: np.ndarray | None, owner: Any = None
) -> Path:
    """Write one finished block atomically: band 1 ``codes`` (h, w), band 2 ``conf`` (h, w) if given,
    both in ``codes``' dtype. ``owner``: the run's :attr:`RunLock.owner` (None: no check); it appears only
    while that run still wants it (checked just before the rename).

    Raises:
        DiskFullError: no space left (the temporary file is removed).
        RunOver: the run ``owner`` has ended; nothing was written.
    """
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.tif")
    g = grid
    profile = {
        "driver": "GTiff",
        "width": block.width,
        "height": block.height,
        "count": 2 if conf is not None else 1,
        "dtype": codes.dtype.name,
        "crs": g.crs,
        "transform": g.transform * Affine.translation(block.c0, block.r0),
        "compress": "ZSTD",
        "zstd_level": 1,
    }
    if block.width >= 256 and block.height >= 256:
        profile.update(tiled=True, blockxsize=256, blockysize=256)
    bands = [codes] if conf is None else [codes, conf.astype(codes.dtype)]
    check_run(owner, f"block {path.name}")
    sidecar = _sidecar(path)
    sidecar.unlink(missing_ok=True)
    try:
        with GdalErrors() as gdal_errors:
            with rasterio.open(tmp, "w", **profile) as dst:
                for i, band in enumerate(bands, start=1):
                    dst.write(band, i)
            _read_back(tmp, bands)
        record = _file_record(tmp)
        check_run(owner, f"block {path.name}")  # the block appears only while its run wants it
        os.replace(tmp, path)
        side_tmp = sidecar.with_name(f".{sidecar.name}.{os.getpid()}.tmp")
        side_tmp.write_text(json.dumps(record))
        os.replace(side_tmp, sidecar)
    except Exception as exc:
        if tmp.exists():
            tmp.unlink()
        if not isinstance(exc, RunOver) and is_enospc(exc, gdal_errors.messages, path.parent):
            raise DiskFullError(f"No space left on device writing {path}") from exc
        raise
    return path


def remove_block(blocks_dir: str | Path, block: Block) -> None:
    """Remove a block file and its record (the record first: a block without one is not trusted)."""
    _sidecar(block_path(blocks_dir, block)).unlink(missing_ok=True)
    block_path(blocks_dir, block).unlink(missing_ok=True)


def _sidecar(path: Path) -> Path:
    """The record (size, SHA-256) that marks block file ``path`` as finished."""
    return path.with_name(path.name + ".sha256")


def _file_record(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


def _read_back(path: Path, bands: list[np.ndarray]) -> None:
    """Re-open a just-written block file and compare it with what was written.

    Raises:
        OSError (EIO): the file does not read back as written (e.g. cut short by a failed write
            that GDAL did not raise).
    """
    try:
        with rasterio.open(path) as src:
            same = src.count == len(bands) and all(np.array_equal(src.read(i + 1), b) for i, b in enumerate(bands))
    except rasterio.errors.RasterioError as exc:
        raise OSError(errno.EIO, f"block file {path} does not read back after writing ({exc})") from exc
    if not same:
        raise OSError(errno.EIO, f"block file {path} does not read back as written")


def verify_block(path: Path, bands: int) -> str | None:
    """Why block file ``path`` is not a finished block (None when it is): its sidecar is missing or
    does not match the file's size and SHA-256, or it does not open with ``bands`` bands."""
    sidecar = _sidecar(path)
    try:
        record = json.loads(sidecar.read_text())
    except (OSError, json.JSONDecodeError):
        return "no record of a finished write"
    try:
        if os.path.getsize(path) != record.get("size"):
            return f"size {os.path.getsize(path)} bytes, {record.get('size')} written"
        if _file_record(path)["sha256"] != record.get("sha256"):
            return "checksum differs from the one written"
        with rasterio.open(path) as src:
            if src.count != bands:
                return f"{src.count} bands, {bands} expected"
    except (OSError, rasterio.errors.RasterioError) as exc:
        return f"unreadable ({exc})"
    return None


# ------------------------------------------------------------------------- manifest, resume
def _files_fingerprint(files: Sequence[str]) -> list[list]:
    """``[path, size, mtime_ns]`` of each local file; ``[url, size, ETag or Last-Modified]`` of a remote one."""
    remote_ids = remote_identities(files)
    out = []
    for f in files:
        if f in remote_ids:
            out.append(remote_ids[f])
            continue
        s = os.stat(f)
        out.append([os.path.abspath(f), s.st_size, s.st_mtime_ns])
    return out


def fingerprint(job: PredictJob) -> dict[str, Any]:
    """The manifest: everything that makes a block file valid for ``job`` (JSON types only)."""
    grid, lut, group = job.grid, job.code_lut, job.class_group
    found = {
        "version": MANIFEST_VERSION,
        "checkpoint": _files_fingerprint([job.checkpoint])[0],
        "images": _files_fingerprint(job.image_files),
        "grid": [grid.crs_wkt, grid.x0, grid.y0, grid.res_x, grid.res_y, grid.width, grid.height],
        "tile_px": job.windows.tile,
        "overlap_px": job.windows.overlap,
        "window_lattice": [job.windows.row0, job.windows.col0],
        "block_size": job.block_size,
        "code_lut": list(lut),
        "class_group": list(group) if group is not None else None,
        "dtype": job.dtype,
        "confidence": bool(job.confidence),
        "aoi_sha256": hashlib.sha256(job.aoi_wkb).hexdigest() if job.aoi_wkb else None,
        "input_scale": job.input_scale,
        "tta": job.tta,
        "label_prior": (
            {**job.label_prior.record(), "files": _files_fingerprint(job.label_prior.label_files)}
            if job.label_prior is not None
            else None
        ),
    }
    return json.loads(json.dumps(found))


def prepare_partial(partial: Path, manifest_data: dict[str, Any], blocks_dir: Path, bands: int) -> set[str]:
    """Create/reuse ``MAP.tif.partial``; return the names of blocks already finished.

    Call it holding :func:`lock_partial`. A folder made with another manifest is emptied (the lock
    file kept); block files that fail :func:`verify_block` (cut short, changed, never recorded as
    finished), their sidecars and temporary files are deleted, each said in the log.

    Raises:
        LcmapInputError: ``partial`` exists but is not an unfinished lcmap map.
    """
    manifest = partial / "manifest.json"
    _check_partial_is_ours(partial)
    old = None
    if manifest.is_file():
        try:
            old = json.loads(manifest.read_text())
        except (OSError, json.JSONDecodeError):
            old = None
    if old != manifest_data and any(p.name != LOCK_NAME for p in partial.iterdir()):
        log.info("%s was made with other parameters: starting over", partial)
        for p in partial.iterdir():
            if p.name != LOCK_NAME:  # a symlink is removed, never followed
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    blocks_dir.mkdir(parents=True, exist_ok=True)
    if old != manifest_data:
        tmp = manifest.with_name(".manifest.json.tmp")
        tmp.write_text(json.dumps(manifest_data, indent=1))
        os.replace(tmp, manifest)
    done = set()
    for p in sorted(blocks_dir.glob("r*_c*.tif")):
        problem = verify_block(p, bands)
        if problem is None:
            done.add(p.stem)
            continue
        log.info("block %s is not a finished block (%s): it is computed again", p.name, problem)
        p.unlink()
        _sidecar(p).unlink(missing_ok=True)
    for p in [*blocks_dir.glob(".*.tmp.tif"), *blocks_dir.glob(".*.tmp")]:
        p.unlink()
    for p in blocks_dir.glob("r*_c*.tif.sha256"):  # a record without its block
        if p.name.removesuffix(".tif.sha256") not in done:
            p.unlink()
    return done


# ----------------------------------------------------------------------------------- COG
def write_map(
    job: PredictJob,
    blocks: list[Block],
    out: Path,
    partial: Path,
    out_legend: Legend,
    model_legend: Legend,
    console: Any | None = None,
    tags: dict[str, str] | None = None,
) -> None:
    """Mosaic the block files into ``out`` (COG, mode overviews, colours, category names, tags,
    ``MAP.qml``) and, with ``job.confidence``, ``MAP_confidence.tif`` (average overviews).

    ``partial``: the folder for the mosaic VRTs; ``console``: a rich console to say what is being
    written, or None; ``tags``: further GDAL tags of both maps (how they were made:
    :func:`lcmap.pipeline.prediction.predict_config.map_tags`; a tile's fingerprint).
    """
    g = job.grid
    colormap, names, entries = cog.map_categories(out_legend)
    made = dict(tags or {})
    tags = {**map_tags(job, out_legend, model_legend), **made}
    sources = [cog.VrtSource(str(block_path(job.blocks_dir, b)), 1, b.c0, b.r0, b.width, b.height) for b in blocks]
    common: dict[str, Any] = dict(width=g.width, height=g.height, crs=g.crs, transform=g.transform)
    vrt = cog.write_mosaic_vrt(
        partial / "map.vrt",
        dtype=job.dtype,
        nodata=MAP_NODATA,
        sources=sources,
        colormap=colormap,
        category_names=names,
        tags=tags,
        description="land cover class",
        **common,
    )
    if job.confidence:
        conf_out = confidence_path(out)
        csources = [cog.VrtSource(s.path, 2, s.xoff, s.yoff, s.width, s.height) for s in sources]
        cvrt = cog.write_mosaic_vrt(
            partial / "confidence.vrt",
            dtype="uint8",
            nodata=CONFIDENCE_NODATA,
            sources=csources,
            tags={**confidence_tags(job), **made},
            description="confidence (%)",
            **common,
        )
        if console:
            console.print(f"writing {conf_out.name} (COG, average overviews)")
        cog.write_cog(cvrt, conf_out, resampling="average", predictor=True)
    if console:
        console.print(f"writing {out.name} (COG, mode overviews)")
    cog.write_cog(vrt, out, resampling="mode", sidecars={".qml": cog.write_qml(entries)})


# ------------------------------------------------------------------------------ full disk
#: A write that failed with less than this free (bytes) in its folder failed for want of space.
_FULL_BELOW_BYTES = 1024 * 1024
_ENOSPC_TEXTS = ("No space left on device", "Free disk space available")


def is_enospc(exc: BaseException | None, gdal_messages: Sequence[str] = (), folder: str | Path | None = None) -> bool:
    """Whether ``exc`` (or an exception it was raised from) means "no space left on device".

    This is the one place that looks at message text. In order: an ``OSError`` with errno
    ENOSPC in the chain; GDAL's messages (in the chain, or ``gdal_messages`` captured with
    :class:`GdalErrors`: GDAL/libtiff report a full disk without errno); or, given the ``folder``
    written to, an I/O error while less than 1 MiB is free there.
    """
    seen = 0
    io_error = False
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        if isinstance(exc, (OSError, rasterio.errors.RasterioError)):
            io_error = True
        text = str(exc)
        if any(t in text for t in _ENOSPC_TEXTS):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    if any(t in m for m in gdal_messages for t in _ENOSPC_TEXTS):
        return True
    if io_error and folder is not None:
        try:
            return shutil.disk_usage(folder).free < _FULL_BELOW_BYTES
        except OSError:
            return False
    return False


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def space_error(job: PredictJob, out: Path, partial: Path, exc: BaseException) -> DiskFullError:
    """The error to raise when the disk filled up while making ``out``: how much space is needed."""
    g = job.grid
    per_px = np.dtype(job.dtype).itemsize * (2 if job.confidence else 1)
    raw = g.width * g.height * per_px
    upper = raw * (1 + 4 / 3 + 1 / 3)  # block files + COG with overviews + GDAL's overview temp
    try:
        free: float = shutil.disk_usage(out.parent).free
    except OSError:
        free = float("nan")
    return DiskFullError(
        f"the disk is full while writing {out} ({exc}). A {g.width} x {g.height} px map needs at "
        f"most about {_fmt_bytes(upper)} free in {out.parent} (uncompressed: block files, the COG with "
        f"overviews and GDAL's temporary overview file; compressed it is usually 3-10x less); "
        f"{_fmt_bytes(free)} is free now. Free some space (or choose another --out) and run the same "
        f"command again: finished blocks in {partial} are kept."
    )
