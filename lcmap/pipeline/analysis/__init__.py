"""After the map: evaluation against a reference, zonal statistics, change maps, STAC Items."""
