"""Errors raised for bad user input: each message names the file and what to do."""


class LcmapInputError(Exception):
    """Bad input (file, CRS, AOI, legend, ...). The CLI prints its message and exits with code 2."""
