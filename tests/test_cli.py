"""The ``lcmap`` command line: list options (several values after one flag), ``lcmap evaluate`` end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from typer.testing import CliRunner

from lcmap.cli import app
from lcmap.cli_options import LIST_OPTIONS, expand_list_options
from lcmap.geodata.legends import IGNORE_INDEX, get_legend
from lcmap.geodata.sample import SAMPLE_DIR, sample_paths
from lcmap.pipeline.analysis.evaluate import LEGEND_TAG
from lcmap.pipeline.analysis.evaluate_report import format_score

runner = CliRunner()
CHES, NLCD = get_legend("chesapeake"), get_legend("nlcd")


def test_expand_list_options() -> None:
    args = ["-v", "evaluate", "--reference", "a", "b", "c", "--out", "o", "--baseline=x", "y", "--map", "m"]
    assert expand_list_options(args) == [
        "-v",
        "evaluate",
        "--reference",
        "a",
        "--reference",
        "b",
        "--reference",
        "c",
        "--out",
        "o",
        "--baseline=x",
        "--baseline",
        "y",
        "--map",
        "m",
    ]
    # repeated flags, non-list options and everything after "--" are left alone
    same = ["predict", "--images", "a", "--images", "b", "--bbox", "-80", "37", "-79", "38", "--", "--images", "p", "q"]
    assert expand_list_options(same) == same
    assert {"--images", "--labels", "--reference", "--baseline"} <= LIST_OPTIONS


def test_format_score_never_minus_zero() -> None:
    assert format_score(None) == "n/a" and format_score(None, signed=True) == "n/a"
    assert format_score(-0.0001) == "0.000" and format_score(-0.0001, signed=True) == "+0.000"
    assert format_score(-0.0006) == "-0.001" and format_score(0.12345, signed=True) == "+0.123"


# --------------------------------------------------------------------------- evaluate on the sample
def _target(codes: np.ndarray, legend) -> np.ndarray:
    return legend.code_to_target_lut()[codes.astype(np.int64)]


def _nearest(path: Path, transform, shape: tuple[int, int]) -> np.ndarray:
    """``path``'s band 1 at the centres of a 1 m grid (same CRS), by hand (0 off the file)."""
    with rasterio.open(path) as src:
        data, inv = src.read(1), ~src.transform
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    xs, ys = transform * (cols + 0.5, rows + 0.5)
    c, r = inv * (xs, ys)
    c, r = np.floor(c).astype(int), np.floor(r).astype(int)
    inside = (r >= 0) & (r < data.shape[0]) & (c >= 0) & (c < data.shape[1])
    return np.where(inside, data[r.clip(0, data.shape[0] - 1), c.clip(0, data.shape[1] - 1)], 0)


def _cm(truth: np.ndarray, pred: np.ndarray, n: int = 4) -> list[list[int]]:
    cm = np.zeros((n, n), dtype=np.int64)
    np.add.at(cm, (truth, pred), 1)
    return cm.tolist()


@pytest.fixture
def sample_map(tmp_path: Path) -> Path:
    """The reference of patch 0 as a "map" in Chesapeake codes (its legend in the LCMAP_LEGEND tag)."""
    path = tmp_path / "map.tif"
    shutil.copy(sample_paths()["reference"][0], path)
    with rasterio.open(path, "r+") as dst:
        dst.update_tags(**{LEGEND_TAG: json.dumps(CHES.to_dict())})
    return path


