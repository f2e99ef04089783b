"""Nothing lost, nothing silently wrong: the predict/evaluate/input side, run as a user runs it.

Cases (one line each: the test, then what it checks):

- test_second_run_on_the_same_out_is_refused_with_the_pid: a 2nd predict on --out is refused at once
  with the holder's pid (other parameters too); the holder's partial folder is left alone
- test_cli_second_run_exits_2: the same through the CLI: exit 2, "another lcmap process (pid N)"
- test_sigkilled_holder_releases_the_lock: after SIGKILL of the holder the next run works
- test_symlinked_partial_folder_is_refused_and_nothing_is_deleted_through_it: a planted MAP.tif.partial
  link (or blocks/ link) is refused, exit 2; a link among an old run's files is removed, not followed
- test_out_equal_to_an_input_image_is_refused: --out = the imagery (or a symlink to it): exit 2, untouched
- test_out_equal_to_the_aoi_is_refused: --out (or its .qml, .stac.json) = the --aoi file: exit 2, untouched
- test_outputs_in_the_images_folder_are_skipped: maps, confidence maps, .partial blocks in an --images
  folder are skipped (logged) and the next run works
- test_other_commands_refuse_out_equal_to_an_input: evaluate, stats, changes: --out = an input, exit 2
- test_16bit_imagery_for_an_8bit_model_is_refused: uint16 x40 imagery: exit 2 naming dtype, range and
  --input-scale; --input-scale 0.025 gives the 8-bit map; a wrong factor is still refused
- test_old_checkpoint_without_imagery_record_still_predicts: older checkpoints work, said in the log
- test_band_stats_record_dtype_and_range: training records dtype and 0.1/99.9 percentiles
- test_block_cut_short_during_write_is_not_finished: a block cut short by an unreported write failure
  (fault injected at the write) is never counted as finished
- test_truncated_block_is_recomputed_on_resume: a truncated (header readable), changed or unrecorded
  block from an earlier run is recomputed on resume (logged); the map is right
- test_full_disk_tmpfs_while_writing_blocks: a full tmpfs while writing blocks: disk-full message, exit 2
- test_full_disk_tmpfs_during_cog_assembly: a full tmpfs during COG assembly: the same DiskFullError;
  the kept blocks resume after space is freed
- test_wrong_reference_legend_names_the_option: evaluate names --reference-legend, not --legend
- test_fractional_label_values_are_refused: float labels with fractions: "not whole numbers", the file

The rest of the hostile sweep lives beside its room, each file's docstring listing its cases:
tests/test_reliability_training.py (weights-only checkpoints, YAML errors, unwritable --out, SIGTERM,
demo --resume, tls:// schedulers, single-class kappa) and tests/test_cluster.py (worker killed,
scheduler lost or unreachable, Ctrl-C on predict). docs/guarantees.md names them all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin
from typer.testing import CliRunner

import lcmap.pipeline.prediction.predict as P
from lcmap.cli import app
from lcmap.errors import DiskFullError, ImageryMismatchError, LcmapInputError, OutputLockedError
from lcmap.geodata.datasets import open_imagery
from lcmap.geodata.io import find_raster_files
from lcmap.geodata.label_mosaic import Grid, LabelMosaic
from lcmap.geodata.legends import UnknownLabelError, get_legend, target_legend
from lcmap.geodata.normalization import BandStats, compute_band_stats
from lcmap.models import build_model
from lcmap.pipeline.prediction import execution, mapfile
from lcmap.pipeline.runs import save_checkpoint

DATA = Path(__file__).parent / "data"
SAMPLE = DATA / "m_3907833_nw_17_1_naip-new.tif"  # 260 x 260, 4 bands, uint8
SAMPLE_NLCD = DATA / "m_3907833_nw_17_1_nlcd.tif"
FAST = dict(tile_px=64, overlap_px=16, batch_size=4, scheduler="synchronous")
REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _write(path: Path, data: np.ndarray, crs="EPSG:32617", x0=500_000.0, y0=4_000_000.0, res=1.0, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=data.shape[-1],
        height=data.shape[-2],
        count=data.shape[0],
        dtype=data.dtype.name,
        crs=crs,
        transform=from_origin(x0, y0, res, res),
        **kw,
    ) as dst:
        dst.write(data)
    return path


def _imagery(path: Path, h: int = 96, w: int = 112) -> Path:
    rng = np.random.default_rng(0)
    return _write(path, rng.integers(1, 255, (4, h, w)).astype(np.uint8))


def _checkpoint(path: Path, imagery: Path | None = None, legend=None) -> Path:
    """A tiny random U-Net; with ``imagery``, the training imagery record of that imagery."""
    torch.manual_seed(0)
    legend = legend or target_legend()
    model = build_model("unet", 4, len(legend))
    extra = {}
    if imagery is not None:
        extra["imagery_range"] = compute_band_stats(open_imagery(imagery)).range_record()
    return save_checkpoint(path, model, "unet", legend, [128.0] * 4, [60.0] * 4, **extra)


def _said(result) -> str:
    """The CLI's output with rich's line wrapping undone."""
    return " ".join(result.output.split())


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    image = _imagery(root / "images" / "scene.tif")
    ckpt = _checkpoint(root / "model.ckpt", image)
    ref = P.predict_map(
        P.PredictConfig.of(ckpt, image, root / "ref" / "map.tif", block_px=48, **FAST), progress=False
    ).path
    return {"root": root, "image": image, "ckpt": ckpt, "ref": ref}


def _hold_lock(out: Path) -> subprocess.Popen:
    """A separate process holding ``out``'s lock (as a running predict does) until killed."""
    code = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from lcmap.pipeline.prediction import mapfile
        out = Path({str(out)!r})
        with mapfile.lock_partial(out.with_name(out.name + ".partial"), out):
            (out.with_name(out.name + ".partial") / "blocks").mkdir(exist_ok=True)
            (out.with_name(out.name + ".partial") / "blocks" / "mine.txt").write_text("A's work")
            print("locked", flush=True)
            time.sleep(120)
        """
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


# ------------------------------------------------------------------------------ 1. one writer
def test_second_run_on_the_same_out_is_refused_with_the_pid(data, tmp_path):
    out = tmp_path / "map.tif"
    holder = _hold_lock(out)
    try:
        started = time.perf_counter()
        with pytest.raises(
            OutputLockedError, match=rf"being written by another lcmap process \(pid {holder.pid}\)"
        ) as e:
            P.predict_map(P.PredictConfig.of(data["ckpt"], data["image"], out, legend="native", **FAST), progress=False)
        assert e.value.pid == holder.pid
        assert time.perf_counter() - started < 30  # at once, not after predicting
        # the holder's folder is not deleted, even though this run's parameters differ
        assert (out.with_name("map.tif.partial") / "blocks" / "mine.txt").read_text() == "A's work"
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()


def test_cli_second_run_exits_2(data, tmp_path):
    out = tmp_path / "map.tif"
    holder = _hold_lock(out)
    try:
        args = ["predict", "--model", str(data["ckpt"]), "--images", str(data["image"]), "--out", str(out)]
        result = CliRunner().invoke(app, [*args, "--scheduler", "synchronous", "--tile-px", "64", "--overlap-px", "16"])
        assert result.exit_code == 2, result.output
        assert f"pid {holder.pid}" in _said(result) and "another lcmap process" in _said(result)
    finally:
        holder.kill()
        holder.wait()


def test_sigkilled_holder_releases_the_lock(data, tmp_path):
    out = tmp_path / "map.tif"
    holder = _hold_lock(out)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    result = P.predict_map(P.PredictConfig.of(data["ckpt"], data["image"], out, block_px=48, **FAST), progress=False)
    assert np.array_equal(_read(result.path), _read(data["ref"]))
    assert not out.with_name("map.tif.partial").exists()


def test_symlinked_partial_folder_is_refused_and_nothing_is_deleted_through_it(data, tmp_path):
    """A pre-planted MAP.tif.partial symlink (or a blocks/ link inside) whose target holds a
    manifest.json: refused, exit 2, the target's files kept (before: deleted, the map written there)."""
    victim = tmp_path / "victim"
    (victim / "photos").mkdir(parents=True)
    (victim / "manifest.json").write_text("{}")
    (victim / "thesis.txt").write_text("years of work")
    (victim / "photos" / "a.jpg").write_text("x")
    before = sorted(str(p.relative_to(victim)) for p in victim.rglob("*"))
    out = tmp_path / "map.tif"
    partial = tmp_path / "map.tif.partial"
    partial.symlink_to(victim, target_is_directory=True)
    args = ["predict", "--model", str(data["ckpt"]), "--images", str(data["image"]), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--scheduler", "synchronous", "--tile-px", "64", "--overlap-px", "16"])
    assert result.exit_code == 2, result.output
    assert "is a symlink" in _said(result) and "map.tif.partial" in _said(result)
    partial.unlink()
    partial.mkdir()
    (partial / "manifest.json").write_text("{}")
    (partial / "blocks").symlink_to(victim, target_is_directory=True)
    with pytest.raises(LcmapInputError, match=r"blocks is a symlink"):
        P.predict_map(P.PredictConfig.of(data["ckpt"], data["image"], out, **FAST), progress=False)
    assert sorted(str(p.relative_to(victim)) for p in victim.rglob("*")) == before and not out.exists()
    # a link among an older run's files is removed, never followed
    (partial / "blocks").unlink()
    (partial / "old").symlink_to(victim, target_is_directory=True)
    result = P.predict_map(P.PredictConfig.of(data["ckpt"], data["image"], out, block_px=48, **FAST), progress=False)
    assert np.array_equal(_read(result.path), _read(data["ref"])) and not partial.exists()
    assert sorted(str(p.relative_to(victim)) for p in victim.rglob("*")) == before
    assert (victim / "thesis.txt").read_text() == "years of work"


# ------------------------------------------------------------------------------ 2. outputs vs inputs
def test_out_equal_to_an_input_image_is_refused(data, tmp_path):
    image = _imagery(tmp_path / "naip.tif")
    before = _sha(image)
    args = ["predict", "--model", str(data["ckpt"]), "--images", str(image), "--out", str(image)]
    result = CliRunner().invoke(app, [*args, "--scheduler", "synchronous", "--tile-px", "64", "--overlap-px", "16"])
    assert result.exit_code == 2, result.output
    assert "is also an input" in _said(result)
    assert _sha(image) == before
    # the same file by another path (a symlink) too
    link = tmp_path / "link.tif"
    link.symlink_to(image)
    with pytest.raises(LcmapInputError, match="is also an input"):
        P.predict_map(P.PredictConfig.of(data["ckpt"], link, image, **FAST), progress=False)
    assert _sha(image) == before


def test_out_equal_to_the_aoi_is_refused(data, tmp_path):
    """--out (or a file written beside it: MAP.qml, MAP.stac.json) equal to the --aoi file: exit 2,
    the AOI untouched (before: the AOI was replaced by the GeoTIFF, exit 0)."""
    from rasterio.warp import transform_bounds

    w, s, e, n = transform_bounds("EPSG:32617", "EPSG:4326", 500_010, 3_999_930, 500_080, 3_999_990)
    ring = [[w, s], [e, s], [e, n], [w, n], [w, s]]
    feature = {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [ring]}}
    for aoi, out in (("aoi.geojson", "aoi.geojson"), ("map.qml", "map.tif"), ("map.stac.json", "map.tif")):
        path = tmp_path / aoi
        path.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
        before = _sha(path)
        args = ["predict", "--model", str(data["ckpt"]), "--images", str(data["image"]), "--aoi", str(path)]
        result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / out), "--scheduler", "synchronous"])
        assert result.exit_code == 2, result.output
        assert "is also an input" in _said(result) and aoi in _said(result)
        assert _sha(path) == before and not (tmp_path / "map.tif").exists()
    # a different --out with the same AOI maps
    assert P.predict_map(
        P.PredictConfig.of(data["ckpt"], data["image"], tmp_path / "ok.tif", aoi=tmp_path / "aoi.geojson", **FAST),
        progress=False,
    ).path


