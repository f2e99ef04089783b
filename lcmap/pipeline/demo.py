"""``lcmap demo``: the paper's comparison, end to end, on the embedded real sample.

1. train ``paraformer-tiny`` on the NLCD 30 m labels of the sample's 6 training patches (CPU);
2. predict those patches at 1 m into a COG (map updating: the area the labels cover), the network
   combined at each pixel with the NLCD label it updates (``lcmap predict --label-prior``,
   :mod:`lcmap.pipeline.prediction.prediction_prior`);
3. score the map against the Chesapeake 1 m reference, with the NLCD label as the baseline;
4. the same for the 2 held-out patches (ground never trained on), and for the network alone there
   (no label prior: ``held_out_network_alone`` in metrics.json);
5. write ``quicklook.png`` (imagery | LR label | prediction | reference).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import rasterio

from lcmap.geodata.legends import DEFAULT_TARGET, IGNORE_INDEX, get_legend
from lcmap.geodata.sample import sample_metadata, sample_paths

log = logging.getLogger(__name__)

#: Patches shown in the quicklook: two training patches with mixed cover, one held-out.
QUICKLOOK_PATCHES = (0, 7, 3)

#: Training options the demo sets on top of the TrainConfig defaults (README: "What the demo shows"):
#: none. NLCD 21 "Developed, Open Space" is defined as mostly lawn grass with under 20 % impervious
#: cover: a mixed class at 1 m. Trained as a plain label, the network learns "open grass =
#: built-up"; as a mixed class its pixels ask for "a built-up or a low-vegetation class" and the
#: image decides (partial-label cross-entropy, see lcmap.pipeline.training.task.weighted_ce). The NLCD
#: legend declares it (lcmap.geodata.legends), so the defaults already train it so.
DEMO_TRAINING: dict = {}

#: The file that marks a folder as the demo's own (``lcmap demo`` refuses any other non-empty folder).
DEMO_MARKER = ".lcmap-demo"


def run_demo(
    out: str | Path = "lcmap-demo",
    epochs: int | None = None,
    progress: bool = True,
    resume: bool = False,
    **train_overrides,
) -> dict:
    """Run the demo into ``out``; returns the metrics dict (also written to ``out/metrics.json``).

    ``epochs`` and ``train_overrides`` (TrainConfig fields, e.g. ``steps_per_epoch``) shorten the
    training for a quick look; the defaults are the ones the README's numbers come from.
    ``resume``: continue the interrupted training in ``out/run`` (its saved options; ``epochs`` may
    change), then map and score as usual.

    Raises:
        LcmapInputError: ``out`` holds files an ``lcmap demo`` did not write (:func:`_claim_out`);
            ``out/run`` already holds a training run and ``resume`` is False (or holds none and
            ``resume`` is True).
        TrainingInterrupted: Ctrl-C or SIGTERM during training; the message says ``lcmap demo --resume``.
    """
    from lcmap.errors import LcmapInputError, TrainingInterrupted
    from lcmap.pipeline.analysis.evaluate import evaluate_map
    from lcmap.pipeline.prediction.predict import PredictConfig, predict_map
    from lcmap.pipeline.runs import RunFolder
    from lcmap.pipeline.training.train import TrainConfig, run_train

    out = Path(out)
    _claim_out(out)
    train_files, all_files = sample_paths("train"), sample_paths()
    nlcd, reference_legend = get_legend("nlcd"), get_legend(all_files["reference_legend"])
    t0 = time.perf_counter()

    log.info("1/4 training paraformer-tiny on the sample's NLCD labels (CPU, from scratch)")
    flags = {**DEMO_TRAINING, **({"epochs": epochs} if epochs else {}), **train_overrides}
    run = RunFolder(out / "run")
    resume_command = f"lcmap demo --out {out} --resume"
    if resume:
        cfg = TrainConfig(out=str(run.path), resume=True).merged(epochs=epochs)
    elif run.last_ckpt.exists():
        raise LcmapInputError(
            f"{run.path} already holds the demo's training run: continue it with '{resume_command}', "
            f"or start over in another --out (or delete {run.path})"
        )
    else:
        cfg = TrainConfig().merged(
            images=train_files["imagery"],
            labels=train_files["labels"],
            legend="nlcd",
            aoi=all_files["aoi_train"],
            model="paraformer-tiny",
            out=run.path,
            **flags,
        )
    # No --reference here: the reference is what the map is scored against, so it must not pick
    # the checkpoint either: predict then maps with last.ckpt (see runs.resolve_checkpoint).
    try:
        run_dir = run_train(cfg)
    except TrainingInterrupted as exc:
        raise TrainingInterrupted(exc.run_dir, exc.global_step, resume_command=resume_command) from None
    t_train = time.perf_counter() - t0

    results: dict = {}
    for split, aoi, name, prior in (
        ("train", all_files["aoi_train"], "map", all_files["labels"]),
        ("held_out", all_files["aoi_heldout"], "map_heldout", all_files["labels"]),
        ("held_out_network_alone", all_files["aoi_heldout"], "map_heldout_network_alone", None),
    ):
        log.info("%s predicting the %s patches at 1 m%s", "2/4" if split == "train" else "3/4",
                 split.replace("_", "-"), " with the NLCD as prior" if prior else "")  # fmt: skip
        map_path = predict_map(
            PredictConfig.of(
                run_dir,
                all_files["imagery"],
                out / f"{name}.tif",
                aoi=aoi,
                tile_px=256,
                overlap_px=32,
                block_px=2048,
                scheduler="synchronous",
                label_prior=prior or [],
            ),
            progress=progress,
        ).path
        report_dir = out / {"train": "report", "held_out": "report_heldout"}.get(split, f"report_{split}")
        results[split] = evaluate_map(
            map_path,
            all_files["reference"],
            reference_legend,
            report_dir,
            baseline=all_files["labels"],
            baseline_legend=nlcd,
            aoi=aoi,
            progress=progress,
        )

    log.info("4/4 writing the quicklook")
    quicklook(out / "quicklook.png", out / "map.tif", out / "map_heldout.tif")

    metrics = dict(results["train"])
    metrics["held_out"] = results["held_out"]
    metrics["held_out_network_alone"] = results["held_out_network_alone"]
    metrics["demo"] = {
        "seconds_total": round(time.perf_counter() - t0, 1),
        "seconds_training": round(t_train, 1),
        "cpu_cores": os.cpu_count(),
        "task": "map updating: trained on the NLCD labels of the 6 training patches, mapped and "
        "scored there; held_out = the 2 patches never trained on",
    }
    _write_json(out / "metrics.json", metrics)
    (out / "report.md").write_text(_summary_md(metrics) + "\n" + (out / "report" / "report.md").read_text())
    _print_summary(out, metrics)
    return metrics


def _claim_out(out: Path) -> None:
    """Make ``out`` the demo's folder, or refuse it: the demo writes ``map.tif``, ``report.md``,
    ``metrics.json`` ... there, so ``out`` must be new, empty, or made by an earlier ``lcmap demo``
    (holding its :data:`DEMO_MARKER` file, written here); a user's files are never overwritten."""
    from lcmap.errors import LcmapInputError

    marker = out / DEMO_MARKER
    if out.exists() and not out.is_dir():
        raise LcmapInputError(f"--out {out} is a file, not a folder: choose a new or empty folder for the demo")
    if out.is_dir() and not marker.is_file():
        found = sorted(p.name for p in out.iterdir())
        if found:
            raise LcmapInputError(
                f"--out {out} already holds files lcmap demo did not write ({', '.join(found[:5])}"
                f"{' ...' if len(found) > 5 else ''}); the demo writes map.tif, report.md, metrics.json and more "
                "there and would replace them. Choose a new or empty folder for --out."
            )
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text("Made by 'lcmap demo': a later 'lcmap demo --out' here replaces its files.\n")


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def _summary_md(m: dict) -> str:
    rows = [("Paraformer-tiny + NLCD prior (1 m)", m), ("NLCD 2011 label (30 m)", m["baseline"])]
    h = m["held_out"]
    rows += [("held-out: Paraformer-tiny + NLCD prior", h), ("held-out: NLCD", h["baseline"])]
    if "held_out_network_alone" in m:
        rows.append(("held-out: the network alone (no --label-prior)", m["held_out_network_alone"]))
    lines = [
        "# lcmap demo: embedded real sample",
        "",
        "| scored against Chesapeake 1 m reference | OA | mIoU | " + " | ".join(DEFAULT_TARGET.names) + " |",
        "|---|---|---|" + "---|" * len(DEFAULT_TARGET),
    ]
    for label, r in rows:
        ious = [r["per_class"].get(n, {}).get("iou") for n in DEFAULT_TARGET.names]
        lines.append(
            f"| {label} | {r['oa']:.3f} | {r['miou']:.3f} | "
            + " | ".join("-" if v is None else f"{v:.3f}" for v in ious)
            + " |"
        )
    lines.append("")

    def gain(r: dict, key: str) -> str:  # evaluate_map's map-minus-baseline gains
        g = r["gain"].get(key)
        return "n/a" if g is None else f"{g:+.3f}"

    lines.append(
        f"mIoU gain over NLCD: {gain(m, 'miou')} (training area), {gain(h, 'miou')} (held-out); "
        f"over the classes present in the reference, the same classes for both maps: "
        f"{gain(m, 'miou_reference_classes')} (training area), {gain(h, 'miou_reference_classes')} "
        f"(held-out). Run time {m['demo']['seconds_total']:.0f} s on {m['demo']['cpu_cores']} CPU cores."
    )
    return "\n".join(lines)


