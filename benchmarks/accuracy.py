"""Accuracy on the embedded sample that cannot be tuned to two patches: k-fold over its 8 patches.

For each ``--label-loss``, seed and fold: ``paraformer-tiny`` is trained with the demo's budget
(the TrainConfig defaults plus ``lcmap.pipeline.demo.DEMO_TRAINING``: 8 epochs x 30 steps x 8
patches of 128 px, AdamW; validation on the LR labels, so the map comes from last.ckpt as in the
demo) on the NLCD labels of the patches NOT in the fold, then every patch of the fold is mapped
ALONE (:func:`map_patch`: one forward pass over the whole patch) and scored against the
Chesapeake 1 m reference, with NLCD itself scored on the same pixels. Patch ``i`` is in fold
``i % K`` (``--folds 8``: leave-one-out).

Scores are over the reference's classes (the classes present in the reference on the scored
pixels; the same classes for the map and for NLCD): ``mIoU`` and per-class IoU of the map and of
NLCD, and the gain (map minus NLCD) per fold and seed. The summary per loss: the mean gain over
folds and seeds, the WORST fold's gain (its mean over the seeds), the worst single run, and the
scores of all folds' pixels pooled (per seed, then averaged), with the training time.

    python benchmarks/accuracy.py [--label-loss plat prior ...] [--folds 8] [--seeds 3]
        [--epochs N] [--steps N] [--prior-blur-m M] [--set KEY=VALUE ...] [--out DIR] [--reuse]
        [--keep-runs] [--rescore]

Each run is scored twice from the same checkpoint: the network alone (``LOSS``) and combined with
the held-out patches' NLCD by ``lcmap predict --label-prior`` (``LOSS+label-prior``,
:mod:`lcmap.pipeline.prediction.prediction_prior`). ``--rescore`` scores the kept checkpoints of the runs in
``OUT/runs.jsonl`` again (with ``--reuse --keep-runs``).

Smoke run (well under 2 minutes): ``--folds 2 --seeds 1 --epochs 1 --steps 2``. Each finished run
is appended to ``OUT/runs.jsonl``; ``--reuse`` skips the runs found there (an interrupted
benchmark continues). The last line printed is one JSON object (the summary).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_sample import SAMPLE, _patches, _reference_and_nlcd  # noqa: E402

from lcmap.geodata.legends import IGNORE_INDEX  # noqa: E402
from lcmap.models import predict_proba, sum_probabilities  # noqa: E402
from lcmap.pipeline.metrics import confusion_matrix, scores_from_confusion  # noqa: E402
from lcmap.pipeline.prediction.prediction_prior import PriorReader, prediction_prior  # noqa: E402
from lcmap.pipeline.runs import load_trained_model  # noqa: E402
from lcmap.pipeline.training.config import LABEL_LOSSES, TrainConfig  # noqa: E402
from lcmap.pipeline.training.train import run_train  # noqa: E402

#: Seeds in the order used: the demo's default first.
SEEDS = (1234, 1, 2, 3, 4, 5, 6, 7, 8, 9)
SHORT = {"water": "water", "tree canopy": "tree", "low vegetation": "lowveg", "built-up": "built"}


def folds_of(n_patches: int, k: int) -> list[list[int]]:
    """Patch indices per fold: patch ``i`` in fold ``i % k``."""
    if not 2 <= k <= n_patches:
        raise ValueError(f"--folds must be between 2 and {n_patches}")
    return [[i for i in range(n_patches) if i % k == f] for f in range(k)]


def map_patch(tm: Any, image_path: Path, prior: Any = None) -> np.ndarray:
    """Target-class indices (uint8, IGNORE_INDEX where the class has no target) of the map of ONE
    imagery file by itself: one forward pass over the whole file (padded by reflection to a multiple
    of 32 px if needed), normalised as ``lcmap predict`` does (``(value - mean) / std``, pixels whose
    bands all equal the nodata value set to the band mean), both heads' softmax averaged, LR-class
    probabilities summed per target class (argmax)."""
    with rasterio.open(image_path) as src:
        image = src.read().astype(np.float32)
        nodata = src.nodata
        crs_wkt, transform = src.crs.to_wkt(), src.transform
    x = (image - tm.mean[:, None, None]) / tm.std[:, None, None]
    if nodata is not None:
        x[:, np.all(image == nodata, axis=0)] = 0.0
    h, w = x.shape[1:]
    xt = torch.from_numpy(x)[None]
    if (-h) % 32 or (-w) % 32:
        xt = torch.nn.functional.pad(xt, (0, (-w) % 32, 0, (-h) % 32), mode="reflect")
    with torch.no_grad():
        probs = predict_proba(tm.model, xt)[:, :, :h, :w]
    n_target = len(tm.legend.target)
    group = torch.from_numpy(tm.legend.index_to_target_group())
    p = sum_probabilities(probs, group, n_target + 1)[0]
    if prior is not None:
        reader = PriorReader(prior, crs_wkt, transform)
        p = p * torch.from_numpy(reader.factors(0, h, 0, w))
        reader.close()
    idx = p.argmax(0).numpy().astype(np.uint8)
    return np.where(idx == n_target, IGNORE_INDEX, idx).astype(np.uint8)


def fold_config(loss: str, seed: int, train_patches: list[int], run_dir: Path, args: argparse.Namespace) -> TrainConfig:
    """The demo's training options on the NLCD labels of ``train_patches`` (no AOI: the files are the area)."""
    from lcmap.pipeline.demo import DEMO_TRAINING

    config = TrainConfig(
        images=[str(SAMPLE / "naip" / f"patch-{i}.tif") for i in train_patches],
        labels=[str(SAMPLE / "nlcd" / f"patch-{i}.tif") for i in train_patches],
        legend="nlcd",
        model="paraformer-tiny",
        seed=seed,
        out=str(run_dir),
        progress_bar=False,
    ).merged(**DEMO_TRAINING)
    config = config.merged(
        label_loss=loss, epochs=args.epochs, steps_per_epoch=args.steps, prior_blur_m=args.prior_blur_m
    )
    return config.merged(**dict(kv.split("=", 1) for kv in args.set))


