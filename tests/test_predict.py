"""``lcmap predict``: COG output, styling, AOI masking, resume, block-size invariance, bad input.

Small rasters written here (a two-file mosaic with a nodata hole) and tiny random U-Net
checkpoints; most runs use ``scheduler="synchronous"`` (one test goes through a LocalCluster).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin
from rasterio.warp import transform_bounds

import lcmap.pipeline.prediction.predict as P
from lcmap.errors import DiskFullError, LcmapInputError
from lcmap.geodata.legends import get_legend, target_legend
from lcmap.models import build_model
from lcmap.pipeline.prediction import execution, inference, mapfile
from lcmap.pipeline.prediction.cog import read_category_names
from lcmap.pipeline.runs import save_checkpoint

CRS = "EPSG:32617"
X0, Y0 = 500_000.0, 4_000_000.0
H, W = 150, 170
SPLIT, GAP = 90, 6  # the mosaic's two files: columns [0, 90) and [96, 170); no file covers the gap
HOLE = (slice(10, 30), slice(120, 150))  # all bands 0 = imagery nodata
FAST = dict(tile_px=64, overlap_px=16, batch_size=4, scheduler="synchronous")


def _imagery(folder: Path, bands: int = 4) -> list[Path]:
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    rng = np.random.default_rng(0)
    layers = [
        128 + 100 * np.sin(xx / 9),
        128 + 100 * np.cos(yy / 13),
        128 + 80 * np.sin((xx + yy) / 7),
        rng.integers(1, 255, (H, W)),
    ]
    data = np.stack([layers[b % 4] for b in range(bands)]).clip(1, 255).astype(np.uint8)
    data[:, HOLE[0], HOLE[1]] = 0
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, c0, c1 in (("left.tif", 0, SPLIT), ("right.tif", SPLIT + GAP, W)):
        path = folder / name
        with rasterio.open(
            path,
            "w",
            driver="GTiff",
            width=c1 - c0,
            height=H,
            count=bands,
            dtype="uint8",
            crs=CRS,
            transform=from_origin(X0 + c0, Y0, 1, 1),
        ) as dst:
            dst.write(data[:, :, c0:c1])
        paths.append(path)
    return paths


def _checkpoint(path: Path, legend, bands: int = 4, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = build_model("unet", bands, len(legend))
    with torch.no_grad():  # sharpen the random head so that several classes win somewhere
        model.net.segmentation_head[0].weight.mul_(8.0)
    return save_checkpoint(path, model, "unet", legend, [128.0] * bands, [60.0] * bands)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    images = _imagery(root / "images")
    ckpt4 = _checkpoint(root / "target4.ckpt", target_legend())
    ckpt_nlcd = _checkpoint(root / "nlcd.ckpt", get_legend("nlcd"), seed=1)
    ref = P.predict_map(
        P.PredictConfig.of(ckpt4, [root / "images"], root / "ref" / "map.tif", block_px=4096, confidence=True, **FAST),
        progress=False,
    ).path
    return {"root": root, "images": images, "ckpt": ckpt4, "ckpt_nlcd": ckpt_nlcd, "ref": ref}


def _read(path: Path, band: int = 1) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(band)


# ------------------------------------------------------------------------------ the map
def test_cog_grid_styling_and_legend(data):
    ref = data["ref"]
    from rio_cogeo.cogeo import cog_validate

    assert cog_validate(str(ref), quiet=True)[0]
    conf_path = ref.with_name("map_confidence.tif")
    assert cog_validate(str(conf_path), quiet=True)[0]
    assert not Path(str(ref) + ".partial").exists()
    with rasterio.open(data["images"][0]) as left:
        crs, transform = left.crs, left.transform
    with rasterio.open(ref) as src:
        assert src.crs == crs and src.transform == transform and (src.height, src.width) == (H, W)
        assert src.dtypes[0] == "uint8" and src.nodata == 0
        assert src.profile["blockxsize"] == 512 and src.profile["compress"] == "zstd"
        cmap = src.colormap(1)
        legend = json.loads(src.tags()[mapfile.LEGEND_TAG])
        codes = src.read(1)
    assert legend == target_legend().to_dict()
    for c in target_legend().classes:
        assert cmap[c.code] == (*c.color, 255)
    assert cmap[0][3] == 0  # nodata transparent
    assert read_category_names(ref) == ["nodata", "water", "tree canopy", "low vegetation", "built-up"]
    palette = ET.parse(ref.with_suffix(".qml")).getroot().find("pipe/rasterrenderer")
    assert palette.get("type") == "paletted"
    entries = palette.findall("colorPalette/paletteEntry")
    assert [(e.get("value"), e.get("label")) for e in entries] == [
        ("1", "water"),
        ("2", "tree canopy"),
        ("3", "low vegetation"),
        ("4", "built-up"),
    ]
    # every class of this legend has a target: only the nodata hole and the gap between files are 0
    assert set(np.unique(codes)) - {0} <= {1, 2, 3, 4} and len(np.unique(codes[codes > 0])) >= 2
    invalid = np.zeros((H, W), bool)
    invalid[HOLE] = True
    invalid[:, SPLIT : SPLIT + GAP] = True
    assert np.array_equal(codes == 0, invalid)
    conf = _read(conf_path)
    assert np.array_equal(conf == 255, invalid)
    valid = conf[codes > 0]
    assert valid.min() >= 25 and valid.max() <= 100  # max of 4 probabilities, in percent


def test_preview_png_beside_the_map(data):
    """MAP.preview.png: small; every map pixel in its class colour from the COG's colour table
    (nodata transparent); the legend beside it shows the same colours; the STAC Item lists it."""
    from PIL import Image

    from lcmap.pipeline.prediction.preview import MIN_MAP_PX

    ref = data["ref"]
    png = ref.with_name("map.preview.png")
    assert png.is_file() and png.stat().st_size < 200_000
    assert not [p for p in ref.parent.iterdir() if "tmp" in p.name]  # written atomically
    image = np.asarray(Image.open(png).convert("RGBA"))
    assert max(image.shape[:2]) <= 1024
    with rasterio.open(ref) as src:
        codes, cmap = src.read(1), src.colormap(1)
    factor = max(1, MIN_MAP_PX // max(H, W))  # small maps are enlarged by a whole factor
    map_part = image[: H * factor : factor, : W * factor : factor]
    expected = np.array([(*cmap[c][:3], 0 if c == 0 else 255) for c in range(256)], np.uint8)[codes]
    assert (map_part[..., 3] == 0).sum() == (codes == 0).sum() > 0
    opaque = codes > 0
    assert np.array_equal(map_part[opaque], expected[opaque])
    legend = image[:, W * factor :, :3].reshape(-1, 3)
    for c in target_legend().classes:  # each class's swatch, in the map's colour
        assert (legend == cmap[c.code][:3]).all(axis=1).sum() >= 100, c.name
    item = json.loads(ref.with_suffix(".stac.json").read_text())
    assert item["assets"]["thumbnail"]["href"] == png.name and item["assets"]["thumbnail"]["roles"] == ["thumbnail"]


def test_block_size_and_mosaic_invariance(data):
    result = P.predict_map(
        P.PredictConfig.of(
            data["ckpt"], data["images"], data["root"] / "b48" / "map.tif", block_px=48, confidence=True, **FAST
        ),
        progress=False,
    )
    out = result.path
    # 150 x 170 px in 48 px blocks on the window lattice (it starts 32 px before the map's corner
    # here): rows [0, 16, 64, 112], columns [0, 16, 64, 112, 160]
    assert result.blocks == 4 * 5
    assert result.confidence_path == out.with_name("map_confidence.tif")
    assert np.array_equal(_read(out), _read(data["ref"]))
    assert np.array_equal(
        _read(out.with_name("map_confidence.tif")), _read(data["ref"].with_name("map_confidence.tif"))
    )


def test_aoi_polygon_masks_and_crops(data, tmp_path):
    # a triangle in lon/lat over the middle of the imagery
    corners = [(X0 + 20, Y0 - 130), (X0 + 150, Y0 - 130), (X0 + 85, Y0 - 15)]
    from rasterio.warp import transform as warp

    lon, lat = warp(CRS, "EPSG:4326", [c[0] for c in corners], [c[1] for c in corners])
    ring = [[a, b] for a, b in zip(lon, lat, strict=True)] + [[lon[0], lat[0]]]
    aoi = tmp_path / "aoi.geojson"
    aoi.write_text(
        json.dumps(
            {
                "type": "FeatureCollection",
                "features": [
                    {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [ring]}}
                ],
            }
        )
    )
    out = P.predict_map(
        P.PredictConfig.of(data["ckpt"], data["images"], tmp_path / "aoi" / "map.tif", aoi=aoi, block_px=48, **FAST),
        progress=False,
    ).path
    with rasterio.open(out) as src:
        codes, t = src.read(1), src.transform
    # extent: the triangle's bounds snapped outwards to the 1 m grid
    assert t.a == 1 and -t.e == 1
    assert X0 + 19 <= t.c <= X0 + 20 and Y0 - 16 <= t.f <= Y0 - 14
    rows, cols = np.indices(codes.shape)
    cx, cy = t.c + cols + 0.5, t.f - rows - 0.5  # pixel centres
    (ax, ay), (bx, by), (qx, qy) = corners

    def side(px, py, x1, y1, x2, y2):
        return (x2 - x1) * (py - y1) - (y2 - y1) * (px - x1)

    s1, s2, s3 = side(cx, cy, ax, ay, bx, by), side(cx, cy, bx, by, qx, qy), side(cx, cy, qx, qy, ax, ay)
    inside = ((s1 > 0) & (s2 > 0) & (s3 > 0)) | ((s1 < 0) & (s2 < 0) & (s3 < 0))
    margin = np.minimum(np.minimum(abs(s1), abs(s2)), abs(s3)) > 200  # away from the edges (reprojection)
    col_img, row_img = (cx - X0 - 0.5).astype(int), (Y0 - cy - 0.5).astype(int)
    in_hole = ((row_img >= 10) & (row_img < 30) & (col_img >= 120) & (col_img < 150)) | (
        (col_img >= SPLIT) & (col_img < SPLIT + GAP)
    )
    assert np.all(codes[~inside & margin] == 0)
    assert np.all(codes[inside & margin & ~in_hole] > 0)


def test_bbox_in_utm_crops_exactly(data, tmp_path):
    bbox = (X0 + 10.4, Y0 - 100, X0 + 120, Y0 - 20.5)
    out = P.predict_map(
        P.PredictConfig.of(
            data["ckpt"], data["images"], tmp_path / "bbox" / "map.tif", bbox=bbox, bbox_crs=CRS, block_px=4096, **FAST
        ),
        progress=False,
    ).path
    with rasterio.open(out) as src:
        assert src.transform.c == X0 + 10 and src.transform.f == Y0 - 20
        assert (src.width, src.height) == (110, 80)
        codes = src.read(1)
    assert np.all(np.delete(codes, np.s_[SPLIT - 10 : SPLIT + GAP - 10], axis=1) > 0)
    assert np.all(codes[:, SPLIT - 10 : SPLIT + GAP - 10] == 0)


def test_native_legend_codes(data, tmp_path):
    nlcd = get_legend("nlcd")
    out = P.predict_map(
        P.PredictConfig.of(
            data["ckpt_nlcd"], data["images"], tmp_path / "native" / "map.tif", legend="native", block_px=96, **FAST
        ),
        progress=False,
    ).path
    with rasterio.open(out) as src:
        codes = src.read(1)
        assert json.loads(src.tags()[mapfile.LEGEND_TAG])["name"] == "nlcd"
        cmap = src.colormap(1)
    present = set(np.unique(codes).tolist()) - {0}
    assert present and present <= set(nlcd.codes)
    assert cmap[11] == (*nlcd.classes[0].color, 255)
    names = read_category_names(out)
    assert names[11] == "Open Water" and names[95] == "Emergent Herbaceous Wetlands"
    entries = ET.parse(out.with_suffix(".qml")).getroot().findall("pipe/rasterrenderer/colorPalette/paletteEntry")
    assert len(entries) == len(nlcd)
    # target codes of the same model: wherever the native map's class has a target, the target map
    # may differ from it only where several LR classes share a target (summed probabilities)
    tgt = P.predict_map(
        P.PredictConfig.of(data["ckpt_nlcd"], data["images"], tmp_path / "tgt" / "map.tif", block_px=96, **FAST),
        progress=False,
    ).path
    lut = np.zeros(256, np.uint8)
    for c in nlcd.classes:
        lut[c.code] = 0 if c.target is None else nlcd.target.index_of(c.target) + 1
    assert np.mean(lut[codes] == _read(tgt)) > 0.5


def test_target_map_takes_the_target_class_of_highest_summed_probability(data, tmp_path, monkeypatch):
    """NLCD 41 alone is the most probable LR class, but 71 + 81 + 82 (low vegetation) sum higher."""
    nlcd = get_legend("nlcd")
    idx = {c: nlcd.codes.index(c) for c in (12, 41, 71, 81, 82)}

    def fake_proba(model, x):  # per pixel, from the pixel's own (normalised) bands only
        p = torch.full((x.shape[0], len(nlcd)) + x.shape[2:], 0.0)
        split = x[:, 0] > 0  # band 1 above 128
        p[:, idx[41]] = torch.where(split, 0.3, 0.9)
        for c in (71, 81, 82):
            p[:, idx[c]] = torch.where(split, 0.2, 0.0)
        snow = x[:, 1] > 1.5  # band 2 above 218: NLCD 12 (no target class) wins outright
        p[:, idx[12]] = torch.where(snow, 5.0, 0.0)
        p[:, idx[41]] = torch.where(snow, 0.0, p[:, idx[41]])
        return p / p.sum(1, keepdim=True)

    monkeypatch.setattr(inference, "predict_proba", fake_proba)
    native = _read(
        P.predict_map(
            P.PredictConfig.of(
                data["ckpt_nlcd"], data["images"], tmp_path / "n" / "map.tif", legend="native", block_px=96, **FAST
            ),
            progress=False,
        ).path
    )
    tgt = _read(
        P.predict_map(
            P.PredictConfig.of(data["ckpt_nlcd"], data["images"], tmp_path / "t" / "map.tif", block_px=96, **FAST),
            progress=False,
        ).path
    )
    with rasterio.open(data["ref"]) as src:  # the imagery on the output grid (same grid as ref)
        band1, band2 = (np.full((src.height, src.width), -1.0) for _ in range(2))
    for f in data["images"]:
        with rasterio.open(f) as src:
            c0 = int(round(src.transform.c - X0))
            band1[:, c0 : c0 + src.width] = src.read(1)
            band2[:, c0 : c0 + src.width] = src.read(2)
    valid = native > 0
    assert valid.sum() > 1000
    snow, split = band2 > 128 + 1.5 * 60, band1 > 128
    assert snow[valid].any() and (split & ~snow)[valid].any() and (~split & ~snow)[valid].any()
    assert np.all(native[valid & snow] == 12) and np.all(native[valid & ~snow] == 41)
    assert np.all(tgt[valid & snow] == 0)  # untargeted class wins: nodata
    assert np.all(tgt[valid & ~snow & split] == 3)  # low vegetation (0.6) beats tree canopy (0.3)
    assert np.all(tgt[valid & ~snow & ~split] == 2)
    assert np.all(tgt[~valid] == 0)


def test_resume_after_interruption(data, tmp_path, monkeypatch):
    out = tmp_path / "resume" / "map.tif"
    real_write = mapfile.write_block
    written = []

    def failing_write(path, grid, block, codes, conf):
        if len(written) == 3:
            raise KeyboardInterrupt("killed")
        written.append(block.name)
        return real_write(path, grid, block, codes, conf)

    monkeypatch.setattr(mapfile, "write_block", failing_write)
    with pytest.raises(KeyboardInterrupt):
        P.predict_map(
            P.PredictConfig.of(data["ckpt"], data["images"], out, block_px=48, confidence=True, **FAST), progress=False
        )
    assert not out.exists() and not out.with_name("map_confidence.tif").exists()
    partial = Path(str(out) + ".partial")
    assert sorted(p.stem for p in (partial / "blocks").glob("*.tif")) == sorted(written)
    assert (partial / "manifest.json").is_file()

    monkeypatch.setattr(mapfile, "write_block", real_write)
    ran = []
    real_predict = execution.predict_group

    def counting(st, job, blocks, given=None):
        for item in real_predict(st, job, blocks, given):
            ran.append(item[0].name)
            yield item

    monkeypatch.setattr(execution, "predict_group", counting)
    result = P.predict_map(
        P.PredictConfig.of(data["ckpt"], data["images"], out, block_px=48, confidence=True, **FAST), progress=False
    )
    assert result.blocks_resumed == 3 and len(ran) == 20 - 3 and not set(ran) & set(written)  # 4 x 5 blocks
    assert result.blocks_run == 20 - 3
    assert np.array_equal(_read(out), _read(data["ref"]))
    assert np.array_equal(
        _read(out.with_name("map_confidence.tif")), _read(data["ref"].with_name("map_confidence.tif"))
    )
    assert not partial.exists()

    # a leftover from other parameters is not reused
    (partial / "blocks").mkdir(parents=True)
    (partial / "manifest.json").write_text(json.dumps({"version": 1, "tile_px": 999}))
    (partial / "blocks" / "r00000_c00000.tif").write_bytes(b"stale")
    ran.clear()
    result = P.predict_map(P.PredictConfig.of(data["ckpt"], data["images"], out, block_px=48, **FAST), progress=False)
    assert result.blocks_resumed == 0 and len(ran) == 20
    assert np.array_equal(_read(out), _read(data["ref"]))


def test_local_cluster_matches_synchronous(data, tmp_path):
    opts = {**FAST, "scheduler": None}
    result = P.predict_map(
        P.PredictConfig.of(data["ckpt"], data["images"], tmp_path / "dask" / "map.tif", block_px=96, **opts),
        progress=False,
    )
    out = result.path
    assert result.blocks_run == 2 * 3  # 96 px blocks on the lattice (from -32): rows [0, 64), cols [0, 64, 160)
    assert np.array_equal(_read(out), _read(data["ref"]))


# ---------------------------------------------------------------------------- bad input
def _bad_cases(data, tmp_path):
    three_band = _checkpoint(tmp_path / "rgb.ckpt", target_legend(), bands=3)
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"not a checkpoint at all")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    far = transform_bounds(CRS, "EPSG:4326", X0 + 50_000, Y0 - 50_000, X0 + 50_100, Y0 - 49_900)
    return {
        "bbox outside": (dict(bbox=far), "does not overlap"),
        "band count": (dict(model=three_band), "band"),
        "corrupt checkpoint": (dict(model=corrupt), "not a readable checkpoint"),
        "missing checkpoint": (dict(model=tmp_path / "nope.ckpt"), "does not exist"),
        "tile not multiple of 32": (dict(tile_px=100), "multiple of 32"),
        "overlap too large": (dict(overlap_px=40), "half of --tile-px"),
        "unwritable folder": (dict(out=blocker / "sub" / "map.tif"), "cannot write to the output folder"),
        "bad legend mode": (dict(legend="nlcd"), "--legend"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "bbox outside",
        "band count",
        "corrupt checkpoint",
        "missing checkpoint",
        "tile not multiple of 32",
        "overlap too large",
        "unwritable folder",
        "bad legend mode",
    ],
)
def test_bad_input_writes_nothing(data, tmp_path, case):
    kwargs, message = _bad_cases(data, tmp_path)[case]
    args = {"model": data["ckpt"], "images": data["images"], "out": tmp_path / "out" / "map.tif", **FAST}
    args.update(kwargs)
    with pytest.raises(LcmapInputError, match=message):
        P.predict_map(P.PredictConfig.of(**args), progress=False)
    out = Path(args["out"])
    assert not out.exists() and not Path(str(out) + ".partial").exists()


def test_full_disk_says_how_much_space(data, tmp_path, monkeypatch):
    def full(path, grid, block, codes, conf):
        raise DiskFullError("No space left on device")

    monkeypatch.setattr(mapfile, "write_block", full)
    out = tmp_path / "full" / "map.tif"
    with pytest.raises(LcmapInputError, match=r"disk is full.*needs at most about [\d.]+ [KMG]?B"):
        P.predict_map(P.PredictConfig.of(data["ckpt"], data["images"], out, block_px=4096, **FAST), progress=False)
    assert not out.exists()
    assert mapfile.is_enospc(rasterio.errors.RasterioIOError("write failed: No space left on device"))


def test_imagery_nodata_reaches_the_model_as_the_band_mean(data, tmp_path, monkeypatch):
    """The hole and the gap between the two files are fed as 0 (normalised band mean), not as the
    raw nodata value ((0 - 128) / 60 = -2.13 in every band), which no valid pixel (>= 1) reaches."""
    seen = []
    real = inference.predict_proba

    def spy(model, x):
        seen.append(x.detach().clone())
        return real(model, x)

    monkeypatch.setattr(inference, "predict_proba", spy)
    P.predict_map(
        P.PredictConfig.of(data["ckpt"], data["images"], tmp_path / "m" / "map.tif", block_px=96, **FAST),
        progress=False,
    )
    x = torch.cat(seen)
    assert x.min() > (1 - 128) / 60 - 1e-4
    assert ((x == 0).all(dim=1)).sum() >= 20 * 30  # at least the hole's pixels, all bands 0


def test_nan_in_float_imagery_is_map_nodata_and_the_rest_maps_normally(data, tmp_path):
    """Float imagery with NaN as nodata (a NaN block, one NaN band, an inf): those pixels get the
    map's nodata; every other pixel gets the class it gets when the same pixels hold a finite
    nodata value (the one valid-pixel rule), so NaN is not fed to the model ("all water" before)."""
    with rasterio.open(data["images"][0]) as src:
        raw, profile = src.read().astype(np.float32), src.profile
    bad = np.zeros(raw.shape[1:], bool)
    bad[40:70, 20:50] = True
    nan = raw.copy()
    nan[:, bad] = np.nan
    nan[0, 5, 5], nan[2, 6, 6] = np.nan, np.inf
    bad[5, 5] = bad[6, 6] = True
    finite = raw.copy()
    finite[:, bad] = -9999.0
    maps = []
    for name, values, nodata in (("nan", nan, float("nan")), ("finite", finite, -9999.0)):
        path = tmp_path / name / "img.tif"
        path.parent.mkdir()
        with rasterio.open(path, "w", **{**profile, "dtype": "float32", "nodata": nodata}) as dst:
            dst.write(values)
        maps.append(
            _read(
                P.predict_map(
                    P.PredictConfig.of(data["ckpt"], path, tmp_path / name / "map.tif", **FAST), progress=False
                ).path
            )
        )
    got, expected = maps
    assert (got[bad] == 0).all() and (got[~bad] != 0).all()
    assert np.array_equal(got, expected)
    assert len(np.unique(got[~bad])) > 1  # not one class everywhere
