"""``benchmarks/accuracy.py``: folds, the lone-file mapping it scores, and a smoke run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import accuracy  # noqa: E402

from lcmap.geodata.legends import IGNORE_INDEX, get_legend  # noqa: E402
from lcmap.geodata.sample import sample_paths  # noqa: E402
from lcmap.models import build_model  # noqa: E402
from lcmap.pipeline.runs import load_trained_model, save_checkpoint  # noqa: E402


def test_folds_partition_the_patches() -> None:
    for k in (2, 4, 8):
        folds = accuracy.folds_of(8, k)
        assert len(folds) == k and sorted(i for f in folds for i in f) == list(range(8))
    assert accuracy.folds_of(8, 8) == [[i] for i in range(8)]  # leave-one-out
    with pytest.raises(ValueError):
        accuracy.folds_of(8, 1)


def test_map_patch_is_one_forward_pass_over_the_whole_file_in_target_classes(tmp_path: Path) -> None:
    nlcd = get_legend("nlcd")
    torch.manual_seed(0)
    model = build_model("unet", 4, len(nlcd)).eval()
    mean, std = [110.0, 120.0, 100.0, 150.0], [40.0, 35.0, 30.0, 55.0]
    tm = load_trained_model(save_checkpoint(tmp_path / "m.ckpt", model, "unet", nlcd, mean, std))
    path = sample_paths()["imagery"][3]
    got = accuracy.map_patch(tm, path)
    import rasterio

    with rasterio.open(path) as src:
        x = (src.read().astype(np.float32) - np.array(mean, np.float32)[:, None, None]) / np.array(std, np.float32)[
            :, None, None
        ]
    with torch.no_grad():
        probs = torch.softmax(tm.model(torch.from_numpy(x)[None])[0], 1)[0].numpy()
    group = nlcd.index_to_target_group()
    summed = np.zeros((5, *probs.shape[1:]))
    for k, g in enumerate(group):
        summed[g] += probs[k]
    want = summed.argmax(0)
    want = np.where(want == 4, IGNORE_INDEX, want)
    assert got.shape == (256, 256)
    np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_smoke_run_prints_the_summary_as_the_last_json_line(tmp_path: Path, capsys) -> None:
    args = ["--label-loss", "prior", "--folds", "8", "--only-folds", "3", "--seeds", "1", "--epochs", "1"]
    assert accuracy.main([*args, "--steps", "1", "--out", str(tmp_path)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    summary = json.loads(last)
    prior = summary["losses"]["prior"]
    assert prior["runs"] == 1 and prior["worst_fold"] == 3 and np.isfinite(prior["mean_gain"])
    assert set(prior["pooled"]["map"]["iou"]) == {"water", "tree canopy", "low vegetation", "built-up"}
    assert (tmp_path / "runs.jsonl").is_file() and not (tmp_path / "prior-s1234-f3").exists()
    # --reuse: nothing trained again
    assert accuracy.main([*args, "--steps", "1", "--out", str(tmp_path), "--reuse"]) == 0
    assert "done prior" not in capsys.readouterr().out


def test_map_patch_with_the_label_prior_is_what_lcmap_predict_writes(tmp_path: Path) -> None:
    """The benchmark's ``LOSS+label-prior`` maps are ``lcmap predict --label-prior``'s: sample patch 3
    (smaller than one window, so predict runs one forward pass over it too) with its NLCD."""
    import rasterio

    from lcmap.pipeline.prediction.predict import PredictConfig, predict_map

    nlcd = get_legend("nlcd")
    torch.manual_seed(1)
    model = build_model("unet", 4, len(nlcd)).eval()
    mean, std = [110.0, 120.0, 100.0, 150.0], [40.0, 35.0, 30.0, 55.0]
    freq = [0.8 if c == 41 else 0.2 if c == 81 else 0.0 for c in nlcd.codes]
    ckpt = save_checkpoint(tmp_path / "m.ckpt", model, "unet", nlcd, mean, std, label_frequency=freq)
    tm = load_trained_model(ckpt)
    prior = accuracy.label_prior_of(tm, [0, 1], [3])
    got = accuracy.map_patch(tm, sample_paths()["imagery"][3], prior)
    plain = accuracy.map_patch(tm, sample_paths()["imagery"][3])
    labels = [str(sample_paths()["labels"][3])]
    config = PredictConfig.of(ckpt, [sample_paths()["imagery"][3]], tmp_path / "map.tif", tile_px=512,
                              overlap_px=64, scheduler="synchronous", label_prior=labels)  # fmt: skip
    r = predict_map(config, progress=False)
    with rasterio.open(r.path) as src:
        written = src.read(1).astype(np.int64) - 1  # codes 1..4 -> target indices; nodata -> -1
    written = np.where(written < 0, IGNORE_INDEX, written)
    assert (got != plain).mean() > 0.01  # the prior matters here
    assert (written == got).mean() > 0.999  # the same map (but for float near-ties)
