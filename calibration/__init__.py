"""covspec.calibration: measures what the runtimes tune themselves with (`covspec calibrate`: the link,
the draft's step and acceptance, the edge's verify time), written as the profile the device reads."""
