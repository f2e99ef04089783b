"""``lcmap predict`` options declared once (:class:`PredictConfig`): the flags of before, ``--config
predict.yaml`` with the flags given winning, unknown keys and bad values refused in one line naming
them, and the map (its tags, its confidence map's, its STAC Item) saying how it was made."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import rasterio
import typer.main
import yaml
from map_rasters import write_map_cog
from rasterio.transform import from_origin
from typer.testing import CliRunner

import lcmap.pipeline.prediction.predict as P
from lcmap.cli import app
from lcmap.errors import LcmapInputError
from lcmap.pipeline.analysis.stac import stac_item_path, write_stac_item
from lcmap.pipeline.prediction.predict_config import CHECKPOINT_TAG, PREDICT_OPTIONS_TAG, PredictConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

UTM = "EPSG:32617"
X0, Y0 = 500_000.0, 4_000_000.0
runner = CliRunner()
#: ``lcmap predict``'s flags and defaults before its options were declared in PredictConfig (and one since).
FLAGS_BEFORE = {
    "--model": None, "--images": [], "--out": None, "--bbox": None, "--bbox-crs": "EPSG:4326", "--aoi": None,
    "--tile-px": 512, "--overlap-px": 64, "--block-px": 4096, "--batch-size": 4, "--device": "auto",
    "--scheduler": None, "--confidence": False, "--legend": "target", "--precision": "32", "--devices": None,
    "--input-scale": None, "--tta": "none", "--stac-asset": None, "--crs": None,
    "--label-prior": [], "--tile-km": None,  # added after the declaration (prediction_prior, tiled_output)
}  # fmt: skip


def _one_line_error(result) -> str:
    """The command's error: exit 2 and one ``error:`` line, returned without the prefix."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0].removeprefix("error: ")


@pytest.fixture
def captured(monkeypatch) -> list[PredictConfig]:
    """``lcmap predict`` runs, but ``predict_map`` only records the options it was given."""
    seen: list[PredictConfig] = []

    def fake(config: PredictConfig, progress: bool = True):
        seen.append(config)
        return SimpleNamespace(path=Path(str(config.out)))

    monkeypatch.setattr(P, "predict_map", fake)
    return seen


def _yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


# ------------------------------------------------------------------------------ declaration
def test_the_flags_and_defaults_of_before_come_from_the_declaration():
    command = typer.main.get_command(app).commands["predict"]  # type: ignore[attr-defined]
    flags = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}
    assert set(FLAGS_BEFORE) | {"--config", "--no-confidence"} == flags - {"--help"}
    defaults = PredictConfig()
    assert {PredictConfig.flag_of(n): getattr(defaults, n) for n in PredictConfig.field_names()} == FLAGS_BEFORE
    for name in PredictConfig.field_names():  # the help of --help is the declaration's
        assert PredictConfig.option_of(name).help in next(p.help for p in command.params if p.name == name)


# ------------------------------------------------------------------------------ --config
def test_yaml_options_are_used_and_a_flag_given_wins(tmp_path, captured):
    config = _yaml(
        tmp_path / "predict.yaml",
        {"model": "run", "images": ["a.tif", "b.tif"], "out": str(tmp_path / "m.tif"), "tile_px": 256,
         "overlap-px": 32, "confidence": True, "bbox": [-80.6, 37.6, -80.5, 37.7], "tta": "D4"},
    )  # fmt: skip
    args = ["predict", "--config", str(config), "--tile-px", "128", "--no-confidence", "--images", "c.tif"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    (cfg,) = captured
    assert (cfg.tile_px, cfg.confidence, cfg.images) == (128, False, ["c.tif"])  # the flags given
    assert (cfg.overlap_px, cfg.bbox, cfg.tta, cfg.model) == (32, [-80.6, 37.6, -80.5, 37.7], "d4", "run")  # YAML
    assert (cfg.block_px, cfg.device, cfg.legend) == (4096, "auto", "target")  # neither: the defaults
    # without --config, the flags alone (their defaults never override anything)
    runner.invoke(app, ["predict", "--model", "r", "--images", "x.tif", "--out", str(tmp_path / "n.tif")])
    assert captured[1] == PredictConfig(model="r", images=["x.tif"], out=str(tmp_path / "n.tif"))


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("tile: 256\n", ["unknown option(s) tile", "tile_px"]),
        ("tile_px: big\n", ["option tile_px = 'big' is invalid"]),
        ("devices: 1.5\n", ["option devices = 1.5 is invalid", "whole number"]),
        ("confidence: maybe\n", ["option confidence = 'maybe' is invalid", "true/false"]),
        ("- tile_px\n", ["must hold a mapping of option: value"]),
        ("tile_px: [1\n", ["is not valid YAML at line"]),
    ],
)
def test_a_bad_key_or_value_is_one_line_naming_it(tmp_path, captured, text, said):
    config = _yaml(tmp_path / "predict.yaml", text)
    message = _one_line_error(runner.invoke(app, ["predict", "--config", str(config), "--out", "m.tif"]))
    assert str(config) in message and all(s in message for s in said), message
    assert not captured


