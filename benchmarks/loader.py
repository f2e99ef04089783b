"""Training-patch throughput: lcmap's TorchGeo loader vs plain rasterio windowed reads.

Same process, same windows: the windows are drawn once by lcmap's random geo-sampler inside the
embedded sample's training AOI; then
  (a) lcmap: ``LabelledImagery`` (imagery & NLCD labels, labels warped nearest onto the 1 m grid,
      encoded, AOI-masked) through a DataLoader with 0 and 2 workers, ``stack_samples`` collate;
  (b) plain: for each window, rasterio reads the imagery window and the 30 m label window
      resampled nearest to the same shape (no encoding, no masking), stacked into a batch.
Prints patches/s for each, the ratio (target >= 0.7), and one JSON line.

    python benchmarks/loader.py [--patches 512] [--patch-px 128] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import rasterio
import torch
from rasterio.enums import Resampling
from rasterio.windows import from_bounds
from torch.utils.data import DataLoader
from torchgeo.datasets import stack_samples

from lcmap.compat import query_bounds, random_patch_sampler
from lcmap.geodata.aoi import aoi_from_file
from lcmap.geodata.datasets import LabelledImagery, open_imagery, open_labels
from lcmap.geodata.legends import get_legend
from lcmap.geodata.sample import sample_paths


class _Fixed(torch.utils.data.Sampler):
    def __init__(self, queries):
        self.queries = queries

    def __iter__(self):
        return iter(self.queries)

    def __len__(self):
        return len(self.queries)


def plain_reads(queries, imagery_files, label_files, batch_size: int) -> int:
    """Read every window with rasterio directly; returns the number of patches read."""
    srcs_img = [rasterio.open(f) for f in imagery_files]
    srcs_lbl = [rasterio.open(f) for f in label_files]
    n = 0
    batch = []
    for q in queries:
        xmin, ymin, xmax, ymax = query_bounds(q)
        for si, sl in zip(srcs_img, srcs_lbl, strict=True):
            b = si.bounds
            if b.left <= (xmin + xmax) / 2 <= b.right and b.bottom <= (ymin + ymax) / 2 <= b.top:
                w = int(round(xmax - xmin))
                img = si.read(
                    window=from_bounds(xmin, ymin, xmax, ymax, si.transform), boundless=True, out_shape=(si.count, w, w)
                )
                lbl = sl.read(
                    1,
                    window=from_bounds(xmin, ymin, xmax, ymax, sl.transform),
                    boundless=True,
                    out_shape=(w, w),
                    resampling=Resampling.nearest,
                )
                batch.append((torch.from_numpy(img.astype(np.float32)), torch.from_numpy(lbl.astype(np.int64))))
                break
        if len(batch) == batch_size:
            torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])
            n += len(batch)
            batch = []
    n += len(batch)
    for s in srcs_img + srcs_lbl:
        s.close()
    return n


def lcmap_loader(ds, queries, batch_size: int, workers: int) -> int:
    loader = DataLoader(
        ds,
        batch_size=batch_size,
        sampler=_Fixed(queries),
        num_workers=workers,
        collate_fn=stack_samples,
        persistent_workers=False,
    )
    n = 0
    for batch in loader:
        n += batch["image"].shape[0]
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patches", type=int, default=512)
    parser.add_argument("--patch-px", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)

    paths = sample_paths("train")
    imagery = open_imagery(paths["imagery"])
    labels = open_labels(paths["labels"], get_legend("nlcd"))
    aoi = aoi_from_file(paths["aoi_train"]).to_crs(imagery.crs)
    ds = LabelledImagery(imagery, labels, aoi=aoi)
    queries = list(random_patch_sampler(ds, args.patch_px, args.patches, roi=aoi, seed=0))

    results = {}
    # warm-up (file handles, GDAL caches) for both
    plain_reads(queries[:16], paths["imagery"], paths["labels"], args.batch_size)
    lcmap_loader(ds, queries[:16], args.batch_size, 0)
    t = time.perf_counter()
    n = plain_reads(queries, paths["imagery"], paths["labels"], args.batch_size)
    results["plain_patches_per_s"] = n / (time.perf_counter() - t)
    for workers in (0, 2):
        t = time.perf_counter()
        n = lcmap_loader(ds, queries, args.batch_size, workers)
        results[f"lcmap_{workers}w_patches_per_s"] = n / (time.perf_counter() - t)
    for workers in (0, 2):
        results[f"ratio_{workers}w"] = results[f"lcmap_{workers}w_patches_per_s"] / results["plain_patches_per_s"]

    print(f"windows: {len(queries)} x {args.patch_px} px, batch {args.batch_size}, embedded sample (NAIP + NLCD 30 m)")
    print(f"plain rasterio reads      : {results['plain_patches_per_s']:8.1f} patches/s")
    for workers in (0, 2):
        print(
            f"lcmap loader, {workers} workers   : {results[f'lcmap_{workers}w_patches_per_s']:8.1f} patches/s"
            f"   ratio {results[f'ratio_{workers}w']:.2f} (target >= 0.7)"
        )
    print(
        json.dumps(
            {
                "benchmark": "loader",
                "patches": len(queries),
                "patch_px": args.patch_px,
                **{k: round(v, 3) for k, v in results.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
