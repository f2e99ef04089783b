"""Planning ``lcmap predict``: inputs checked, grids worked out, nothing written.

:func:`plan_prediction` opens the model and the imagery, checks them against each other (band
count, data type and value range of the training imagery, ``--input-scale``), refuses an output
that is an input, chooses the map's CRS (:mod:`lcmap.geodata.mapcrs`), the output grid, the window
grid and the blocks that touch the imagery inside the AOI (:mod:`lcmap.pipeline.tiling`), and the
manifest fingerprint a re-run must match to resume. :func:`lcmap.pipeline.predict.predict_map`
runs the plan.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import shapely
import torch
from rasterio.crs import CRS

from lcmap.errors import ImageryMismatchError, LcmapInputError
from lcmap.geodata.aoi import AOI, resolve_aoi
from lcmap.geodata.datasets import HRImagery, open_imagery
from lcmap.geodata.io import check_not_an_input
from lcmap.geodata.legends import MAP_NODATA, Legend, target_legend
from lcmap.geodata.mapcrs import grid_res, output_crs
from lcmap.geodata.normalization import imagery_mismatch, sample_imagery_range
from lcmap.geodata.remote import absolute_input
from lcmap.models.tta import TTA_MODES
from lcmap.pipeline import cog, mapfile, tiled_output
from lcmap.pipeline.inference import PRECISIONS, PredictJob
from lcmap.pipeline.runs import TrainedModel, load_trained_model, resolve_checkpoint, training_imagery_range
from lcmap.pipeline.stac import stac_item_path
from lcmap.pipeline.tiling import Block, block_side_px, lattice_windows, output_grid

__all__ = ["TILE_MULTIPLE", "Plan", "plan_prediction"]

log = logging.getLogger(__name__)

#: ``tile_px`` must be a multiple of this (U-Net: 32; Paraformer-tiny: 16).
TILE_MULTIPLE = 32


@dataclass
class Plan:
    """A checked prediction: the job, the legend of the output codes, and where things go."""

    job: PredictJob
    out: Path
    partial: Path
    out_legend: Legend
    model_legend: Legend
    fingerprint: dict[str, Any]
    model: TrainedModel | None = field(default=None, repr=False)
    imagery: HRImagery | None = field(default=None, repr=False)
    #: the imagery's footprint inside the AOI, in the output CRS (WKB)
    area_wkb: bytes | None = field(default=None, repr=False)

    def blocks(self) -> list[Block]:
        """The blocks to predict: those that touch the imagery's footprint inside the AOI."""
        blocks = self.job.blocks()
        if self.area_wkb is None:
            return blocks
        area = shapely.from_wkb(self.area_wkb)
        shapely.prepare(area)
        g = self.job.grid
        return [
            b for b in blocks if area.intersects(shapely.box(*g.bounds(b.r0, b.c0, b.r0 + b.height, b.c0 + b.width)))
        ]


def _check_output_folder(out: Path) -> None:
    if out.exists() and out.is_dir():
        raise LcmapInputError(
            f"--out {out} is a folder: give the map's file name, e.g. {out / 'map.tif'} (or --tile-km N for a "
            "folder of tiles)"
        )
    folder = out.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".lcmap-write-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise LcmapInputError(
            f"cannot write to the output folder {folder} ({exc.strerror or exc}). Choose another --out "
            "in a folder you can write to."
        ) from exc


def _code_lut(legend: Legend, mode: str) -> tuple[tuple[int, ...], tuple[int, ...] | None, Legend, str]:
    """Map channels and their codes for ``--legend target|native``.

    Returns:
        ``(code_lut, class_group, out_legend, dtype)``: ``code_lut[c]`` is the code written for map
        channel ``c``; ``class_group[k]`` the map channel that model channel ``k`` adds its
        probability to (None: one map channel per model channel). With ``target``, the map
        channels are the target classes, plus one channel (written as nodata) for LR classes
        without a target: each pixel gets the target class of highest summed probability.
    """
    if mode == "target":
        scheme = legend.target
        group = tuple(int(v) for v in legend.index_to_target_group())
        lut = tuple(c.code for c in scheme.classes) + ((MAP_NODATA,) if len(scheme) in group else ())
        out_legend = target_legend(scheme)
    elif mode == "native":
        if MAP_NODATA in legend.codes:
            raise LcmapInputError(
                f"legend {legend.name!r} has a class coded {MAP_NODATA}, which is the map's nodata "
                "value: write the map with --legend target instead"
            )
        lut = tuple(legend.codes)
        group = None
        out_legend = legend
    else:
        raise LcmapInputError(f"--legend {mode!r}: choose 'target' (common classes) or 'native' (the model's legend)")
    dtype = "uint8" if max(lut + (MAP_NODATA,)) <= 255 else "uint16"
    return lut, group, out_legend, dtype


