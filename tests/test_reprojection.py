"""Reprojection keeps every file: the real sample (NAIP, NAD83 / UTM 17N) mapped onto another zone,
datum and unit (``--crs``), and a folder mixing CRSs, against the map in the imagery's own CRS.

The network is swapped for a per-pixel one (each pixel's class: its brightest normalised band), so
a pixel's class depends only on its own values: two maps of the same imagery on different grids
may differ only where resampling changed a pixel (edges, fine texture). ``scheduler="synchronous"``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely
import torch
from rasterio.crs import CRS
from rasterio.warp import Resampling, calculate_default_transform, reproject, transform_geom
from torch import nn

import lcmap.pipeline.prediction.predict as P
from lcmap.geodata.aoi import rasterize_aoi
from lcmap.geodata.datasets import open_imagery
from lcmap.geodata.legends import target_legend
from lcmap.geodata.mapcrs import grid_res
from lcmap.geodata.sample import sample_paths
from lcmap.models import build_model
from lcmap.pipeline.prediction import inference, planning
from lcmap.pipeline.prediction.strips import StripReader
from lcmap.pipeline.prediction.tiling import output_grid
from lcmap.pipeline.runs import save_checkpoint

FAST = dict(tile_px=64, overlap_px=16, batch_size=4, scheduler="synchronous", device="cpu")
NAIP = {p.stem: p for p in sample_paths()["imagery"]}  # patch-0 ... patch-7, EPSG:26917
EDGE_PX = 3  # pixels along a footprint's edge, where resampling mixes in the outside


class BrightestBand(nn.Module):
    """Per pixel: class k = the band k of highest normalised value (4 bands -> the 4 target classes)."""

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [8.0 * x]


@pytest.fixture(scope="module", autouse=True)
def per_pixel_model():
    """Planning (and a worker, if one loads it) gets the checkpoint's legend and normalisation with
    the per-pixel network."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    load = planning.load_trained_model

    def per_pixel(path, device):
        return dataclasses.replace(load(path, device), model=BrightestBand())

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(planning, "load_trained_model", per_pixel)
        mp.setattr(inference, "load_trained_model", per_pixel)
        yield
    torch.set_num_threads(before)


def _warp(src_path: Path, dst_path: Path, crs: str) -> Path:
    """``src_path`` warped into ``crs`` by rasterio (nearest; outside the footprint 0 = nodata)."""
    with rasterio.open(src_path) as src:
        tf, w, h = calculate_default_transform(src.crs, crs, src.width, src.height, *src.bounds)
        profile = src.profile | dict(crs=crs, transform=tf, width=w, height=h, nodata=0)
        dst_path.parent.mkdir(parents=True, exist_ok=True)
        with rasterio.open(dst_path, "w", **profile) as dst:
            for b in range(1, src.count + 1):
                reproject(rasterio.band(src, b), rasterio.band(dst, b), resampling=Resampling.nearest, dst_nodata=0)
    return dst_path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("reproj")
    torch.manual_seed(0)
    model = build_model("unet", 4, len(target_legend()))  # stored for its legend and normalisation only
    ckpt = save_checkpoint(root / "m.ckpt", model, "unet", target_legend(), [128.0] * 4, [60.0] * 4)
    own = {
        "patch-0": P.predict_map(
            P.PredictConfig.of(ckpt, [NAIP["patch-0"]], root / "own" / "patch-0.tif", **FAST), progress=False
        ).path
    }
    return {"root": root, "ckpt": ckpt, "own": own}


def _read(path: Path) -> tuple[np.ndarray, rasterio.Affine, CRS]:
    with rasterio.open(path) as src:
        return src.read(1), src.transform, src.crs


def _footprint(image: Path, crs: CRS) -> shapely.Geometry:
    """``image``'s footprint (its edges densified) in ``crs``."""
    with rasterio.open(image) as src:
        box = shapely.box(*src.bounds).segmentize(8.0)
        return shapely.geometry.shape(transform_geom(src.crs, crs, shapely.geometry.mapping(box)))


def _erode(mask: np.ndarray, n: int) -> np.ndarray:
    for _ in range(n):
        p = np.pad(mask, 1)
        mask = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask


def _agreement(own_map: Path, other_map: Path) -> tuple[float, float]:
    """``other_map`` put onto ``own_map``'s grid by nearest neighbour: (the share of own's valid
    pixels, away from its edge, that it maps; the share of those with the same class)."""
    own, tf, crs = _read(own_map)
    other, otf, ocrs = _read(other_map)
    on_own = np.zeros_like(own)
    reproject(other, on_own, src_transform=otf, src_crs=ocrs, dst_transform=tf, dst_crs=crs,
              src_nodata=0, dst_nodata=0, resampling=Resampling.nearest)  # fmt: skip
    inner = _erode(own > 0, EDGE_PX)
    both = inner & (on_own > 0)
    return float(both.sum() / inner.sum()), float((own[both] == on_own[both]).mean())


