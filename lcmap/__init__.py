"""lcmap: update 1 m land-cover maps from 10-30 m historical labels (Paraformer on TorchGeo)."""

__version__ = "0.1.0"
