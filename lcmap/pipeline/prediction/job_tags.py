"""The GDAL dataset tags a map (and its confidence map) gets from the job that made it: its legend,
model, windows, test-time augmentation and ``--label-prior``. How the map was made as options
(``LCMAP_PREDICT_OPTIONS``) is :func:`lcmap.pipeline.prediction.predict_config.map_tags`'s."""

from __future__ import annotations

import json
from pathlib import Path

from lcmap.geodata.io import CONFIDENCE_TAG
from lcmap.geodata.legends import Legend
from lcmap.pipeline.prediction import cog
from lcmap.pipeline.prediction.inference import PredictJob

__all__ = ["confidence_tags", "label_prior_tag", "map_tags"]


def map_tags(job: PredictJob, out_legend: Legend, model_legend: Legend) -> dict[str, str]:
    """The dataset tags of a map made by ``job`` (its legend, model, windows, TTA)."""
    return {
        cog.LEGEND_TAG: cog.legend_tag(out_legend),
        "LCMAP_MODEL": Path(job.checkpoint).name,
        "LCMAP_MODEL_LEGEND": model_legend.name,
        "LCMAP_TILE_PX": str(job.windows.tile),
        "LCMAP_OVERLAP_PX": str(job.windows.overlap),
        "LCMAP_TTA": job.tta,
        **label_prior_tag(job),
    }


def label_prior_tag(job: PredictJob) -> dict[str, str]:
    """``LCMAP_LABEL_PRIOR``: the labels a map was combined with (``--label-prior``), or nothing."""
    if job.label_prior is None:
        return {}
    keep = ("label_files", "legend", "class_mix")
    return {"LCMAP_LABEL_PRIOR": json.dumps({k: v for k, v in job.label_prior.record().items() if k in keep})}


def confidence_tags(job: PredictJob) -> dict[str, str]:
    """The dataset tags of the confidence map made by ``job``."""
    return {
        CONFIDENCE_TAG: "maximum blended class probability, percent (0-100); 255 = nodata",
        "LCMAP_MODEL": Path(job.checkpoint).name,
        "LCMAP_TTA": job.tta,
    }
