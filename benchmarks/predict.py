"""Benchmark ``lcmap predict`` (not a test): throughput, memory, seams.

    python benchmarks/predict.py                 # default: ~3-5 min on 2 CPU cores
    python benchmarks/predict.py --tile 512 --overlap 64 --windows 8 --memory-side 896 --memory-block 896 --threads 2
                                                 # bigger: 512 px windows, 3136 px side (~20 min)

1. Throughput (CPU, one process, ``scheduler="synchronous"``): the whole pipeline (read,
   normalise, infer, blend, write blocks, COG with overviews) against the bare model forward
   over the same windows with the same batch shapes. Target: ratio >= 0.85.
   Also reported: how many windows blocks recompute at their borders (halo) for a block size.
2. Memory: peak RSS of a fresh process predicting an area 16x larger than another (4x the side),
   with the same block size (the 1x area is one block), ``MALLOC_TRIM_THRESHOLD_`` set as Dask's
   nanny sets it for workers. Target: growth <= 10%. What still grows is GDAL's block cache of the
   source imagery, capped at ``lcmap.pipeline.prediction.mapfile.GDAL_CACHE_BYTES``.
3. Seams: maps with ``block_px`` 1024 and 4096 must be bit-identical. Against a reference with a
   large overlap (half a window), the disagreement rate near window borders vs in window
   interiors, for lcmap's blended grid and for a naive non-overlapping grid (TorchGeo's
   GridGeoSampler via :func:`lcmap.compat.grid_patch_sampler`, hard labels, no blending).

Imagery: the embedded NAIP sample patches (256 px, 4 bands, EPSG:26917) tiled with flips into a
larger mosaic. Model: a U-Net (6 Chesapeake classes, written as the 4 target classes) fitted for
``--train-steps`` steps to the sample's 1 m reference (60 by default, ~1 min; 0 = random weights):
seams measure consistency between window layouts, not accuracy.
Prints one ratio per line and, last, one JSON line with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.transform import from_origin

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "lcmap" / "geodata" / "sample" / "naip"


# --------------------------------------------------------------------------------- inputs
def make_mosaic(path: Path, side: int) -> Path:
    """A ``side`` x ``side`` 4-band raster made of the NAIP sample patches (flipped), tiled 512."""
    patches = []
    for p in sorted(SAMPLE.glob("patch-*.tif")):
        with rasterio.open(p) as src:
            patches.append(src.read())
            crs, t0 = src.crs, src.transform
    n = len(patches)
    ps = patches[0].shape[1]
    profile = dict(
        driver="GTiff",
        width=side,
        height=side,
        count=4,
        dtype="uint8",
        crs=crs,
        transform=from_origin(t0.c, t0.f, 1.0, 1.0),
        tiled=True,
        blockxsize=512,
        blockysize=512,
        compress="deflate",
        zlevel=1,
    )
    with rasterio.open(path, "w", **profile) as dst:
        for r0 in range(0, side, 512):
            h = min(512, side - r0)
            strip = np.zeros((4, h, side), np.uint8)
            for rr in range(r0 // ps * ps, r0 + h, ps):
                for cc in range(0, side, ps):
                    k = (rr // ps * 7 + cc // ps * 3) % n
                    tile = patches[k]
                    if (rr // ps + cc // ps) % 2:
                        tile = tile[:, :, ::-1]
                    if (rr // ps) % 3 == 1:
                        tile = tile[:, ::-1, :]
                    a, b = max(rr, r0), min(rr + ps, r0 + h, side)
                    w = min(ps, side - cc)
                    strip[:, a - r0 : b - r0, cc : cc + w] = tile[:, a - rr : b - rr, :w]
            from rasterio.windows import Window

            dst.write(strip, window=Window(0, r0, side, h))
    return path


def make_checkpoint(path: Path, train_steps: int) -> Path:
    """A U-Net for the 4-band sample: random, or fitted for ``train_steps`` steps to the sample's
    1 m reference (Chesapeake legend, 6 classes) so that its predictions are local and confident
    like a trained model's (a random network's argmax depends on the window position everywhere)."""
    from lcmap.geodata.legends import get_legend
    from lcmap.models import build_model
    from lcmap.pipeline.runs import save_checkpoint

    images, labels = [], []
    legend = get_legend("chesapeake")
    for p in sorted(SAMPLE.glob("patch-*.tif")):
        with rasterio.open(p) as src:
            images.append(src.read().astype(np.float32))
        with rasterio.open(SAMPLE.parent / "reference" / p.name) as src:
            labels.append(legend.encode(src.read(1)))
    a = np.stack(images)
    mean, std = a.mean((0, 2, 3)), a.std((0, 2, 3))
    torch.manual_seed(0)
    model = build_model("unet", 4, len(legend))
    if train_steps > 0:
        x_all = torch.from_numpy((a - mean[:, None, None]) / std[:, None, None]).float()
        y_all = torch.from_numpy(np.stack(labels).astype(np.int64))
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        gen = torch.Generator().manual_seed(0)
        model.train()
        for _ in range(train_steps):
            idx = torch.randint(0, len(x_all), (8,), generator=gen)
            r, c = (int(v) for v in torch.randint(0, 256 - 128 + 1, (2,), generator=gen))
            x, y = x_all[idx, :, r : r + 128, c : c + 128], y_all[idx, r : r + 128, c : c + 128]
            if torch.rand(1, generator=gen) < 0.5:
                x, y = x.flip(-1), y.flip(-1)
            loss = torch.nn.functional.cross_entropy(model(x)[0], y, ignore_index=255)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
    return save_checkpoint(path, model, "unet", legend, mean, std)


# ----------------------------------------------------------------------------- 1. speed
def bare_forward_seconds(ckpt: Path, n_windows: int, tile: int, batch: int) -> float:
    from lcmap.models import predict_proba
    from lcmap.pipeline.runs import load_trained_model

    tm = load_trained_model(ckpt, "cpu")
    x = torch.randn(batch, tm.in_channels, tile, tile)
    n_batches = -(-n_windows // batch)
    with torch.inference_mode():
        predict_proba(tm.model, x)  # warm-up (as the pipeline's first block is not timed apart)
        t = time.perf_counter()
        for _ in range(n_batches):
            predict_proba(tm.model, x).float().cpu()
        return time.perf_counter() - t


def pipeline_seconds(ckpt: Path, raster: Path, out: Path, **kw) -> tuple[float, dict]:
    from lcmap.pipeline.prediction.predict import PredictConfig, predict_map

    t = time.perf_counter()
    result = predict_map(PredictConfig.of(ckpt, [raster], out, scheduler="synchronous", **kw), progress=False)
    return time.perf_counter() - t, result.stats()


# ---------------------------------------------------------------------------- 2. memory
def peak_rss_mb() -> float:
    """This process's peak RSS (MB). Linux: VmHWM, reset by exec (``ru_maxrss`` is not: a child
    started by ``subprocess`` inherits the forking parent's peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_memory(args: argparse.Namespace) -> None:
    """Run in a fresh process: predict, print peak RSS (MB) as JSON."""
    import lcmap.pipeline.prediction.predict as P
    from lcmap.models import predict_proba
    from lcmap.pipeline.runs import load_trained_model

    torch.set_num_threads(args.threads)
    # baseline: imports, the model and one forward at the batch shape (independent of the area)
    tm = load_trained_model(args.ckpt, "cpu")
    with torch.inference_mode():
        predict_proba(tm.model, torch.randn(args.batch, tm.in_channels, args.tile, args.tile))
    del tm
    base = peak_rss_mb()
    # RSS sampled during the run, against RSS just before it: what the prediction itself adds
    import threading

    import psutil

    proc = psutil.Process()
    rss0 = proc.memory_info().rss / 2**20
    sampled = [rss0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            sampled.append(proc.memory_info().rss / 2**20)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t = time.perf_counter()
    result = P.predict_map(
        P.PredictConfig.of(
            args.ckpt,
            [args.raster],
            args.out,
            tile_px=args.tile,
            overlap_px=args.overlap,
            block_px=args.block,
            batch_size=args.batch,
            scheduler="synchronous",
        ),
        progress=False,
    )
    seconds = time.perf_counter() - t
    stop.set()
    sampler.join()
    peak = peak_rss_mb()
    print(
        json.dumps(
            {
                "peak_rss_mb": peak,
                "baseline_rss_mb": base,
                "seconds": seconds,
                "added_mb": max(sampled) - rss0,
                **result.stats(),
            }
        )
    )


def run_child(ckpt: Path, raster: Path, out: Path, args: argparse.Namespace, block: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child-memory",
        "--ckpt",
        str(ckpt),
        "--raster",
        str(raster),
        "--out",
        str(out),
        "--tile",
        str(args.tile),
        "--overlap",
        str(args.overlap),
        "--block",
        str(block),
        "--batch",
        str(args.batch),
        "--threads",
        str(args.threads),
    ]
    # as in a Dask worker process (the nanny sets it): glibc gives freed memory back promptly
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "65536"}
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if res.returncode:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- 3. seams
def naive_grid_map(ckpt: Path, raster: Path, tile: int) -> np.ndarray:
    """Non-overlapping windows from TorchGeo's grid sampler, hard labels, no blending."""
    from lcmap.compat import grid_patch_sampler, query_bounds
    from lcmap.geodata.datasets import open_imagery
    from lcmap.models import predict_proba
    from lcmap.pipeline.runs import load_trained_model

    tm = load_trained_model(ckpt, "cpu")
    ds = open_imagery([raster])
    x, y, _ = ds.bounds
    w = int(round((x.stop - x.start) / ds.res[0]))
    h = int(round((y.stop - y.start) / ds.res[1]))
    out = np.zeros((h, w), np.uint8)
    lut = tm.legend.index_to_target_lut().astype(np.int64) + 1
    lut[lut > 255] = 0
    mean = torch.from_numpy(tm.mean).view(-1, 1, 1)
    std = torch.from_numpy(tm.std).view(-1, 1, 1)
    with torch.inference_mode():
        for q in grid_patch_sampler(ds, tile, tile):
            xmin, ymin, xmax, ymax = query_bounds(q)
            img = ds[q]["image"].float()
            if img.ndim == 4:
                img = img[0]
            p = predict_proba(tm.model, ((img - mean) / std)[None])[0]
            # TorchGeo 0.8 anchors this grid at the bottom-left corner: windows overhang the top
            # and right edges (read as nodata); paint the part inside the raster
            c0 = int(round((xmin - x.start) / ds.res[0]))
            r0 = int(round((y.stop - ymax) / ds.res[1]))
            pred = lut[p.argmax(0).numpy()]
            ra, ca = max(0, r0), max(0, c0)
            rb, cb = min(h, r0 + tile), min(w, c0 + tile)
            out[ra:rb, ca:cb] = pred[ra - r0 : rb - r0, ca - c0 : cb - c0]
    return out