def test_outputs_in_the_images_folder_are_skipped(data, tmp_path, caplog):
    folder = tmp_path / "images"
    image = _imagery(folder / "naip.tif")
    P.predict_map(
        P.PredictConfig.of(data["ckpt"], folder, folder / "map.tif", confidence=True, block_px=48, **FAST),
        progress=False,
    )
    (folder / "old.tif.partial" / "blocks").mkdir(parents=True)
    _write(folder / "old.tif.partial" / "blocks" / "r000000_c000000.tif", np.ones((1, 8, 8), np.uint8))
    with caplog.at_level(logging.INFO, logger="lcmap.geodata.io"):
        assert find_raster_files(folder, "imagery") == [str(image)]
    skipped = caplog.text
    assert "map.tif" in skipped and "map_confidence.tif" in skipped and "partial" in skipped
    # and the next run over the folder is not confused by them ("different band counts [1, 4]")
    again = P.predict_map(
        P.PredictConfig.of(data["ckpt"], folder, tmp_path / "again.tif", block_px=48, **FAST), progress=False
    )
    assert np.array_equal(_read(again.path), _read(folder / "map.tif"))


def test_other_commands_refuse_out_equal_to_an_input(data, tmp_path):
    runner = CliRunner()
    ref = tmp_path / "ref.tif"
    ref.write_bytes(data["ref"].read_bytes())  # a map with the LCMAP_LEGEND tag; codes 0-4
    for ext in (".tif.aux.xml",):
        side = data["ref"].with_name(data["ref"].name.replace(".tif", ext))
        if side.exists():
            (tmp_path / ("ref" + ext)).write_bytes(side.read_bytes())
    before = _sha(ref)
    ev = runner.invoke(
        app, ["evaluate", "--map", str(data["ref"]), "--reference", str(ref), "--reference-legend", "4class",
              "--out", str(ref)],
    )  # fmt: skip
    assert ev.exit_code == 2 and "is also an input" in _said(ev), ev.output
    zones = tmp_path / "zones.geojson"
    zones.write_text(
        '{"type":"FeatureCollection","features":[{"type":"Feature","properties":{"name":"a"},'
        '"geometry":{"type":"Polygon","coordinates":[[[0,0],[1,0],[1,1],[0,0]]]}}]}'
    )
    st = runner.invoke(app, ["stats", "--map", str(ref), "--zones", str(zones), "--field", "name", "--out", str(ref)])
    assert st.exit_code == 2 and "is also an input" in _said(st), st.output
    old = _write(tmp_path / "old" / "old.tif", np.ones((1, 96, 112), np.uint8))  # a plain 4-class raster
    old_before = _sha(old)
    ch = runner.invoke(
        app, ["changes", "--map", str(data["ref"]), "--old", str(tmp_path / "old"), "--old-legend", "4class",
              "--out", str(old)],
    )  # fmt: skip
    assert ch.exit_code == 2 and "is also an input" in _said(ch), ch.output
    assert _sha(ref) == before and _sha(old) == old_before