def _footprint_mapped(map_path: Path, images: list[Path]) -> tuple[list[float], float]:
    """(for each of ``images``, the share of its footprint, away from its edge, that the map holds
    a class for; the map's classes outside every footprint's edge zone, as a share of the map's)."""
    codes, tf, crs = _read(map_path)
    mapped, near = [], np.zeros(codes.shape, bool)
    for image in images:
        inside = rasterize_aoi(_footprint(image, crs), tf, codes.shape)
        mapped.append(float((codes[_erode(inside, EDGE_PX)] > 0).mean()))
        near |= ~_erode(~inside, EDGE_PX)  # the footprint and its edge zone
    return mapped, float(((codes > 0) & ~near).sum() / (codes > 0).sum())


# ---------------------------------------------------------------------------- the reader
def test_strip_reader_reads_a_file_in_another_crs_onto_the_map_grid():
    """A NAD83 / UTM 17N file read onto a WGS 84 / UTM 16N grid: its footprint is valid (the reader
    finds the file by its bounds on the map's CRS, not in its own, and warps it onto the map's grid)."""
    ds0 = open_imagery([NAIP["patch-0"]])
    crs = CRS.from_epsg(32616)
    ds = open_imagery([NAIP["patch-0"]], crs=crs, res=grid_res(ds0, crs))
    x, y, _ = ds.bounds
    grid = output_grid(crs.to_wkt(), (x.start, y.start, x.stop, y.stop), ds.res)
    reader = StripReader(ds, grid)
    assert reader.prepare() == np.uint8  # warped strips keep the imagery's type
    buf = np.empty((4, grid.height, grid.width), reader.prepare())
    image, valid, _, _ = reader.read(0, grid.height, 0, grid.width, buf)
    inside = rasterize_aoi(_footprint(NAIP["patch-0"], crs), grid.transform, (grid.height, grid.width))
    assert valid[_erode(inside, EDGE_PX)].all()
    assert not valid[_erode(~inside, EDGE_PX)].any()  # nothing beyond the footprint's edge zone
    # the pixels are the file's own values (nearest neighbour): the same band means within 1 %
    with rasterio.open(NAIP["patch-0"]) as src:
        own_mean = src.read().reshape(4, -1).mean(axis=1)
    assert np.allclose(image[:, valid].mean(axis=1), own_mean, rtol=0.01)


# ----------------------------------------------------------------------------- --crs X
@pytest.mark.parametrize("crs", ["EPSG:32616", "EPSG:5070", "EPSG:2283"])
def test_crs_option_maps_the_imaged_area_with_the_classes_of_the_own_crs_map(data, crs):
    """NAIP in NAD83 / UTM 17N mapped on WGS 84 / UTM 16N (another zone and datum), CONUS Albers and
    Virginia North (US survey feet): the patch's footprint is mapped, nothing around it, pixels stay
    1 m on the ground, and the classes are those of the map in the imagery's own CRS."""
    out = P.predict_map(
        P.PredictConfig.of(
            data["ckpt"], [NAIP["patch-0"]], data["root"] / crs.replace(":", "") / "map.tif", crs=crs, **FAST
        ),
        progress=False,
    )
    with rasterio.open(out.path) as src:
        assert src.crs == CRS.from_user_input(crs)
        unit_m = src.crs.linear_units_factor[1]  # 0.3048006 for EPSG:2283's US survey foot
        assert src.res[0] * unit_m == pytest.approx(1.0, abs=0.01)
        assert src.res[1] * unit_m == pytest.approx(1.0, abs=0.01)
    mapped, outside = _footprint_mapped(out.path, [NAIP["patch-0"]])
    assert mapped[0] > 0.999 and outside == 0
    coverage, agree = _agreement(data["own"]["patch-0"], out.path)
    assert coverage > 0.999
    assert agree > 0.95


# ------------------------------------------------------------------------- mixed folders
@pytest.mark.parametrize("other_crs", ["EPSG:32616", "EPSG:5070"])
def test_folder_mixing_crss_maps_every_file(data, other_crs):
    """A folder with patch 0 (NAD83 / UTM 17N) and patch 5 warped by rasterio into WGS 84 / UTM 16N
    (another zone and datum) or CONUS Albers, no --crs: both files' areas are mapped (on UTM 17N,
    the zone of the imagery's centre), each with the classes of its file's map in the file's own CRS."""
    folder = data["root"] / f"mixed{other_crs[5:]}"
    (folder / "a.tif").parent.mkdir(parents=True, exist_ok=True)
    (folder / "a.tif").write_bytes(NAIP["patch-0"].read_bytes())
    warped = _warp(NAIP["patch-5"], folder / "b.tif", other_crs)
    warped_own = P.predict_map(
        P.PredictConfig.of(data["ckpt"], [warped], data["root"] / f"own{other_crs[5:]}.tif", **FAST), progress=False
    ).path
    out = P.predict_map(
        P.PredictConfig.of(data["ckpt"], [folder], data["root"] / f"mixed{other_crs[5:]}.tif", **FAST), progress=False
    )
    with rasterio.open(out.path) as src:
        assert src.crs.to_epsg() == 32617
    # the imaged areas: the patches' footprints (the warped file's corners are nodata)
    mapped, outside = _footprint_mapped(out.path, [NAIP["patch-0"], NAIP["patch-5"]])
    assert mapped[0] > 0.999 and mapped[1] > 0.999 and outside == 0
    for own in (data["own"]["patch-0"], warped_own):
        coverage, agree = _agreement(own, out.path)
        assert coverage > 0.999 and agree > 0.95, own