def test_the_yaml_is_data_never_code(tmp_path, captured):
    marker = tmp_path / "ran"
    config = _yaml(tmp_path / "predict.yaml", f'model: !!python/object/apply:os.mkdir ["{marker}"]\n')
    message = _one_line_error(runner.invoke(app, ["predict", "--config", str(config)]))
    assert "is not valid YAML" in message and not marker.exists() and not captured


def test_missing_and_impossible_options_are_one_line(tmp_path):
    message = _one_line_error(runner.invoke(app, ["predict", "--images", "x.tif", "--tile-px", "100"]))
    assert "no model given (--model)" in message and "no map given (--out)" in message
    assert "--tile-px 100" in message and "multiple of 32" in message
    with pytest.raises(LcmapInputError, match=r"--devices 0: must be at least 1"):
        PredictConfig.of("m.ckpt", "x.tif", "m.tif", devices=0).check()
    with pytest.raises(LcmapInputError, match=r"predict options: unknown option\(s\) tiles"):
        PredictConfig.of("m.ckpt", "x.tif", "m.tif", tiles=3)


# ------------------------------------------------------------------------------ the map records them
def _imagery(path: Path, x0: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(int(x0) % 97)
    profile = dict(driver="GTiff", width=64, height=64, count=3, dtype="uint8", crs=UTM)
    with rasterio.open(path, "w", transform=from_origin(x0, Y0, 1, 1), **profile) as dst:
        dst.write(rng.integers(1, 255, (3, 64, 64)).astype(np.uint8))
    return path


def test_the_map_its_confidence_map_and_its_stac_item_record_the_options(tmp_path, monkeypatch):
    import torch

    from lcmap.geodata.legends import target_legend
    from lcmap.models import build_model
    from lcmap.pipeline.runs import save_checkpoint

    monkeypatch.chdir(tmp_path)
    _imagery(tmp_path / "img" / "a.tif", X0)
    _imagery(tmp_path / "img" / "b.tif", X0 + 64)
    torch.manual_seed(0)
    ckpt = save_checkpoint(
        tmp_path / "m.ckpt", build_model("unet", 3, 4), "unet", target_legend(), [128.0] * 3, [60.0] * 3
    )
    config = _yaml(
        tmp_path / "predict.yaml",
        {"model": "m.ckpt", "images": "img", "tile_px": 64, "overlap_px": 16, "batch_size": 8,
         "scheduler": "synchronous", "confidence": True},
    )  # fmt: skip
    out = tmp_path / "out" / "map.tif"
    result = runner.invoke(app, ["predict", "--config", str(config), "--out", str(out), "--batch-size", "3"])
    assert result.exit_code == 0, result.output

    with rasterio.open(out) as src:
        tags = src.tags()
    options = json.loads(tags[PREDICT_OPTIONS_TAG])
    assert set(options) == set(PredictConfig.field_names()) - {"out"}
    assert options["model"] == str(ckpt.resolve()) and options["images"] == [str(tmp_path.resolve() / "img")]
    assert (options["tile_px"], options["overlap_px"], options["batch_size"]) == (64, 16, 3)  # the flag won
    assert options["confidence"] is True and options["block_px"] == 4096 and options["bbox"] is None
    assert tags[CHECKPOINT_TAG] == str(ckpt.resolve())
    with rasterio.open(out.with_name("map_confidence.tif")) as src:
        assert json.loads(src.tags()[PREDICT_OPTIONS_TAG]) == options
    # the recorded options are a --config file that makes the same map's options
    again = _yaml(tmp_path / "again.yaml", tags[PREDICT_OPTIONS_TAG])
    assert PredictConfig.from_yaml(again).recorded() == options

    props = json.loads(stac_item_path(out).read_text())["properties"]
    assert props["lcmap:predict_options"] == options and props["lcmap:checkpoint"] == str(ckpt.resolve())
    stac_item_path(out).unlink()  # lcmap stac reads them back from the map's tags
    assert runner.invoke(app, ["stac", "--map", str(out)]).exit_code == 0
    props = json.loads(stac_item_path(out).read_text())["properties"]
    assert props["lcmap:predict_options"] == options and props["lcmap:checkpoint"] == str(ckpt.resolve())


def test_stac_item_of_a_map_without_or_with_a_broken_options_tag(tmp_path):
    codes = np.full((40, 40), 2, dtype=np.uint8)
    plain = write_map_cog(tmp_path / "plain" / "map.tif", codes, UTM, from_origin(X0, Y0, 1, 1))
    props = json.loads(write_stac_item(plain).read_text())["properties"]
    assert "lcmap:predict_options" not in props and "lcmap:checkpoint" not in props  # an older map
    broken = write_map_cog(
        tmp_path / "broken" / "map.tif", codes, UTM, from_origin(X0, Y0, 1, 1), tags={PREDICT_OPTIONS_TAG: "{tile"}
    )
    with pytest.raises(LcmapInputError, match=f"{PREDICT_OPTIONS_TAG} tag is not valid JSON"):
        write_stac_item(broken)
    assert not stac_item_path(broken).exists()