def _print_summary(out: Path, m: dict) -> None:
    from rich.console import Console

    console = Console(stderr=True)
    console.print(_summary_md(m))
    console.print(
        f"\n[bold]Outputs in {out}[/]:\n"
        f"  map.tif (+ map.qml)      the 1 m map (COG); QGIS: Layer > Add Raster Layer, or drag it in:\n"
        f"                           the .qml beside it gives the class colours and names\n"
        f"  map.preview.png          the map small, with its legend\n"
        f"  map_heldout.tif          the held-out patches (+ _network_alone: without the label prior)\n"
        f"  metrics.json, report.md  scores (map vs NLCD baseline; held_out)\n"
        f"  quicklook.png            imagery | LR label | prediction | reference\n"
        f"  run/                     the training run: checkpoints, loss.png, metrics.csv\n"
        f"Go on with your own imagery: lcmap predict --model {out / 'run'} --images YOUR.tif "
        "--bbox W S E N --label-prior YOUR_OLD_LABELS.tif --out MAP.tif"
    )


def _read_target(path: Path, legend_name: str | None, bounds, shape, crs: str | None = None) -> np.ndarray:
    """A raster's target-class codes (1..N, 0 nodata) on the grid of ``bounds`` (``xmin, ymin, xmax,
    ymax`` in ``crs``, default the sample's CRS) and ``shape`` ``(H, W)`` px; the raster may be in
    any CRS (nearest neighbour, :class:`lcmap.geodata.label_mosaic.LabelMosaic`)."""
    from rasterio.transform import from_bounds

    from lcmap.geodata.label_mosaic import Grid, LabelMosaic

    no_label = (0,) if legend_name is None else get_legend(legend_name).nodata
    grid = Grid.of(
        crs or sample_metadata()["crs"],
        from_bounds(*bounds, width=shape[1], height=shape[0]),
        width=shape[1],
        height=shape[0],
    )
    with LabelMosaic(path, what="label", no_label_codes=no_label) as mosaic:
        labels = mosaic.read(grid)
    if legend_name is None:  # already target codes
        return np.where(labels.has_label, labels.codes, 0)
    t = get_legend(legend_name).code_to_target_lut()[np.where(labels.has_label, labels.codes, 0)]
    return np.where(labels.has_label & (t != IGNORE_INDEX), t.astype(np.int32) + 1, 0)


