"""One-off studies behind the README's and results/' figures, run from a checkout (`python -m benchmarks.NAME`);
not installed with the package."""