# ------------------------------------------------------------------------------ 3. imagery kind
def test_band_stats_record_dtype_and_range(tmp_path):
    stats = compute_band_stats(open_imagery(SAMPLE))
    with rasterio.open(SAMPLE) as src:
        pixels = src.read().reshape(4, -1).astype(float)
    assert stats.dtype == "uint8"
    assert np.allclose(stats.high, np.percentile(pixels, 99.9, axis=1))
    assert np.allclose(stats.low, np.percentile(pixels, 0.1, axis=1))
    stats.to_json(tmp_path / "normalization.json")
    assert BandStats.from_json(tmp_path / "normalization.json") == stats
    (tmp_path / "old.json").write_text('{"mean": [1, 2], "std": [3, 4]}')  # written by older lcmap
    assert BandStats.from_json(tmp_path / "old.json").range_record() is None


def test_16bit_imagery_for_an_8bit_model_is_refused(tmp_path):
    ckpt = _checkpoint(tmp_path / "model.ckpt", SAMPLE)
    with rasterio.open(SAMPLE) as src:
        profile, pixels = src.profile, src.read()
    profile.update(dtype="uint16")
    img16 = tmp_path / "naip16.tif"
    with rasterio.open(img16, "w", **profile) as dst:
        dst.write(pixels.astype(np.uint16) * 40)
    out = tmp_path / "map.tif"
    args = ["predict", "--model", str(ckpt), "--images", str(img16), "--out", str(out)]
    opts = ["--scheduler", "synchronous", "--tile-px", "64", "--overlap-px", "16", "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, *opts])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "uint16" in text and "uint8" in text and "far above the training range" in text
    assert "--input-scale" in text
    assert not out.exists()
    with pytest.raises(ImageryMismatchError):
        P.plan_prediction(P.PredictConfig.of(ckpt, img16, out, device="cpu"))
    # asked for explicitly, the rescale is accepted and gives the 8-bit map (up to float rounding)
    scaled = P.predict_map(P.PredictConfig.of(ckpt, img16, out, input_scale=0.025, **FAST), progress=False)
    plain = P.predict_map(P.PredictConfig.of(ckpt, SAMPLE, tmp_path / "plain.tif", **FAST), progress=False)
    assert np.mean(_read(scaled.path) == _read(plain.path)) > 0.995
    # a wrong factor still leaves the values far outside the range
    with pytest.raises(ImageryMismatchError, match="after --input-scale 0.5"):
        P.plan_prediction(P.PredictConfig.of(ckpt, img16, tmp_path / "x.tif", input_scale=0.5, device="cpu"))


def test_old_checkpoint_without_imagery_record_still_predicts(data, tmp_path, caplog):
    old = _checkpoint(tmp_path / "old.ckpt")  # no imagery_range: trained by an older lcmap
    with caplog.at_level(logging.INFO, logger="lcmap.pipeline.prediction.planning"):
        result = P.predict_map(
            P.PredictConfig.of(old, data["image"], tmp_path / "map.tif", block_px=48, **FAST), progress=False
        )
    assert "does not record its training imagery" in caplog.text
    assert np.array_equal(_read(result.path), _read(data["ref"]))


# ------------------------------------------------------------------------------ 4. finished blocks
def test_block_cut_short_during_write_is_not_finished(data, tmp_path, monkeypatch):
    """Fault injection at the write: GDAL "succeeds" but the file on disk is cut short."""
    real_open = rasterio.open

    class CutShort:
        def __init__(self, path, ds):
            self.path, self.ds = Path(path), ds

        def __enter__(self):
            return self.ds.__enter__()

        def __exit__(self, *exc):
            self.ds.__exit__(*exc)
            os.truncate(self.path, self.path.stat().st_size * 2 // 3)

    def cut_short_open(path, mode="r", **kw):
        ds = real_open(path, mode, **kw)
        return CutShort(path, ds) if mode == "w" else ds

    monkeypatch.setattr(rasterio, "open", cut_short_open)
    out = tmp_path / "map.tif"
    with pytest.raises(OSError, match="does not read back"):
        P.predict_map(P.PredictConfig.of(data["ckpt"], data["image"], out, block_px=48, **FAST), progress=False)
    blocks = out.with_name("map.tif.partial") / "blocks"
    assert not list(blocks.glob("r*_c*.tif")) and not list(blocks.glob("*.sha256")) and not out.exists()


def test_truncated_block_is_recomputed_on_resume(data, tmp_path, monkeypatch, caplog):
    out = tmp_path / "map.tif"
    real_write = mapfile.write_block
    written: list[str] = []

    def stop_after_four(path, grid, block, codes, conf):
        if len(written) == 4:
            raise KeyboardInterrupt("killed")
        written.append(block.name)
        return real_write(path, grid, block, codes, conf)

    monkeypatch.setattr(mapfile, "write_block", stop_after_four)
    with pytest.raises(KeyboardInterrupt):
        P.predict_map(P.PredictConfig.of(data["ckpt"], data["image"], out, block_px=48, **FAST), progress=False)
    monkeypatch.setattr(mapfile, "write_block", real_write)
    blocks = out.with_name("map.tif.partial") / "blocks"
    cut, changed, unrecorded = (blocks / f"{name}.tif" for name in written[:3])
    with rasterio.open(cut) as src:  # cut short past its header: still opens
        assert src.count == 1
    os.truncate(cut, cut.stat().st_size - 40)
    with rasterio.open(cut) as src:
        assert src.count == 1  # the old check (it opens with the right band count) would keep it
    raw = bytearray(changed.read_bytes())
    raw[-1] ^= 0xFF
    changed.write_bytes(bytes(raw))
    Path(str(unrecorded) + ".sha256").unlink()  # renamed into place, killed before its record

    ran: list[str] = []
    real_predict = execution.predict_group

    def counting(st, job, blocks, given=None):
        for item in real_predict(st, job, blocks, given):
            ran.append(item[0].name)
            yield item

    monkeypatch.setattr(execution, "predict_group", counting)
    with caplog.at_level(logging.INFO, logger="lcmap.pipeline.prediction.mapfile"):
        result = P.predict_map(
            P.PredictConfig.of(data["ckpt"], data["image"], out, block_px=48, **FAST), progress=False
        )
    assert set(written[:3]) <= set(ran) and written[3] not in ran
    assert result.blocks_resumed == 1
    for name in written[:3]:
        assert f"block {name}.tif is not a finished block" in caplog.text
    assert np.array_equal(_read(result.path), _read(data["ref"]))


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs (skipped where mounting is not permitted)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path, leave_bytes: int) -> None:
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave_bytes))