def score(cm_map: np.ndarray, cm_nlcd: np.ndarray, names: list[str]) -> dict[str, Any]:
    """mIoU and per-class IoU of the map and of NLCD over the reference's classes (None for a class
    absent from the reference); the gain in mIoU."""
    sm, sn = scores_from_confusion(cm_map, names), scores_from_confusion(cm_nlcd, names)
    present = [n for n in names if sm["per_class"][n]["support_px"] > 0]  # the same pixels for both
    m_iou = {n: (sm["per_class"][n]["iou"] if n in present else None) for n in names}
    n_iou = {n: (sn["per_class"][n]["iou"] if n in present else None) for n in names}
    return {
        "map": {"miou": sm["miou_reference_classes"], "iou": m_iou},
        "nlcd": {"miou": sn["miou_reference_classes"], "iou": n_iou},
        "gain": sm["miou_reference_classes"] - sn["miou_reference_classes"],
        "reference_classes": present,
        "pixels": int(cm_map.sum()),
    }


def label_prior_of(tm: Any, train_patches: list[int], held_out: list[int]) -> Any:
    """The ``--label-prior`` of ``tm`` with the held-out patches' NLCD (as ``lcmap predict`` builds
    it). A checkpoint from before lcmap recorded ``label_frequency`` gets the frequency of each NLCD
    class over the whole training patches instead (the run samples patches inside them)."""
    if tm.hparams.get("label_frequency") is None:
        legend = tm.hparams.get("label_legend") or tm.hparams["legend"]
        codes = [c["code"] for c in legend["classes"]]
        counts = np.zeros(len(codes))
        for i in train_patches:
            with rasterio.open(SAMPLE / "nlcd" / f"patch-{i}.tif") as src:
                values, n = np.unique(src.read(1), return_counts=True)
            for v, c in zip(values.tolist(), n.tolist(), strict=True):
                if v in codes:
                    counts[codes.index(v)] += c
        tm.hparams["label_frequency"] = (counts / counts.sum()).tolist()
    n_channels = len(tm.legend.target) + 1  # map_patch's channels: the target classes and "no target"
    files = [str(SAMPLE / "nlcd" / f"patch-{i}.tif") for i in held_out]
    with rasterio.open(SAMPLE / "naip" / f"patch-{held_out[0]}.tif") as src:
        bounds, crs = tuple(src.bounds), src.crs.to_wkt()
    return prediction_prior(tm, files, "target", n_channels, crs, bounds)


def score_checkpoint(ckpt: Path, train_patches: list[int], held_out: list[int]) -> dict[str, Any]:
    """Confusion matrices of the map of each held-out patch (alone; network alone and with the
    label prior) and of NLCD, on the same pixels."""
    tm = load_trained_model(ckpt)
    names = list(tm.legend.target.names)
    k = len(names)
    prior = label_prior_of(tm, train_patches, held_out)
    cm = {key: np.zeros((k, k), np.int64) for key in ("cm_map", "cm_map_label_prior", "cm_nlcd")}
    for i in held_out:
        ref, nlcd = _reference_and_nlcd(i)
        image = SAMPLE / "naip" / f"patch-{i}.tif"
        pred, pred_prior = map_patch(tm, image), map_patch(tm, image, prior)
        keep = (ref != IGNORE_INDEX) & (nlcd != IGNORE_INDEX) & (pred != IGNORE_INDEX)
        cm["cm_map"] += confusion_matrix(ref[keep], pred[keep], k)
        cm["cm_map_label_prior"] += confusion_matrix(ref[keep], pred_prior[keep], k)
        cm["cm_nlcd"] += confusion_matrix(ref[keep], nlcd[keep], k)
    return {"names": names, **{key: v.tolist() for key, v in cm.items()}}


