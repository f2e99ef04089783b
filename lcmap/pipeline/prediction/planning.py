"""Planning ``lcmap predict``: inputs checked, grids worked out, nothing written.

:func:`plan_prediction` opens the model and the imagery, checks them against each other (band
count, data type and value range of the training imagery, ``--input-scale``), refuses an output
that is an input, chooses the map's CRS (:mod:`lcmap.geodata.mapcrs`), the output grid, the window
grid and the blocks that touch the imagery inside the AOI (:mod:`lcmap.pipeline.prediction.tiling`), and the
manifest fingerprint a re-run must match to resume, from the options of one
:class:`~lcmap.pipeline.prediction.predict_config.PredictConfig` (checked first by its ``check``).
:func:`lcmap.pipeline.prediction.predict.predict_map` runs the plan.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import shapely
import torch
from rasterio.crs import CRS

from lcmap.errors import ImageryMismatchError, LcmapInputError
from lcmap.geodata.aoi import resolve_aoi
from lcmap.geodata.datasets import HRImagery, open_imagery
from lcmap.geodata.io import check_not_an_input
from lcmap.geodata.legends import MAP_NODATA, Legend, target_legend
from lcmap.geodata.mapcrs import grid_res, output_crs
from lcmap.geodata.normalization import imagery_mismatch, sample_imagery_range
from lcmap.geodata.remote import absolute_input
from lcmap.geodata.stac_inputs import asset_choice
from lcmap.pipeline.analysis.stac import stac_item_path
from lcmap.pipeline.prediction import cog, mapfile, tiled_output
from lcmap.pipeline.prediction.inference import PredictJob
from lcmap.pipeline.prediction.predict_config import PredictConfig, map_tags
from lcmap.pipeline.prediction.tiling import Block, block_side_px, lattice_windows, output_grid
from lcmap.pipeline.runs import TrainedModel, load_trained_model, resolve_checkpoint, training_imagery_range

__all__ = ["Plan", "plan_prediction"]

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """A checked prediction: the job, the legend of the output codes, and where things go."""

    job: PredictJob
    out: Path
    partial: Path
    out_legend: Legend
    model_legend: Legend
    fingerprint: dict[str, Any]
    #: GDAL tags that say how the map was made (:func:`lcmap.pipeline.prediction.predict_config.map_tags`)
    tags: dict[str, str] = field(default_factory=dict)
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
    else:  # PredictConfig.check refuses any other
        raise ValueError(f"legend mode {mode!r}")
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


def plan_prediction(config: PredictConfig, *, torch_threads: int | None = None) -> Plan:
    """Check every input and work out the grids; writes nothing but a probe file.

    ``config``: the options (:func:`lcmap.pipeline.prediction.predict.predict_map` documents each; its
    ``--stac-asset`` applies while the imagery is opened). ``torch_threads``: torch threads of the
    workers (None: their default).

    Raises:
        LcmapInputError: on any bad input (see :func:`predict_map`).
    """
    config.check()
    with asset_choice(config.stac_asset):
        return _plan(config, torch_threads)


def _plan(c: PredictConfig, torch_threads: int | None) -> Plan:
    dev = _resolve_device(c.device)
    if c.precision == "bf16" and not dev.startswith("cuda"):
        raise LcmapInputError(
            "--precision bf16 runs the model in bfloat16 on CUDA GPUs only; this run is on the CPU "
            "(--device cpu, or no GPU visible): leave --precision out (float32)"
        )
    assert c.model is not None and c.out is not None  # PredictConfig.check
    out = Path(c.out).expanduser().absolute()
    if c.tile_km is not None:
        tiled_output.check_tiles_out(out, c.tile_km)  # a folder, a positive tile side
    _check_output_folder(tiled_output.mosaic_path(out) if c.tile_km is not None else out)

    checkpoint = resolve_checkpoint(c.model)
    tm = load_trained_model(checkpoint, "cpu")
    ds = open_imagery(c.images)
    if ds.count != tm.in_channels:
        raise LcmapInputError(
            f"the imagery has {ds.count} band(s) ({', '.join(ds.files[:3])}{' ...' if len(ds.files) > 3 else ''}) "
            f"but model {checkpoint} was trained on {tm.in_channels}: use imagery with the same bands, "
            "in the same order, as the training imagery"
        )
    outputs = {"--out": out, "the map's .partial folder": out.with_name(out.name + ".partial")}
    outputs.update({"the map's style": cog.qml_path(out), "the map's STAC Item": stac_item_path(out)})
    if c.confidence:
        outputs["the confidence map"] = mapfile.confidence_path(out)
    if c.tile_km is not None:
        outputs = tiled_output.planned_outputs(out, c.confidence)
    check_not_an_input(outputs, [*ds.files, str(checkpoint), *([c.aoi] if c.aoi else [])])
    _check_imagery_kind(tm, ds, c.input_scale)
    bbox4 = cast("tuple[float, float, float, float]", tuple(c.bbox)) if c.bbox is not None else None
    aoi_obj = resolve_aoi(c.aoi, bbox4, c.bbox_crs)
    crs, why = output_crs(ds, c.crs, aoi_obj)
    if crs != CRS.from_user_input(ds.crs):  # read every file onto the map's CRS
        ds = open_imagery(c.images, crs=crs, res=grid_res(ds, crs))
    log.info("map CRS: %s (%s)", crs.to_string(), why)
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
    lut, group, out_legend, dtype = _code_lut(tm.legend, c.legend)
    prior = None
    if c.label_prior:  # the LR labels as a prior at each pixel (lcmap.pipeline.prediction.prediction_prior)
        from lcmap.pipeline.prediction.prediction_prior import prediction_prior

        prior = prediction_prior(tm, list(c.label_prior), c.legend, len(lut), grid.crs_wkt,
                                 grid.bounds(0, 0, grid.height, grid.width))  # fmt: skip
        log.info(
            "label prior: %d label file(s) in legend %s; training class mix %s",
            len(prior.label_files), prior.legend.get("name"),
            ", ".join(f"{n} {v:.2f}" for n, v in zip(out_legend.names, prior.class_mix, strict=False)),
        )  # fmt: skip
    wg = lattice_windows(grid, c.tile_px, c.overlap_px)
    block_size = block_side_px(c.block_px, wg)
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
        batch_size=c.batch_size,
        code_lut=lut,
        class_group=group,
        dtype=dtype,
        confidence=bool(c.confidence),
        aoi_wkb=aoi_wkb,
        blocks_dir=str(partial / "blocks"),
        precision=c.precision,
        input_scale=float(c.input_scale) if c.input_scale is not None else 1.0,
        tta=c.tta,
        label_prior=prior,
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
        tags=map_tags(c, job.checkpoint),
        model=tm,
        imagery=ds,
        area_wkb=shapely.to_wkb(area),
    )


# ------------------------------------------------------------------------------ running
