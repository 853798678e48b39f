"""The run machinery train.py and evaluate.py stand on: flags, recipes, preflight, runtime (devices, DDP, the data
order), checkpoints, run_folders, cache (--cache_visual), interop (checkpoint formats that are not ours)."""
