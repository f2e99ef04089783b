"""Datasets, legends, AOI and sampling (TorchGeo)."""
