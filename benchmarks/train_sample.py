"""Train on the embedded real sample and score the 1 m maps against the Chesapeake reference.

For each model and seed: ``run_train`` on the TRAIN split (aoi_train.geojson, NLCD 2011 labels,
the TrainConfig defaults unless overridden), then every sample patch is predicted whole
(``predict_proba`` of the 256 px patch, padded to a multiple of 32 px if needed), mapped to the 4
target classes and compared with the Chesapeake 1 m reference. The NLCD label itself is scored on
the same pixels (``gain``: mIoU gain; ``gainRC``: gain in mIoU over the classes present in the
reference, the same classes for both). Scores are pooled per split: ``train`` (the 6 training patches: the area the
model was trained on) and ``heldout`` (patches 3 and 6, never seen in training).

    python benchmarks/train_sample.py [--models paraformer-tiny unet] [--seeds 1234 1 2]
        [--checkpoints last best] [--no-reference-val] [--epochs N] [--steps-per-epoch N] ...
        [--products nlcd | nlcd+shifted] [--label-fusion partial|agree|first] [--shift-m 30]

``--products nlcd+shifted`` trains on two fused label products (``--label-product``): NLCD and NLCD
itself shifted east by ``--shift-m`` (one 30 m cell by default), which mimics a second product
with a co-registration difference (no reference information is used). The "NLCD" columns always
score NLCD alone.

Prints a table and one JSON line (``RESULT {...}``). Timings on a shared 2-core machine are noisy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.enums import Resampling
from rasterio.warp import reproject

from lcmap.geodata.legends import IGNORE_INDEX, get_legend
from lcmap.models import sum_probabilities
from lcmap.models.tta import TTA_MODES, predict_proba_tta
from lcmap.pipeline.metrics import confusion_matrix, scores_from_confusion
from lcmap.pipeline.runs import load_trained_model
from lcmap.pipeline.training.config import TrainConfig
from lcmap.pipeline.training.train import run_train

SAMPLE = Path(__file__).resolve().parents[1] / "lcmap" / "geodata" / "sample"


def _patches() -> list[dict]:
    return json.loads((SAMPLE / "sample.json").read_text())["patches"]


def _reference_and_nlcd(i: int) -> tuple[np.ndarray, np.ndarray]:
    """Target indices (IGNORE where nodata) of the reference and of NLCD on the patch's 1 m grid."""
    ref_legend, nlcd_legend = get_legend("chesapeake"), get_legend("nlcd")
    with rasterio.open(SAMPLE / "reference" / f"patch-{i}.tif") as r:
        ref = ref_legend.code_to_target_lut()[r.read(1)]
        transform, crs, shape = r.transform, r.crs, (r.height, r.width)
    with rasterio.open(SAMPLE / "nlcd" / f"patch-{i}.tif") as n:
        nlcd = np.zeros(shape, np.uint8)
        reproject(
            n.read(1),
            nlcd,
            src_transform=n.transform,
            src_crs=n.crs,
            dst_transform=transform,
            dst_crs=crs,
            resampling=Resampling.nearest,
            src_nodata=0,
            dst_nodata=0,
        )
    return ref, nlcd_legend.code_to_target_lut()[nlcd]


def predict_patch(tm, i: int, tta: str = "none") -> np.ndarray:
    """Target-class indices of the model's prediction for sample patch ``i`` (whole patch), with
    test-time augmentation ``tta`` (:func:`lcmap.models.tta.predict_proba_tta`)."""
    with rasterio.open(SAMPLE / "naip" / f"patch-{i}.tif") as src:
        image = src.read().astype(np.float32)
    x = (image - tm.mean[:, None, None]) / tm.std[:, None, None]
    h, w = x.shape[1:]
    ph, pw = (-h) % 32, (-w) % 32
    xt = torch.from_numpy(x)[None]
    if ph or pw:
        xt = torch.nn.functional.pad(xt, (0, pw, 0, ph), mode="reflect")
    with torch.no_grad():
        probs = predict_proba_tta(tm.model, xt, tta)[0, :, :h, :w]
    # as lcmap predict --legend target: the target class of highest summed LR-class probability
    n_target = len(tm.legend.target)
    group = torch.from_numpy(tm.legend.index_to_target_group())
    idx = sum_probabilities(probs[None], group, n_target + 1)[0].argmax(0).numpy().astype(np.uint8)
    return np.where(idx == n_target, IGNORE_INDEX, idx).astype(np.uint8)


