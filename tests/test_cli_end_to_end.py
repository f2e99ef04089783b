"""Every command through the CLI, end to end on the embedded real sample, as a user would type them.

``lcmap train`` (imagery as a quoted glob, labels as several files after one flag) -> ``lcmap
predict`` (imagery as a folder) -> ``lcmap evaluate`` (references as a ``.txt`` list, baseline as a
folder) -> ``lcmap stats`` -> ``lcmap changes`` -> ``lcmap stac``. The training is tiny (a few
steps): the test checks that the commands fit together and write what they promise, not accuracy.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import geopandas as gpd
import pytest
import rasterio
import shapely
from typer.testing import CliRunner

from lcmap.cli import app
from lcmap.geodata.sample import SAMPLE_DIR, sample_paths


def _ok(result) -> None:
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("e2e") / "run"
    train_labels = [str(p) for p in sample_paths("train")["labels"]]
    args = [
        "train",
        "--images", str(SAMPLE_DIR / "naip" / "patch-*.tif"),
        "--labels", *train_labels,
        "--legend", "nlcd",
        "--aoi", str(SAMPLE_DIR / "aoi_train.geojson"),
        "--model", "paraformer-tiny",
        "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "2", "--patch-px", "64",
        "--num-workers", "0", "--no-progress-bar",
        "--out", str(run),
    ]  # fmt: skip
    _ok(CliRunner().invoke(app, args, env={"COLUMNS": "200"}))
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "config.yaml").is_file()
    return run


def test_train_predict_evaluate_stats_changes_stac(trained: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    paths = sample_paths("heldout")
    out_map = tmp_path / "map" / "MAP.tif"
    predict = ["predict", "--model", str(trained), "--images", str(SAMPLE_DIR / "naip"),
               "--aoi", str(SAMPLE_DIR / "aoi_heldout.geojson"), "--out", str(out_map),
               "--tile-px", "128", "--overlap-px", "32", "--scheduler", "synchronous"]  # fmt: skip
    _ok(runner.invoke(app, predict, env={"COLUMNS": "200"}))
    assert out_map.is_file() and out_map.with_suffix(".qml").is_file()
    assert (out_map.parent / "MAP.stac.json").is_file()
    with rasterio.open(out_map) as src:
        assert src.tags().get("LCMAP_LEGEND") and src.count == 1

    refs = tmp_path / "references.txt"
    refs.write_text("\n".join(str(p) for p in paths["reference"]) + "\n")
    report = tmp_path / "report"
    evaluate = ["evaluate", "--map", str(out_map), "--reference", str(refs), "--reference-legend", "chesapeake",
                "--baseline", str(SAMPLE_DIR / "nlcd"), "--baseline-legend", "nlcd", "--out", str(report)]  # fmt: skip
    result = runner.invoke(app, evaluate, env={"COLUMNS": "200"})
    _ok(result)
    metrics = json.loads((report / "metrics.json").read_text())
    assert 0.0 <= metrics["oa"] <= 1.0 and "baseline" in metrics
    assert sorted(metrics["reference"]) == sorted(str(p) for p in paths["reference"])

    with rasterio.open(out_map) as src:
        crs = src.crs
    zones = gpd.read_file(SAMPLE_DIR / "aoi_heldout.geojson").to_crs(crs)
    zones = gpd.GeoDataFrame({"NAME": ["heldout"]}, geometry=[shapely.union_all(zones.geometry)], crs=crs)
    zones_path = tmp_path / "zones.gpkg"
    zones.to_file(zones_path)
    stats_dir = tmp_path / "stats"
    stats = ["stats", "--map", str(out_map), "--zones", str(zones_path), "--field", "NAME", "--out", str(stats_dir)]
    _ok(runner.invoke(app, stats, env={"COLUMNS": "200"}))
    rows = list(csv.DictReader((stats_dir / "stats.csv").open()))
    assert rows and {r["zone"] for r in rows} == {"heldout"}
    assert abs(sum(float(r["percent"]) for r in rows) - 100.0) < 1e-6

    changes_out = tmp_path / "changes" / "CHANGES.tif"
    changes = ["changes", "--map", str(out_map), "--old", *map(str, paths["labels"]), "--old-legend", "nlcd",
               "--out", str(changes_out)]  # fmt: skip
    _ok(runner.invoke(app, changes, env={"COLUMNS": "200"}))
    assert changes_out.is_file() and changes_out.with_suffix(".csv").is_file()

    item = out_map.parent / "MAP.stac.json"
    item.unlink()
    _ok(runner.invoke(app, ["stac", "--map", str(out_map), "--datetime", "2014-06-01"], env={"COLUMNS": "200"}))
    assert json.loads(item.read_text())["properties"]["datetime"].startswith("2014-06-01")
