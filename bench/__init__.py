"""Side-by-side benchmark of the sidecar against the per-process TRL pipeline: ``python -m bench --help``."""