def _resolve_device(device: str) -> str:
    d = str(device).lower()
    if d == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if d not in ("cpu", "cuda") and not d.startswith("cuda:"):
        raise LcmapInputError(f"--device {device!r}: choose auto, cpu or cuda")
    if d.startswith("cuda") and not torch.cuda.is_available():
        raise LcmapInputError("--device cuda: no CUDA GPU is visible to PyTorch here; use --device cpu")
    return d


def _check_imagery_kind(tm: TrainedModel, ds: HRImagery, input_scale: float | None) -> None:
    """Refuse imagery whose data type or value range is not that of the model's training imagery.

    Raises:
        ImageryMismatchError: naming the difference and ``--input-scale``.
    """
    trained = training_imagery_range(tm)
    if trained is None:
        log.info(
            "model %s does not record its training imagery's data type and range (trained by an older "
            "lcmap): the imagery is not checked against it",
            tm.checkpoint,
        )
        return
    dtype, high = sample_imagery_range(ds.files, ds.nodata)
    problem = imagery_mismatch(trained, dtype, high, input_scale)
    if problem is None:
        return
    t_high = max(trained["high"])
    hint = ""
    if math.isfinite(float(max(high))) and float(max(high)) > 0:
        hint = f" (here about --input-scale {t_high / float(max(high)):.3g})"
    raise ImageryMismatchError(
        f"the imagery ({ds.files[0]}{' ...' if len(ds.files) > 1 else ''}) is not like model {tm.checkpoint}'s "
        f"training imagery: {problem}. The map would be wrong. Use imagery of the same kind as the training "
        f"imagery, or, if it is the same imagery scaled differently, give --input-scale FACTOR: the imagery's "
        f"values are multiplied by FACTOR before the model sees them{hint}."
    )