def border_mask(shape: tuple[int, int], edges: list[int], band: int) -> np.ndarray:
    """Pixels within ``band`` px of the given interior column/row lines (same lines both axes)."""
    h, w = shape
    m = np.zeros(shape, bool)
    for e in edges:
        if 0 < e < w:
            m[:, max(0, e - band) : min(w, e + band)] = True
        if 0 < e < h:
            m[max(0, e - band) : min(h, e + band), :] = True
    return m


def disagreement(a: np.ndarray, ref: np.ndarray, zone: np.ndarray) -> float:
    valid = zone & (ref > 0)
    return float((a[valid] != ref[valid]).mean()) if valid.any() else float("nan")


# ------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tile", type=int, default=256, help="window side, px (default 256)")
    ap.add_argument("--overlap", type=int, default=32, help="window overlap, px (default 32)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared machine)")
    ap.add_argument("--windows", type=int, default=6, help="windows per side for throughput/seams (default 6)")
    ap.add_argument(
        "--memory-side", type=int, default=448, help="side of the 1x area for the memory test, px (one block)"
    )
    ap.add_argument(
        "--memory-block", type=int, default=448, help="block_px for the memory test (the 1x area is one block)"
    )
    ap.add_argument("--repeats", type=int, default=2, help="throughput repeats (min is kept)")
    ap.add_argument(
        "--train-steps",
        type=int,
        default=60,
        help="fit the U-Net to the sample's 1 m reference first (0: random weights)",
    )
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--skip", nargs="*", default=[], choices=["speed", "memory", "seams"])
    # child mode (memory)
    ap.add_argument("--child-memory", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--raster", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--block", type=int, default=4096, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_memory:
        child_memory(args)
        return

    torch.set_num_threads(args.threads)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="lcmap-bench-predict-"))
    work.mkdir(parents=True, exist_ok=True)
    stride = args.tile - args.overlap
    side = stride * (args.windows - 1) + args.tile  # exactly windows x windows windows
    t = time.perf_counter()
    ckpt = work / f"model_{args.train_steps}steps.ckpt"
    if not ckpt.exists():  # reused with --workdir
        make_checkpoint(ckpt, args.train_steps)
    print(
        f"model: U-Net, {'trained ' + str(args.train_steps) + ' steps' if args.train_steps else 'random'} "
        f"({time.perf_counter() - t:.0f} s)"
    )
    raster = make_mosaic(work / f"mosaic_{side}.tif", side)
    result: dict = {
        "tile_px": args.tile,
        "overlap_px": args.overlap,
        "batch_size": args.batch,
        "torch_threads": args.threads,
        "side_px": side,
        "cpu_count": os.cpu_count(),
        "train_steps": args.train_steps,
    }
    common = dict(tile_px=args.tile, overlap_px=args.overlap, batch_size=args.batch)

    if "speed" not in args.skip:
        n_win = args.windows**2
        pipe, bare, fwd, stats = [], [], [], {}
        for r in range(args.repeats):
            s, stats = pipeline_seconds(ckpt, raster, work / f"speed{r}" / "map.tif", block_px=4096, **common)
            pipe.append(s)
            fwd.append(stats["seconds_forward"])
            bare.append(bare_forward_seconds(ckpt, n_win, args.tile, args.batch))
        assert stats["windows"] == n_win, stats
        ratio = min(bare) / min(pipe)
        mpx = side * side / 1e6
        best = int(np.argmin(pipe))
        inside = fwd[best] / pipe[best]
        print(
            f"throughput: pipeline {mpx / min(pipe):.3f} Mpx/s ({min(pipe):.1f} s, of which COG writing "
            f"{stats['seconds_write']:.2f} s) vs bare forward {mpx / min(bare):.3f} Mpx/s ({min(bare):.1f} s) "
            f"over the same {n_win} windows -> ratio {ratio:.3f} (target >= 0.85); "
            f"share of the pipeline's own run spent in the model: {inside:.3f}"
        )
        # halo recompute of blocks (same windows computed by two blocks), default-sized runs
        from lcmap.pipeline.prediction.tiling import WindowGrid, block_side_px

        halo = {}
        for tile, ov, bpx in ((512, 64, 4096), (512, 64, 8192), (args.tile, args.overlap, 1024)):
            wg = WindowGrid(tile, ov, 40000, 40000)
            bs = block_side_px(bpx, wg)
            per_axis = sum(len(wg.touching(b0, min(b0 + bs, 40000), wg.n_cols)) for b0 in range(0, 40000, bs))
            halo[f"{tile}/{ov}/{bpx}"] = round((per_axis / wg.n_cols) ** 2, 3)
        print(
            "block halo recompute factor (windows run / distinct windows, 40000 px side): "
            + ", ".join(f"tile/overlap/block {k}: {v}x" for k, v in halo.items())
        )
        result.update(
            speed_ratio=round(ratio, 4),
            pipeline_s=round(min(pipe), 2),
            bare_s=round(min(bare), 2),
            pipeline_mpx_s=round(mpx / min(pipe), 4),
            bare_mpx_s=round(mpx / min(bare), 4),
            write_s=round(stats["seconds_write"], 3),
            model_share_in_pipeline=round(inside, 4),
            halo_recompute=halo,
        )

    if "memory" not in args.skip:
        small = make_mosaic(work / "mem_1x.tif", args.memory_side)
        big = make_mosaic(work / "mem_16x.tif", 4 * args.memory_side)
        r1 = run_child(ckpt, small, work / "mem1" / "map.tif", args, args.memory_block)
        r16 = run_child(ckpt, big, work / "mem16" / "map.tif", args, args.memory_block)
        growth = r16["peak_rss_mb"] / r1["peak_rss_mb"] - 1
        print(
            f"memory: peak RSS {r1['peak_rss_mb']:.0f} MB for {args.memory_side}^2 px ({r1['blocks']} blocks) vs "
            f"{r16['peak_rss_mb']:.0f} MB for 16x the area ({r16['blocks']} blocks) -> growth {100 * growth:.1f}% "
            f"(target <= 10%); RSS added by the prediction itself (sampled, over the RSS after imports, model "
            f"and one forward): {r1['added_mb']:.0f} MB vs {r16['added_mb']:.0f} MB"
        )
        result.update(
            rss_1x_mb=round(r1["peak_rss_mb"], 1),
            rss_16x_mb=round(r16["peak_rss_mb"], 1),
            rss_growth=round(growth, 4),
            rss_added_1x_mb=round(r1["added_mb"], 1),
            rss_added_16x_mb=round(r16["added_mb"], 1),
            mem_seconds_16x=round(r16["seconds"], 1),
        )

    if "seams" not in args.skip:
        maps = {}
        for name, kw in (("b1024", dict(block_px=1024)), ("b4096", dict(block_px=4096))):
            out = work / f"seams_{name}" / "map.tif"
            pipeline_seconds(ckpt, raster, out, **common, **kw)
            with rasterio.open(out) as src:
                maps[name] = src.read(1)
        identical = bool(np.array_equal(maps["b1024"], maps["b4096"]))
        print(f"seams: block_px 1024 vs 4096 bit-identical: {identical}")
        ref_out = work / "seams_ref" / "map.tif"
        pipeline_seconds(
            ckpt, raster, ref_out, tile_px=args.tile, overlap_px=args.tile // 2, batch_size=args.batch, block_px=4096
        )
        with rasterio.open(ref_out) as src:
            ref = src.read(1)
        naive = naive_grid_map(ckpt, raster, args.tile)
        shape = ref.shape
        naive_edges = list(range(args.tile, side, args.tile))
        ours_edges = sorted(
            {j * stride for j in range(1, args.windows)} | {j * stride + args.tile for j in range(args.windows - 1)}
        )
        band = 4
        zones = {
            "naive_on_its_borders": (naive, border_mask(shape, naive_edges, band)),
            "lcmap_on_its_borders": (maps["b4096"], border_mask(shape, ours_edges, band)),
            "lcmap_on_naive_borders": (maps["b4096"], border_mask(shape, naive_edges, band)),
        }
        seam = {}
        for key, (m, zone) in zones.items():
            seam[key] = {
                "border": round(disagreement(m, ref, zone), 4),
                "interior": round(disagreement(m, ref, ~zone), 4),
            }
        print(
            f"seams vs reference (overlap {args.tile // 2} px), disagreement within {band} px of window borders / "
            "in interiors:"
        )
        for key, v in seam.items():
            ratio = v["border"] / v["interior"] if v["interior"] else float("inf")
            print(
                f"  {key:24s} border {100 * v['border']:.2f}%  interior {100 * v['interior']:.2f}%  "
                f"(border/interior {ratio:.2f})"
            )
        result.update(blocks_bit_identical=identical, seams=seam)

    print(json.dumps(result))


if __name__ == "__main__":
    main()