def test_full_disk_tmpfs_while_writing_blocks(data, tiny_disk):
    _fill(tiny_disk, 12 * 1024)
    args = ["predict", "--model", str(data["ckpt"]), "--images", str(data["image"]), "--out", str(tiny_disk / "m.tif")]
    opts = ["--scheduler", "synchronous", "--tile-px", "64", "--overlap-px", "16", "--block-px", "48"]
    result = CliRunner().invoke(app, [*args, *opts])
    assert result.exit_code == 2, result.output
    assert "the disk is full" in _said(result) and "finished blocks" in _said(result)
    assert not (tiny_disk / "m.tif").exists()
    assert isinstance(result.exception, SystemExit)


def test_full_disk_tmpfs_during_cog_assembly(data, tiny_disk, monkeypatch):
    real_write_map = mapfile.write_map

    def fill_then_write(*args, **kwargs):  # the blocks are written; then the disk fills up
        _fill(tiny_disk, 0)
        return real_write_map(*args, **kwargs)

    monkeypatch.setattr(mapfile, "write_map", fill_then_write)
    out = tiny_disk / "m.tif"
    with pytest.raises(DiskFullError, match="the disk is full"):
        P.predict_map(P.PredictConfig.of(data["ckpt"], data["image"], out, block_px=48, **FAST), progress=False)
    assert not out.exists()
    # the blocks are kept and verified: freeing space and running again resumes them all
    (tiny_disk / "filler").unlink()
    monkeypatch.setattr(mapfile, "write_map", real_write_map)
    result = P.predict_map(P.PredictConfig.of(data["ckpt"], data["image"], out, block_px=48, **FAST), progress=False)
    assert result.blocks_resumed == result.blocks
    assert np.array_equal(_read(out), _read(data["ref"]))