def shifted_nlcd(out_dir: Path, shift_m: float) -> Path:
    """The sample NLCD patches shifted east by ``shift_m`` (same codes and legend), written to ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in sorted((SAMPLE / "nlcd").glob("patch-*.tif")):
        with rasterio.open(path) as src:
            profile, data = src.profile, src.read()
        t = profile["transform"]
        profile["transform"] = rasterio.Affine(t.a, t.b, t.c + shift_m, t.d, t.e, t.f)
        with rasterio.open(out_dir / path.name, "w", **profile) as dst:
            dst.write(data)
    return out_dir


def score_run(ckpt: Path, tta: str = "none", tm=None) -> dict:
    """Scores of checkpoint ``ckpt`` (or the already loaded ``tm``) per split, maps predicted with ``tta``;
    ``predict_seconds``: time spent predicting the patches."""
    tm = tm if tm is not None else load_trained_model(ckpt)
    names = tm.legend.target.names
    k = len(names)
    out = {}
    cms = {
        "train": (np.zeros((k, k), np.int64), np.zeros((k, k), np.int64)),
        "heldout": (np.zeros((k, k), np.int64), np.zeros((k, k), np.int64)),
    }
    seconds = 0.0
    for p in _patches():
        i, split = p["patch"], p["split"]
        ref, nlcd = _reference_and_nlcd(i)
        t0 = time.perf_counter()
        pred = predict_patch(tm, i, tta)
        seconds += time.perf_counter() - t0
        keep = (ref != IGNORE_INDEX) & (nlcd != IGNORE_INDEX) & (pred != IGNORE_INDEX)
        cms[split][0][...] += confusion_matrix(ref[keep], pred[keep], k)
        cms[split][1][...] += confusion_matrix(ref[keep], nlcd[keep], k)
    for split, (cm_model, cm_nlcd) in cms.items():
        sm, sn = scores_from_confusion(cm_model, names), scores_from_confusion(cm_nlcd, names)
        out[split] = {
            "model": {"oa": sm["oa"], "miou": sm["miou"], "iou": {n: v["iou"] for n, v in sm["per_class"].items()}},
            "nlcd": {"oa": sn["oa"], "miou": sn["miou"], "iou": {n: v["iou"] for n, v in sn["per_class"].items()}},
            "gain_miou": sm["miou"] - sn["miou"],
            "gain_miou_reference_classes": sm["miou_reference_classes"] - sn["miou_reference_classes"],
            "pixels": int(cm_model.sum()),
        }
    out["predict_seconds"] = seconds
    return out


def sample_config(
    model: str, seed: int, run_dir: Path, demo_settings: bool, reference_val: bool, progress_bar: bool = False
) -> TrainConfig:
    """The TrainConfig of one run on the sample's TRAIN split (``demo_settings``: the demo's options on
    top of the defaults; ``reference_val``: validate, and pick best.ckpt, on the Chesapeake reference)."""
    config = TrainConfig(
        images=[str(SAMPLE / "naip")],
        labels=[str(SAMPLE / "nlcd")],
        legend="nlcd",
        aoi=str(SAMPLE / "aoi_train.geojson"),
        model=model,
        seed=seed,
        out=str(run_dir),
        progress_bar=progress_bar,
    )
    if demo_settings:
        from lcmap.pipeline.demo import DEMO_TRAINING

        config = config.merged(**DEMO_TRAINING)
    if reference_val:
        config = config.merged(reference=[str(SAMPLE / "reference")], reference_legend="chesapeake")
    return config


def _fmt(v) -> str:
    return "  -  " if v is None else f"{v:.3f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["paraformer-tiny", "unet"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[1234])
    ap.add_argument("--checkpoints", nargs="+", default=["last", "best"], choices=["last", "best"])
    ap.add_argument(
        "--no-reference-val",
        action="store_true",
        help="validate on the LR labels instead of the reference (best.ckpt then follows agreement)",
    )
    ap.add_argument("--out", default="/tmp/lcmap-bench")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--steps-per-epoch", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--patch-px", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--optimizer")
    ap.add_argument("--class-weighting")
    ap.add_argument("--augment", type=lambda s: s.lower() in ("1", "true", "yes", "on"))
    ap.add_argument(
        "--demo-settings",
        action="store_true",
        help="start from the demo's training settings (lcmap.pipeline.demo.DEMO_TRAINING)",
    )
    ap.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="any other TrainConfig option, e.g. --set weight_decay=0.05 val_patch_px=128",
    )
    ap.add_argument(
        "--tta", default="none", choices=TTA_MODES, help="test-time augmentation of the scored maps (and validation)"
    )
    ap.add_argument("--products", default="nlcd", choices=["nlcd", "nlcd+shifted"])
    ap.add_argument("--label-fusion", default="partial", choices=["partial", "agree", "first"])
    ap.add_argument("--shift-m", type=float, default=30.0, help="east shift of the second NLCD product (m)")
    ap.add_argument("--progress-bar", action="store_true")
    args = ap.parse_args(argv)

    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = []
    for model in args.models:
        for seed in args.seeds:
            tag = "" if args.products == "nlcd" else f"-{args.products}-{args.label_fusion}"
            run_dir = Path(args.out) / f"{model}-s{seed}{tag}"
            if run_dir.exists():
                import shutil

                shutil.rmtree(run_dir)
            config = sample_config(
                model, seed, run_dir, args.demo_settings, not args.no_reference_val, args.progress_bar
            )
            if args.products == "nlcd+shifted":
                shifted = shifted_nlcd(Path(args.out) / f"nlcd-shift{args.shift_m:g}m", args.shift_m)
                products = [
                    {"labels": [str(SAMPLE / "nlcd")], "legend": "nlcd"},
                    {"labels": [str(shifted)], "legend": "nlcd"},
                ]
                config = dataclasses.replace(config, labels=[], label_products=products, label_fusion=args.label_fusion)
            config = config.merged(
                epochs=args.epochs,
                steps_per_epoch=args.steps_per_epoch,
                batch_size=args.batch_size,
                patch_px=args.patch_px,
                lr=args.lr,
                optimizer=args.optimizer,
                class_weighting=args.class_weighting,
                augment=args.augment,
            )
            config = config.merged(**dict(kv.split("=", 1) for kv in args.set))
            config = config.merged(val_tta=args.tta)
            t0 = time.perf_counter()
            run_train(config)
            seconds = time.perf_counter() - t0
            for which in args.checkpoints:
                scores = score_run(run_dir / "checkpoints" / f"{which}.ckpt", args.tta)
                results.append(
                    {
                        "model": model,
                        "seed": seed,
                        "products": args.products,
                        "label_fusion": args.label_fusion if args.products != "nlcd" else None,
                        "checkpoint": which,
                        "train_seconds": seconds,
                        "tta": args.tta,
                        "config": {
                            k: v
                            for k, v in config.to_dict().items()
                            if k
                            in (
                                "epochs",
                                "steps_per_epoch",
                                "batch_size",
                                "patch_px",
                                "lr",
                                "optimizer",
                                "class_weighting",
                                "augment",
                                "label_trust",
                            )
                        },
                        **scores,
                    }
                )
                _print_row(results[-1])
    print()
    print("RESULT " + json.dumps(results))
    return 0


def _print_row(r: dict) -> None:
    names = list(r["train"]["model"]["iou"])
    short = {"water": "water", "tree canopy": "tree", "low vegetation": "lowveg", "built-up": "built"}
    head = (
        f"{'model':16s} {'seed':>5s} {'ckpt':4s} {'split':7s} {'OA':>6s} {'mIoU':>6s} "
        + " ".join(f"{short.get(n, n)[:6]:>6s}" for n in names)
        + f" | {'NLCD OA':>7s} {'mIoU':>6s} "
        + " ".join(f"{short.get(n, n)[:6]:>6s}" for n in names)
        + f" | {'gain':>6s} {'gainRC':>6s} {'train s':>7s}"
    )
    if not getattr(_print_row, "_done", False):
        print(head)
        _print_row._done = True  # type: ignore[attr-defined]
    for split in ("train", "heldout"):
        m, n = r[split]["model"], r[split]["nlcd"]
        print(
            f"{r['model']:16s} {r['seed']:5d} {r['checkpoint']:4s} {split:7s} "
            + f"{_fmt(m['oa']):>6s} {_fmt(m['miou']):>6s} "
            + " ".join(f"{_fmt(m['iou'][k]):>6s}" for k in names)
            + f" | {_fmt(n['oa']):>7s} {_fmt(n['miou']):>6s} "
            + " ".join(f"{_fmt(n['iou'][k]):>6s}" for k in names)
            + f" | {r[split]['gain_miou']:+.3f} {r[split]['gain_miou_reference_classes']:+.3f}"
            + f" {r['train_seconds']:7.0f}"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