def plan_prediction(
    model: str | Path,
    images: str | Path | Sequence[str | Path],
    out: str | Path,
    *,
    bbox: Sequence[float] | None = None,
    bbox_crs: str = "EPSG:4326",
    aoi: str | Path | AOI | None = None,
    tile_px: int = 512,
    overlap_px: int = 64,
    block_px: int = 4096,
    batch_size: int = 4,
    device: str = "auto",
    confidence: bool = False,
    legend: str = "target",
    torch_threads: int | None = None,
    precision: str = "32",
    input_scale: float | None = None,
    tta: str = "none",
    crs: str | None = None,
    tile_km: float | None = None,
) -> Plan:
    """Check every input and work out the grids; writes nothing but a probe file.

    ``crs``: the map's CRS (imagery in other CRSs is warped onto it); None: see :func:`output_crs`.
    ``tile_km``: ``out`` is a folder of tiles (:mod:`lcmap.pipeline.tiled_output`).

    Raises:
        LcmapInputError: on any bad input (see :func:`predict_map`).
    """
    if not isinstance(tile_px, int) or tile_px < TILE_MULTIPLE or tile_px % TILE_MULTIPLE:
        raise LcmapInputError(
            f"--tile-px {tile_px}: the window side must be a positive multiple of {TILE_MULTIPLE} px "
            f"(the networks downsample by {TILE_MULTIPLE}), e.g. 256, 512 or 1024"
        )
    if not isinstance(overlap_px, int) or overlap_px < 0 or 2 * overlap_px > tile_px:
        raise LcmapInputError(
            f"--overlap-px {overlap_px}: must be between 0 and half of --tile-px ({tile_px // 2}); "
            "64 px per side is a good default for 512 px windows"
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise LcmapInputError(f"--batch-size {batch_size}: must be at least 1")
    if not isinstance(block_px, int) or block_px < 1:
        raise LcmapInputError(f"--block-px {block_px}: must be a positive number of pixels")
    if legend not in ("target", "native"):
        raise LcmapInputError(f"--legend {legend!r}: choose 'target' (common classes) or 'native' (the model's legend)")
    if input_scale is not None and not (math.isfinite(input_scale) and input_scale > 0):
        raise LcmapInputError(f"--input-scale {input_scale}: must be a positive number, e.g. 0.025")
    if tta not in TTA_MODES:
        raise LcmapInputError(
            f"--tta {tta!r}: choose none, flips (4 flips, ~4x the model time) or d4 (8 flips and rotations, ~8x)"
        )
    dev = _resolve_device(device)
    if precision not in PRECISIONS:
        raise LcmapInputError(f"--precision {precision!r}: choose 32 or bf16 (bfloat16 on CUDA GPUs)")
    if precision == "bf16" and not dev.startswith("cuda"):
        raise LcmapInputError(
            "--precision bf16 runs the model in bfloat16 on CUDA GPUs only; this run is on the CPU "
            "(--device cpu, or no GPU visible): leave --precision out (float32)"
        )

    out = Path(out).expanduser().absolute()
    if tile_km is not None:
        tiled_output.check_tiles_out(out, tile_km)  # a folder, a positive tile side
    _check_output_folder(tiled_output.mosaic_path(out) if tile_km is not None else out)

    checkpoint = resolve_checkpoint(model)
    tm = load_trained_model(checkpoint, "cpu")
    ds = open_imagery(images)
    if ds.count != tm.in_channels:
        raise LcmapInputError(
            f"the imagery has {ds.count} band(s) ({', '.join(ds.files[:3])}{' ...' if len(ds.files) > 3 else ''}) "
            f"but model {checkpoint} was trained on {tm.in_channels}: use imagery with the same bands, "
            "in the same order, as the training imagery"
        )
    outputs = {"--out": out, "the map's .partial folder": out.with_name(out.name + ".partial")}
    outputs.update({"the map's style": cog.qml_path(out), "the map's STAC Item": stac_item_path(out)})
    if confidence:
        outputs["the confidence map"] = mapfile.confidence_path(out)
    if tile_km is not None:
        outputs = tiled_output.planned_outputs(out, confidence)
    aoi_files = [str(aoi)] if isinstance(aoi, (str, Path)) else []  # the --aoi file (a bbox or AOI object: none)
    check_not_an_input(outputs, [*ds.files, str(checkpoint), *aoi_files])
    _check_imagery_kind(tm, ds, input_scale)
    bbox4 = cast("tuple[float, float, float, float]", tuple(bbox)) if bbox is not None else None
    if isinstance(aoi, (str, Path)):
        aoi_obj = resolve_aoi(aoi, bbox4, bbox_crs)
    elif isinstance(aoi, AOI):
        if bbox is not None:
            raise LcmapInputError("give either --aoi or --bbox, not both")
        aoi_obj = aoi
    else:
        aoi_obj = resolve_aoi(None, bbox4, bbox_crs)
    out_crs, why = output_crs(ds, crs, aoi_obj)
    if out_crs != CRS.from_user_input(ds.crs):  # read every file onto the map's CRS
        ds = open_imagery(images, crs=out_crs, res=grid_res(ds, out_crs))
    log.info("map CRS: %s (%s)", out_crs.to_string(), why)
    crs = out_crs
    x, y, _ = ds.bounds
    img_bounds = (float(x.start), float(y.start), float(x.stop), float(y.stop))
    geom = None
    if aoi_obj is not None:
        aoi_obj.check_overlap(img_bounds, crs, f"the imagery ({ds.files[0]}{' ...' if len(ds.files) > 1 else ''})")
        geom = aoi_obj.to_crs(crs)
    grid = output_grid(
        ds.crs.to_wkt(), img_bounds, (float(ds.res[0]), float(ds.res[1])), geom.bounds if geom is not None else None
    )
    if grid.width <= 0 or grid.height <= 0:
        raise LcmapInputError(
            f"the AOI ({aoi_obj.source if aoi_obj else ''}) only touches the imagery's edge: nothing to predict"
        )
    lut, group, out_legend, dtype = _code_lut(tm.legend, legend)
    wg = lattice_windows(grid, tile_px, overlap_px)
    block_size = block_side_px(block_px, wg)
    partial = out.with_name(out.name + ".partial")
    aoi_wkb = shapely.to_wkb(geom) if geom is not None else None
    footprint = shapely.union_all(list(ds.index.geometry.values))  # the files' extents, imagery CRS
    area = footprint.intersection(geom) if geom is not None else footprint
    job = PredictJob(
        checkpoint=str(checkpoint.absolute()),
        image_files=tuple(absolute_input(f) for f in ds.files),  # a URL as it is
        device=dev,
        torch_threads=torch_threads,
        grid=grid,
        windows=wg,
        block_size=block_size,
        batch_size=batch_size,
        code_lut=lut,
        class_group=group,
        dtype=dtype,
        confidence=bool(confidence),
        aoi_wkb=aoi_wkb,
        blocks_dir=str(partial / "blocks"),
        precision=precision,
        input_scale=float(input_scale) if input_scale is not None else 1.0,
        tta=tta,
    )
    fingerprint = mapfile.fingerprint(job)
    # the per-process model cache must not serve an older checkpoint saved at the same path
    model_key = json.dumps([fingerprint["checkpoint"], fingerprint["images"]])
    job = replace(job, cache_key=hashlib.sha256(model_key.encode()).hexdigest()[:16])
    return Plan(
        job=job,
        out=out,
        partial=partial,
        out_legend=out_legend,
        model_legend=tm.legend,
        fingerprint=fingerprint,
        model=tm,
        imagery=ds,
        area_wkb=shapely.to_wkb(area),
    )


# ------------------------------------------------------------------------------ running
