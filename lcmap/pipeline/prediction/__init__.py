"""Prediction: planning the grid, windows and blocks, running them (in process or on Dask), writing the COG."""
