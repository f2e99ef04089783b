"""`lcmap demo` end to end on the embedded sample, shortened (the full run is `lcmap demo`)."""

from __future__ import annotations

import json
from pathlib import Path

import rasterio

from lcmap.pipeline.demo import run_demo


def test_demo_writes_everything_it_promises(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    metrics = run_demo(out, epochs=1, steps_per_epoch=4, progress=False)
    for name in (
        "map.tif",
        "map.qml",
        "map_heldout.tif",
        "metrics.json",
        "report.md",
        "quicklook.png",
        "run/checkpoints/last.ckpt",
        "run/loss.png",
    ):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("oa", "miou", "kappa", "per_class", "confusion"):
        assert key in saved and key in saved["baseline"] and key in saved["held_out"]
    assert saved["miou"] == metrics["miou"]
    # the baseline is the NLCD label scored on the same pixels as the map
    assert saved["pixels"] == saved["baseline"]["pixels"] > 300_000
    with rasterio.open(out / "map.tif") as src:
        assert src.crs.to_epsg() == 26917 and src.res == (1.0, 1.0) and src.nodata == 0
    assert "held-out" in (out / "report.md").read_text()
    # map-vs-baseline gains on the same classes, and the demo's training settings recorded in the run
    baseline_miou = saved["baseline"]["miou_reference_classes"]
    assert saved["gain"]["miou_reference_classes"] == saved["miou_reference_classes"] - baseline_miou
    from lcmap.geodata.legends import get_legend
    from lcmap.pipeline.train import TrainConfig

    # the demo passes no mixed class: NLCD's declared one (21) is used and recorded
    nlcd_mixed = {21: ["built-up", "low vegetation"]}
    assert TrainConfig.from_yaml(out / "run" / "config.yaml").mixed_classes == nlcd_mixed
    assert get_legend("nlcd").default_mixed_classes() == nlcd_mixed
