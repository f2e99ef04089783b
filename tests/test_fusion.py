"""Several label products fused into one label (``--label-product``, ``--label-fusion``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml
from pyproj import Transformer
from rasterio.transform import from_origin, rowcol
from typer.testing import CliRunner

from lcmap.geodata.datasets import LabelledImagery, open_imagery, open_labels
from lcmap.geodata.fusion import FusedLabelRaster, fuse_targets, fused_legend
from lcmap.geodata.legends import DEFAULT_TARGET, IGNORE_INDEX, get_legend
from lcmap.pipeline.training.config import TrainConfig
from tests.rasters import fake_imagery, write_raster

SAMPLE = Path(__file__).resolve().parents[1] / "lcmap" / "geodata" / "sample"
I = IGNORE_INDEX  # noqa: E741
# target indices: 0 water, 1 tree canopy, 2 low vegetation, 3 built-up


def test_fuse_targets_by_hand():
    # 3 products x 6 pixels: agree / disagree / nodata in one / nodata in all / 3-way / first nodata
    t = np.array(
        [
            [1, 1, I, I, 0, I],
            [1, 3, 2, I, 1, 3],
            [1, 1, 2, I, 2, 0],
        ],
        dtype=np.uint8,
    )
    partial = fuse_targets(t, "partial")
    assert partial.tolist() == [0b10, 0b1010, 0b100, 0, 0b111, 0b1001]
    assert fuse_targets(t, "agree").tolist() == [0b10, 0, 0b100, 0, 0, 0]
    assert fuse_targets(t, "first").tolist() == [0b10, 0b10, 0b100, 0, 0b1, 0b1000]
    with pytest.raises(ValueError):
        fuse_targets(t, "vote")


def test_fused_legend_plain_classes_first_and_sets_as_mixed_classes():
    from lcmap.pipeline.training.label_classes import allowed_classes_for

    legend = fused_legend(DEFAULT_TARGET)
    assert legend.codes[:4] == [1, 2, 4, 8] and len(legend) == 15
    assert [c.target for c in legend.classes[:4]] == DEFAULT_TARGET.names
    allowed = allowed_classes_for(legend, legend.default_mixed_classes())
    assert allowed[:4] == [[0], [1], [2], [3]]
    assert allowed[legend.codes.index(0b1010)] == [1, 3]
    assert allowed[legend.codes.index(0b1111)] == [0, 1, 2, 3]


# ------------------------------------------------------------- three CRSs, checked pixel by pixel
H = W = 90  # imagery: EPSG:32617, 1 m, 90 x 90 px at (500000, 4000000)
X0, Y0 = 500_000.0, 4_000_000.0
WC = {0: 80, 1: 10, 2: 30, 3: 50}  # worldcover code per target index
NL = {0: 11, 1: 41, 2: 71, 3: 23}  # nlcd code per target index


def _product(path: Path, crs: str, res: float, legend_codes: dict, seed: int, nodata_share: float) -> tuple:
    """A random product covering the imagery (plus a margin) in ``crs`` with ``res`` cells."""
    tr = Transformer.from_crs("EPSG:32617", crs, always_xy=True)
    xs, ys = tr.transform([X0 - 20, X0 + W + 20, X0 - 20, X0 + W + 20], [Y0 + 20, Y0 + 20, Y0 - H - 20, Y0 - H - 20])
    west, north = min(xs), max(ys)
    w, h = int((max(xs) - west) / res) + 2, int((north - min(ys)) / res) + 2
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, 4, size=(h, w))
    codes = np.vectorize(legend_codes.get)(targets).astype(np.uint8)
    codes[rng.random((h, w)) < nodata_share] = 0
    transform = from_origin(west, north, res, res)
    write_raster(path, codes, crs, transform, nodata=0)
    return codes, transform, tr


def _expected_targets(codes, transform, tr, legend_codes) -> tuple[np.ndarray, np.ndarray]:
    """Target index per 1 m pixel from the product cell under the pixel centre (pyproj + rowcol, not GDAL),
    and whether the centre lies safely (>= 15 % of a cell) inside that cell."""
    cols, rows = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
    px, py = tr.transform(X0 + cols.ravel(), Y0 - rows.ravel())
    fr, fc = rowcol(transform, px, py, op=lambda v: v)
    fr, fc = np.asarray(fr, float), np.asarray(fc, float)
    r, c = np.floor(fr).astype(int), np.floor(fc).astype(int)
    safe = (np.minimum(fr - r, 1 - (fr - r)) > 0.15) & (np.minimum(fc - c, 1 - (fc - c)) > 0.15)
    to_target = {v: k for k, v in legend_codes.items()}
    targets = np.array([to_target.get(int(v), I) for v in codes[r, c]])
    return targets.reshape(H, W), safe.reshape(H, W)


def _by_hand(a: int, b: int, rule: str) -> set[int] | None:
    """The acceptable target classes of one pixel (None: ignored)."""
    have = [t for t in (a, b) if t != I]
    if not have:
        return None
    if rule == "first":
        return {have[0]}
    if len(set(have)) == 1 or rule == "partial":
        return set(have)
    return None  # agree, disagreeing


@pytest.mark.parametrize("rule", ["partial", "agree", "first"])
def test_products_in_different_crs_fuse_pixel_by_pixel(tmp_path, rule):
    img = fake_imagery(tmp_path / "img.tif", h=H, w=W, x0=X0, y0=Y0)
    a_codes, a_tr, a_proj = _product(tmp_path / "a" / "wc.tif", "EPSG:5070", 30.0, WC, seed=1, nodata_share=0.2)
    b_codes, b_tr, b_proj = _product(tmp_path / "b" / "nl.tif", "EPSG:4326", 1e-4, NL, seed=2, nodata_share=0.2)
    a, a_safe = _expected_targets(a_codes, a_tr, a_proj, WC)
    b, b_safe = _expected_targets(b_codes, b_tr, b_proj, NL)
    products = [
        open_labels([tmp_path / "a"], get_legend("worldcover")),
        open_labels([tmp_path / "b"], get_legend("nlcd")),
    ]
    fused = FusedLabelRaster(products, rule)
    ds = LabelledImagery(open_imagery([img]), fused)
    mask = ds[(slice(X0, X0 + W, 1.0), slice(Y0 - H, Y0, 1.0))]["mask"].numpy()
    assert mask.shape == (H, W)
    legend = fused.legend
    safe = a_safe & b_safe
    assert safe.sum() > 0.15 * H * W
    n_sets = n_ignored = 0
    for r, c in zip(*np.nonzero(safe), strict=True):
        want = _by_hand(int(a[r, c]), int(b[r, c]), rule)
        got = mask[r, c]
        if want is None:
            assert got == I, (r, c)
            n_ignored += 1
        else:
            assert got != I and legend.codes[got] == sum(1 << t for t in want), (r, c, want, got)
            n_sets += len(want) > 1
    # the case mix is real: sets only with partial, ignored pixels at least where both are nodata
    assert (n_sets > 0) == (rule == "partial")
    assert n_ignored > 0


# ------------------------------------------------------------- options
def test_label_product_flags_and_config_file_agree(tmp_path):
    from lcmap.cli import app
    from lcmap.cli_options import command_from_options  # noqa: F401 - the flags come from TrainConfig

    flags = TrainConfig().merged(label_products=["esa/=worldcover", "esri/a.tif,esri/b.tif=esri"])
    assert flags.label_products == [
        {"labels": ["esa/"], "legend": "worldcover"},
        {"labels": ["esri/a.tif", "esri/b.tif"], "legend": "esri"},
    ]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {"label_products": [{"labels": "esa/", "legend": "worldcover"}, {"labels": ["esri/a.tif", "esri/b.tif"],
                                                                             "legend": "esri"}],
             "label_fusion": "agree"}
        )
    )  # fmt: skip
    from_file = TrainConfig.from_yaml(cfg)
    assert from_file.label_products == flags.label_products and from_file.label_fusion == "agree"
    with pytest.raises(Exception, match="PATHS=LEGEND"):
        TrainConfig().merged(label_products=["esa/"])
    both = TrainConfig(images=["i"], labels=["l"], out="o", label_products=flags.label_products)
    with pytest.raises(Exception, match="not both"):
        both.check()
    bad = TrainConfig(images=["i"], out="o", label_products=flags.label_products, label_fusion="vote")
    with pytest.raises(Exception, match="label-fusion"):
        bad.check()
    text = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).output
    assert "--label-product" in text and "--label-fusion" in text


def test_one_product_is_todays_training(tmp_path):
    """One --label-product gives the same options, hence the same label tensors, as --labels/--legend."""
    from lcmap.pipeline.training.train import _open_inputs

    base = dict(images=[str(SAMPLE / "naip")], aoi=str(SAMPLE / "aoi_train.geojson"), out=str(tmp_path))
    today = TrainConfig(labels=[str(SAMPLE / "nlcd")], legend="nlcd", **base)
    one = TrainConfig(label_products=[{"labels": [str(SAMPLE / "nlcd")], "legend": "nlcd"}], **base).single_product()
    assert one == today
    a, b = _open_inputs(today), _open_inputs(one)
    with rasterio.open(SAMPLE / "naip" / "patch-0.tif") as src:
        left, top = src.bounds.left, src.bounds.top
    query = (slice(left, left + 128, 1.0), slice(top - 128, top, 1.0))
    ma = LabelledImagery(a.imagery, a.labels)[query]["mask"]
    mb = LabelledImagery(b.imagery, b.labels)[query]["mask"]
    assert (ma != I).any() and bool((ma == mb).all())
    assert b.net_legend is None and b.legend.name == "nlcd"


# ------------------------------------------------------------- end to end
def _worldcover_from_nlcd(src_dir: Path, out_dir: Path, shift_m: float) -> Path:
    """A second product: the sample NLCD recoded to WorldCover and shifted east by ``shift_m``."""
    recode = {11: 80, 21: 50, 22: 50, 23: 50, 24: 50, 41: 10, 42: 10, 43: 10, 52: 20, 71: 30, 81: 40, 82: 40,
              90: 90, 95: 90, 31: 60, 0: 0}  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in sorted(src_dir.glob("patch-*.tif")):
        with rasterio.open(path) as src:
            codes = src.read(1)
            t = src.transform
            crs = src.crs.to_string()
        wc = np.vectorize(lambda v: recode.get(int(v), 0))(codes).astype(np.uint8)
        write_raster(out_dir / path.name, wc, crs, from_origin(t.c + shift_m, t.f, t.a, -t.e), nodata=0)
    return out_dir


@pytest.mark.slow
def test_train_two_products_from_a_config_file_then_predict_target_classes(tmp_path):
    from lcmap.cli import app
    from lcmap.pipeline.runs import load_trained_model, read_checkpoint

    second = _worldcover_from_nlcd(SAMPLE / "nlcd", tmp_path / "wc", shift_m=30.0)
    cfg = tmp_path / "train.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "images": [str(SAMPLE / "naip")],
                "label_products": [
                    {"labels": [str(SAMPLE / "nlcd")], "legend": "nlcd"},
                    {"labels": [str(second)], "legend": "worldcover"},
                ],
                "aoi": str(SAMPLE / "aoi_train.geojson"),
                "epochs": 1, "steps_per_epoch": 2, "batch_size": 2, "patch_px": 64, "val_patch_px": 256,
                "accelerator": "cpu", "model": "unet",
            }
        )
    )  # fmt: skip
    run = tmp_path / "run"
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--config", str(cfg), "--out", str(run)])
    assert result.exit_code == 0, result.output
    saved = TrainConfig.from_yaml(run / "config.yaml")
    assert [p["legend"] for p in saved.label_products] == ["nlcd", "worldcover"] and saved.label_fusion == "partial"
    tm = load_trained_model(run)
    assert tm.legend.codes == [1, 2, 3, 4] and tm.legend.name == "4class"
    hp = read_checkpoint(run / "checkpoints" / "last.ckpt")["hyper_parameters"]
    assert len(hp["allowed_classes"]) == 15 and len(hp["class_weights"]) == 15
    out = tmp_path / "map.tif"
    result = runner.invoke(
        app, ["predict", "--model", str(run), "--images", str(SAMPLE / "naip" / "patch-0.tif"), "--out", str(out),
              "--legend", "native"]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    with rasterio.open(out) as src:
        values = set(np.unique(src.read(1)).tolist())
    assert values <= {0, 1, 2, 3, 4} and values - {0}