def test_evaluate_sample_several_values_after_one_flag_and_folders(sample_map: Path, tmp_path: Path) -> None:
    files = sample_paths()
    ref, lr = [str(p) for p in files["reference"]], [str(p) for p in files["labels"]]
    # expected, by hand: the map is patch 0's reference; the baseline is NLCD patch 0 (nearest 30 m)
    with rasterio.open(sample_map) as src:
        transform, shape = src.transform, src.shape
        ref_t = _target(src.read(1), CHES)
    base_t = _target(_nearest(Path(lr[0]), transform, shape), NLCD)
    common = (ref_t != IGNORE_INDEX) & (base_t != IGNORE_INDEX)
    assert common.sum() > 50_000

    common_args = [
        "evaluate",
        "--map",
        str(sample_map),
        "--reference-legend",
        "chesapeake",
        "--baseline-legend",
        "nlcd",
    ]
    runs = {
        "values after one flag": [
            "--reference",
            ref[2],
            ref[0],
            ref[1],
            "--baseline",
            lr[1],
            lr[0],
            "--baseline",
            lr[5],
        ],
        "folders": ["--reference", str(SAMPLE_DIR / "reference"), "--baseline", str(SAMPLE_DIR / "nlcd") + "/"],
        "glob and list": [
            "--reference",
            str(SAMPLE_DIR / "reference" / "patch-[0-3].tif"),
            "--baseline",
            str(tmp_path / "lr.txt"),
        ],
    }
    (tmp_path / "lr.txt").write_text("# NLCD of the sample\n" + "\n".join(lr[:2]) + "\n")
    expected_refs = {
        "values after one flag": sorted(ref[:3]),
        "folders": ref,
        "glob and list": ref[:4],
    }
    expected_base = {"values after one flag": sorted([lr[0], lr[1], lr[5]]), "folders": lr, "glob and list": lr[:2]}
    for name, args in runs.items():
        out = tmp_path / name.replace(" ", "_")
        result = runner.invoke(app, [*common_args, *args, "--out", str(out)])
        assert result.exit_code == 0, (name, result.output)
        m = json.loads((out / "metrics.json").read_text())
        assert m["reference"] == expected_refs[name], name
        assert m["baseline"]["files"] == expected_base[name], name
        assert m["pixels"] == int(common.sum()), name
        assert m["confusion"] == _cm(ref_t[common], ref_t[common]), name
        assert m["baseline"]["confusion"] == _cm(ref_t[common], base_t[common]), name
        assert f"OA {format_score(m['oa'])}" in result.output and "kappa" in result.output
        assert "-0.000" not in result.output


def test_evaluate_bad_list_input_exits_2(sample_map: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = runner.invoke(
        app,
        [
            "evaluate",
            "--map",
            str(sample_map),
            "--reference",
            str(tmp_path / "empty"),
            "--reference-legend",
            "chesapeake",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 2 and "no raster files" in " ".join(result.output.split())
    result = runner.invoke(
        app,
        [
            "evaluate",
            "--map",
            str(sample_map),
            "--reference",
            str(tmp_path / "x*.tif"),
            "--reference-legend",
            "chesapeake",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 2 and "matched no file" in " ".join(result.output.split())


def test_evaluate_undefined_kappa_prints_na(tmp_path: Path) -> None:
    """One class in both map and reference: agreement by chance is total, kappa is undefined."""

    def tif(path: Path, value: int) -> Path:
        with rasterio.open(
            path,
            "w",
            driver="GTiff",
            width=6,
            height=4,
            count=1,
            dtype="uint8",
            nodata=0,
            crs="EPSG:32617",
            transform=from_origin(500_000, 4_000_000, 1, 1),
        ) as dst:
            dst.write(np.full((4, 6), value, np.uint8), 1)
        return path

    out = tmp_path / "report"
    result = runner.invoke(
        app,
        [
            "evaluate",
            "--map",
            str(tif(tmp_path / "m.tif", 2)),
            "--reference",
            str(tif(tmp_path / "r.tif", 2)),
            "--reference-legend",
            "4class",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["kappa"] is None and m["oa"] == 1.0 and m["pixels"] == 24
    assert "kappa n/a" in result.output
    assert "| n/a |" in (out / "report.md").read_text()


def test_logging_shows_lcmap_info_but_not_library_chatter() -> None:
    import logging

    from lcmap.cli import _setup_logging

    _setup_logging(verbose=False)
    assert logging.getLogger("lcmap.pipeline.prediction.predict").isEnabledFor(logging.INFO)
    assert not logging.getLogger("rasterio.merge").isEnabledFor(logging.INFO)  # "Skipping source: ..."
    assert logging.getLogger("rasterio.merge").isEnabledFor(logging.WARNING)
    _setup_logging(verbose=True)
    assert logging.getLogger("rasterio.merge").isEnabledFor(logging.DEBUG)
    _setup_logging(verbose=False)
