"""`lcmap demo` end to end on the embedded sample, shortened (the full run is `lcmap demo`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import rasterio
from typer.testing import CliRunner

from lcmap.cli import app
from lcmap.errors import LcmapInputError
from lcmap.pipeline.demo import DEMO_MARKER, run_demo


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
        ".lcmap-demo",
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
        assert "LCMAP_LABEL_PRIOR" in src.tags()  # mapped with the NLCD as prior
    with rasterio.open(out / "map_heldout_network_alone.tif") as src:
        assert "LCMAP_LABEL_PRIOR" not in src.tags()
    assert "oa" in saved["held_out_network_alone"]
    assert "held-out" in (out / "report.md").read_text()
    # map-vs-baseline gains on the same classes, and the demo's training settings recorded in the run
    baseline_miou = saved["baseline"]["miou_reference_classes"]
    assert saved["gain"]["miou_reference_classes"] == saved["miou_reference_classes"] - baseline_miou
    from lcmap.geodata.legends import get_legend
    from lcmap.pipeline.training.train import TrainConfig

    # the demo passes no mixed class: NLCD's declared one (21) is used and recorded
    nlcd_mixed = {21: ["built-up", "low vegetation"]}
    assert TrainConfig.from_yaml(out / "run" / "config.yaml").mixed_classes == nlcd_mixed
    assert get_legend("nlcd").default_mixed_classes() == nlcd_mixed


def test_demo_refuses_a_folder_it_did_not_make(tmp_path: Path, monkeypatch) -> None:
    """--out holding the user's files (map.tif, report.md, metrics.json, or anything) is refused,
    exit 2, each file untouched (before: all three replaced); a file as --out too. A new or empty
    folder, or one holding the demo's marker, is the demo's: it goes on to train."""
    import lcmap.pipeline.training.train as train

    out = tmp_path / "mine"
    out.mkdir()
    mine = {"map.tif": b"my map", "report.md": b"# my report", "metrics.json": b'{"mine": 1}'}
    for name, data in mine.items():
        (out / name).write_bytes(data)
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--epochs", "1"])
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "did not write (map.tif, metrics.json, report.md)" in said, said
    assert {p.name: p.read_bytes() for p in out.iterdir()} == mine
    (tmp_path / "afile").write_text("x")
    with pytest.raises(LcmapInputError, match="is a file"):
        run_demo(tmp_path / "afile", progress=False)

    class Trained(Exception):
        pass

    def reached(config):
        raise Trained(config.out)

    monkeypatch.setattr(train, "run_train", reached)
    (tmp_path / "empty").mkdir()
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / DEMO_MARKER).write_text("")
    (tmp_path / "ours" / "map.tif").write_bytes(b"an earlier demo's map")
    for folder in ("new", "empty", "ours"):
        with pytest.raises(Trained):
            run_demo(tmp_path / folder, progress=False)
        assert (tmp_path / folder / DEMO_MARKER).is_file()
