"""The embedded real sample: 8 NAIP 1 m patches with NLCD 30 m labels and a 1 m reference.

See README.md beside this file for provenance, licences and how the files were made.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SAMPLE_DIR = Path(__file__).resolve().parent


def sample_metadata() -> dict[str, Any]:
    """``sample.json``: CRS, patches with their bounds and split, legends of each layer."""
    return json.loads((SAMPLE_DIR / "sample.json").read_text())


def sample_paths(split: str | None = None) -> dict[str, Any]:
    """Files of the sample: ``imagery``, ``labels``, ``reference`` (lists of GeoTIFFs, optionally
    only the patches of ``split`` = ``train`` or ``heldout``) and the AOI GeoJSON files."""
    meta = sample_metadata()
    patches = [p["patch"] for p in meta["patches"] if split is None or p["split"] == split]

    def files(folder: str) -> list[Path]:
        return [SAMPLE_DIR / folder / f"patch-{k}.tif" for k in patches]

    return {
        "imagery": files(meta["imagery"]),
        "labels": files(meta["labels"]),
        "reference": files(meta["reference"]),
        "labels_legend": meta["labels_legend"],
        "reference_legend": meta["reference_legend"],
        "aoi_train": SAMPLE_DIR / "aoi_train.geojson",
        "aoi_heldout": SAMPLE_DIR / "aoi_heldout.geojson",
        "aoi_all": SAMPLE_DIR / "aoi_all.geojson",
    }
