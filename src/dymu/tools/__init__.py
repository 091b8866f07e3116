"""Tools built on the library: calibration, analysis, benchmarks and the offline demo."""