# ------------------------------------------------------------------------------ 5, 6. legends, labels
def test_wrong_reference_legend_names_the_option(tmp_path):
    result = CliRunner().invoke(
        app, ["evaluate", "--map", str(_map_4class(tmp_path)), "--reference", str(SAMPLE_NLCD),
              "--reference-legend", "4class", "--out", str(tmp_path / "report")],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "are not in legend '4class'" in text and "with --reference-legend" in text and "with --legend" not in text


def _map_4class(tmp_path: Path) -> Path:
    from map_rasters import write_map_cog

    with rasterio.open(SAMPLE_NLCD) as src:
        crs, transform, shape = src.crs.to_string(), src.transform, src.shape
    codes = np.random.default_rng(0).integers(1, 5, shape).astype(np.uint8)
    return write_map_cog(tmp_path / "map4.tif", codes, crs, transform)


def test_fractional_label_values_are_refused(tmp_path):
    values = np.array([[[11, 21.5], [41, 42]]], np.float32)
    labels = _write(tmp_path / "continuous.tif", values)
    grid = Grid.of("EPSG:32617", from_origin(500_000.0, 4_000_000.0, 1, 1), 2, 2)
    with pytest.raises(
        UnknownLabelError, match=r"continuous\.tif: label values are not whole numbers \(e\.g\. 21\.5\)"
    ):
        LabelMosaic(labels).read(grid)
    whole = _write(tmp_path / "whole.tif", np.array([[[11, 21], [41, 42]]], np.float32))
    assert LabelMosaic(whole).read_target(grid, get_legend("nlcd")).shape == (2, 2)
