"""Token counts, calibration and ETA for `runner plan`."""
