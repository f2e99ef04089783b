"""What test-time augmentation (``lcmap predict --tta``) buys on the embedded sample, and what it costs.

For each seed, ``paraformer-tiny`` is trained ONCE with the demo's settings (as
``benchmarks/train_sample.py --demo-settings --no-reference-val``: the TrainConfig defaults plus
``lcmap.pipeline.demo.DEMO_TRAINING``, last.ckpt, as the demo maps with), then every sample
patch is predicted whole under each TTA mode (``none``, ``flips``, ``d4``:
:func:`lcmap.models.tta.predict_proba_tta`) and scored against the Chesapeake 1 m reference
(:func:`train_sample.score_run`), pooled per split: ``heldout`` (patches 3 and 6, never trained
on) and ``train`` (the training area). The predict time of each mode (all 8 patches, the minimum
over ``--timing-rounds`` interleaved rounds, this process, same checkpoint) is given as a ratio
to ``none``.

    python benchmarks/tta.py [--seeds 1234 1 2] [--out /tmp/lcmap-bench-tta] [--reuse]
        [--epochs N] [--steps-per-epoch N] [--timing-rounds 3]

``--reuse``: use ``OUT/paraformer-tiny-s{seed}/checkpoints/last.ckpt`` where it exists instead of
training again. ``--combine LOG ...``: only summarise the ``RESULT`` lines of runs made separately
(e.g. one process per seed). Prints a table and one JSON line (``RESULT {...}``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_sample import _patches, predict_patch, sample_config, score_run  # noqa: E402

from lcmap.models.tta import TTA_MODES  # noqa: E402
from lcmap.pipeline.runs import load_trained_model  # noqa: E402
from lcmap.pipeline.training.train import run_train  # noqa: E402

SHORT = {"water": "water", "tree canopy": "tree", "low vegetation": "lowveg", "built-up": "built"}


def checkpoint_for(model: str, seed: int, out: Path, reuse: bool, epochs: int | None, steps: int | None) -> Path:
    """Train ``model`` with the demo's settings and ``seed`` into ``out`` (unless ``reuse`` finds it)."""
    run_dir = out / f"{model}-s{seed}"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if reuse and ckpt.is_file():
        return ckpt
    if run_dir.exists():
        shutil.rmtree(run_dir)
    config = sample_config(model, seed, run_dir, demo_settings=True, reference_val=False)
    run_train(config.merged(epochs=epochs, steps_per_epoch=steps))
    return ckpt


def predict_seconds(tm, mode: str) -> float:
    """Seconds to predict all sample patches with ``mode`` (no scoring)."""
    t0 = time.perf_counter()
    for p in _patches():
        predict_patch(tm, p["patch"], mode)
    return time.perf_counter() - t0


def measure(ckpt: Path, modes: list[str], rounds: int) -> dict:
    """Scores and predict seconds per mode for one checkpoint."""
    tm = load_trained_model(ckpt)
    scores = {m: score_run(ckpt, m, tm=tm) for m in modes}
    times = {m: [scores[m]["predict_seconds"]] for m in modes}
    for _ in range(max(0, rounds - 1)):  # interleaved, so load changes hit every mode alike
        for m in modes:
            times[m].append(predict_seconds(tm, m))
    best = {m: min(t) for m, t in times.items()}
    return {m: {**scores[m], "predict_seconds": best[m], "time_ratio": best[m] / best[modes[0]]} for m in modes}


def _row(label: str, mode: str, split: dict, ratio: float, names: list[str]) -> str:
    m = split["model"]
    ious = " ".join(f"{'  -  ' if m['iou'][n] is None else format(m['iou'][n], '.3f'):>6s}" for n in names)
    return f"{label:8s} {mode:6s} {m['miou']:6.3f} {ious} {ratio:6.2f}x"


def summarise(results: list[dict], modes: list[str]) -> dict:
    """Print the per-seed rows and the means per split and mode; returns the means."""
    names = list(results[0]["heldout"]["model"]["iou"])
    seeds = sorted({r["seed"] for r in results})
    print(f"{'seed':8s} {'tta':6s} {'mIoU':>6s} " + " ".join(f"{SHORT.get(n, n)[:6]:>6s}" for n in names) + "  time")
    summary: dict = {}
    for split in ("heldout", "train"):
        print(f"-- {split} patches (Chesapeake 1 m reference)")
        for r in results:
            print(_row(str(r["seed"]), r["tta"], r[split], r["time_ratio"], names))
        for mode in modes:
            rows = [r for r in results if r["tta"] == mode]
            miou = float(np.mean([r[split]["model"]["miou"] for r in rows]))
            iou = {}
            for n in names:
                vals = [r[split]["model"]["iou"][n] for r in rows if r[split]["model"]["iou"][n] is not None]
                iou[n] = float(np.mean(vals)) if vals else None
            ratio = float(np.mean([r["time_ratio"] for r in rows]))
            summary.setdefault(split, {})[mode] = {"miou": miou, "iou": iou, "time_ratio": ratio}
            print(_row("mean", mode, {"model": {"miou": miou, "iou": iou}}, ratio, names))
    for mode in modes[1:]:
        for split in ("heldout", "train"):
            gain = summary[split][mode]["miou"] - summary[split]["none"]["miou"]
            summary[split][mode]["gain_miou"] = gain
            print(f"{split} mIoU gain of {mode} over none: {gain:+.4f} (mean of {len(seeds)} seeds: {seeds})")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="paraformer-tiny")
    ap.add_argument("--seeds", nargs="+", type=int, default=[1234, 1, 2])
    ap.add_argument("--modes", nargs="+", default=list(TTA_MODES), choices=TTA_MODES)
    ap.add_argument("--out", default="/tmp/lcmap-bench-tta")
    ap.add_argument("--reuse", action="store_true", help="reuse OUT/MODEL-sSEED/checkpoints/last.ckpt if present")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--steps-per-epoch", type=int)
    ap.add_argument("--timing-rounds", type=int, default=3)
    ap.add_argument("--combine", nargs="+", metavar="LOG", help="only summarise the RESULT lines of earlier runs")
    args = ap.parse_args(argv)
    modes = ["none"] + [m for m in args.modes if m != "none"]  # ratios are against none

    if args.combine:  # seeds scored in separate processes: their RESULT lines
        results = []
        for log_file in args.combine:
            line = [ln for ln in Path(log_file).read_text().splitlines() if ln.startswith("RESULT ")][-1]
            results += json.loads(line[len("RESULT ") :])["runs"]
        modes = list(dict.fromkeys(r["tta"] for r in results))
    else:
        results = []
        for seed in args.seeds:
            ckpt = checkpoint_for(args.model, seed, Path(args.out), args.reuse, args.epochs, args.steps_per_epoch)
            for mode, r in measure(ckpt, modes, args.timing_rounds).items():
                results.append({"model": args.model, "seed": seed, "tta": mode, **r})
    summary = summarise(results, modes)
    print()
    print("RESULT " + json.dumps({"runs": results, "mean": summary, "torch_threads": torch.get_num_threads()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