def quicklook(path: Path, map_train: Path, map_heldout: Path) -> None:
    """Imagery | NLCD label | prediction | reference for a few patches, with a legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    meta = sample_metadata()
    files = sample_paths()
    colours: list[tuple[float, float, float]] = [(1.0, 1.0, 1.0)]
    colours += [(c.color[0] / 255, c.color[1] / 255, c.color[2] / 255) for c in DEFAULT_TARGET.classes]
    cmap = ListedColormap(colours)
    patches = [p for p in meta["patches"] if p["patch"] in QUICKLOOK_PATCHES]
    patches.sort(key=lambda p: QUICKLOOK_PATCHES.index(p["patch"]))
    fig, axes = plt.subplots(len(patches), 4, figsize=(13, 3.3 * len(patches)), squeeze=False)
    for row, p in zip(axes, patches, strict=True):
        k, bounds = p["patch"], p["bounds"]
        shape = (int(bounds[3] - bounds[1]), int(bounds[2] - bounds[0]))
        with rasterio.open(files["imagery"][k]) as src:
            rgb = np.moveaxis(src.read([1, 2, 3]), 0, -1)
        panels = [
            (rgb, f"patch {k} ({'held out' if p['split'] == 'heldout' else 'training'}): NAIP 1 m"),
            (_read_target(files["labels"][k], "nlcd", bounds, shape), "NLCD 2011 (30 m): LR label"),
            (
                _read_target(map_heldout if p["split"] == "heldout" else map_train, None, bounds, shape),
                "lcmap Paraformer-tiny (1 m)",
            ),
            (_read_target(files["reference"][k], "chesapeake", bounds, shape), "Chesapeake 1 m reference"),
        ]
        for ax, (img, title) in zip(row, panels, strict=True):
            if img.ndim == 3:
                ax.imshow(img)
            else:
                ax.imshow(img, cmap=cmap, vmin=0, vmax=len(DEFAULT_TARGET), interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    handles = [Patch(color=colours[c.code], label=c.name) for c in DEFAULT_TARGET.classes]
    handles.append(Patch(facecolor="white", edgecolor="grey", label="no data"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    fig.suptitle(
        "lcmap demo: updating a 30 m NLCD map to 1 m (Chesapeake Land Cover sample, "
        "West Virginia; Robinson et al. CVPR 2019)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)
