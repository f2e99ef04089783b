"""Province scale, measured (not a test): pipeline throughput, model pixels per map pixel, memory.

    python benchmarks/scale.py --pipeline-only      # < 2 min on 2 CPU cores
    python benchmarks/scale.py                      # 16 km²: inputs, lcmap train --aoi, lcmap predict --aoi
    python benchmarks/scale.py --km2 100            # a city-size area (slow on CPU: the model dominates)

1. **Pipeline only** (one process, ``scheduler="synchronous"``): ``predict_map`` over ``--km2``
   of 1 m imagery (many GeoTIFFs) with the model replaced by a stand-in that returns fixed
   probabilities; Mpx/s = map pixels / (wall time - time inside the stand-in): read, normalise,
   window cutting, blending, argmax, block files and the COG with overviews. One process makes
   the whole map once (its first run, also printed), then three more times: the median of those
   is the figure (a worker that maps a province runs many tasks; its first one also grows its heap).
   Phases: planning, blocks (what one worker can feed a GPU), COG assembly (once per map).
   Also: model pixels per map pixel (windows x tile² / map pixels) at the defaults (tile 512,
   overlap 64, block 4096), and peak RSS of a fresh process at 16 and 64 km² (flat: <= 10 %).
2. **End to end** (without ``--pipeline-only``): a city-size test area built from the embedded
   NAIP patches: imagery as GeoTIFFs split across two UTM zones (EPSG:32616 / 32617, at the zone
   boundary) plus some in EPSG:3857, an NLCD-like label as one large EPSG:5070 raster (30 m), a
   WorldCover-like label as EPSG:4326 tiles (10 m), an AOI polygon (GeoJSON, EPSG:4326); runs
   ``lcmap train --aoi`` (a few steps of paraformer-tiny) and ``lcmap predict --aoi`` through the
   CLI and reports km²/hour, the COG's validity (rio-cogeo), its CRS, and the seam at the zone
   crossing (disagreement near the seam vs interior).

Prints one figure per line and, last, one JSON object (``pipeline_mpx_s``,
``model_px_per_map_px``, ``peak_rss_gb``, ``km2_per_hour``, ``km2``, ...).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_common import REPO, peak_rss_mb, pipeline_run, standin_checkpoint, write_tiles  # noqa: E402


def decode_reference(images: Path) -> dict:
    """The floor: read and decode every imagery file once (rasterio, 512 px tiles), in this process."""
    import glob

    t0, c0 = time.perf_counter(), time.process_time()
    px = 0
    for path in sorted(glob.glob(str(images / "*.tif"))):
        with rasterio.open(path) as src:
            for _, win in src.block_windows(1):
                px += int(src.read(window=win).shape[1] * win.width)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"decode_mpx_s": px / 1e6 / wall, "decode_mpx_per_cpu_s": px / 1e6 / cpu}


def _child(args: argparse.Namespace) -> None:
    if args.warmup:  # imports, first-call costs: what a worker pays once, not per km²
        warm = Path(args.out + ".warm.tif")
        pipeline_run(Path(args.images), Path(args.ckpt), warm, 512, args.tile_px, args.overlap_px, bbox=args.warmup)
    cold = None
    if args.repeat > 1:  # one whole run first: a worker's first task also sizes its heap (page faults)
        warm = Path(args.out).with_name(f"{Path(args.out).stem}.cold.tif")
        cold = pipeline_run(Path(args.images), Path(args.ckpt), warm, args.block_px, args.tile_px, args.overlap_px)
    ref = decode_reference(Path(args.images))  # before and after: the machine's load as it was then
    runs = []
    for k in range(max(1, args.repeat)):  # the median run (by wall time) is reported, all rates listed
        out = Path(args.out) if k == 0 else Path(args.out).with_name(f"{Path(args.out).stem}.{k}.tif")
        if args.tile_km:  # a folder of tiles
            out = Path(args.out) if k == 0 else Path(args.out).with_name(f"{Path(args.out).name}.{k}")
        runs.append(pipeline_run(Path(args.images), Path(args.ckpt), out, args.block_px, args.tile_px, args.overlap_px,
                                 tile_km=args.tile_km))  # fmt: skip
    res = sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]
    res["mpx_s_runs"] = [round(r["mpx_s"], 2) for r in runs]
    res["blocks_mpx_s_runs"] = [round(r["blocks_mpx_s"], 2) for r in runs]
    res["peak_rss_mb"] = peak_rss_mb()
    res["cold_mpx_s"] = cold["mpx_s"] if cold is not None else None
    ref2 = decode_reference(Path(args.images))
    res["decode_mpx_s"] = max(ref["decode_mpx_s"], ref2["decode_mpx_s"])
    res["decode_mpx_per_cpu_s"] = max(ref["decode_mpx_per_cpu_s"], ref2["decode_mpx_per_cpu_s"])
    print(json.dumps(res))


def pipeline_in_child(
    images: Path,
    ckpt: Path,
    out: Path,
    block_px: int = 4096,
    tile_px: int = 512,
    overlap_px=64,
    repeat: int = 3,
    tile_km: float | None = None,
):
    cmd = [sys.executable, __file__, "--child", "--images", str(images), "--ckpt", str(ckpt), "--out", str(out)]
    cmd += ["--repeat", str(repeat)] + (["--tile-km", str(tile_km)] if tile_km else [])
    cmd += ["--block-px", str(block_px), "--tile-px", str(tile_px), "--overlap-px", str(overlap_px)]
    cmd += ["--warmup", *(str(v) for v in (500_000, 4_200_000 - 1024, 501_024, 4_200_000))]
    # no MALLOC_TRIM_THRESHOLD_ (trimming on every free made GDAL's COG assembly ~4x slower): the
    # workers trim once per task (lcmap.pipeline.prediction.execution.release_free_memory)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def pipeline_only(tmp: Path, km2: float, rss_km2: tuple[float, ...] | None) -> dict:
    side = int(round(math.sqrt(km2) * 1000))
    ckpt = standin_checkpoint(tmp / "standin.ckpt")
    images = tmp / f"img{side}"
    write_tiles(images, side, "EPSG:32617", 500_000.0, 4_200_000.0)
    res = pipeline_in_child(images, ckpt, tmp / "map.tif")
    print(f"pipeline only: {res['map_px'] / 1e6:.1f} Mpx in {res['wall_s']:.2f} s "
          f"(stand-in {res['standin_s']:.2f} s): {res['mpx_s']:.1f} Mpx/s per process "
          f"(median of {len(res['mpx_s_runs'])} runs: {', '.join(f'{v:.1f}' for v in res['mpx_s_runs'])}; "
          f"the process's first whole run before them: {res['cold_mpx_s']:.1f})")  # fmt: skip
    print(f"  per CPU-second: {res['mpx_per_cpu_s']:.1f} Mpx (all threads, stand-in excluded)")
    print(f"  phases: planning {res['plan_s']:.2f} s, blocks {res['blocks_s']:.2f} s "
          f"({res['blocks_mpx_s']:.1f} Mpx/s: what one worker can feed a GPU), COG assembly {res['cog_s']:.2f} s "
          f"({res['map_px'] / 1e6 / max(res['cog_s'], 1e-9):.0f} Mpx/s, once per map, in the client)")  # fmt: skip
    print(
        f"reference, read + decode of the same imagery (DEFLATE, same process): {res['decode_mpx_s']:.1f} Mpx/s, "
        f"{res['decode_mpx_per_cpu_s']:.1f} Mpx per CPU-second; pipeline / decode: "
        f"{res['mpx_s'] / res['decode_mpx_s']:.2f} (wall), "
        f"{res['mpx_per_cpu_s'] / res['decode_mpx_per_cpu_s']:.2f} (CPU)"
    )
    print(f"model px per map px (tile 512, overlap 64, block 4096): {res['model_px_per_map_px']:.3f}")
    out = {"pipeline_mpx_s": res["mpx_s"], "model_px_per_map_px": res["model_px_per_map_px"],
           "pipeline_mpx_per_cpu_s": res["mpx_per_cpu_s"], "decode_mpx_s": res["decode_mpx_s"],
           "pipeline_over_decode": res["mpx_s"] / res["decode_mpx_s"],
           "pipeline_wall_s": res["wall_s"], "km2": side * side / 1e6, "blocks_mpx_s": res["blocks_mpx_s"],
           "cog_mpx_s": res["map_px"] / 1e6 / max(res["cog_s"], 1e-9), "pipeline_mpx_s_runs": res["mpx_s_runs"],
           "pipeline_mpx_s_first_run": res["cold_mpx_s"]}  # fmt: skip
    rss = {km2: res["peak_rss_mb"]}
    if rss_km2:
        for a in rss_km2:
            if a in rss:
                continue
            s = int(round(math.sqrt(a) * 1000))
            img = tmp / f"img{s}"
            write_tiles(img, s, "EPSG:32617", 500_000.0, 4_200_000.0)
            rss[a] = pipeline_in_child(img, ckpt, tmp / f"map{s}.tif", repeat=1)["peak_rss_mb"]
        lo = rss[min(rss_km2)]
        print("peak RSS per process: " + ", ".join(
            f"{rss[a]:.0f} MB at {a:g} km² ({100 * (rss[a] / lo - 1):+.1f} %)" for a in sorted(rss_km2)
        ))  # fmt: skip
        out["rss_growth_pct"] = 100 * (rss[max(rss_km2)] / lo - 1)
    out["peak_rss_gb"] = max(rss.values()) / 1024
    out["peak_rss_mb_by_km2"] = {str(k): v for k, v in rss.items()}
    return out


#: ``--tile-km`` of the serial-share runs: one 4032 px block per tile (4.032 km), 4, 9 and 25 tiles
#: at 16, 64 and 256 km² (the tile grid follows the block lattice)
SERIAL_TILE_KM = 4.0
#: the tiles' side (km) at that --tile-km: whole blocks of 4032 px at 1 m
SERIAL_TILE_SIDE_KM = max(1, round(SERIAL_TILE_KM * 1000 / 4032)) * 4.032
#: Wuhan and Hubei (km²), for the figures extrapolated from the measurements
AREAS_KM2 = {"Wuhan": 8_569.0, "Hubei": 186_000.0}


def plan_figures(workers: tuple[int, ...] = (1, 4, 8, 16)) -> dict:
    """Model pixels per map pixel at Wuhan size, exact from the plan (tile 512, overlap 64, block
    4096, tasks as ``predict_map`` makes them for N workers: 2 per worker): each task running its
    border windows (as before seams) and with border windows shared (each window once)."""
    from lcmap.pipeline.prediction import seams, tiling

    side = round(math.sqrt(AREAS_KM2["Wuhan"]) * 1000)
    grid = tiling.output_grid("", (500_000.0, 3_300_000.0, 500_000.0 + side, 3_300_000.0 + side), (1.0, 1.0))
    wg = tiling.lattice_windows(grid, 512, 64)
    size = tiling.block_side_px(4096, wg)
    blocks = tiling.cut_blocks(grid.height, grid.width, size, wg.row0, wg.col0)
    rec, shared, tasks = {}, {}, {}
    for w in workers:
        shape = tiling.task_shape(blocks, w, size, wg)  # as predict_map groups for w worker threads
        regions = [tiling.group_region(g) for g in tiling.block_groups(blocks, *shape)]
        rec[w] = tiling.model_px_per_map_px(wg, regions)
        shared[w] = seams.shared_model_px_per_map_px(wg, regions)
        tasks[w] = len(regions)
    each = ", ".join(f"{w}: {tasks[w]}, {rec[w]:.3f} -> {shared[w]:.3f}" for w in workers)
    print(f"model px per map px at Wuhan size (exact, from the plan), workers: tasks, borders run by each task -> "
          f"shared: {each}")  # fmt: skip
    return {"model_px_per_map_px_16w": shared[16], "model_px_per_map_px_16w_unshared": rec[16],
            "model_px_per_map_px_by_workers": {str(w): shared[w] for w in workers},
            "model_px_per_map_px_by_workers_unshared": {str(w): rec[w] for w in workers}}  # fmt: skip


def serial_share(tmp: Path, areas: list[float], pipeline: dict) -> dict:
    """Last block to finished product, one COG vs COG tiles of :data:`SERIAL_TILE_KM` km, at each
    area (a fresh process each, pipeline only); then Wuhan and Hubei extrapolated: the COG's
    assembly at the largest area's rate, the tiles' as the last tile plus a cost per tile (fitted)."""
    ckpt = standin_checkpoint(tmp / "standin.ckpt")
    rows = {}
    for a in sorted(areas):
        side = int(round(math.sqrt(a) * 1000))
        img = tmp / f"img{side}"
        if not img.exists():
            write_tiles(img, side, "EPSG:32617", 500_000.0, 4_200_000.0)
        cog = pipeline_in_child(img, ckpt, tmp / f"serial{side}.tif", repeat=1)
        tiles = pipeline_in_child(img, ckpt, tmp / f"serial{side}", repeat=1, tile_km=SERIAL_TILE_KM)
        rows[a] = {"map_px": cog["map_px"], "cog_serial_s": cog["serial_s"], "cog_wall_s": cog["wall_s"],
                   "tiles_serial_s": tiles["serial_s"], "tiles_wall_s": tiles["wall_s"],
                   "tiles": tiles["tiles"]}  # fmt: skip
        r = rows[a]
        print(f"serial share at {a:g} km² ({r['map_px'] / 1e6:.0f} Mpx): one COG {r['cog_serial_s']:.2f} s of "
              f"{r['cog_wall_s']:.2f} s ({100 * r['cog_serial_s'] / r['cog_wall_s']:.0f} %); {r['tiles']} tiles of "
              f"{SERIAL_TILE_SIDE_KM:g} km: {r['tiles_serial_s']:.2f} s of {r['tiles_wall_s']:.2f} s "
              f"({100 * r['tiles_serial_s'] / r['tiles_wall_s']:.0f} %)")  # fmt: skip
    big = rows[max(rows)]
    cog_mpx_s = big["map_px"] / 1e6 / big["cog_serial_s"]
    n_tiles = np.array([r["tiles"] for r in rows.values()], float)
    t_serial = np.array([r["tiles_serial_s"] for r in rows.values()])
    per_tile, base = np.polyfit(n_tiles, t_serial, 1) if len(rows) > 1 else (0.0, float(t_serial[0]))
    per_tile = max(float(per_tile), 0.0)
    # the parallel part per Mpx on one process (pipeline only: blocks and tiles, no model)
    par = [(r["tiles_wall_s"] - r["tiles_serial_s"]) / (r["map_px"] / 1e6) for r in rows.values()]
    par_s_per_mpx = float(np.median(par))
    est = {}
    for name, km2 in AREAS_KM2.items():
        px = km2 * 1e6
        tiles = km2 / SERIAL_TILE_SIDE_KM**2
        cog_s = px / 1e6 / cog_mpx_s
        tile_s = float(base + per_tile * tiles)
        est[name] = {"cog_serial_s": cog_s, "tiles_serial_s": tile_s, "tiles": tiles,
                     "pipeline_cpu_s": par_s_per_mpx * px / 1e6}  # fmt: skip
        print(f"  {name} ({km2:,.0f} km², est.): serial after the last block: one COG {cog_s / 60:.1f} min "
              f"({cog_mpx_s:.0f} Mpx/s), {tiles:,.0f} tiles {tile_s:.1f} s ({base:.2f} s + {1000 * per_tile:.1f} "
              f"ms per tile); pipeline without the model {par_s_per_mpx * px / 1e6 / 3600:.1f} process-hours "
              f"(on 16 workers {par_s_per_mpx * px / 1e6 / 16 / 60:.1f} min)")  # fmt: skip
    return {"serial_s": rows[max(rows)]["tiles_serial_s"], "serial_s_by_km2": {str(k): v for k, v in rows.items()},
            "serial_estimates": est, "serial_tile_km": SERIAL_TILE_SIDE_KM}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--km2", type=float, default=16.0)
    ap.add_argument("--pipeline-only", action="store_true")
    ap.add_argument("--rss", action="store_true", help="also peak RSS at 16 and 64 km² (pipeline only)")
    ap.add_argument(
        "--rss-km2", type=float, nargs="+", default=None, metavar="KM2",
        help="peak RSS at these areas instead (e.g. 16 64 256: a task's group is at most 4 blocks wide)",
    )  # fmt: skip
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for name, default in (("--images", ""), ("--ckpt", ""), ("--out", "")):
        ap.add_argument(name, default=default, help=argparse.SUPPRESS)
    ap.add_argument("--warmup", type=float, nargs=4, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--repeat", type=int, default=3, help=argparse.SUPPRESS)
    ap.add_argument("--block-px", type=int, default=4096, help=argparse.SUPPRESS)
    ap.add_argument("--tile-px", type=int, default=512, help=argparse.SUPPRESS)
    ap.add_argument("--overlap-px", type=int, default=64, help=argparse.SUPPRESS)
    ap.add_argument("--tile-km", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument(
        "--serial-km2", type=float, nargs="+", default=None, metavar="KM2",
        help="also the serial share (last block to finished product), one COG vs COG tiles, at these areas "
        "(e.g. 16 64 256; pipeline only, one process each)",
    )  # fmt: skip
    args = ap.parse_args()
    if args.child:
        _child(args)
        return
    with tempfile.TemporaryDirectory(prefix="lcmap-scale-") as d:
        tmp = Path(d)
        areas = tuple(args.rss_km2) if args.rss_km2 else (16.0, 64.0) if args.rss else None
        result = pipeline_only(tmp, args.km2, areas)
        result.update(plan_figures())
        if args.serial_km2:
            result.update(serial_share(tmp, args.serial_km2, result))
        if not args.pipeline_only:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from scale_e2e import end_to_end  # type: ignore[import-not-found]

            e2e = end_to_end(tmp, args.km2)
            result.update(e2e)
            result["peak_rss_gb"] = max(result["peak_rss_gb"], e2e["peak_rss_gb_train"], e2e["peak_rss_gb_predict"])
        result.setdefault("km2_per_hour", None)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
