"""covspec.calibration: measures what the runtimes tune themselves with (not built yet)."""