def run_one(loss: str, seed: int, fold: int, held_out: list[int], args: argparse.Namespace) -> dict[str, Any]:
    """Train without the fold's patches, map each of them alone, and return the confusion matrices."""
    n_patches = len(_patches())
    train_patches = [i for i in range(n_patches) if i not in held_out]
    run_dir = Path(args.out) / f"{loss}-s{seed}-f{fold}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    run_train(fold_config(loss, seed, train_patches, run_dir, args))
    seconds = time.perf_counter() - t0
    scores = score_checkpoint(run_dir / "checkpoints" / "last.ckpt", train_patches, held_out)
    if not args.keep_runs:
        shutil.rmtree(run_dir, ignore_errors=True)
    return {
        "label_loss": loss,
        "seed": seed,
        "fold": fold,
        "held_out": held_out,
        "train_seconds": round(seconds, 1),
        **scores,
    }


def with_label_prior(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``runs`` and, for each run scored with the label prior, the same run as loss ``LOSS+label-prior``."""
    extra = [
        {**r, "label_loss": r["label_loss"] + "+label-prior", "cm_map": r["cm_map_label_prior"]}
        for r in runs
        if "cm_map_label_prior" in r
    ]
    return runs + extra


def _fmt(v: float | None) -> str:
    return "  -  " if v is None else f"{v:.3f}"


def _row(label: str, s: dict[str, Any], names: list[str], extra: str = "") -> str:
    ious = " ".join(f"{_fmt(s['map']['iou'][n]):>6s}" for n in names)
    nl = " ".join(f"{_fmt(s['nlcd']['iou'][n]):>6s}" for n in names)
    gain = f"{s['gain']:+.3f}{extra}"
    return f"{label:28s} {_fmt(s['map']['miou']):>6s} {ious} | {_fmt(s['nlcd']['miou']):>6s} {nl} | {gain}"


def _header(names: list[str]) -> str:
    cls = " ".join(f"{SHORT.get(n, n)[:6]:>6s}" for n in names)
    return f"{'loss / fold (patches) / seed':28s} {'mIoU':>6s} {cls} | {'NLCD':>6s} {cls} | {'gain':>6s}"


def _mean_of(scores: list[dict[str, Any]], which: str, name: str | None = None) -> float | None:
    """The mean over ``scores`` of ``which``'s mIoU (or class ``name``'s IoU), Nones left out."""
    vals = [s[which]["miou"] if name is None else s[which]["iou"][name] for s in scores]
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else None


def summarise(runs: list[dict[str, Any]], losses: list[str]) -> dict[str, Any]:
    """Print per fold and overall; return the summary per loss."""
    summary: dict[str, Any] = {}
    names = runs[0]["names"]
    print(_header(names))
    for loss in losses:
        mine = [r for r in runs if r["label_loss"] == loss]
        if not mine:
            continue
        seeds = sorted({r["seed"] for r in mine})
        folds = sorted({r["fold"] for r in mine})
        per_run = {}
        for r in sorted(mine, key=lambda r: (r["fold"], r["seed"])):
            s = score(np.array(r["cm_map"]), np.array(r["cm_nlcd"]), names)
            per_run[(r["fold"], r["seed"])] = s
            label = f"{loss} f{r['fold']} {r['held_out']} s{r['seed']}"
            print(_row(label, s, names, f"  ({r['train_seconds']:.0f} s)"))
        fold_gain = {f: float(np.mean([per_run[(f, s)]["gain"] for s in seeds if (f, s) in per_run])) for f in folds}
        pooled = []
        for s in seeds:
            cm_m = sum(np.array(r["cm_map"]) for r in mine if r["seed"] == s)
            cm_n = sum(np.array(r["cm_nlcd"]) for r in mine if r["seed"] == s)
            pooled.append(score(cm_m, cm_n, names))
            print(_row(f"{loss} all folds pooled s{s}", pooled[-1], names))

        overall = {
            "map": {"miou": _mean_of(pooled, "map"), "iou": {n: _mean_of(pooled, "map", n) for n in names}},
            "nlcd": {"miou": _mean_of(pooled, "nlcd"), "iou": {n: _mean_of(pooled, "nlcd", n) for n in names}},
            "gain": float(np.mean([p["gain"] for p in pooled])),
        }
        worst_fold = min(fold_gain, key=lambda f: fold_gain[f])
        gains = [s["gain"] for s in per_run.values()]
        summary[loss] = {
            "mean_gain": float(np.mean(gains)),
            "worst_fold": worst_fold,
            "worst_fold_gain": fold_gain[worst_fold],
            "worst_run_gain": float(min(gains)),
            "runs_below_nlcd": int(sum(g < 0 for g in gains)),
            "runs": len(gains),
            "fold_gains": {str(f): g for f, g in fold_gain.items()},
            "pooled": overall,
            "train_seconds_mean": float(np.mean([r["train_seconds"] for r in mine])),
            "seeds": seeds,
        }
        print(_row(f"{loss} MEAN over seeds (pooled)", overall, names))
        print(
            f"{loss}: mean gain {summary[loss]['mean_gain']:+.3f} over {len(gains)} runs ({len(folds)} folds x "
            f"{len(seeds)} seeds); worst fold f{worst_fold} {fold_gain[worst_fold]:+.3f}; worst run "
            f"{summary[loss]['worst_run_gain']:+.3f}; {summary[loss]['runs_below_nlcd']} run(s) below NLCD; "
            f"{summary[loss]['train_seconds_mean']:.0f} s per training"
        )
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label-loss", nargs="+", default=["plat"], choices=LABEL_LOSSES, help="the losses compared")
    ap.add_argument("--folds", type=int, default=8, help="K of the k-fold (8: leave-one-out)")
    ap.add_argument("--only-folds", type=int, nargs="+", help="run only these folds (0-based) of the K")
    ap.add_argument("--seeds", type=int, default=3, help=f"number of seeds (taken in the order {SEEDS[:5]}...)")
    ap.add_argument("--epochs", type=int, help="training epochs (default: the demo's)")
    ap.add_argument("--steps", type=int, help="optimizer steps per epoch (default: the demo's)")
    ap.add_argument("--prior-blur-m", type=float, help="--prior-blur-m of the prior losses (metres)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="any other TrainConfig option")
    ap.add_argument("--out", default="/tmp/lcmap-bench-accuracy")
    ap.add_argument("--reuse", action="store_true", help="skip the runs already in OUT/runs.jsonl")
    ap.add_argument("--keep-runs", action="store_true", help="keep the run folders (checkpoints)")
    ap.add_argument("--rescore", action="store_true", help="score the kept checkpoints of the runs again")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "runs.jsonl"
    done: list[dict[str, Any]] = []
    if args.reuse and log_path.is_file():
        done = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    folds = folds_of(len(_patches()), args.folds)
    wanted = args.only_folds if args.only_folds is not None else range(len(folds))
    seeds = list(SEEDS[: args.seeds])
    runs = []
    for loss in args.label_loss:
        for seed in seeds:
            for f in wanted:
                old = [r for r in done if (r["label_loss"], r["seed"], r["held_out"]) == (loss, seed, folds[f])]
                if old:
                    runs.append(old[-1])
                    continue
                r = run_one(loss, seed, f, folds[f], args)
                with open(log_path, "a") as fh:
                    fh.write(json.dumps(r) + "\n")
                runs.append(r)
                s = score(np.array(r["cm_map"]), np.array(r["cm_nlcd"]), r["names"])
                print(
                    f"done {loss} seed {seed} fold {f} {folds[f]}: gain {s['gain']:+.3f} ({r['train_seconds']:.0f} s)"
                )
                sys.stdout.flush()
    if args.rescore:  # the kept checkpoints scored again by today's code (e.g. with the label prior)
        for r in runs:
            ckpt = Path(args.out) / f"{r['label_loss']}-s{r['seed']}-f{r['fold']}" / "checkpoints" / "last.ckpt"
            if ckpt.is_file():
                train_patches = [i for i in range(len(_patches())) if i not in r["held_out"]]
                r.update(score_checkpoint(ckpt, train_patches, r["held_out"]))
    losses = list(args.label_loss) + [f"{loss}+label-prior" for loss in args.label_loss]
    summary = summarise(with_label_prior(runs), losses)
    settings = {
        "folds": args.folds,
        "only_folds": args.only_folds,
        "seeds": seeds,
        "epochs": args.epochs,
        "steps": args.steps,
        "prior_blur_m": args.prior_blur_m,
        "set": args.set,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps({"settings": settings, "losses": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
