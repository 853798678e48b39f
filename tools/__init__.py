"""Tools beside the method, run from the project's root: bench.py (speed and memory), gap.py (the modality gap)."""
